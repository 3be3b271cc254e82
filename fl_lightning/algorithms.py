"""Algorithm presets (DESIGN §1.3): named, frozen hyper-parameters that expand into callbacks.

Use them three ways, all equivalent:

- Python, callbacks: ``Trainer(callbacks=fl_lightning.algorithms.proxskip(p=0.2))``;
- Python, on the module: ``FederatedLightningModule(model, lr, algorithm=ProxSkip(p=0.2))``;
- YAML: ``--config configs/algorithms/proxskip.yaml`` (sets ``model.algorithm``).

Every preset is also reachable by composing the callbacks of ``fl_lightning.callbacks`` by hand.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

from lightning.pytorch import Callback

from fl_lightning.callbacks import (
    ClientSampling,
    Compression,
    ControlVariates,
    DifferentialPrivacy,
    L1Prox,
    LocalWork,
    NormalizedAveraging,
    ProximalTerm,
    Scaffold,
    ServerOptimizer,
    SkipSchedule,
    TopKPruning,
)
from fl_lightning.callbacks.compression import Method
from fl_lightning.callbacks.control_variates import Reference
from fl_lightning.callbacks.pruning import ParamSelection
from fl_lightning.callbacks.sampling import SamplingMode
from fl_lightning.callbacks.schedule import ScheduleMode
from fl_lightning.hparams import to_plain
from fl_lightning.ops import Scope
from fl_lightning.privacy import AccountantKind, NoiseAt
from fl_lightning.registry import Registry


class Algorithm:
    """A federated algorithm: hyper-parameters (a frozen dataclass in subclasses) → callbacks."""

    name: ClassVar[str] = "custom"

    def callbacks(self) -> list[Callback]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """The preset's name and hyper-parameters (run names, legends, ``wandb.config["algorithm"]``)."""
        return {"name": self.name, **to_plain(asdict(self))}  # type: ignore[call-overload]

    def spec(self) -> dict[str, Any]:
        """The preset as LightningCLI writes it, ``{"class_path": ..., "init_args": {...}}`` of plain Python
        values: what checkpoints store in their hyper-parameters, so ``--ckpt_path`` and
        ``load_from_checkpoint`` can re-parse it."""
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": to_plain(asdict(self))}  # type: ignore[call-overload]

    def __post_init__(self) -> None:
        self.callbacks()  # invalid values fail at construction, with the callback's message


ALGORITHMS: Registry[type[Algorithm]] = Registry("algorithm")


def register_algorithm(name: str) -> Any:
    def decorator(cls: type[Algorithm]) -> type[Algorithm]:
        cls.name = name
        return ALGORITHMS.register(name)(cls)

    return decorator


def get_algorithm(name: str, **kwargs: Any) -> Algorithm:
    """The preset ``name`` with hyper-parameters ``kwargs``."""
    cls = ALGORITHMS.get(name)
    accepted = set(inspect.signature(cls).parameters)
    unknown = set(kwargs) - accepted
    if unknown:
        raise ValueError(f"{name} does not take {sorted(unknown)}; it accepts {sorted(accepted)}")
    return cls(**kwargs)


def class_path_of(name: str) -> str:
    """The import path of the preset registered as ``name`` (``sparse_proxskip`` →
    ``fl_lightning.algorithms.SparseProxSkip``), for ``--model.algorithm sparse_proxskip``."""
    cls = ALGORITHMS.get(name)
    return f"{cls.__module__}.{cls.__qualname__}"


