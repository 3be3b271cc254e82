"""Partitioners: split a training set into clients by its labels (DESIGN §2.3).

Every partitioner takes a 1-D label array and a number of clients and returns one sorted int64 index
array per client; the arrays are disjoint and none is empty. The names and options follow Flower
Datasets where it has them (``iid``, ``dirichlet`` with ``alpha`` / ``min_partition_size`` /
``self_balancing``, ``shard``, ``pathological``, ``natural``); the code is our own. Find them by name
through :func:`partition`, which also checks the options::

    parts = partition("dirichlet", labels, 10, seed=0, alpha=0.1)

The same ``seed`` always gives the same partition.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from fl_lightning.registry import Registry

Partitioner = Callable[..., list[np.ndarray]]
PARTITIONERS: Registry[Partitioner] = Registry("partitioner")

# options every partitioner gets from the front door rather than from ``**kwargs``
_FRONT_DOOR = ("labels", "num_clients", "seed", "groups")


def partition(
    name: str,
    labels: np.ndarray,
    num_clients: int,
    *,
    seed: int = 0,
    groups: np.ndarray | None = None,
    **kwargs: object,
) -> list[np.ndarray]:
    """Split ``labels``' indices into ``num_clients`` clients with the partitioner registered as ``name``.

    Args:
        name: ``iid``, ``dirichlet``, ``shard``, ``pathological``, ``natural``, or ``flwr`` (Flower Datasets'
            partitioners by name, see :mod:`fl_lightning.data.flwr_partitioners`).
        labels: one class label per training sample (for a regression set pass zeros: only ``iid``,
            ``dirichlet`` (quantity skew) and ``natural`` then make sense).
        num_clients: the number of clients.
        seed: seeds every random choice; the same seed gives the same partition.
        groups: a natural client id per sample (FEMNIST writer, ...). Only partitioners that take a
            ``groups`` argument (``natural``) receive it; the others ignore it.
        **kwargs: the partitioner's own options, e.g. ``alpha=0.5`` for ``dirichlet``; or options keyed by
            partitioner, ``dirichlet={"alpha": 0.5}, shard={"shards_per_client": 2}``, of which only
            ``name``'s are used (so a config can switch partitioners without its options leaking across).

    Raises:
        ValueError: for an unknown partitioner or option (naming the accepted ones) and for options
            the data cannot satisfy.
    """
    fn = PARTITIONERS.get(name)
    kwargs = options_for(name, kwargs)
    params = inspect.signature(fn).parameters
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())  # flwr: Flower's options
    accepted = [p for p, v in params.items() if p not in _FRONT_DOOR and v.kind is not inspect.Parameter.VAR_KEYWORD]
    unknown = [] if open_ended else sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"partitioner {name!r} got unknown option(s) {', '.join(unknown)}; "
            f"accepted: {', '.join(accepted) if accepted else 'none besides seed'}"
        )
    call: dict[str, object] = dict(kwargs)
    call["seed"] = seed
    if "groups" in params:
        call["groups"] = groups
    return fn(labels, num_clients, **call)


def options_for(name: str, options: Mapping[str, object]) -> dict[str, object]:
    """The options of partitioner ``name``: ``options`` itself (flat), or ``options[name]`` when ``options``
    is keyed by partitioner names (``{"dirichlet": {"alpha": 0.5}, "shard": {...}}``)."""
    keyed = [k for k in options if k in PARTITIONERS and isinstance(options[k], Mapping)]
    if not keyed:
        return dict(options)
    flat = sorted(set(options) - set(keyed))
    if flat:
        raise ValueError(
            f"partition_args mixes options keyed by partitioner ({', '.join(keyed)}) with flat options "
            f"({', '.join(flat)}); put every option under its partitioner's name"
        )
    return dict(options.get(name) or {})  # type: ignore[call-overload]


# ---------------------------------------------------------------------------------------------- checks
def _labels_and_rng(labels: np.ndarray, num_clients: int, seed: int) -> tuple[np.ndarray, np.random.Generator]:
    """Validate the arguments every partitioner shares; return the labels as an array and the seeded RNG."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array with one label per sample, got shape {labels.shape}")
    n = len(labels)
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)):
        raise ValueError(f"num_clients must be an integer in [1, {n}] (the number of samples), got {num_clients!r}")
    if not 1 <= num_clients <= n:
        raise ValueError(f"num_clients must be in [1, {n}] (at most one client per sample), got {num_clients}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return labels, np.random.default_rng(int(seed))


def _int_option(name: str, value: object, low: int, high: int | None, why: str = "") -> int:
    """An integer option in [low, high] (high None: unbounded), or a ValueError that names it and the range."""
    upper = "∞)" if high is None else f"{high}]"
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer in [{low}, {upper}{why}, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be in [{low}, {upper}{why}, got {value}")
    return int(value)


def _class_order(labels: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """The distinct labels and, for each, the indices of its samples (ascending)."""
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")
    return classes, np.split(order, np.cumsum(counts)[:-1])


def _finish(parts: Sequence[Sequence[np.ndarray] | np.ndarray]) -> list[np.ndarray]:
    """Concatenate each client's pieces into one sorted int64 array."""
    out = []
    for pieces in parts:
        if isinstance(pieces, list):
            arr = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
        else:
            arr = np.asarray(pieces)
        out.append(np.sort(arr.astype(np.int64, copy=False)))
    return out


# ---------------------------------------------------------------------------------------------- partitioners
@PARTITIONERS.register("iid")
def iid(labels: np.ndarray, num_clients: int, *, seed: int = 0) -> list[np.ndarray]:
    """Uniformly random, equal-sized clients: a shuffled split whose sizes differ by at most one."""
    labels, rng = _labels_and_rng(labels, num_clients, seed)
    return _finish(np.array_split(rng.permutation(len(labels)), num_clients))


@PARTITIONERS.register("dirichlet")
def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    *,
    alpha: float | Sequence[float] = 0.5,
    min_partition_size: int | None = None,
    self_balancing: bool = False,
    seed: int = 0,
    max_retries: int = 10,
) -> list[np.ndarray]:
    """Label skew from a Dirichlet prior (Hsu et al., 2019; Flower's ``DirichletPartitioner``).

    For every class, the proportions of its samples that go to the clients are drawn from
    Dir(alpha): a small ``alpha`` (0.1) gives each client few classes, a large one (100) is close to
    IID. ``alpha`` is one concentration for all clients or one per client.

    Args:
        min_partition_size: the fewest samples a client may hold; the whole draw is repeated (up to
            ``max_retries`` draws) until every client has at least this many (and at least one). Default
            (None): derived, min(10, len(labels) // num_clients), so any number of clients the data allow
            works unless a value is given.
        self_balancing: when distributing a class, clients that already hold more than the average
            number of samples per client (len(labels) / num_clients) receive none of it, which keeps
            the client sizes closer together.
        max_retries: how many draws to try before giving up with a ValueError.
    """
    labels, rng = _labels_and_rng(labels, num_clients, seed)
    n = len(labels)
    try:
        alphas = np.asarray(alpha, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"alpha must be a float > 0 or one float > 0 per client, got {alpha!r}") from None
    if alphas.ndim == 0:
        alphas = np.full(num_clients, float(alphas))
    if alphas.shape != (num_clients,):
        raise ValueError(f"alpha must be one float or one float per client ({num_clients}), got shape {alphas.shape}")
    if not np.all(np.isfinite(alphas)) or np.any(alphas <= 0):
        raise ValueError(f"alpha must be > 0 and finite (small = heterogeneous, large = near IID), got {alpha!r}")
    derived = min_partition_size is None
    if derived:
        min_size = min(10, n // num_clients)
    else:
        min_size = _int_option(
            "min_partition_size", min_partition_size, 0, n // num_clients, " (len(labels) // num_clients)"
        )
    max_retries = _int_option("max_retries", max_retries, 1, None)
    need = max(min_size, 1)
    _, by_class = _class_order(labels)
    average = n / num_clients
    smallest = 0
    for _ in range(max_retries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for members in by_class:
            members = rng.permutation(members)
            p = rng.dirichlet(alphas)
            if not np.all(np.isfinite(p)) or p.sum() <= 0:  # underflow at tiny alpha: all to one client
                p = np.zeros(num_clients)
                p[rng.integers(num_clients)] = 1.0
            if self_balancing:
                balanced = np.where(sizes > average, 0.0, p)
                if balanced.sum() > 0:
                    p = balanced
                p = p / p.sum()
            cuts = (np.cumsum(p)[:-1] * len(members)).astype(np.int64)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].append(chunk)
                sizes[client] += len(chunk)
        smallest = int(sizes.min())
        if smallest >= need:
            return _finish(parts)
    raise ValueError(
        f"dirichlet: after {max_retries} draws some client still held only {smallest} samples, fewer than "
        f"min_partition_size={need}{' (derived: min(10, len(labels) // num_clients))' if derived else ''}; "
        f"{'set' if derived else 'lower'} min_partition_size (accepted range [0, {n // num_clients}]), "
        f"raise alpha (now {alpha!r}), use fewer clients or raise max_retries"
    )


@PARTITIONERS.register("shard")
def shard(labels: np.ndarray, num_clients: int, *, shards_per_client: int = 2, seed: int = 0) -> list[np.ndarray]:
    """McMahan et al.'s (2017) pathological non-IID split: sort by label, cut into shards, deal them out.

    The samples (shuffled within each class) are sorted by label and cut into
    ``num_clients * shards_per_client`` contiguous shards whose sizes differ by at most one, so every
    sample lands in a shard; each client receives ``shards_per_client`` shards drawn at random, so
    it sees about ``shards_per_client`` classes.
    """
    labels, rng = _labels_and_rng(labels, num_clients, seed)
    n = len(labels)
    k = _int_option("shards_per_client", shards_per_client, 1, n // num_clients, " (len(labels) // num_clients)")
    shuffled = rng.permutation(n)
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = np.array_split(by_label, num_clients * k)
    dealt = rng.permutation(num_clients * k).reshape(num_clients, k)
    return _finish([[shards[s] for s in row] for row in dealt])


@PARTITIONERS.register("pathological")
def pathological(
    labels: np.ndarray, num_clients: int, *, classes_per_client: int = 2, seed: int = 0
) -> list[np.ndarray]:
    """Every client holds samples of exactly ``classes_per_client`` classes.

    The classes, in a random order, are dealt to the clients as windows of ``classes_per_client``
    consecutive classes whose starts are spread evenly around the circle of classes, so that when
    ``num_clients * classes_per_client >= number of classes`` every class (and so every sample) is
    used and each class is held by about the same number of clients. A class's samples are split
    evenly (at random) among the clients that hold it.
    """
    labels, rng = _labels_and_rng(labels, num_clients, seed)
    classes, by_class = _class_order(labels)
    num_classes = len(by_class)
    k = _int_option("classes_per_client", classes_per_client, 1, num_classes, " (the number of classes)")
    class_order = rng.permutation(num_classes)
    client_order = rng.permutation(num_clients)
    holders: list[list[int]] = [[] for _ in range(num_classes)]
    for window in range(num_clients):
        start = window * num_classes // num_clients
        for j in range(k):
            holders[class_order[(start + j) % num_classes]].append(int(client_order[window]))
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c, members in enumerate(by_class):
        if not holders[c]:
            continue
        if len(members) < len(holders[c]):
            raise ValueError(
                f"pathological: class {classes[c].item()!r} has {len(members)} samples but {len(holders[c])} "
                f"clients must hold it with classes_per_client={k}; lower classes_per_client "
                f"(accepted [1, {num_classes}]) or num_clients"
            )
        for client, chunk in zip(holders[c], np.array_split(rng.permutation(members), len(holders[c]))):
            parts[client].append(chunk)
    return _finish(parts)


@PARTITIONERS.register("natural")
def natural(
    labels: np.ndarray, num_clients: int, *, groups: np.ndarray | None = None, seed: int = 0
) -> list[np.ndarray]:
    """One client per natural group (FEMNIST writer, Shakespeare speaker, ...), given by ``groups``.

    With fewer clients than groups, ``num_clients`` groups are chosen at random (seeded) and the
    other groups' samples are left out; clients come in ascending order of their group id.
    """
    labels, rng = _labels_and_rng(labels, num_clients, seed)
    if groups is None:
        raise ValueError(
            "natural needs groups: one natural client id (writer / user) per sample; "
            "the dataset must provide train_groups (e.g. femnist)"
        )
    groups = np.asarray(groups)
    if groups.shape != labels.shape:
        raise ValueError(f"groups must hold one id per sample: shape {labels.shape}, got {groups.shape}")
    _, members = _class_order(groups)
    num_groups = len(members)
    _int_option("num_clients", num_clients, 1, num_groups, " (the number of distinct groups)")
    chosen = np.arange(num_groups) if num_clients == num_groups else np.sort(
        rng.choice(num_groups, size=num_clients, replace=False)
    )
    return _finish([members[g] for g in chosen])


def label_entropy(labels: np.ndarray, parts: Sequence[np.ndarray]) -> float:
    """Mean over clients of the Shannon entropy (nats) of the client's label distribution.

    0 when every client holds a single class; log(C) when every client holds all C classes equally.
    A quick measure of how heterogeneous a partition is.
    """
    labels = np.asarray(labels)
    _, inverse = np.unique(labels, return_inverse=True)
    entropies = []
    for idx in parts:
        counts = np.bincount(inverse[idx])
        p = counts[counts > 0] / max(len(idx), 1)
        entropies.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(entropies)) if entropies else math.nan


__all__ = ["PARTITIONERS", "dirichlet", "iid", "label_entropy", "natural", "partition", "pathological", "shard"]
