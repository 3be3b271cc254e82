"""Checkpoints that survive Ctrl-C, SIGTERM and ``kill -9``: ``last.ckpt`` every N steps and at a clean stop.

:class:`LastOnInterrupt` writes ``last.ckpt`` when a run stops at a consistent point — a Ctrl-C honoured by
:class:`~fl_lightning.callbacks.GracefulInterrupt` at the end of a step, or SIGTERM, which Lightning raises
before the next step — so ``--ckpt_path last`` continues exactly where the run stopped. It writes nothing
for any other exception (a crash may leave a half-done step, and a
:class:`~fl_lightning.callbacks.DivergenceError` a diverged state): ``last.ckpt`` then stays the last
periodic one, which ``kill -9`` leaves too. :func:`find_last_checkpoint` finds it for ``--ckpt_path last``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from fl_lightning.callbacks.interrupt import GracefulInterrupt


def _last_path(cb: ModelCheckpoint) -> Path | None:
    if not cb.save_last or cb.dirpath is None:
        return None
    return Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"


def _step_of(path: Path) -> int | str:
    import torch

    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
    except Exception:  # unreadable: say so rather than fail while shutting down
        return "?"


class LastOnInterrupt(Callback):
    """On a clean stop (Ctrl-C through :class:`GracefulInterrupt`, or SIGTERM) save ``last.ckpt`` of every
    ``ModelCheckpoint(save_last=True)``; on any other exception save nothing (see the module docs)."""

    def __init__(self) -> None:
        self.saved: list[str] = []

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        clean = isinstance(exception, SIGTERMException) or (
            isinstance(exception, KeyboardInterrupt)
            and any(isinstance(cb, GracefulInterrupt) and cb.stopped_cleanly for cb in trainer.callbacks))
        targets = [(cb, p) for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)
                   for p in [_last_path(cb)] if p is not None]
        if not targets:
            return
        if not clean:
            last = targets[0][1]
            kept = f"; {last} (step {_step_of(last)}) is the last good one" if last.is_file() else ""
            rank_zero_info(f"no checkpoint written on {type(exception).__name__}: the state may be mid-step or "
                           f"diverged{kept}")
            return
        for cb, path in targets:
            trainer.save_checkpoint(path)
            cb.last_model_path = str(path)
            self.saved.append(str(path))
        rank_zero_info(f"saved {targets[0][1]} at step {trainer.global_step}: resume with --ckpt_path last")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {}


def find_last_checkpoint(trainer: Trainer, module: LightningModule | None = None) -> Path | None:
    """The newest ``last*.ckpt`` a previous run with this configuration left: in the ``dirpath`` of the
    Trainer's ``ModelCheckpoint`` if it is fixed, else under the logger's run directories
    (``<save_dir>/<name>/version_*/checkpoints``) or ``default_root_dir``; of those, the newest written by the
    preset of ``module`` (default: the Trainer's), since runs of several presets may share a logger name."""
    dirs: list[Path] = [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks
                        if isinstance(cb, ModelCheckpoint) and cb.dirpath is not None]
    roots: list[Path] = []
    for logger in trainer.loggers:
        root = getattr(logger, "root_dir", None)
        if root is None and getattr(logger, "save_dir", None) is not None:
            root = Path(logger.save_dir) / str(logger.name or "")
        if root is not None:
            roots.append(Path(root))
    roots.append(Path(trainer.default_root_dir))
    for root in roots:
        dirs += [root / "checkpoints", *root.glob("*/checkpoints")]
    found = sorted((p for d in dirs if d.is_dir() for p in d.glob("last*.ckpt")),
                   key=lambda p: p.stat().st_mtime_ns, reverse=True)
    module = module if module is not None else trainer.lightning_module
    wanted = _algorithm_of(module.hparams) if module is not None else None
    for path in found:  # runs of several presets share a logger name: the newest of this run's preset
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("hyper_parameters", {})
        if _algorithm_of(saved) == wanted:
            return path
    return found[0] if found else None  # another preset's: loading it says so (FederatedLightningModule)


def _algorithm_of(hparams: Any) -> str | None:
    from fl_lightning.algorithms import algorithm_class_of  # fl_lightning.algorithms imports the callbacks

    return algorithm_class_of(hparams.get("algorithm")) if hasattr(hparams, "get") else None