def resolve_algorithm(value: Algorithm | Mapping[str, Any] | str | None) -> Algorithm | None:
    """An :class:`Algorithm` from what a user or a checkpoint gives: an instance, a preset name
    (``"sparse_proxskip"``), ``{"class_path": ..., "init_args": {...}}`` (:meth:`Algorithm.spec`, also with a
    preset name as class path) or a ``describe()`` dict ``{"name": ..., **hyper-parameters}`` (checkpoints of
    version 0.1). Only registered presets and already imported subclasses are built: a checkpoint cannot
    make this import code."""
    if value is None or isinstance(value, Algorithm):
        return value
    if isinstance(value, str):
        return get_algorithm(value) if value in ALGORITHMS else _class_named(value)()
    if not isinstance(value, Mapping):
        raise TypeError(f"algorithm must be a preset, its name or its spec dict, got {type(value).__name__}")
    if "class_path" in value:
        path = str(value["class_path"])
        cls = ALGORITHMS.get(path) if path in ALGORITHMS else _class_named(path)
        return cls(**dict(value.get("init_args") or {}))
    if "name" in value:
        kwargs = {k: v for k, v in value.items() if k != "name"}
        return get_algorithm(str(value["name"]), **kwargs)
    raise ValueError(f"an algorithm spec needs 'class_path' (and 'init_args') or 'name', got keys {sorted(value)}")


def algorithm_class_of(value: Algorithm | Mapping[str, Any] | str | None) -> str | None:
    """The import path of the preset ``value`` describes (an instance, a name, a spec or a v0.1 describe dict, as
    :func:`resolve_algorithm` takes), None without one: what decides whether a checkpoint's state fits a run."""
    algorithm = resolve_algorithm(value)
    return None if algorithm is None else f"{type(algorithm).__module__}.{type(algorithm).__qualname__}"


def _class_named(path: str) -> type[Algorithm]:
    module_name, _, cls_name = path.rpartition(".")
    module = sys.modules.get(module_name)
    cls = getattr(module, cls_name, None) if module is not None else None
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
        raise ValueError(
            f"unknown algorithm {path!r}: give a preset name ({', '.join(ALGORITHMS.names())}) or the import "
            "path of an Algorithm subclass whose module is imported"
        )
    return cls


def _preset_function(cls: type[Algorithm]) -> Any:
    """``fl_lightning.algorithms.<name>(**hyper-parameters) -> list of callbacks``."""

    @functools.wraps(cls, assigned=("__doc__",), updated=())
    def preset(**kwargs: Any) -> list[Callback]:
        return get_algorithm(cls.name, **kwargs).callbacks()

    preset.__name__ = preset.__qualname__ = cls.name
    preset.__signature__ = inspect.signature(cls).replace(return_annotation="list[Callback]")  # type: ignore[attr-defined]
    return preset


@dataclass(frozen=True)
class _Rounds(Algorithm):
    """Shared hyper-parameters of the FedAvg-style baselines: ``local_steps`` per round (a fixed schedule), an
    optional random ``cohort_size`` per round, ``seed`` of both."""

    local_steps: int = 5
    cohort_size: int | None = None
    seed: int | None = None

    def _rounds(self) -> list[Callback]:
        cbs: list[Callback] = [SkipSchedule(k=self.local_steps, mode="fixed", seed=self.seed)]
        if self.cohort_size is not None:
            cbs.append(ClientSampling(self.cohort_size, seed=self.seed))
        return cbs


@register_algorithm("fedavg")
@dataclass(frozen=True)
class FedAvg(_Rounds):
    """FedAvg (McMahan et al. 2017): k local SGD steps, then x_i ← Σ_j w_j x̂_j; no control variates.

    With ``cohort_size`` only a random cohort trains in each round (weights renormalised over it).
    """

    def callbacks(self) -> list[Callback]:
        return self._rounds()


@register_algorithm("fedavg_topk")
@dataclass(frozen=True)
class FedAvgTopK(_Rounds):
    """FedAvg with TopK at the server (the seed paper's "FedAvg + TopK" baseline): k dense local SGD steps, then
    x_i ← TopK(Σ_j w_j x̂_j): the average is pruned to ⌈δ·d⌉ weights and broadcast. No control variates, so
    nothing carries the pruned mass into the next round; the uplink is dense, the downlink sparse. ``density``,
    ``scope`` and ``params`` as in the TopK presets (:class:`SparseProxSkip`); ``density=1`` is :class:`FedAvg`.
    Callbacks: SkipSchedule(k, fixed) (+ ClientSampling), TopKPruning(at=server).
    """

    density: float = 0.1
    scope: Scope = "global"
    params: ParamSelection = "weights"

    def callbacks(self) -> list[Callback]:
        return [*self._rounds(), TopKPruning(self.density, at="server", scope=self.scope, params=self.params)]


