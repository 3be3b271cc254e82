"""Ctrl-C with ``GracefulInterrupt``: the run stops at the end of the step (after every other callback) or at
the end of training, and its exception checkpoint resumes exactly; without it, a Ctrl-C in the middle of a
step leaves a checkpoint of a half-done step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import OnExceptionCheckpoint

from fl_lightning import FederatedLightningModule
from fl_lightning.callbacks import FederatedCallback, GracefulInterrupt
from tests.test_resume import OTHER_SEED, SEED, STEPS, assert_identical, build, make_trainer, snapshot


class SigintMidStep(FederatedCallback):
    """Sends ``times`` SIGINTs between the optimizer step and the communication round of step ``at``."""

    def __init__(self, at: int = 6, times: int = 1) -> None:
        self.at, self.times = at, times

    def on_local_step_end(self, trainer: L.Trainer, module: FederatedLightningModule) -> None:
        if trainer.global_step == self.at:
            for _ in range(self.times):
                os.kill(os.getpid(), signal.SIGINT)


class StepEnds(L.Callback):
    """Stateful: counts the ``on_train_batch_end`` calls it saw (saved in checkpoints)."""

    def __init__(self) -> None:
        self.ends = 0

    def on_train_batch_end(self, *args: Any) -> None:
        self.ends += 1

    def state_dict(self) -> dict[str, Any]:
        return {"ends": self.ends}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.ends = state_dict["ends"]


def uninterrupted(preset: str, steps: int = STEPS, **trainer_args: Any) -> dict[str, Any]:
    """The final snapshot of the run that nothing stops."""
    L.seed_everything(SEED)
    module, dm, callbacks = build(preset)
    trainer = make_trainer(steps, callbacks, **trainer_args)
    trainer.fit(module, datamodule=dm)
    return snapshot(trainer, module, dm)


def resumed(preset: str, ckpt: str, steps: int = STEPS, **trainer_args: Any) -> dict[str, Any]:
    """Fresh objects under another global seed, resumed from ``ckpt`` to the end; the final snapshot."""
    L.seed_everything(OTHER_SEED)
    module, dm, callbacks = build(preset)
    trainer = make_trainer(steps, callbacks, **trainer_args)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    assert trainer.global_step == steps
    return snapshot(trainer, module, dm)


@pytest.mark.parametrize("preset", ["proxskip", "sparse_proxskip"])
@pytest.mark.parametrize("graceful", [False, True])
def test_ctrl_c_mid_step_resumes_exactly_only_with_graceful_interrupt(preset: str, graceful: bool,
                                                                     tmp_path: Path) -> None:
    reference = uninterrupted(preset)

    L.seed_everything(SEED)
    module, dm, callbacks = build(preset)
    on_exception = OnExceptionCheckpoint(tmp_path)
    extra = [GracefulInterrupt()] if graceful else []
    trainer = make_trainer(STEPS, [*extra, *callbacks, SigintMidStep(), on_exception], enable_checkpointing=True)
    with pytest.raises(SystemExit):  # Lightning turns KeyboardInterrupt into sys.exit(1)
        trainer.fit(module, datamodule=dm)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is restored
    ckpt = torch.load(on_exception.ckpt_path, weights_only=False)
    # without the callback the checkpoint counts step 6 although its communication round never ran
    assert ckpt["global_step"] == 6

    final = resumed(preset, on_exception.ckpt_path)
    if graceful:
        assert_identical(reference, final)
    else:
        with pytest.raises(AssertionError):
            assert_identical(reference, final)


def test_graceful_interrupt_stops_after_every_other_callback_has_finished_the_step(tmp_path: Path) -> None:
    """Listed first, it still raises after the callbacks behind it (their ``on_train_batch_end`` of the
    interrupted step ran, so their saved state belongs to the saved step)."""
    L.seed_everything(SEED)
    module, dm, callbacks = build("proxskip")
    graceful, ends, on_exception = GracefulInterrupt(), StepEnds(), OnExceptionCheckpoint(tmp_path)
    trainer = make_trainer(STEPS, [graceful, *callbacks, SigintMidStep(), ends, on_exception],
                           enable_checkpointing=True)
    with pytest.raises(SystemExit):
        trainer.fit(module, datamodule=dm)
    assert trainer.callbacks[-1] is graceful
    ckpt = torch.load(on_exception.ckpt_path, weights_only=False)
    assert ckpt["global_step"] == 6 and ckpt["callbacks"][ends.state_key] == {"ends": 6}


class SigintDuringLastValidation(L.Callback):
    """Sends SIGINT when the validation after the last training step starts."""

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == trainer.max_steps:
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_after_the_last_step_stops_at_the_end_of_training_with_a_complete_checkpoint(tmp_path: Path) -> None:
    """8 steps = 2 epochs of 4 (12 samples, batches of 3): a validation runs after the last step."""
    validating = {"limit_val_batches": 1.0}
    reference = uninterrupted("sparse_proxskip", steps=8, **validating)

    L.seed_everything(SEED)
    module, dm, callbacks = build("sparse_proxskip")
    on_exception = OnExceptionCheckpoint(tmp_path)
    trainer = make_trainer(8, [GracefulInterrupt(), *callbacks, SigintDuringLastValidation(), on_exception],
                           enable_checkpointing=True, **validating)
    with pytest.raises(SystemExit):
        trainer.fit(module, datamodule=dm)
    assert torch.load(on_exception.ckpt_path, weights_only=False)["global_step"] == 8
    assert_identical(reference, snapshot(trainer, module, dm))  # nothing was cut short
    assert_identical(reference, resumed("sparse_proxskip", on_exception.ckpt_path, steps=8, **validating))


class StepEndSeen(L.Callback):
    """Records the steps whose ``on_train_batch_end`` ran."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.steps.append(trainer.global_step)


