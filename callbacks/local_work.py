"""``LocalWork``: unequal local work — each client's number of local steps per round (DESIGN §1.2 with budgets τ_i).

Client i takes min(τ_i, round length) local steps in a round and keeps its model x̂_i for the rest of it (its rows
sit out the optimizer step, :class:`~fl_lightning.local_step.HeldRows`); τ_i = 0 drops it out of the round: it
neither trains nor sends (its bits are not counted) and the round's weights are renormalised over the others. The
steps each participant took reach the round as ``rnd.local_steps`` (FedNova normalises by them).

Budgets are fixed (``steps``: one int for all, or one per client), or drawn at every round's start from a seeded
distribution (``low``/``high``: uniform integers in [low, high]), each client dropping out with probability
``dropout``. The draws use a dedicated generator saved in the checkpoint; they do not depend on the number of
processes.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from fl_lightning.callbacks.base import FederatedCallback
from fl_lightning.seeding import derive_seed, restore_random

if TYPE_CHECKING:
    from fl_lightning.module import FederatedLightningModule


class LocalWork(FederatedCallback):
    """Per-client local-step budgets τ_i, fixed or redrawn every round.

    Args:
        steps: τ_i for every client (an int) or one per client (a list of n ints); with ``low``/``high`` unset.
        low, high: draw τ_i uniformly from the integers in [low, high] at every round's start (low ≥ 1).
        dropout: probability that a client sits out a round (τ_i = 0), drawn every round.
        seed: of the draws (default: derived from torch's initial seed at setup).
    """

    def __init__(self, steps: int | Sequence[int] | None = None, low: int | None = None, high: int | None = None,
                 dropout: float = 0.0, seed: int | None = None) -> None:
        drawn = low is not None or high is not None
        if steps is not None and drawn:
            raise ValueError("LocalWork: give steps (fixed budgets) or low and high (drawn budgets), not both")
        if steps is None and not drawn and not dropout:
            raise ValueError("LocalWork needs steps (fixed budgets), low and high (drawn budgets) or a dropout")
        if drawn and (low is None or high is None or not 1 <= low <= high):
            raise ValueError(f"LocalWork low and high must satisfy 1 <= low <= high, got low={low!r}, high={high!r}")
        fixed = [] if steps is None else [steps] if isinstance(steps, int) else list(steps)
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in fixed):
            raise ValueError(f"LocalWork steps must be integers >= 0, got {steps!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LocalWork dropout must lie in [0, 1), got {dropout!r}")
        self.steps = steps if steps is None or isinstance(steps, int) else list(steps)
        self.low, self.high, self.dropout = low, high, float(dropout)
        self.seed = seed
        self._rng = random.Random(seed)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        n = pl_module.num_clients
        if isinstance(self.steps, list) and len(self.steps) != n:
            raise ValueError(f"LocalWork steps has {len(self.steps)} budgets for {n} clients: give one per client")
        if self.seed is None:
            self.seed = derive_seed("local_work")
            self._rng.seed(self.seed)

    def budgets(self, n: int) -> list[int]:
        """This round's τ_i of all n clients (advances the generator when anything is drawn)."""
        if self.low is not None and self.high is not None:
            out = [self._rng.randint(self.low, self.high) for _ in range(n)]
        elif isinstance(self.steps, list):
            out = list(self.steps)
        else:
            out = [2**62 if self.steps is None else self.steps] * n  # dropout only: no limit on the others
        if self.dropout > 0:
            out = [0 if self._rng.random() < self.dropout else b for b in out]
        return out

    @override
    def on_round_start(self, trainer: Trainer, module: FederatedLightningModule, round_index: int) -> None:
        module.set_local_steps(self.budgets(module.num_clients))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "rng": self._rng.getstate()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = state_dict["seed"]
        restore_random(self._rng, state_dict["rng"])