@register_algorithm("proxskip")
@dataclass(frozen=True)
class ProxSkip(Algorithm):
    """ProxSkip / Scaffnew (Mishchenko et al., ICML 2022), DESIGN §1.2 without pruning:

    x̂_i = x_i − γ (∇f_i(x_i) − h_i);  with probability p:  x̄ = Σ_i w_i (x̂_i − (γ/p) h_i),
    h_i ← h_i + (p/γ)(x̄ − x̂_i),  x_i ← x̄;  otherwise x_i ← x̂_i.

    ``mode="fixed"`` uses exactly k = 1/p local steps per round; 1/p must then be an integer (p = 0.4 is refused).
    """

    p: float = 0.2
    mode: ScheduleMode = "bernoulli"
    reference: Reference = "mean"
    seed: int | None = None

    def callbacks(self) -> list[Callback]:
        return [SkipSchedule(p=self.p, mode=self.mode, seed=self.seed), ControlVariates(reference=self.reference)]


@dataclass(frozen=True)
class _Sparse(Algorithm):
    """Shared hyper-parameters of the TopK presets. ``mode="fixed"`` (k = 1/p local steps per round, so p = 1/k
    for an integer k) is the seed paper's setting; ``bernoulli`` gives ProxSkip's random rounds, for any p."""

    p: float = 0.2
    mode: ScheduleMode = "fixed"
    density: float = 0.1
    scope: Scope = "global"
    params: ParamSelection = "weights"
    seed: int | None = None

    def _schedule(self) -> SkipSchedule:
        return SkipSchedule(p=self.p, mode=self.mode, seed=self.seed)

    def _topk(self, *at: str) -> TopKPruning:
        return TopKPruning(self.density, at=at, scope=self.scope, params=self.params)


@register_algorithm("sparse_proxskip")
@dataclass(frozen=True)
class SparseProxSkip(_Sparse):
    """Sparse-ProxSkip (Meinhardt, Yi, Condat, Richtárik, arXiv 2405.20623): prune at the clients.

    x̂_i = TopK(x_i − γ (∇f_i(x_i) − h_i))          after every local step ("step 7")
    with probability p:  x̄ = Σ_i w_i x̂_i,  h_i ← h_i + (p/γ)(x̄ − x̂_i),  x_i ← TopK(x̄)  ("step 9")

    Control variates stay zero-sum (r = x̄), so Σ_i w_i (x̂_i − (γ/p) h_i) = Σ_i w_i x̂_i: clients upload
    their sparse x̂_i (``ControlVariates(uplink="local")``), ⌈δ·d⌉ non-zeros of the pruned tensors each.
    Reconstruction choices, with their switches: TopK over all pruned tensors (``scope="global"``, or
    ``"layer"``); weights only, not biases/norms (``params``). SGD momentum is zeroed wherever TopK zeroes
    a weight, so it cannot revive one (DESIGN §1.4).
    Callbacks: SkipSchedule, ControlVariates(reference="mean", uplink="local"), TopKPruning(at=[local, received]).
    """

    def callbacks(self) -> list[Callback]:
        return [self._schedule(), ControlVariates(reference="mean", uplink="local"), self._topk("local", "received")]


