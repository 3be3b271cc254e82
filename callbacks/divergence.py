"""``DivergenceGuard``: stop training when the loss or the weights stop being finite (NaN/Inf).

A diverged run is worse than a stopped one: its later checkpoints hold NaN weights, and a checkpoint
callback that keeps only the newest files (``save_top_k``, ``save_last``) then replaces the last good
state with a useless one. The guard stops the run with a :class:`DivergenceError` that names the step
and the round, before any checkpoint of the bad state reaches the disk:

- in ``on_train_batch_end`` of every ``check_every_n_steps``-th step. Lightning runs the checkpoint
  callbacks (``ModelCheckpoint``) after all other callbacks, so the error comes first there;
- in ``on_save_checkpoint`` of every checkpoint, whatever the step: the checkpoint is being assembled
  then and not yet written, so the error aborts the write. Steps between two checks are covered too;
- in ``on_train_end``, so a run does not end quietly with NaN weights.

A checkpoint written *after* the run stopped (``OnExceptionCheckpoint`` saves one from
``on_exception``) cannot be prevented without breaking Lightning's shutdown; the guard marks it
instead (``diverged`` in its state), and resuming from a marked checkpoint with a guard raises
:class:`DivergenceError` before the first step.

Cost. The loss of every step is checked on the device without a host synchronisation: a flag and the
first bad step (and round) are accumulated with a few scalar tensor operations. On a check step the guard
tests every floating-point tensor of the module's ``state_dict`` (client weights x_i, control variates,
the global model, buffers such as the bit counters) with one ``isfinite().all()`` per tensor — a read of
the model state, less than one SGD update reads — and synchronises once (``bool(...)``); under a
multi-process strategy the verdict is all-reduced so that every rank stops at the same step. With the default
``check_every_n_steps=1`` that is one sync per step; on a GPU, where a sync stalls the launch queue, a
value of 10–100 removes nearly all of the cost while the ``on_save_checkpoint`` check still keeps every
written checkpoint finite.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerStatus
from torch import Tensor
from typing_extensions import override


class DivergenceError(RuntimeError):
    """Training diverged: the loss or the weights contain NaN or Inf."""


def nonfinite_tensors(tensors: Mapping[str, Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an Inf (synchronises with the device)."""
    return [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def _all_finite(tensors: Iterable[Tensor]) -> Tensor | None:
    """A 0-dim bool tensor, True when every floating-point tensor is finite (no synchronisation); None
    when there is no floating-point tensor."""
    flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point() and t.numel() > 0]
    if not flags:
        return None
    return torch.stack([f.to(flags[0].device) for f in flags]).all()


def _loss_of(outputs: Any) -> Tensor | None:
    """The loss in what ``training_step`` returned (a tensor, a mapping with ``loss``, or nothing)."""
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, Mapping) and isinstance(outputs.get("loss"), Tensor):
        return outputs["loss"]
    return None


