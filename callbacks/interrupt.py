"""``GracefulInterrupt``: Ctrl-C (SIGINT) finishes the current local step before the run stops.

Python raises ``KeyboardInterrupt`` wherever the main thread happens to be — possibly between the
optimizer step and the communication round of a step. A checkpoint written then (``OnExceptionCheckpoint``)
holds a half-done step: x_i updated and ``global_step`` advanced, but the coin not flipped and the round
not run, so the resumed run differs from the uninterrupted one. This callback turns the first SIGINT into
a request that is honoured where the state is consistent, by raising ``KeyboardInterrupt`` there:

- at the end of the current training step (``on_train_batch_end``). The callback moves itself behind every
  other callback at ``setup`` (checkpoint callbacks included), so every callback has finished the step when
  it raises: the state is the one a ``ModelCheckpoint(every_n_train_steps=1)`` would have saved;
- at the end of training (``on_train_end``), for a request that came after the last step (during the
  final validation, say).

Lightning then calls ``on_exception`` (``OnExceptionCheckpoint`` saves), prints "Detected KeyboardInterrupt"
and exits with status 1. A second Ctrl-C stops at once. Under a multi-process strategy the request is
all-reduced at the end of every step, so all ranks stop at the same step even if only some received the
signal. Lightning already treats SIGTERM this way (its handler sets a flag that is checked after the step).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override


class GracefulInterrupt(Callback):
    """Defer Ctrl-C to the end of the current training step (main thread only; elsewhere a no-op).

    Attributes:
        requested: a Ctrl-C arrived and the run will stop at the next consistent point.
        stopped_cleanly: the run was stopped at such a point (a checkpoint now resumes exactly).
    """

    def __init__(self) -> None:
        self._previous: Any = None
        self._installed = False
        self.requested = False
        self.stopped_cleanly = False

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:  # second Ctrl-C: give up waiting
            self._restore()
            raise KeyboardInterrupt
        self.requested = True
        rank_zero_info("\nCtrl-C: the run stops at the end of this training step (press Ctrl-C again to stop at once)")

    def _restore(self) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def _stop_if_requested(self, trainer: Trainer) -> None:
        """Raise ``KeyboardInterrupt`` if a Ctrl-C came, here or (multi-process) on any other rank."""
        stop = self.requested
        if trainer.world_size > 1:  # all ranks take part, so all stop at the same point
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            self._restore()
            self.stopped_cleanly = True
            raise KeyboardInterrupt

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Run after every other callback (Lightning calls callbacks in list order). Assigning a new list, as
        # Lightning's own callback connector does, leaves the loop that is calling ``setup`` undisturbed.
        trainer.callbacks = [cb for cb in trainer.callbacks if cb is not self] + [self]

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.requested = self.stopped_cleanly = False
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handler)
            self._installed = True

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._stop_if_requested(trainer)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._stop_if_requested(trainer)  # a Ctrl-C after the last step: every step is complete, stop as asked
        self._restore()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore()