@register_algorithm("sparse_proxskip_local")
@dataclass(frozen=True)
class SparseProxSkipLocal(_Sparse):
    """Sparse-ProxSkip-Local (the seed paper, v2): pruning inside local training through a straight-through
    estimator (DESIGN §1.4).

    x̂_i = x_i − γ (∇f_i(TopK(x_i)) − h_i)          forward and gradient at TopK(x_i), dense update
    with probability p:  x̂_i ← TopK(x̂_i) (the uplink is sparse),  x̄ = Σ_i w_i x̂_i,
                         h_i ← h_i + (p/γ)(x̄ − x̂_i),  x_i ← TopK(x̄) (or x̄ with ``prune_broadcast=False``)

    Reconstruction choices: TopK(x̂_i) replaces x̂_i for the whole round, so the control variates are updated
    with the pruned model the client sent and stay zero-sum (as in :class:`SparseProxSkip`, whose uplink
    form it shares); whether the broadcast is pruned as well is ours (``prune_broadcast``, default True so
    the global model is sparse); ``scope`` and ``params`` as in :class:`SparseProxSkip`. Momentum is not
    masked (STE: pruned weights may grow back).
    Callbacks: SkipSchedule, ControlVariates(reference="mean", uplink="local"),
    TopKPruning(at=[forward, round, received]).
    """

    prune_broadcast: bool = True

    def callbacks(self) -> list[Callback]:
        at = ("forward", "round", "received") if self.prune_broadcast else ("forward", "round")
        return [self._schedule(), ControlVariates(reference="mean", uplink="local"), self._topk(*at)]


@register_algorithm("server_pruning")
@dataclass(frozen=True)
class ServerPruning(_Sparse):
    """Prune at the server, naively (the seed paper's failing baseline):

    x̄ = Σ_i w_i (x̂_i − (γ/p) h_i),  b = TopK(x̄),  h_i ← h_i + (p/γ)(b − x̂_i),  x_i ← b

    Σ_i w_i h_i becomes (p/γ)(TopK(x̄) − x̄) ≠ 0 after every round: the pruned mass is fed back into every
    local step, amplified by 1/p — worse as p shrinks.
    Callbacks: SkipSchedule, ControlVariates(reference="broadcast"), TopKPruning(at=server).
    """

    def callbacks(self) -> list[Callback]:
        return [self._schedule(), ControlVariates(reference="broadcast"), self._topk("server")]


@register_algorithm("server_pruning_modified")
@dataclass(frozen=True)
class ServerPruningModified(_Sparse):
    """Prune at the server, but update the control variates with the unpruned average (the paper's second
    baseline): b = TopK(x̄), h_i ← h_i + (p/γ)(x̄ − x̂_i), x_i ← b. Zero-sum, but the uplink stays dense.
    Callbacks: SkipSchedule, ControlVariates(reference="mean"), TopKPruning(at=server).
    """

    def callbacks(self) -> list[Callback]:
        return [self._schedule(), ControlVariates(reference="mean"), self._topk("server")]


@register_algorithm("randprox_l1")
@dataclass(frozen=True)
class RandProxL1(Algorithm):
    """ProxSkip with the ℓ1 prox at the clients (RandProx, Condat & Richtárik): solves min f(x) + λ‖x‖₁.

    x̂_i = prox_{γλ‖·‖₁}(x_i − γ (∇f_i(x_i) − h_i))   (soft-thresholding, after every local step)
    with probability p:  x̄ = Σ_i w_i x̂_i,  h_i ← h_i + (p/γ)(x̄ − x̂_i),  x_i ← x̄

    Zero-sum control variates make the fixed point the exact minimiser of f + λ‖·‖₁ (see
    :class:`~fl_lightning.callbacks.L1Prox`). The prox acts on ``params`` (weights by default); λ is a
    penalty weight, not a density target. Uplink: as in :class:`SparseProxSkip`, Σ_i w_i h_i = 0 makes DESIGN §1.2's
    x̄ = Σ_i w_i (x̂_i − (γ/p) h_i) equal Σ_i w_i x̂_i, so clients send the prox output x̂_i
    (``ControlVariates(uplink="local")``), exactly zero off its support, and the uplink is billed at its sparse
    encoding. (The shifted form sends the same x̄ as a dense message, and leaves float rounding residues of
    (γ/p) Σ_i w_i h_i, ~1e-8 in float32, where the solution is zero: the global model then reads density 1.)
    Callbacks: SkipSchedule, ControlVariates(reference="mean", uplink="local"), L1Prox(lam).
    """

    p: float = 0.2
    mode: ScheduleMode = "bernoulli"
    lam: float = 1e-3
    params: ParamSelection = "weights"
    seed: int | None = None

    def callbacks(self) -> list[Callback]:
        return [SkipSchedule(p=self.p, mode=self.mode, seed=self.seed),
                ControlVariates(reference="mean", uplink="local"), L1Prox(self.lam, params=self.params)]


