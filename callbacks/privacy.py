"""``DifferentialPrivacy``: client-level (user-level) DP for any preset's round (DP-FedAvg, McMahan et al., ICLR 2018;
adaptive clipping, Andrew et al., NeurIPS 2021). What the guarantee covers: docs/privacy.md.

With x the server model the round starts from, u_i the preset's uplink message (after every compressor) and
Δ_i = u_i − x what client i sends relative to it:

    clip            Δ̃_i = Δ_i · min(1, C / ‖Δ_i‖₂)              ‖·‖ over the whole model, all clients at once
    central noise   x̄ = x + (Σ_{i∈S} Δ̃_i + N(0, σ²C²I)) / D     D = n (everyone), m (fixed size m) or q·n = m
                                                               (Poisson, q = m / n): a fixed denominator
    local noise     u_i = x + Δ̃_i + N(0, σ²C²I) per client, x̄ = mean of the noisy reports over S

Weights are uniform (a client's influence on x̄ is C / D, whatever its data size); a run with w_i ∝ |D_i| is
refused. x̄ replaces ``rnd.mean`` in ``on_mean``, before anything reads it: the server model, a server optimizer,
TopK at the server, the broadcast and the control variates' reference are all post-processing of the noisy x̄.
Clipping is the last change to the message: a callback that changes the uplink after it (a later
``on_compress_uplink``) is refused with central noise, as are callbacks whose extra uplink messages are not
clipped (SCAFFOLD's Δc_i, FedNova's τ_i-weighted average).

Adaptive clipping (``target_quantile`` γ): every participant also sends b_i = 1[‖Δ_i‖ ≤ C] (one bit); the server
estimates b̃ = (Σ_{i∈S} (b_i − ½) + N(0, σ_b²)) / D + ½ and sets C ← C · exp(−η_C (b̃ − γ)) for the next round,
with the update's noise multiplier σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−1/2) so that the round is still a σ-Gaussian
mechanism (Andrew et al., Alg. 1 and Thm. 1; σ_b = D/20 by default).

The noise comes from a generator seeded by ``seed`` and the round index only (every process draws the same
numbers, once, after the all-reduce; local noise: per client from its global id), so resuming and scaling out give
the same run. ε is computed by dp-accounting (:class:`~fl_lightning.privacy.PrivacyAccountant`) after every round
and logged as ``privacy/epsilon``; ``target_epsilon`` stops training before a round would exceed it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from fl_lightning import metric_keys as keys
from fl_lightning.callbacks.base import FederatedCallback
from fl_lightning.callbacks.compression import Compression
from fl_lightning.callbacks.control_variates import ControlVariates
from fl_lightning.callbacks.fednova import NormalizedAveraging
from fl_lightning.callbacks.sampling import ClientSampling
from fl_lightning.callbacks.scaffold import Scaffold
from fl_lightning.privacy import ACCOUNTANTS, NOISE_AT, AccountantKind, NoiseAt, PrivacyAccountant, Sampling
from fl_lightning.privacy import update_noise_multiplier as split_noise
from fl_lightning.round import Round, Tensors
from fl_lightning.seeding import derive_seed, step_seed

if TYPE_CHECKING:
    from fl_lightning.module import FederatedLightningModule

#: callbacks whose extra uplink messages DP does not clip (refused at setup)
UNCLIPPED_MESSAGES: tuple[type[FederatedCallback], ...] = (Scaffold, NormalizedAveraging)


def _positive(name: str, value: float, *, zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not zero):
        raise ValueError(f"DifferentialPrivacy {name} must be {'>= 0' if zero else '> 0'}, got {value!r}")
    return float(value)


def update_norms(uplink: Tensors, x: Tensors) -> torch.Tensor:
    """‖u_i − x‖₂ over every tensor of the model, per client: ``[c]`` from stacked ``[c, ...]`` messages."""
    sq = [(u - x[k].unsqueeze(0)).flatten(1).pow(2).sum(1) for k, u in uplink.items()]
    return torch.stack(sq).sum(0).sqrt()


def clip_factors(norms: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """min(1, C / ‖Δ_i‖) per client (1 for a zero update)."""
    return torch.where(norms > clip_norm, clip_norm / norms, torch.ones_like(norms))


def gaussian_like(tensors: Tensors, seed: int, scale: float) -> Tensors:
    """``scale`` · N(0, I) shaped like ``tensors`` (in their order), from one generator seeded ``seed``."""
    first = next(iter(tensors.values()))
    gen = torch.Generator(device=first.device)
    gen.manual_seed(seed)
    return {k: scale * torch.randn(v.shape, generator=gen, dtype=v.dtype, device=v.device) for k, v in tensors.items()}


def _rows(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


class DifferentialPrivacy(FederatedCallback):
    """Client-level DP: clip every client's update to ``clip_norm``, add Gaussian noise, account ε (module docstring).

    Args:
        clip_norm: C > 0 (the initial C with adaptive clipping).
        noise_multiplier: σ ≥ 0, the noise std in units of C (0: clipping only, ε = ∞).
        delta: δ ∈ (0, 1) of the reported (ε, δ).
        accountant: ``rdp`` or ``pld`` (dp-accounting; ``pld`` not with fixed-size cohorts).
        noise: ``central`` (on the sum at the server, after the all-reduce) or ``local`` (on each clipped update).
        target_epsilon: stop training (cleanly, with a message) before a round would make ε exceed it.
        target_quantile: γ ∈ (0, 1), enables adaptive clipping (central noise): the fraction of unclipped updates
            C is steered to.
        clip_lr: η_C > 0 of the geometric update of C.
        count_noise: σ_b of the noisy unclipped count (default D/20, Andrew et al.).
        seed: of the noise (default: derived from torch's initial seed at setup).
    """

    MESSAGE = "dp_unclipped"  # adaptive clipping's b_i − ½, an extra uplink message

    def __init__(self, clip_norm: float, noise_multiplier: float, delta: float = 1e-5,
                 accountant: AccountantKind = "rdp", noise: NoiseAt = "central", target_epsilon: float | None = None,
                 target_quantile: float | None = None, clip_lr: float = 0.2, count_noise: float | None = None,
                 seed: int | None = None) -> None:
        self.clip_norm = _positive("clip_norm", clip_norm)
        self.noise_multiplier = _positive("noise_multiplier", noise_multiplier, zero=True)
        if not (isinstance(delta, (int, float)) and 0 < delta < 1):
            raise ValueError(f"DifferentialPrivacy delta must lie in (0, 1), got {delta!r}")
        self.delta = float(delta)
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"DifferentialPrivacy accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
        if noise not in NOISE_AT:
            raise ValueError(f"DifferentialPrivacy noise must be one of {NOISE_AT}, got {noise!r}")
        self.accountant: AccountantKind = accountant
        self.noise: NoiseAt = noise
        self.target_epsilon = None if target_epsilon is None else _positive("target_epsilon", target_epsilon)
        if target_quantile is not None:
            if not (isinstance(target_quantile, (int, float)) and 0 < target_quantile < 1):
                raise ValueError(f"DifferentialPrivacy target_quantile must lie in (0, 1), got {target_quantile!r}")
            if noise != "central":
                raise ValueError("DifferentialPrivacy adaptive clipping (target_quantile) needs noise='central'")
        self.target_quantile = target_quantile
        self.clip_lr = _positive("clip_lr", clip_lr)
        self.count_noise = None if count_noise is None else _positive("count_noise", count_noise)
        self.seed = seed
        self.rounds = 0  # rounds accounted so far
        self.initial_clip_norm = self.clip_norm
        self.sampling: Sampling = "full"
        self.denominator = 1  # D
        self.update_noise = self.noise_multiplier  # σ_Δ (σ without adaptive clipping)
        self.privacy: PrivacyAccountant | None = None
        self._clipped: torch.Tensor | None = None  # this round's number of clipped updates (all processes)
        self._unclipped_sum: torch.Tensor | None = None  # Σ (b_i − ½) (adaptive clipping)
        self._stopped = False

    # ------------------------------------------------------------------ set-up and refusals
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        federated = [cb for cb in trainer.callbacks if isinstance(cb, FederatedCallback)]
        if sum(isinstance(cb, DifferentialPrivacy) for cb in federated) > 1:
            raise ValueError("two DifferentialPrivacy callbacks; keep one")
        unclipped = [type(cb).__name__ for cb in federated if isinstance(cb, UNCLIPPED_MESSAGES)]
        if unclipped:
            raise ValueError(f"DifferentialPrivacy cannot be combined with {', '.join(unclipped)}: its extra uplink "
                             "messages (SCAFFOLD's Δc_i, FedNova's τ_i weighting) are neither clipped nor noised, so "
                             "they would leak the clients' data")
        after = federated[federated.index(self) + 1:] if self in federated else []
        later = [type(cb).__name__ for cb in after if _changes_uplink(cb)]
        if later and self.noise == "central":
            raise ValueError(
                f"DifferentialPrivacy clips the uplink in on_compress_uplink, but {', '.join(later)} changes the "
                "uplink after it: the message sent would no longer be the clipped one (quantisation can grow its "
                "norm, TopK of the model moves it away from x). Put DifferentialPrivacy after it in the callback "
                "list, e.g. Trainer(callbacks=[*fedcomloc(...), DifferentialPrivacy(...)])"
            )
        if any(isinstance(cb, ControlVariates) and cb.uplink == "local" for cb in federated):
            rank_zero_warn("DifferentialPrivacy with ControlVariates(uplink='local'): sending x̂_i relies on "
                           "Σ_i w_i h_i = 0, which clipping and noise break (the sum then accumulates every round's "
                           "perturbation); ControlVariates(uplink='shifted') keeps it bounded (docs/privacy.md)")
        n = pl_module.num_clients
        samplers = [cb for cb in federated if isinstance(cb, ClientSampling)]
        cohort_size = samplers[0].cohort_size if samplers else None
        self.sampling = "full" if not samplers else samplers[0].mode
        self.denominator = n if cohort_size is None else cohort_size
        if self.target_quantile is not None:
            if self.count_noise is None:
                self.count_noise = self.denominator / 20
            self.update_noise = split_noise(self.noise_multiplier, self.count_noise)
        if self.seed is None:
            self.seed = derive_seed("privacy")
        self.privacy = PrivacyAccountant(self.accountant, self.noise_multiplier, self.delta, sampling=self.sampling,
                                         num_clients=n, cohort_size=cohort_size, noise=self.noise)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        weights = trainer.datamodule.client_weights  # type: ignore[attr-defined]
        if not bool((weights == weights[0]).all()):
            raise ValueError(
                "DifferentialPrivacy needs uniform client weights (client_weighting: uniform): with w_i ∝ |D_i| a "
                "client's influence on the average is w_i·C, not C/D, and the noise would not cover it"
            )
        self._check_budget(trainer)

    # ------------------------------------------------------------------ the round
    @override
    def on_compress_uplink(self, trainer: Trainer, module: FederatedLightningModule, rnd: Round) -> None:
        assert rnd.cohort is not None
        x = {k: v.detach() for k, v in module.global_model.named_parameters()}
        norms = update_norms(rnd.uplink, x)
        clipped = norms > self.clip_norm
        if self.target_quantile is not None:  # b_i − ½, one bit each, summed over the cohort
            half = (~clipped).to(torch.float64).unsqueeze(1) - 0.5
            ones = torch.ones(len(norms), dtype=torch.float64, device=norms.device)
            self._unclipped_sum = rnd.send_up(self.MESSAGE, {"b": half}, weights=ones, bits=ones)["b"][0]
            self._clipped = rnd.cohort.size / 2 - self._unclipped_sum
        else:
            self._clipped = module.reduce(clipped.sum().to(torch.float64))
        local = self.noise == "local"
        if not local and not bool(clipped.any()):
            return  # nothing to change: u_i stay the very tensors (bit for bit, and their bits as measured)
        factors = clip_factors(norms, self.clip_norm)
        out = {}
        for k, u in rnd.uplink.items():
            delta = (u - x[k].unsqueeze(0)) * _rows(factors, u)
            # central: the unclipped rows keep their very values (u, not x + (u − x))
            out[k] = x[k].unsqueeze(0) + delta if local else torch.where(_rows(clipped, u).bool(),
                                                                         x[k].unsqueeze(0) + delta, u)
        if local and self.noise_multiplier > 0:  # client i's noise from its own generator: any process, any order
            seed = step_seed(self._seed(), rnd.index)
            scale = self.noise_multiplier * self.clip_norm
            for j, i in enumerate(rnd.cohort.ids.tolist()):
                z = gaussian_like({k: u[j] for k, u in out.items()}, step_seed(seed, int(i)), scale)
                for k in out:
                    out[k][j] += z[k]
        rnd.uplink = out
        rnd.uplink_bits = None  # the message changed: measure what is sent

    @override
    def on_mean(self, trainer: Trainer, module: FederatedLightningModule, rnd: Round) -> None:
        others = sorted(set(rnd.messages_up) - {self.MESSAGE})
        if others:
            raise ValueError(f"DifferentialPrivacy: the extra uplink message(s) {others} are neither clipped nor "
                             "noised, so they would leak the clients' data")
        if self.noise == "local":
            return
        assert rnd.cohort is not None
        x = {k: v.detach() for k, v in module.global_model.named_parameters()}
        size, d = rnd.cohort.size, self.denominator
        if size != d:  # uniform weights 1/|S| → the fixed denominator D: x + (|S|/D)(x̄ − x)
            rnd.mean = {k: x[k] + (size / d) * (m - x[k]) for k, m in rnd.mean.items()}
        if self.noise_multiplier == 0:
            return
        seed = step_seed(self._seed(), rnd.index)
        if self.target_quantile is not None:
            gen = torch.Generator(device=self._unclipped_sum.device)  # type: ignore[union-attr]
            gen.manual_seed(step_seed(seed, -1))
            count_noise = torch.randn((), generator=gen, dtype=torch.float64, device=gen.device)
            self._unclipped_sum = self._unclipped_sum + (self.count_noise or 0.0) * count_noise
        noise = gaussian_like(rnd.mean, seed, self.update_noise * self.clip_norm / d)
        rnd.mean = {k: m + noise[k] for k, m in rnd.mean.items()}

    def _seed(self) -> int:
        assert self.seed is not None, "DifferentialPrivacy.setup sets the seed"
        return self.seed

    @override
    def on_round_end(self, trainer: Trainer, module: FederatedLightningModule, rnd: Round) -> None:
        assert rnd.cohort is not None and self.privacy is not None and self._clipped is not None
        self.rounds += 1
        size = rnd.cohort.size

        def value(v: float) -> torch.Tensor:
            return torch.tensor(v, dtype=torch.float64, device=module.device)

        module.round_metrics[keys.EPSILON] = value(self.privacy.epsilon(self.rounds))
        module.round_metrics[keys.CLIP_NORM] = value(self.clip_norm)
        fraction = self._clipped / size if size else torch.zeros((), dtype=torch.float64)
        module.round_metrics[keys.CLIPPED_FRACTION] = fraction.to(device=module.device, dtype=torch.float64)
        if self.target_quantile is not None and self._unclipped_sum is not None:
            estimate = float(self._unclipped_sum) / self.denominator + 0.5  # b̃, the noisy unclipped fraction
            self.clip_norm *= math.exp(-self.clip_lr * (estimate - self.target_quantile))
        self._check_budget(trainer)

    def _check_budget(self, trainer: Trainer) -> None:
        """Stop before the next round would make ε exceed ``target_epsilon``."""
        if self.target_epsilon is None or self.privacy is None:
            return
        upcoming = self.privacy.epsilon(self.rounds + 1)
        if upcoming <= self.target_epsilon:
            return
        trainer.should_stop = True
        if not self._stopped:
            self._stopped = True
            spent = self.privacy.epsilon(self.rounds)
            rank_zero_info(f"privacy budget spent: ε = {spent:.4g} (δ = {self.delta:g}) after {self.rounds} rounds; "
                           f"one more round would reach ε = {upcoming:.4g} > target_epsilon = {self.target_epsilon:g}, "
                           "so training stops here")

    # ------------------------------------------------------------------ state
    def epsilon(self) -> float:
        """ε of the rounds so far (0 before ``setup``)."""
        return 0.0 if self.privacy is None else self.privacy.epsilon(self.rounds)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "rounds": self.rounds, "clip_norm": self.clip_norm}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = state_dict["seed"]
        self.rounds = int(state_dict["rounds"])
        self.clip_norm = float(state_dict["clip_norm"])


def _changes_uplink(cb: FederatedCallback) -> bool:
    """Whether ``cb`` changes the uplink message in ``on_compress_uplink`` (a Compression of another direction
    does not)."""
    if isinstance(cb, Compression):
        return cb.direction == "uplink"
    return type(cb).on_compress_uplink is not FederatedCallback.on_compress_uplink


__all__ = ["DifferentialPrivacy", "clip_factors", "gaussian_like", "update_norms"]
