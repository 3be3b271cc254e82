"""Privacy accounting of client-level DP rounds with dp-accounting (the ``[privacy]`` extra): ε(R) after R rounds.

One round of DP-FedAvg (McMahan et al., ICLR 2018) releases x + (Σ_{i∈S} clip_C(Δ_i) + N(0, σ²C²I)) / D. Its
:class:`dp_accounting.DpEvent` (:func:`round_event`), by how S is drawn and where the noise is added:

==========  ===========================  ==================================================================
noise       sampling                     one round's event (neighbouring relation)
==========  ===========================  ==================================================================
central     full participation           ``GaussianDpEvent(σ)`` (add/remove one client)
central     Poisson, q = m / n           ``PoissonSampledDpEvent(q, GaussianDpEvent(σ))`` (add/remove)
central     fixed size m, w/o repl.      ``SampledWithoutReplacementDpEvent(n, m, GaussianDpEvent(σ/2))``
                                         (replace one: the sum moves by up to 2C, so σC / 2C = σ/2)
local       any (no amplification)       ``GaussianDpEvent(σ/2)`` per client report (any two reports of a
                                         client lie within 2C of each other)
==========  ===========================  ==================================================================

σ is the round's total noise multiplier (with adaptive clipping it is shared with the noisy count:
:func:`update_noise_multiplier`, Andrew et al. 2021). R rounds compose: the RDP accountant adds R copies of one
round's RDP curve (exactly what ``RdpAccountant().compose(event, R)`` does) and converts it with
``dp_accounting.rdp.compute_epsilon``; the PLD accountant composes the privacy-loss distribution of one round
with itself (incrementally round by round, ``self_compose(R)`` after a resume; the two agree to ~1e-10).
The package is imported only when a :class:`PrivacyAccountant` is made.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal, get_args

from fl_lightning.extras import require

AccountantKind = Literal["rdp", "pld"]
ACCOUNTANTS: tuple[str, ...] = get_args(AccountantKind)
Sampling = Literal["full", "poisson", "fixed"]
NoiseAt = Literal["central", "local"]
NOISE_AT: tuple[str, ...] = get_args(NoiseAt)


def _dp() -> Any:
    return require("dp_accounting", extra="privacy", feature="differential privacy accounting")


def round_event(noise_multiplier: float, *, sampling: Sampling, num_clients: int, cohort_size: int | None,
                noise: NoiseAt = "central") -> Any:
    """The ``dp_accounting.DpEvent`` of one round (the module docstring's table)."""
    dp = _dp()
    if noise == "local":
        return dp.GaussianDpEvent(noise_multiplier / 2)
    if sampling == "full":
        return dp.GaussianDpEvent(noise_multiplier)
    assert cohort_size is not None
    if sampling == "poisson":
        return dp.PoissonSampledDpEvent(cohort_size / num_clients, dp.GaussianDpEvent(noise_multiplier))
    return dp.SampledWithoutReplacementDpEvent(num_clients, cohort_size, dp.GaussianDpEvent(noise_multiplier / 2))


def neighboring_relation(sampling: Sampling, noise: NoiseAt = "central") -> Any:
    """Replace-one for fixed-size sampling without replacement (the only relation dp-accounting analyses it
    under), add/remove one client otherwise."""
    relation = _dp().NeighboringRelation
    return relation.REPLACE_ONE if sampling == "fixed" and noise == "central" else relation.ADD_OR_REMOVE_ONE


def update_noise_multiplier(noise_multiplier: float, count_noise: float) -> float:
    """σ_Δ of the update when the clipped-count query gets noise std σ_b (Andrew et al. 2021, Thm. 1):
    σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−1/2), so that the round (update and count together) is a Gaussian mechanism with
    noise multiplier σ. Needs σ_b > 1/(2σ)."""
    if noise_multiplier == 0:
        return 0.0
    rest = noise_multiplier**-2 - (2 * count_noise) ** -2
    if rest <= 0:
        raise ValueError(
            f"adaptive clipping: count_noise (σ_b = {count_noise:g}) leaves no privacy for the update at "
            f"noise_multiplier {noise_multiplier:g}; it must exceed 1/(2σ) = {1 / (2 * noise_multiplier):g}"
        )
    return rest**-0.5


class PrivacyAccountant:
    """ε(R) at ``delta`` after R rounds of :func:`round_event`, computed by dp-accounting's RDP or PLD accountant.

    Args:
        kind: ``rdp`` (Rényi DP, fast, slightly loose) or ``pld`` (privacy-loss distributions, tighter; one
            FFT convolution per round, about 0.3 s on a CPU). ``pld`` does not analyse fixed-size sampling.
        noise_multiplier: σ of a round (0: no privacy, ε = ∞).
        delta: δ ∈ (0, 1).
        sampling, num_clients, cohort_size, noise: as :func:`round_event`.
    """

    def __init__(self, kind: AccountantKind, noise_multiplier: float, delta: float, *, sampling: Sampling,
                 num_clients: int, cohort_size: int | None, noise: NoiseAt = "central") -> None:
        if kind not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {kind!r}")
        if kind == "pld" and sampling == "fixed" and noise == "central":
            raise ValueError("the pld accountant does not analyse fixed-size cohorts (sampling without replacement): "
                             "use accountant='rdp', or Poisson sampling (sampling='poisson')")
        self.kind, self.noise_multiplier, self.delta = kind, float(noise_multiplier), float(delta)
        self.sampling, self.noise = sampling, noise
        self.event = round_event(noise_multiplier, sampling=sampling, num_clients=num_clients,
                                 cohort_size=cohort_size, noise=noise)
        self.relation = neighboring_relation(sampling, noise)
        self._rdp: Any = None  # one round's RDP curve (orders, values)
        self._pld_round: Any = None  # one round's privacy-loss distribution
        self._pld: tuple[int, Any] | None = None  # (R, the PLD of R rounds): the last one computed

    def epsilon(self, rounds: int) -> float:
        """ε after ``rounds`` rounds (0 rounds: 0; σ = 0: ∞)."""
        if rounds <= 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        return self._rdp_epsilon(rounds) if self.kind == "rdp" else self._pld_epsilon(rounds)

    def _rdp_epsilon(self, rounds: int) -> float:
        dp = _dp()
        if self._rdp is None:
            one = dp.rdp.RdpAccountant(neighboring_relation=self.relation)
            absl = logging.getLogger("absl")  # its notes on fractional orders it leaves out: not the user's concern
            level = absl.level
            absl.setLevel(logging.ERROR)
            try:
                one.compose(self.event)
            finally:
                absl.setLevel(level)
            self._rdp = (one.orders, one.rdp)
        orders, curve = self._rdp
        return float(dp.rdp.compute_epsilon(orders, rounds * curve, self.delta)[0])

    def _pld_epsilon(self, rounds: int) -> float:
        dp = _dp()
        pld = dp.pld.privacy_loss_distribution
        if isinstance(self.event, dp.GaussianDpEvent):  # Gaussians compose in closed form: σ/√R, as PLDAccountant
            one = pld.from_gaussian_mechanism(standard_deviation=self.event.noise_multiplier / math.sqrt(rounds),
                                              value_discretization_interval=1e-4,
                                              neighboring_relation=self.relation)
            return float(one.get_epsilon_for_delta(self.delta))
        if self._pld_round is None:  # PLDAccountant's construction of a Poisson-sampled Gaussian
            self._pld_round = pld.from_gaussian_mechanism(
                standard_deviation=self.event.event.noise_multiplier, value_discretization_interval=1e-4,
                sampling_prob=self.event.sampling_probability, neighboring_relation=self.relation)
        if self._pld is not None and self._pld[0] == rounds:
            composed = self._pld[1]
        elif self._pld is not None and self._pld[0] == rounds - 1:
            composed = self._pld[1].compose(self._pld_round)
        else:
            composed = self._pld_round.self_compose(rounds)
        self._pld = (rounds, composed)
        return float(composed.get_epsilon_for_delta(self.delta))


__all__ = ["ACCOUNTANTS", "NOISE_AT", "AccountantKind", "NoiseAt", "PrivacyAccountant", "Sampling",
           "neighboring_relation", "round_event", "update_noise_multiplier"]