@register_algorithm("fedcomloc")
@dataclass(frozen=True)
class FedComLoc(_Sparse):
    """FedComLoc (Yi et al. 2024): Scaffnew with a compressor C in one place (``variant``), r = what was compressed:

    - ``local``:  x̂_i = x_i − γ (∇f_i(C(x_i)) − h_i), C in the forward pass with an STE (§1.4); dense rounds,
      r = x̄ (zero-sum). C = TopK_δ of the weights (``TopKPruning(at="forward")``, ``scope``/``params`` as in
      the other TopK presets) or nearest-level quantisation of every tensor (``Compression("forward")``);
    - ``com``:    u_i = C(x̂_i − (γ/p) h_i),  x̄ = Σ_i w_i u_i,  h_i ← h_i + (p/γ)(x̄ − x̂_i),  x_i ← x̄;
    - ``global``: x̄ = Σ_i w_i (x̂_i − (γ/p) h_i),  b = C(x̄),  h_i ← h_i + (p/γ)(b − x̂_i),  x_i ← b.

    C is TopK_δ (``method="topk"``; on the wire it compresses the whole message, biases included) or QSGD
    quantisation with ``bits`` (``"quantize"``: stochastic and unbiased on the wire). With compression on
    the wire Σ_i w_i h_i is no longer exactly zero (``cv/sum_norm`` shows by how much).
    Callbacks: SkipSchedule, ControlVariates(reference="mean" for local/com, "broadcast" for global), then
    TopKPruning(at=forward) or Compression(forward|uplink|downlink).
    """

    variant: Literal["local", "com", "global"] = "com"
    method: Method = "topk"
    bits: int = 8

    def callbacks(self) -> list[Callback]:
        if self.variant not in ("local", "com", "global"):
            raise ValueError(f"fedcomloc variant must be 'local', 'com' or 'global', got {self.variant!r}")
        if self.variant == "local" and self.method == "topk":
            return [self._schedule(), ControlVariates(reference="mean"), self._topk("forward")]
        direction = {"local": "forward", "com": "uplink", "global": "downlink"}[self.variant]
        reference = "broadcast" if self.variant == "global" else "mean"
        compressor = Compression(direction, self.method, density=self.density if self.method == "topk" else None,
                                 bits=self.bits, scope=self.scope, seed=self.seed)
        return [self._schedule(), ControlVariates(reference=reference), compressor]


@register_algorithm("fedprox")
@dataclass(frozen=True)
class FedProx(_Rounds):
    """FedProx (Li et al., MLSys 2020, eq. (2)): local steps on f_i(x) + (μ/2)‖x − x^t‖², x^t the round's global
    model, then x ← Σ_i w_i x̂_i. μ = 0 is FedAvg bit for bit; larger μ keeps clients nearer x^t.
    Callbacks: SkipSchedule(k, fixed) (+ ClientSampling), ProximalTerm(mu).
    """

    mu: float = 0.01

    def callbacks(self) -> list[Callback]:
        return [*self._rounds(), ProximalTerm(self.mu)]


