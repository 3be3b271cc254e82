"""``GracefulInterrupt``: Ctrl-C (SIGINT) finishes the current local step before the run stops.

Python raises ``KeyboardInterrupt`` wherever the main thread happens to be — possibly between the
optimizer step and the communication round of a step. A checkpoint written then (``OnExceptionCheckpoint``)
holds a half-done step: x_i updated and ``global_step`` advanced, but the coin not flipped and the round
not run, so the resumed run differs from the uninterrupted one. This callback turns the first SIGINT into
a request that is honoured at the end of the step (``on_train_batch_end``), where the state is consistent,
by raising ``KeyboardInterrupt`` there: Lightning then calls ``on_exception`` (``OnExceptionCheckpoint``
saves) and exits. A second Ctrl-C stops at once. Lightning already treats SIGTERM this way.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override


class GracefulInterrupt(Callback):
    """Defer Ctrl-C to the end of the current training step (main thread only; elsewhere a no-op)."""

    def __init__(self) -> None:
        self._previous: Any = None
        self._installed = False
        self.requested = False

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:  # second Ctrl-C: give up waiting
            self._restore()
            raise KeyboardInterrupt
        self.requested = True

    def _restore(self) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.requested = False
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handler)
            self._installed = True

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.requested:
            self._restore()
            raise KeyboardInterrupt

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore()
