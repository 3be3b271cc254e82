"""``SkipSchedule``: when a local step ends with communication — the coin θ_t of ProxSkip (DESIGN §1.2)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any, Literal, get_args

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from fl_lightning.callbacks.base import FederatedCallback
from fl_lightning.seeding import derive_seed, restore_random

ScheduleMode = Literal["bernoulli", "fixed", "geometric"]
MODES: tuple[str, ...] = get_args(ScheduleMode)


class SkipSchedule(FederatedCallback):
    """Communicate with probability ``p`` after each local step.

    Modes (all with expected round length 1/p):

    - ``bernoulli``: θ_t ~ Bernoulli(p) after every step, as in ProxSkip (Mishchenko et al. 2022, Alg. 1).
    - ``fixed``: exactly k local steps per round, k = ``k`` or 1/p, which must then be an integer (p = 1/k, up to a
      relative 1e-9 on 1/p: ``p=0.1`` and ``p=1/3`` are k = 10 and 3; ``p=0.4`` is refused rather than run as
      p = 0.5); the control variates use p = 1/k. This is FedAvg's schedule and the seed paper's.
    - ``geometric``: the round length is drawn at the round's start from Geometric(p); the same law as
      ``bernoulli`` but the length is known in advance.

    The coin comes from a dedicated ``random.Random`` seeded with ``seed`` (default: derived from
    torch's initial seed at setup), never from the global RNG; it is shared by all clients and ranks,
    and its state is saved in the checkpoint.
    """

    def __init__(self, p: float | None = None, mode: ScheduleMode = "bernoulli", k: int | None = None,
                 seed: int | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"SkipSchedule mode must be one of {MODES}, got {mode!r}")
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f"SkipSchedule k (local steps per round) must be an integer >= 1, got {k!r}")
            if p is not None and not math.isclose(p, 1.0 / k):
                raise ValueError(f"SkipSchedule: give p or k, not both (p={p}, k={k})")
            if mode == "bernoulli":
                mode = "fixed"
            p = 1.0 / k
        if p is None:
            raise ValueError("SkipSchedule needs p (communication probability in (0, 1]) or k (steps per round)")
        if not (isinstance(p, (int, float)) and 0.0 < p <= 1.0):
            raise ValueError(f"SkipSchedule p (communication probability) must lie in (0, 1], got {p!r}")
        self.mode: str = mode
        self.k: int = k if k is not None else steps_per_round(p) if mode == "fixed" else max(1, round(1.0 / p))
        self._p = float(p)
        self.seed = seed
        self._rng = random.Random(seed)
        self._steps_in_round = 0
        self._round_length: int | None = None

    @property
    def p(self) -> float:
        """The communication probability the control variates use (1/k in ``fixed`` mode)."""
        return 1.0 / self.k if self.mode == "fixed" else self._p

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.seed is None:
            self.seed = derive_seed("schedule")
            self._rng.seed(self.seed)

    def _geometric(self) -> int:
        if self._p >= 1.0:
            return 1
        u = 1.0 - self._rng.random()  # in (0, 1]
        return 1 + math.floor(math.log(u) / math.log1p(-self._p))

    def step(self) -> bool:
        """Advance one local step; True when this step ends with a communication round."""
        self._steps_in_round += 1
        if self.mode == "bernoulli":
            communicate = self._rng.random() < self._p
        else:
            if self._round_length is None:
                self._round_length = self.k if self.mode == "fixed" else self._geometric()
            communicate = self._steps_in_round >= self._round_length
        if communicate:
            self._steps_in_round = 0
            self._round_length = None
        return communicate

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "rng": self._rng.getstate(), "steps_in_round": self._steps_in_round,
                "round_length": self._round_length}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = state_dict["seed"]
        restore_random(self._rng, state_dict["rng"])
        self._steps_in_round = state_dict["steps_in_round"]
        self._round_length = state_dict["round_length"]


#: How far 1/p may be from an integer, relatively, for ``mode="fixed"``: a p typed as a decimal (0.1, 0.05) or
#: computed as 1/k gives 1/p within a few ulps (~1e-16) of k, and one written with 10 significant digits
#: (0.3333333333) within ~1e-10; a p that means another value (0.4 → 2.5, 0.3 → 3.33) is off by far more.
FIXED_RTOL = 1e-9


def steps_per_round(p: float) -> int:
    """k = 1/p, the local steps of every round in ``mode="fixed"``; raises unless 1/p is an integer (relative
    tolerance :data:`FIXED_RTOL`), rather than silently running another p (DESIGN §1.2: a fixed k = 1/p)."""
    inverse = 1.0 / p
    k = max(1, round(inverse))
    if not math.isclose(inverse, k, rel_tol=FIXED_RTOL, abs_tol=0.0):
        below, above = 1.0 / math.floor(inverse), 1.0 / math.ceil(inverse)
        raise ValueError(
            f"SkipSchedule p={p!r} with mode='fixed': a fixed schedule runs k = 1/p local steps per round, so 1/p "
            f"must be an integer, but 1/p = {inverse:.6g}. Use p = 1/k (e.g. p={above:.6g} or p={below:.6g}, or give "
            "k=...), or mode='bernoulli' / 'geometric' for random rounds of mean length 1/p"
        )
    return k


def communication_schedule(callbacks: Sequence[FederatedCallback], *, warn: bool = True) -> SkipSchedule | None:
    """The one :class:`SkipSchedule` among a module's federated ``callbacks`` (None without one, with a warning
    when ``warn``: clients then never communicate). Raises when there are several, or when a callback that needs
    rounds (``requires_schedule``, true by default) has none."""
    schedules = [cb for cb in callbacks if isinstance(cb, SkipSchedule)]
    if len(schedules) > 1:
        raise ValueError(f"got {len(schedules)} SkipSchedule callbacks; keep exactly one")
    if schedules:
        return schedules[0]
    others = [type(cb).__name__ for cb in callbacks if getattr(cb, "requires_schedule", True)]
    if others:
        verb = "needs" if len(others) == 1 else "need"
        raise ValueError(f"{', '.join(others)} {verb} a communication schedule: add a SkipSchedule callback")
    if warn:
        rank_zero_warn("no SkipSchedule callback: clients train independently and never communicate")
    return None