def test_second_ctrl_c_stops_at_once() -> None:
    L.seed_everything(SEED)
    module, dm, callbacks = build("proxskip")
    seen = StepEndSeen()
    trainer = make_trainer(STEPS, [GracefulInterrupt(), *callbacks, SigintMidStep(times=2), seen])
    with pytest.raises(SystemExit):
        trainer.fit(module, datamodule=dm)
    assert seen.steps == [1, 2, 3, 4, 5]  # step 6 never reached its end
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_request_on_any_rank_stops_every_rank_at_the_same_step() -> None:
    """Under a multi-process strategy the decision is all-reduced (any rank's request counts): a rank that
    got no SIGINT stops too when the reduction says another rank did."""
    votes: list[bool] = []

    def any_rank(decision: bool, all: bool = True) -> bool:  # Lightning's signature
        votes.append(decision)
        return not all  # another rank asked to stop; an "all ranks" vote would be wrong here

    trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(reduce_boolean_decision=any_rank))
    graceful = GracefulInterrupt()
    with pytest.raises(KeyboardInterrupt):
        graceful.on_train_batch_end(trainer, None, None, None, 0)  # type: ignore[arg-type]
    assert votes == [False]  # this rank's own vote: no request here

    alone = SimpleNamespace(world_size=1, strategy=SimpleNamespace(reduce_boolean_decision=any_rank))
    graceful.on_train_batch_end(alone, None, None, None, 0)  # type: ignore[arg-type]  # one process: no vote
    assert votes == [False]


def test_the_handler_is_only_installed_from_the_main_thread() -> None:
    """``signal.signal`` works in the main thread only; elsewhere the callback leaves SIGINT alone."""
    graceful, errors = GracefulInterrupt(), []

    def train_start() -> None:
        try:
            graceful.on_train_start(None, None)  # type: ignore[arg-type]
        except Exception as err:  # signal.signal outside the main thread raises ValueError
            errors.append(err)

    worker = threading.Thread(target=train_start)
    worker.start()
    worker.join()
    assert errors == [] and signal.getsignal(signal.SIGINT) is signal.default_int_handler


# A run in a separate process, stopped by a SIGINT from outside (what a terminal's Ctrl-C sends).
# From step 3 on every step sleeps between its optimizer step and its communication round, so the signal
# most likely lands in the middle of a step, the hard case; the long run leaves seconds for it to arrive.
CHILD = """
import pathlib, sys, time
import lightning as L
from lightning.pytorch.callbacks import OnExceptionCheckpoint
from fl_lightning.callbacks import FederatedCallback, GracefulInterrupt
from tests.test_resume import SEED, build, make_trainer

ready, ckpt_dir, steps = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])

class SlowFromStep3(FederatedCallback):
    def on_local_step_end(self, trainer, module):
        if trainer.global_step >= 3:
            ready.touch()
            time.sleep(0.1)

L.seed_everything(SEED)
module, dm, callbacks = build("sparse_proxskip")
trainer = make_trainer(steps, [GracefulInterrupt(), *callbacks, SlowFromStep3(), OnExceptionCheckpoint(ckpt_dir)],
                       enable_checkpointing=True)
trainer.fit(module, datamodule=dm)
"""
LONG_RUN = 60
ROOT = Path(__file__).resolve().parents[1]


def test_ctrl_c_from_outside_the_process_leaves_a_checkpoint_that_resumes_exactly(tmp_path: Path) -> None:
    """What a terminal's Ctrl-C does to a training process, at a moment the test does not choose. (SIGTERM
    from outside takes the same path as the in-process SIGTERM of ``tests/test_resume.py``: Lightning's
    handler only sets a flag.)"""
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:  # a file, not a pipe: a full pipe would block the child
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(ready), str(tmp_path), str(LONG_RUN)],
                                 cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.monotonic() + 300  # start-up (imports) on a loaded machine
            while not ready.exists():
                assert child.poll() is None, f"the run ended before the signal:\n{log.read_text()}"
                assert time.monotonic() < deadline, "the run did not reach step 3"
                time.sleep(0.01)
            child.send_signal(signal.SIGINT)
            child.wait(timeout=300)
        finally:
            child.kill()
    assert child.returncode == 1, log.read_text()  # Lightning: sys.exit(1) after a KeyboardInterrupt
    ckpt = tmp_path / "on_exception.ckpt"
    stopped_at = torch.load(ckpt, weights_only=False)["global_step"]
    assert 3 <= stopped_at < LONG_RUN, "stopped by the signal, not by the end of the run"

    assert_identical(uninterrupted("sparse_proxskip", steps=LONG_RUN), resumed("sparse_proxskip", str(ckpt),
                                                                                steps=LONG_RUN))