@register_algorithm("scaffold")
@dataclass(frozen=True)
class SCAFFOLD(_Rounds):
    """SCAFFOLD (Karimireddy et al., ICML 2020, Algorithm 1, option II): local steps g_i − c_i + c;
    c_i⁺ = c_i − c + (x − y_i)/(K_i η_l); x ← x + η_g Σ w_i (y_i − x); c ← c + Σ (w_i/Σ_j w_j)(c_i⁺ − c_i).
    The uplink counts y_i and Δc_i, the downlink x and c. Callbacks: SkipSchedule(k, fixed) (+ ClientSampling),
    Scaffold(server_lr).
    """

    server_lr: float = 1.0

    def callbacks(self) -> list[Callback]:
        return [*self._rounds(), Scaffold(self.server_lr)]


@dataclass(frozen=True)
class _FedOpt(_Rounds):
    """Server optimizers on the pseudo-gradient Δ = Σ_i w_i x̂_i − x (Reddi et al., ICLR 2021, Algorithm 2)."""

    server_lr: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    rule: ClassVar[str] = "adam"

    def callbacks(self) -> list[Callback]:
        return [*self._rounds(), ServerOptimizer(self.rule, self.server_lr, beta1=self.beta1, beta2=self.beta2,
                                                 tau=self.tau)]


@register_algorithm("fedadam")
@dataclass(frozen=True)
class FedAdam(_FedOpt):
    """FedAdam: m ← β₁m + (1−β₁)Δ, v ← β₂v + (1−β₂)Δ², x ← x + η m/(√v + τ); m₀ = 0, v₀ = τ², no bias correction.
    Callbacks: SkipSchedule(k, fixed) (+ ClientSampling), ServerOptimizer("adam")."""

    rule: ClassVar[str] = "adam"


@register_algorithm("fedyogi")
@dataclass(frozen=True)
class FedYogi(_FedOpt):
    """FedYogi: as FedAdam with v ← v − (1−β₂)Δ² sign(v − Δ²). Callbacks: ..., ServerOptimizer("yogi")."""

    rule: ClassVar[str] = "yogi"


@register_algorithm("fedadagrad")
@dataclass(frozen=True)
class FedAdagrad(_FedOpt):
    """FedAdagrad: as FedAdam with v ← v + Δ². Callbacks: ..., ServerOptimizer("adagrad")."""

    rule: ClassVar[str] = "adagrad"


@register_algorithm("fedavgm")
@dataclass(frozen=True)
class FedAvgM(_Rounds):
    """FedAvgM (Hsu et al. 2019): server momentum v ← βv + Δ, x ← x + η v with Δ = Σ_i w_i x̂_i − x.
    Callbacks: SkipSchedule(k, fixed) (+ ClientSampling), ServerOptimizer("avgm")."""

    server_lr: float = 1.0
    server_momentum: float = 0.9

    def callbacks(self) -> list[Callback]:
        return [*self._rounds(), ServerOptimizer("avgm", self.server_lr, momentum=self.server_momentum)]


@register_algorithm("fednova")
@dataclass(frozen=True)
class FedNova(_Rounds):
    """FedNova (Wang et al., NeurIPS 2020): x⁺ = x − τ_eff Σ_i w_i (x − y_i)/τ_i, τ_eff = Σ_i w_i τ_i, for
    unequal local work: τ_i drawn uniformly in [``min_local_steps``, ``local_steps``] every round (or every client
    takes ``local_steps`` when ``min_local_steps`` is None). Plain local SGD (momentum 0).
    Callbacks: SkipSchedule(k, fixed) (+ ClientSampling) (+ LocalWork(low, high)), NormalizedAveraging().
    """

    min_local_steps: int | None = None

    def callbacks(self) -> list[Callback]:
        cbs = self._rounds()
        if self.min_local_steps is not None:
            cbs.append(LocalWork(low=self.min_local_steps, high=self.local_steps, seed=self.seed))
        return [*cbs, NormalizedAveraging()]


