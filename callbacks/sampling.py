"""``ClientSampling``: a random cohort of clients takes part in each round (FedAvg, McMahan et al. 2017), drawn
with a fixed size or by Poisson sampling (DP-FedAvg, McMahan et al. 2018)."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, Literal, get_args

from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from fl_lightning.callbacks.base import FederatedCallback
from fl_lightning.seeding import derive_seed, restore_random

if TYPE_CHECKING:
    from fl_lightning.module import FederatedLightningModule

SamplingMode = Literal["fixed", "poisson"]
SAMPLING_MODES: tuple[str, ...] = get_args(SamplingMode)


class ClientSampling(FederatedCallback):
    """At the start of every round a cohort S of the n clients is drawn; only they take local steps, and the
    round averages their models with weights w_i renormalised over the cohort. Every client then receives the
    new global model.

    - ``mode="fixed"``: ``cohort_size`` clients uniformly without replacement (|S| = m every round).
    - ``mode="poisson"``: every client joins independently with probability q = ``cohort_size`` / n, so |S| is
      Binomial(n, q) with mean ``cohort_size`` and may be 0 (the round then keeps the server's model, or adds
      only noise under :class:`~fl_lightning.callbacks.DifferentialPrivacy`). This is the sampling the privacy
      amplification of DP-FedAvg assumes.

    The draws use a dedicated ``random.Random`` (seeded with ``seed``, default: from torch's initial seed at
    setup), saved in the checkpoint; every process draws the same cohort.
    """

    def __init__(self, cohort_size: int, seed: int | None = None, mode: SamplingMode = "fixed") -> None:
        if isinstance(cohort_size, bool) or not isinstance(cohort_size, int) or cohort_size < 1:
            raise ValueError(f"ClientSampling cohort_size must be an integer >= 1, got {cohort_size!r}")
        if mode not in SAMPLING_MODES:
            raise ValueError(f"ClientSampling mode must be one of {SAMPLING_MODES}, got {mode!r}")
        self.cohort_size = cohort_size
        self.seed = seed
        self.mode: SamplingMode = mode
        self._rng = random.Random(seed)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        n = pl_module.num_clients
        if self.cohort_size > n:
            raise ValueError(f"ClientSampling cohort_size ({self.cohort_size}) must be <= the number of clients ({n})")
        if self.seed is None:
            self.seed = derive_seed("cohort")
            self._rng.seed(self.seed)

    def rate(self, num_clients: int) -> float:
        """q = cohort_size / n: the probability that a given client takes part in a round (both modes)."""
        return self.cohort_size / num_clients

    def draw(self, num_clients: int) -> list[int]:
        """This round's cohort (global ids; advances the generator)."""
        if self.mode == "fixed":
            return self._rng.sample(range(num_clients), self.cohort_size)
        q = self.rate(num_clients)
        return [i for i in range(num_clients) if self._rng.random() < q]

    @override
    def on_round_start(self, trainer: Trainer, module: FederatedLightningModule, round_index: int) -> None:
        module.set_active_clients(self.draw(module.num_clients))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "rng": self._rng.getstate()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = state_dict["seed"]
        restore_random(self._rng, state_dict["rng"])
