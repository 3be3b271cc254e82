"""Ctrl-C in the middle of a local step: with GracefulInterrupt the run stops at the end of the step and its
exception checkpoint resumes exactly; without it, the checkpoint holds a half-done step."""

from __future__ import annotations

import os
import signal

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import OnExceptionCheckpoint

from fl_lightning.callbacks import FederatedCallback, GracefulInterrupt
from tests.test_resume import OTHER_SEED, SEED, STEPS, build, make_trainer


class SigintMidStep(FederatedCallback):
    """Sends SIGINT between the optimizer step and the communication round of step 6."""

    def on_local_step_end(self, trainer, module) -> None:
        if trainer.global_step == 6:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("graceful", [False, True])
def test_ctrl_c_mid_step_resumes_exactly_only_with_graceful_interrupt(graceful: bool, tmp_path) -> None:
    L.seed_everything(SEED)
    module, dm, callbacks = build("proxskip")
    make_trainer(STEPS, callbacks).fit(module, datamodule=dm)
    reference = {k: v.clone() for k, v in module.state_dict().items()}

    L.seed_everything(SEED)
    module, dm, callbacks = build("proxskip")
    on_exception = OnExceptionCheckpoint(tmp_path)
    extra = [GracefulInterrupt()] if graceful else []
    trainer = make_trainer(STEPS, [*callbacks, SigintMidStep(), *extra, on_exception], enable_checkpointing=True)
    with pytest.raises(SystemExit):
        trainer.fit(module, datamodule=dm)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is restored

    L.seed_everything(OTHER_SEED)
    resumed, dm2, callbacks2 = build("proxskip")
    make_trainer(STEPS, callbacks2).fit(resumed, datamodule=dm2, ckpt_path=on_exception.ckpt_path)
    same = all(torch.equal(reference[k], v) for k, v in resumed.state_dict().items())
    assert same == graceful