@register_algorithm("dp_fedavg")
@dataclass(frozen=True)
class DPFedAvg(_Rounds):
    """DP-FedAvg (McMahan et al., ICLR 2018), client-level DP: k local steps, then with Δ_i = x̂_i − x

    x ← x + (Σ_{i∈S} Δ_i · min(1, C/‖Δ_i‖) + N(0, σ²C²I)) / D,   D = expected cohort size (q·n = cohort_size)

    S is a Poisson sample (every client joins with q = cohort_size / n; ``sampling="poisson"``, the default) or a
    fixed-size one (``"fixed"``, D = cohort_size), or everyone (``cohort_size=None``, D = n). ε at ``delta`` is
    computed by dp-accounting (``accountant`` ``rdp`` or ``pld``) after every round, logged as ``privacy/epsilon``
    and left in ``module.final_metrics``; ``target_epsilon`` stops training before a round would exceed it.
    ``noise="local"`` noises each clipped update instead; ``target_quantile`` turns on adaptive clipping
    (Andrew et al. 2021; ``count_noise`` σ_b of its noisy count, default D/20). Uniform client weights only.
    Callbacks: SkipSchedule(k, fixed) (+ ClientSampling(mode)), DifferentialPrivacy. What the guarantee covers:
    docs/privacy.md.
    """

    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    delta: float = 1e-5
    accountant: AccountantKind = "rdp"
    sampling: SamplingMode = "poisson"
    noise: NoiseAt = "central"
    target_epsilon: float | None = None
    target_quantile: float | None = None
    count_noise: float | None = None

    def callbacks(self) -> list[Callback]:
        if self.accountant == "pld" and self.sampling == "fixed" and self.cohort_size is not None \
                and self.noise == "central":
            raise ValueError("dp_fedavg: the pld accountant does not analyse fixed-size cohorts; use "
                             "accountant='rdp' or sampling='poisson'")
        cbs: list[Callback] = [SkipSchedule(k=self.local_steps, mode="fixed", seed=self.seed)]
        if self.cohort_size is not None:
            cbs.append(ClientSampling(self.cohort_size, seed=self.seed, mode=self.sampling))
        cbs.append(DifferentialPrivacy(self.clip_norm, self.noise_multiplier, self.delta, accountant=self.accountant,
                                       noise=self.noise, target_epsilon=self.target_epsilon,
                                       target_quantile=self.target_quantile, count_noise=self.count_noise,
                                       seed=self.seed))
        return cbs


fedavg = _preset_function(FedAvg)
proxskip = _preset_function(ProxSkip)
sparse_proxskip = _preset_function(SparseProxSkip)
sparse_proxskip_local = _preset_function(SparseProxSkipLocal)
server_pruning = _preset_function(ServerPruning)
server_pruning_modified = _preset_function(ServerPruningModified)
randprox_l1 = _preset_function(RandProxL1)
fedavg_topk = _preset_function(FedAvgTopK)
fedcomloc = _preset_function(FedComLoc)
fedprox = _preset_function(FedProx)
scaffold = _preset_function(SCAFFOLD)
fedadam = _preset_function(FedAdam)
fedyogi = _preset_function(FedYogi)
fedadagrad = _preset_function(FedAdagrad)
fedavgm = _preset_function(FedAvgM)
fednova = _preset_function(FedNova)
dp_fedavg = _preset_function(DPFedAvg)

__all__ = [
    "ALGORITHMS",
    "SCAFFOLD",
    "Algorithm",
    "DPFedAvg",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedAvgTopK",
    "FedComLoc",
    "FedNova",
    "FedProx",
    "FedYogi",
    "ProxSkip",
    "RandProxL1",
    "ServerPruning",
    "ServerPruningModified",
    "SparseProxSkip",
    "SparseProxSkipLocal",
    "class_path_of",
    "dp_fedavg",
    "fedadagrad",
    "fedadam",
    "fedavg",
    "fedavg_topk",
    "fedavgm",
    "fedcomloc",
    "fednova",
    "fedprox",
    "fedyogi",
    "get_algorithm",
    "proxskip",
    "randprox_l1",
    "register_algorithm",
    "resolve_algorithm",
    "scaffold",
    "server_pruning",
    "server_pruning_modified",
    "sparse_proxskip",
    "sparse_proxskip_local",
]