class DivergenceGuard(Callback):
    """Stop training with a :class:`DivergenceError` when the loss or the weights become NaN/Inf.

    Args:
        check_every_n_steps: test the weights (and read the accumulated loss flag) every n steps; every
            checkpoint is tested regardless. 1 = every step (one host synchronisation per step).

    The error message names the step (``trainer.global_step`` after the step that produced the values, as
    in ``ModelCheckpoint``'s ``step=`` file names) and the round (for a
    :class:`~fl_lightning.FederatedLightningModule`, the 0-based index of the round that step belongs to,
    i.e. the rounds completed before it; omitted for other modules). Its state (``diverged``: step, round
    and what was non-finite, or None) is saved in checkpoints.
    """

    def __init__(self, check_every_n_steps: int = 1) -> None:
        n = check_every_n_steps
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"DivergenceGuard check_every_n_steps must be an integer >= 1, got {n!r}")
        self.check_every_n_steps = check_every_n_steps
        self.diverged: dict[str, Any] | None = None  # step, round and what was non-finite, once detected
        self._round_of_step: int | None = None
        self._bad_loss: Tensor | None = None  # device flag: some step's loss was non-finite
        self._first_bad_step: Tensor | None = None  # device int64: the first such step (-1: none)
        self._first_bad_round: Tensor | None = None

    # ------------------------------------------------------------------ hooks
    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._round_of_step = getattr(pl_module, "round_index", None)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = _loss_of(outputs)
        step = trainer.global_step  # steps done, this one included: a checkpoint now would be "step=<step>"
        if loss is not None:
            self._accumulate_loss(loss.detach(), step, self._round_of_step)
        if step % self.check_every_n_steps == 0:
            self.check(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.check(trainer, pl_module)  # a run never ends "successfully" with NaN weights

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.status == TrainerStatus.INTERRUPTED:
            # written while shutting down after an exception (OnExceptionCheckpoint): never raise here, and
            # no collective either (other ranks may not take part); mark a diverged state instead
            if self.diverged is None:
                self.diverged = self._find_problem(trainer, pl_module)
        else:
            self.check(trainer, pl_module, suffix="; this checkpoint was not written")
        if self.diverged is not None:
            checkpoint.setdefault("callbacks", {})[self.state_key] = self.state_dict()

    # ------------------------------------------------------------------ checks
    def _accumulate_loss(self, loss: Tensor, step: int, round_index: int | None) -> None:
        """Remember, on the device, whether a loss was non-finite and the first step (and round) it was."""
        bad = ~torch.isfinite(loss).all()
        if self._bad_loss is None or self._bad_loss.device != bad.device:
            self._bad_loss = torch.zeros((), dtype=torch.bool, device=bad.device)
            self._first_bad_step = torch.full((), -1, dtype=torch.int64, device=bad.device)
            self._first_bad_round = torch.full((), -1, dtype=torch.int64, device=bad.device)
        assert self._first_bad_step is not None and self._first_bad_round is not None
        first = bad & ~self._bad_loss
        self._first_bad_step = torch.where(first, step, self._first_bad_step)
        self._first_bad_round = torch.where(first, -1 if round_index is None else round_index, self._first_bad_round)
        self._bad_loss = self._bad_loss | bad

    def _loss_report(self, step: int) -> str | None:
        """How to name a non-finite loss since the start, with its first step and round (synchronises)."""
        if self._bad_loss is None or not bool(self._bad_loss):
            return None
        assert self._first_bad_step is not None and self._first_bad_round is not None
        first_step, first_round = int(self._first_bad_step), int(self._first_bad_round)
        if first_step == step:
            return "the loss"
        return f"the loss (first at step {first_step}" + (f", round {first_round})" if first_round >= 0 else ")")

    def _find_problem(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any] | None:
        """What is non-finite now, or None. One host synchronisation when all is well."""
        state = pl_module.state_dict()
        flags = [f for f in (_all_finite(state.values()),) if f is not None]
        if self._bad_loss is not None:
            flags.append(~self._bad_loss.to(flags[0].device if flags else self._bad_loss.device))
        if not flags or bool(torch.stack(flags).all()):
            return None
        step = trainer.global_step
        what = [w for w in (self._loss_report(step),) if w is not None]
        bad_tensors = nonfinite_tensors(state)
        if bad_tensors:
            more = f" and {len(bad_tensors) - 5} more" if len(bad_tensors) > 5 else ""
            what.append(f"the weights ({', '.join(bad_tensors[:5])}{more})")
        round_index = self._round_of_step
        if round_index is None:
            round_index = getattr(pl_module, "round_index", None)
        return {"step": step, "round": round_index, "what": " and ".join(what)}

    def check(self, trainer: Trainer, pl_module: LightningModule, suffix: str = "") -> None:
        """Raise :class:`DivergenceError` if a loss since the start or the current state is non-finite, here
        or (under a multi-process strategy) on any other rank, so that all ranks stop together."""
        problem = self.diverged if self.diverged is not None else self._find_problem(trainer, pl_module)
        if not trainer.strategy.reduce_boolean_decision(problem is not None, all=False):
            return
        if problem is None:
            problem = {"step": trainer.global_step, "round": self._round_of_step,
                       "what": "the state of another process (rank)"}
        self.diverged = problem
        raise DivergenceError(self._message(problem) + suffix)

    @staticmethod
    def _message(problem: Mapping[str, Any]) -> str:
        where = f"step {problem['step']}"
        if problem.get("round") is not None:
            where = f"round {problem['round']}, {where}"
        return (f"training diverged at {where}: non-finite values (NaN/Inf) in {problem['what']}. "
                "Lower the learning rate (lr), then start again or resume from a checkpoint written before "
                "this step (docs/reliability.md, section 3)")

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"check_every_n_steps": self.check_every_n_steps, "diverged": self.diverged}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.diverged = state_dict.get("diverged")
        if self.diverged is not None:
            raise DivergenceError(
                "this checkpoint was written after training diverged ("
                + self._message(self.diverged) + "); resume from an earlier checkpoint"
            )
