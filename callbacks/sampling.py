"""``ClientSampling``: a random cohort of clients takes part in each round (FedAvg, McMahan et al. 2017)."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from fl_lightning.callbacks.base import FederatedCallback
from fl_lightning.seeding import derive_seed, restore_random

if TYPE_CHECKING:
    from fl_lightning.module import FederatedLightningModule


class ClientSampling(FederatedCallback):
    """At the start of every round, ``cohort_size`` of the n clients are drawn uniformly without
    replacement; only they take local steps, and the round averages their models with weights w_i
    renormalised over the cohort. Every client then receives the new global model.

    The draw uses a dedicated ``random.Random`` (seeded with ``seed``, default: from torch's initial
    seed at setup), saved in the checkpoint.
    """

    def __init__(self, cohort_size: int, seed: int | None = None) -> None:
        if isinstance(cohort_size, bool) or not isinstance(cohort_size, int) or cohort_size < 1:
            raise ValueError(f"ClientSampling cohort_size must be an integer >= 1, got {cohort_size!r}")
        self.cohort_size = cohort_size
        self.seed = seed
        self._rng = random.Random(seed)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        n = pl_module.num_clients
        if self.cohort_size > n:
            raise ValueError(f"ClientSampling cohort_size ({self.cohort_size}) must be <= the number of clients ({n})")
        if self.seed is None:
            self.seed = derive_seed("cohort")
            self._rng.seed(self.seed)

    @override
    def on_round_start(self, trainer: Trainer, module: FederatedLightningModule, round_index: int) -> None:
        module.set_active_clients(self._rng.sample(range(module.num_clients), self.cohort_size))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "rng": self._rng.getstate()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = state_dict["seed"]
        restore_random(self._rng, state_dict["rng"])
