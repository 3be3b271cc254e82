"""DivergenceGuard: a diverging run stops with an error naming the round and step, and never writes a
checkpoint of the diverged state over the last good one."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from torch import nn

from fl_lightning import FederatedDataModule, FederatedLightningModule
from fl_lightning.algorithms import proxskip
from fl_lightning.callbacks import FederatedCallback
from fl_lightning.callbacks.divergence import DivergenceError, DivergenceGuard
from tests.conftest import least_squares, make_trainer

PROBLEM = least_squares(n=4, d=5, m=12, kappa=10.0, seed=3)
HUGE_LR = 50.0  # γL ≫ 2: the float32 iterates overflow within a few rounds


def diverging_run() -> tuple[FederatedLightningModule, FederatedDataModule, list[L.Callback]]:
    L.seed_everything(0)
    module = FederatedLightningModule(nn.Linear(5, 1, bias=False), lr=HUGE_LR, loss="mse")
    dm = FederatedDataModule.from_client_tensors(PROBLEM.clients, batch_size=3)
    return module, dm, proxskip(p=0.3)


class RoundRecorder(L.Callback):
    """The round each step belongs to (rounds completed before it)."""

    def __init__(self) -> None:
        self.rounds: list[int] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.rounds.append(pl_module.round_index)


def floating_state_is_finite(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def saved_steps(directory: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in directory.iterdir() if (m := re.fullmatch(r"step=(\d+)\.ckpt", p.name)))


# check_every_n_steps=1000 never reaches a check step: then the on_save_checkpoint check stops the run
@pytest.mark.parametrize("check_every_n_steps", [1, 1000])
def test_huge_lr_stops_naming_round_and_step_and_keeps_the_last_good_checkpoint(
        check_every_n_steps: int, tmp_path: Path) -> None:
    module, dm, callbacks = diverging_run()
    recorder = RoundRecorder()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=1, save_top_k=-1,
                                  save_last=True)
    guard = DivergenceGuard(check_every_n_steps=check_every_n_steps)
    trainer = make_trainer(500, [*callbacks, recorder, guard, checkpoints], enable_checkpointing=True)
    with pytest.raises(DivergenceError, match=r"round \d+, step \d+") as err:
        trainer.fit(module, datamodule=dm)

    found = re.search(r"round (\d+), step (\d+)", str(err.value))
    assert found is not None
    round_index, step = int(found.group(1)), int(found.group(2))
    assert step == trainer.global_step < 500, "stopped at the step that diverged, not at the end"
    assert round_index == recorder.rounds[-1] >= 1
    assert ("not written" in str(err.value)) == (check_every_n_steps != 1)

    # every step before the divergence was saved, the diverged one was not, and "last" is the last good one
    assert saved_steps(tmp_path) == list(range(1, step))
    last_good = tmp_path / f"step={step - 1}.ckpt"
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == step - 1
    assert floating_state_is_finite(torch.load(last_good, weights_only=False)["state_dict"])
    loaded = FederatedLightningModule.load_from_checkpoint(last_good, client_model=nn.Linear(5, 1, bias=False))
    assert floating_state_is_finite(loaded.state_dict())
    assert re.search(r"non-finite values \(NaN/Inf\) in the (loss|weights)", str(err.value))


class NanControlVariateAtStep4(FederatedCallback):
    """Writes a NaN into client 0's control variate after the optimizer step of step 4 (the loss of step 4,
    computed before, is finite)."""

    def on_local_step_end(self, trainer: L.Trainer, module: FederatedLightningModule) -> None:
        if trainer.global_step == 4:
            module.ensure_clients().extra["cv_h"]["weight"][0, 0, 0] = float("nan")


def test_nan_in_the_weights_with_a_finite_loss_stops_naming_the_tensor_round_and_step() -> None:
    L.seed_everything(0)
    module = FederatedLightningModule(nn.Linear(5, 1, bias=False), lr=0.01, loss="mse")
    dm = FederatedDataModule.from_client_tensors(PROBLEM.clients, batch_size=3)
    recorder = RoundRecorder()
    trainer = make_trainer(20, [*proxskip(p=0.3), NanControlVariateAtStep4(), recorder, DivergenceGuard()])
    in_the_weights = r"at round \d+, step 4: non-finite values \(NaN/Inf\) in the weights \("
    with pytest.raises(DivergenceError, match=in_the_weights) as err:
        trainer.fit(module, datamodule=dm)
    assert f"round {recorder.rounds[3]}, step 4" in str(err.value)  # the round step 4 belonged to
    assert "clients.extra.cv_h.weight" in str(err.value) and "the loss" not in str(err.value)
    assert trainer.global_step == 4


def test_a_good_checkpoint_resumes_to_the_same_divergence_and_trains_on_with_a_lower_lr(tmp_path: Path) -> None:
    """Resumed with the same lr, the run diverges again at the same round and step (the resume is exact); a
    module built with a lower lr resumes with that lr and trains on with finite weights. The checkpoint of
    step 3 is used, not the last good one: with lr = 50 the last finite weights are so large (~1e20) that
    their loss overflows float32 whatever the next step does."""
    module, dm, callbacks = diverging_run()
    every_step = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    trainer = make_trainer(500, [*callbacks, DivergenceGuard(), every_step], enable_checkpointing=True)
    with pytest.raises(DivergenceError) as first:
        trainer.fit(module, datamodule=dm)
    where = re.search(r"round \d+, step \d+", str(first.value))
    assert where is not None and trainer.global_step > 3

    def resume(lr: float) -> tuple[L.Trainer, FederatedLightningModule]:
        L.seed_everything(1)
        fresh = FederatedLightningModule(nn.Linear(5, 1, bias=False), lr=lr, loss="mse")
        dm2 = FederatedDataModule.from_client_tensors(PROBLEM.clients, batch_size=3)
        resumed = make_trainer(trainer.global_step + 30, [*proxskip(p=0.3), DivergenceGuard()])
        resumed.fit(fresh, datamodule=dm2, ckpt_path=tmp_path / "step=3.ckpt")
        return resumed, fresh

    with pytest.raises(DivergenceError, match=re.escape(f"at {where.group(0)}:")):
        resume(module.lr)
    resumed, fresh = resume(0.01)
    assert resumed.global_step == trainer.global_step + 30 and resumed.optimizers[0].param_groups[0]["lr"] == 0.01
    assert floating_state_is_finite(fresh.state_dict())


def test_non_finite_loss_with_finite_weights_is_reported_with_its_first_step() -> None:
    """A plain LightningModule (the guard is not federated-only) whose loss is +inf at step 2 while the
    weights stay finite: the check at step 4 names step 4 and the first bad step."""

    class InfAtStep2(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(2, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = self.layer(torch.ones(1, 2)).pow(2).mean()
            # a constant +inf: the gradient, and so the weights, stay finite
            return loss + (torch.tensor(float("inf")) if self.global_step == 1 else 0.0)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def train_dataloader(self) -> list[int]:
            return list(range(10))

    module = InfAtStep2()
    trainer = make_trainer(10, [DivergenceGuard(check_every_n_steps=4)])
    with pytest.raises(DivergenceError, match=r"at step 4: .*the loss \(first at step 2\)") as err:
        trainer.fit(module)
    assert "round" not in str(err.value)
    assert "weights" not in str(err.value) and floating_state_is_finite(module.state_dict())


def test_checkpoint_written_after_divergence_is_marked_and_refused_on_resume(tmp_path: Path) -> None:
    """OnExceptionCheckpoint saves the diverged state from ``on_exception`` (after the error); the guard
    marks that checkpoint, and resuming from it fails before the first step."""
    module, dm, callbacks = diverging_run()
    on_exception = OnExceptionCheckpoint(tmp_path)
    trainer = make_trainer(500, [*callbacks, DivergenceGuard(), on_exception], enable_checkpointing=True)
    with pytest.raises(DivergenceError):
        trainer.fit(module, datamodule=dm)
    saved = torch.load(on_exception.ckpt_path, weights_only=False)
    marked = saved["callbacks"][DivergenceGuard().state_key]["diverged"]
    assert marked is not None and marked["step"] == trainer.global_step

    module2, dm2, callbacks2 = diverging_run()
    trainer2 = make_trainer(500, [*callbacks2, DivergenceGuard()])
    with pytest.raises(DivergenceError, match="written after training diverged"):
        trainer2.fit(module2, datamodule=dm2, ckpt_path=on_exception.ckpt_path)
    assert trainer2.global_step == 0


class CountingGuard(DivergenceGuard):
    """Records the steps at which the weights are tested (each costs a host synchronisation)."""

    def __init__(self, check_every_n_steps: int) -> None:
        super().__init__(check_every_n_steps)
        self.checked_at: list[int] = []

    def _find_problem(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any] | None:
        self.checked_at.append(trainer.global_step)
        return super()._find_problem(trainer, pl_module)


def test_healthy_run_is_checked_every_n_steps_and_at_the_end_only() -> None:
    L.seed_everything(0)
    module = FederatedLightningModule(nn.Linear(5, 1, bias=False), lr=0.01, loss="mse")
    dm = FederatedDataModule.from_client_tensors(PROBLEM.clients, batch_size=3)
    guard = CountingGuard(check_every_n_steps=3)
    make_trainer(10, [*proxskip(p=0.3), guard]).fit(module, datamodule=dm)
    assert guard.checked_at == [3, 6, 9, 10]
    assert guard.diverged is None and guard.state_dict()["diverged"] is None


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_check_every_n_steps_must_be_a_positive_integer(bad: Any) -> None:
    with pytest.raises(ValueError, match="check_every_n_steps"):
        DivergenceGuard(check_every_n_steps=bad)
