"""Partitioners: coverage, disjointness, reproducibility, heterogeneity and their error messages."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fl_lightning.data.partition import (
    PARTITIONERS,
    dirichlet,
    iid,
    label_entropy,
    natural,
    partition,
    pathological,
    shard,
)

PROPERTY = settings(max_examples=25, deadline=None)


def _check_disjoint_sorted(parts: list[np.ndarray], n: int, num_clients: int, covering: bool = True) -> None:
    assert len(parts) == num_clients
    for p in parts:
        assert p.dtype == np.int64 and p.ndim == 1 and len(p) > 0
        assert np.all(np.diff(p) > 0), "indices must be sorted and unique within a client"
        assert p.min() >= 0 and p.max() < n
    everything = np.concatenate(parts)
    assert len(np.unique(everything)) == len(everything), "a sample landed in two clients"
    if covering:
        assert len(everything) == n, "a sample landed in no client"


@st.composite
def labelled(draw: st.DrawFn, min_per_client: int = 1, max_clients: int = 8) -> tuple[np.ndarray, int, int]:
    """(labels, num_clients, seed) with at least ``min_per_client`` samples per client."""
    num_clients = draw(st.integers(1, max_clients))
    num_classes = draw(st.integers(1, 10))
    n = draw(st.integers(num_clients * min_per_client, num_clients * min_per_client + 200))
    seed = draw(st.integers(0, 2**31 - 1))
    labels = np.random.default_rng(draw(st.integers(0, 10**6))).integers(0, num_classes, n)
    return labels, num_clients, seed


def _classes_of(labels: np.ndarray, parts: list[np.ndarray]) -> list[set[int]]:
    return [set(np.unique(labels[p]).tolist()) for p in parts]


# ---------------------------------------------------------------------------------------------- properties
@PROPERTY
@given(labelled())
def test_iid_covers_every_sample_once_with_sizes_within_one(case: tuple[np.ndarray, int, int]) -> None:
    labels, k, seed = case
    parts = iid(labels, k, seed=seed)
    _check_disjoint_sorted(parts, len(labels), k)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@PROPERTY
@given(labelled(min_per_client=30), st.floats(1.0, 10.0), st.booleans())
def test_dirichlet_covers_every_sample_once_and_respects_min_partition_size(
    case: tuple[np.ndarray, int, int], alpha: float, self_balancing: bool
) -> None:
    labels, k, seed = case
    try:
        parts = dirichlet(labels, k, alpha=alpha, min_partition_size=5, self_balancing=self_balancing, seed=seed)
    except ValueError as err:  # a legitimately unlucky draw; must say what to change
        assert "min_partition_size" in str(err)
        assume(False)
    _check_disjoint_sorted(parts, len(labels), k)
    assert min(len(p) for p in parts) >= 5


@PROPERTY
@given(labelled(), st.integers(1, 4))
def test_shard_covers_every_sample_once(case: tuple[np.ndarray, int, int], shards_per_client: int) -> None:
    labels, k, seed = case
    assume(len(labels) >= k * shards_per_client)
    parts = shard(labels, k, shards_per_client=shards_per_client, seed=seed)
    _check_disjoint_sorted(parts, len(labels), k)


@PROPERTY
@given(st.integers(1, 8), st.integers(1, 10), st.integers(0, 40), st.data())
def test_pathological_gives_exactly_k_classes_and_uses_every_class_when_it_can(
    num_clients: int, num_classes: int, extra: int, data: st.DataObject
) -> None:
    k = data.draw(st.integers(1, num_classes), label="classes_per_client")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    rng = np.random.default_rng(seed)
    # every class has at least num_clients samples, so no class can run out of samples for its holders
    labels = rng.permutation(np.concatenate([np.repeat(np.arange(num_classes), num_clients),
                                             rng.integers(0, num_classes, extra)]))
    parts = pathological(labels, num_clients, classes_per_client=k, seed=seed)
    covering = num_clients * k >= num_classes
    _check_disjoint_sorted(parts, len(labels), num_clients, covering=covering)
    assert all(len(c) == k for c in _classes_of(labels, parts))
    if covering:
        assert set().union(*_classes_of(labels, parts)) == set(range(num_classes))


@PROPERTY
@given(labelled(max_clients=12), st.integers(1, 10))
def test_pathological_either_meets_its_contract_or_says_what_to_lower(
    case: tuple[np.ndarray, int, int], classes_per_client: int
) -> None:
    # arbitrary labels: rare classes may have fewer samples than the clients that must hold them
    labels, k, seed = case
    num_classes = len(np.unique(labels))
    try:
        parts = pathological(labels, k, classes_per_client=classes_per_client, seed=seed)
    except ValueError as err:
        message = str(err)
        if classes_per_client > num_classes:
            assert f"classes_per_client must be in [1, {num_classes}]" in message
        else:
            assert "lower classes_per_client" in message and "or num_clients" in message
        return
    _check_disjoint_sorted(parts, len(labels), k, covering=k * classes_per_client >= num_classes)
    assert all(len(c) == classes_per_client for c in _classes_of(labels, parts))


@PROPERTY
@given(st.sampled_from(["iid", "dirichlet", "shard", "pathological", "natural"]), labelled(min_per_client=20))
def test_the_same_seed_gives_the_same_partition(name: str, case: tuple[np.ndarray, int, int]) -> None:
    labels, k, seed = case
    groups = np.arange(len(labels)) % (k + 3)  # natural: k of k + 3 groups, chosen by the seed
    kwargs = {"dirichlet": {"alpha": 5.0, "min_partition_size": 1}, "pathological": {"classes_per_client": 1}}.get(
        name, {}
    )
    try:
        first = partition(name, labels, k, seed=seed, groups=groups, **kwargs)
    except ValueError:  # an unlucky Dirichlet draw or a class with fewer samples than clients holding it
        assume(False)
    second = partition(name, labels, k, seed=seed, groups=groups, **kwargs)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


@PROPERTY
@given(st.integers(1, 40), st.integers(0, 2**31 - 1), st.data())
def test_natural_gives_each_client_one_whole_group(num_groups: int, seed: int, data: st.DataObject) -> None:
    rng = np.random.default_rng(seed)
    groups = rng.permutation(np.concatenate([np.arange(num_groups), rng.integers(0, num_groups, 100)])) * 7 + 3
    labels = rng.integers(0, 5, len(groups))
    k = data.draw(st.integers(1, num_groups), label="num_clients")
    parts = natural(labels, k, groups=groups, seed=seed)
    _check_disjoint_sorted(parts, len(labels), k, covering=k == num_groups)
    for p in parts:
        (g,) = np.unique(groups[p])
        assert np.array_equal(p, np.flatnonzero(groups == g)), "a client must hold its whole group"


# ---------------------------------------------------------------------------------------------- behaviour
def _balanced(num_classes: int = 10, per_class: int = 100, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


def test_different_seeds_give_different_partitions() -> None:
    labels = _balanced()
    for name in ("iid", "dirichlet", "shard", "pathological"):
        a, b = partition(name, labels, 10, seed=0), partition(name, labels, 10, seed=1)
        assert not all(np.array_equal(x, y) for x, y in zip(a, b)), name


def test_small_alpha_is_more_heterogeneous_than_large_alpha() -> None:
    labels = _balanced()
    entropy = {
        alpha: np.mean([label_entropy(labels, dirichlet(labels, 10, alpha=alpha, min_partition_size=1, seed=s))
                        for s in range(5)])
        for alpha in (0.1, 1.0, 100.0)
    }
    assert entropy[0.1] < entropy[1.0] < entropy[100.0]
    assert entropy[100.0] > 0.95 * np.log(10)  # near IID: every client sees nearly uniform labels
    assert entropy[0.1] < 0.6 * np.log(10)


def test_alpha_per_client_is_accepted_and_checked() -> None:
    labels = _balanced()
    parts = dirichlet(labels, 4, alpha=[0.5, 1.0, 2.0, 4.0], min_partition_size=1, seed=0)
    _check_disjoint_sorted(parts, len(labels), 4)
    with pytest.raises(ValueError, match="alpha must be one float or one float per client"):
        dirichlet(labels, 4, alpha=[1.0, 1.0])


def test_self_balancing_evens_out_client_sizes() -> None:
    labels = _balanced()

    def spread(balanced: bool) -> float:
        return float(np.mean([
            np.std([len(p) for p in dirichlet(labels, 10, alpha=0.3, min_partition_size=0,
                                              self_balancing=balanced, seed=s)])
            for s in range(20)
        ]))

    assert spread(True) < 0.8 * spread(False)


def test_dirichlet_is_quantity_skew_on_a_single_class() -> None:
    labels = np.zeros(500, dtype=np.int64)  # what the datamodule passes for regression data
    parts = dirichlet(labels, 5, alpha=1.0, min_partition_size=5, seed=3)
    _check_disjoint_sorted(parts, 500, 5)
    assert len({len(p) for p in parts}) > 1


def test_shard_gives_each_client_at_most_its_shards_classes() -> None:
    labels = _balanced()  # 10 classes x 100, 20 shards of 50: each shard lies within one class
    parts = shard(labels, 10, shards_per_client=2, seed=0)
    _check_disjoint_sorted(parts, 1000, 10)
    assert all(len(c) <= 2 for c in _classes_of(labels, parts))
    assert all(len(p) == 100 for p in parts)


def test_shard_spreads_leftover_samples() -> None:
    labels = _balanced(per_class=101)  # 1010 samples into 21 shards: sizes 48 and 49
    parts = shard(labels, 7, shards_per_client=3, seed=0)
    _check_disjoint_sorted(parts, 1010, 7)


def test_pathological_spreads_classes_evenly_over_clients() -> None:
    labels = _balanced()
    parts = pathological(labels, 10, classes_per_client=2, seed=0)
    holders = np.zeros(10, dtype=int)
    for classes in _classes_of(labels, parts):
        holders[list(classes)] += 1
    assert np.all(holders == 2)
    _check_disjoint_sorted(parts, 1000, 10)


def test_pathological_fails_when_a_class_has_fewer_samples_than_holders() -> None:
    labels = np.array([0] * 50 + [1] * 50 + [2])
    with pytest.raises(ValueError, match=r"class 2 has 1 samples but 6 clients .* lower classes_per_client"):
        pathological(labels, 6, classes_per_client=3, seed=0)


def test_natural_picks_a_seeded_subset_of_groups() -> None:
    groups = np.repeat(np.arange(20), 5)
    labels = np.zeros(100, dtype=np.int64)
    a = natural(labels, 6, groups=groups, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, natural(labels, 6, groups=groups, seed=1)))
    chosen = [int(groups[p[0]]) for p in a]
    assert chosen == sorted(chosen) and len(set(chosen)) == 6
    other = [int(groups[p[0]]) for p in natural(labels, 6, groups=groups, seed=2)]
    assert chosen != other


def test_front_door_gives_groups_only_to_partitioners_that_take_them() -> None:
    labels = _balanced()
    groups = np.arange(1000) % 7
    iid_parts = partition("iid", labels, 5, seed=0, groups=groups)
    assert all(np.array_equal(a, b) for a, b in zip(iid_parts, iid(labels, 5, seed=0)))
    assert len(partition("natural", labels, 7, seed=0, groups=groups)) == 7


def test_registry_lists_the_partitioners() -> None:
    assert PARTITIONERS.names() == ["dirichlet", "flwr", "iid", "natural", "pathological", "shard"]


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("name", "num_clients", "kwargs", "pattern"),
    [
        ("iid", 0, {}, r"num_clients must be in \[1, 1000\]"),
        ("iid", 1001, {}, r"num_clients must be in \[1, 1000\]"),
        ("iid", 2.5, {}, r"num_clients must be an integer"),
        ("iid", 2, {"seed": -1}, r"seed must be a non-negative integer"),
        ("dirichlet", 10, {"alpha": 0.0}, r"alpha must be > 0"),
        ("dirichlet", 10, {"alpha": -1.0}, r"alpha must be > 0"),
        ("dirichlet", 10, {"alpha": float("nan")}, r"alpha must be > 0"),
        ("dirichlet", 10, {"min_partition_size": 101}, r"min_partition_size must be in \[0, 100\]"),
        ("dirichlet", 10, {"min_partition_size": -1}, r"min_partition_size must be in \[0, 100\]"),
        ("dirichlet", 10, {"max_retries": 0}, r"max_retries must be in \[1, "),
        ("dirichlet", 10, {"alpha": 0.01, "min_partition_size": 99}, r"lower min_partition_size .*raise alpha"),
        ("shard", 10, {"shards_per_client": 101}, r"shards_per_client must be in \[1, 100\]"),
        ("shard", 10, {"shards_per_client": 0}, r"shards_per_client must be in \[1, 100\]"),
        ("pathological", 10, {"classes_per_client": 11}, r"classes_per_client must be in \[1, 10\]"),
        ("pathological", 10, {"classes_per_client": 0}, r"classes_per_client must be in \[1, 10\]"),
        ("natural", 10, {}, r"natural needs groups"),
        ("natural", 8, {"groups": np.arange(1000) % 7}, r"num_clients must be in \[1, 7\]"),
        ("natural", 3, {"groups": np.arange(10)}, r"groups must hold one id per sample"),
        ("dirichlet", 10, {"beta": 1.0}, r"unknown option\(s\) beta; accepted: alpha, min_partition_size, "
                                         r"self_balancing, max_retries"),
        ("iid", 10, {"alpha": 1.0}, r"unknown option\(s\) alpha; accepted: none besides seed"),
        ("quantity", 10, {}, r"unknown partitioner 'quantity'; known: dirichlet, flwr, iid"),
    ],
)
def test_errors_name_the_parameter_and_its_range(name: str, num_clients: int, kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        partition(name, _balanced(), num_clients, **kwargs)


def test_labels_must_be_one_dimensional() -> None:
    with pytest.raises(ValueError, match="labels must be a 1-D array"):
        iid(np.zeros((4, 2)), 2)
