"""The Lightning contract from Python: checkpoints load, evaluate and resume; optimizers are honoured or
refused; a diverging run stops; the global model is a working LightningModule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from fl_lightning import FederatedDataModule, FederatedLightningModule
from fl_lightning.algorithms import ProxSkip, SparseProxSkip, fedavg, proxskip, resolve_algorithm
from fl_lightning.callbacks import DivergenceError
from fl_lightning.hparams import to_plain
from tests.conftest import make_trainer
from tests.test_module import _separable


def _data() -> FederatedDataModule:
    return _separable(4, 40)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


class Evaluated(L.LightningModule):
    """A user's LightningModule with its own validation/test steps and optimizer."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("my_val_acc", (self(x).argmax(-1) == y).float().mean())

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("my_test_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3, betas=(0.8, 0.99))


def test_hyper_parameters_are_plain_and_numpy_scalars_resume(tmp_path: Path) -> None:
    L_smooth = np.float64(4.0)
    lr = np.float32(0.5) / L_smooth  # γ = 1/(2L) from NumPy: a numpy.float64
    module = FederatedLightningModule(_net(), lr=lr, loss="cross_entropy", momentum=np.float32(0.0),
                                      algorithm=ProxSkip(p=np.float64(0.25), seed=1))
    assert type(module.hparams["lr"]) is float and type(module.hparams["algorithm"]["init_args"]["p"]) is float
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=6)
    make_trainer(12, [ckpt], enable_checkpointing=True).fit(module, datamodule=_data())
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)  # torch's default: no NumPy, no objects
    assert state["hyper_parameters"]["algorithm"] == {
        "class_path": "fl_lightning.algorithms.ProxSkip",
        "init_args": {"p": 0.25, "mode": "bernoulli", "reference": "mean", "seed": 1}}

    loaded = FederatedLightningModule.load_from_checkpoint(tmp_path / "last.ckpt", client_model=_net())
    assert loaded.algorithm == ProxSkip(p=0.25, seed=1) and loaded.lr == 0.125
    for a, b in zip(loaded.global_model.parameters(), module.global_model.parameters(), strict=True):
        assert torch.equal(a, b)
    resumed = FederatedLightningModule(_net(), lr=lr, loss="cross_entropy", algorithm=ProxSkip(p=0.25, seed=1))
    trainer = make_trainer(18)
    trainer.fit(resumed, datamodule=_data(), ckpt_path=tmp_path / "last.ckpt")
    assert trainer.global_step == 18


def test_algorithm_specs_of_every_form_resolve_to_the_same_preset() -> None:
    preset = SparseProxSkip(p=0.1, density=0.05)
    assert resolve_algorithm(preset.spec()) == preset
    assert resolve_algorithm(preset.describe()) == preset  # version 0.1 checkpoints
    assert resolve_algorithm({"class_path": "sparse_proxskip", "init_args": {"p": 0.1, "density": 0.05}}) == preset
    assert resolve_algorithm("sparse_proxskip") == SparseProxSkip()
    with pytest.raises(ValueError, match=r"unknown algorithm 'os\.system'"):
        resolve_algorithm({"class_path": "os.system", "init_args": {}})
    assert to_plain({"a": (np.int64(3), np.array([1.5]))}) == {"a": [3, [1.5]]}


def test_test_and_predict_evaluate_the_global_model() -> None:
    module = FederatedLightningModule(_net(), lr=0.1, loss="cross_entropy")
    dm = _data()
    trainer = make_trainer(40, proxskip(p=0.25, seed=0), limit_val_batches=None)
    trainer.fit(module, datamodule=dm)
    [val] = trainer.validate(module, datamodule=dm)
    [test] = trainer.test(module, datamodule=dm)
    expected = module.evaluate_global(dm)
    assert test["test/acc"] == pytest.approx(float(expected["val/acc"])) == pytest.approx(val["val/acc"])
    assert test["test/loss"] == pytest.approx(float(expected["val/loss"]), rel=1e-5)
    [logits] = trainer.predict(module, datamodule=dm)
    assert logits.shape == (200, 3)
    torch.testing.assert_close(logits, module.global_model(dm.data.test_x))


def test_validate_before_training_warns_that_the_model_is_untrained() -> None:
    module = FederatedLightningModule(_net(), lr=0.1, loss="cross_entropy")
    with pytest.warns(UserWarning, match="validate of an untrained model"):
        make_trainer(1, limit_val_batches=None).validate(module, datamodule=_data())


def test_the_client_modules_own_eval_steps_run_and_its_global_model_validates_alone() -> None:
    module = FederatedLightningModule(Evaluated(), lr=0.1)
    dm = _data()
    trainer = make_trainer(20, fedavg(local_steps=5), limit_val_batches=None)
    with pytest.warns(UserWarning, match="configure_optimizers uses Adam with lr=0.001"):
        trainer.fit(module, datamodule=dm)
    opt = trainer.optimizers[0]
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["lr"] == 0.1
    assert opt.param_groups[0]["betas"] == (0.8, 0.99)  # the client's own hyper-parameters
    [val] = trainer.validate(module, datamodule=dm)
    [test] = trainer.test(module, datamodule=dm)
    assert set(val) == {"my_val_acc"} and set(test) == {"my_test_loss"}
    # the global model is a LightningModule of the user's class that logs through its own Trainer
    [alone] = make_trainer(1, limit_val_batches=None).validate(module.global_model, datamodule=dm)
    assert alone["my_val_acc"] == pytest.approx(val["my_val_acc"])


@pytest.mark.parametrize("name", ["Adam", "RMSprop"])
def test_an_elementwise_optimizer_over_the_stack_equals_one_optimizer_per_client(name: str) -> None:
    """Elementwise: Adam on the stacked [n, ...] tensors takes exactly the steps n separate Adams take on the
    clients' own rows (same gradients). Compared to float32 rounding (rtol 1e-6: the same ops on the same
    values; only the order of a few reductions may differ)."""
    module = FederatedLightningModule(_net(), lr=0.05, loss="cross_entropy", optimizer=name, num_clients=4)
    opt = module.configure_optimizers()
    stacked = dict(module.clients.x.items())
    rows = {k: [nn.Parameter(v[i].detach().clone()) for i in range(v.shape[0])] for k, v in stacked.items()}
    per_client = [getattr(torch.optim, name)([rows[k][i] for k in rows], lr=0.05) for i in range(4)]
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        grads = {k: torch.randn(v.shape, generator=g) for k, v in stacked.items()}
        for k, v in stacked.items():
            v.grad = grads[k].clone()
            for i in range(4):
                rows[k][i].grad = grads[k][i].clone()
        opt.step()
        for o in per_client:
            o.step()
    for k, v in stacked.items():
        torch.testing.assert_close(v.detach(), torch.stack([r.detach() for r in rows[k]]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"optimizer": "LBFGS"}, r"local optimizer 'LBFGS' is not supported: .*elementwise.*\(SGD, Adam"),
        ({"optimizer": {"class_path": "torch.optim.Adafactor"}}, "not supported"),
        ({"optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.5}}},
         r"lr \(0.5\) differs from the model's lr \(0.1\).*--model.lr"),
        ({"optimizer": "Adam", "momentum": 0.9}, "model.momentum / model.weight_decay configure the default SGD"),
    ],
)
def test_unsupported_optimizer_settings_fail_before_the_first_step(kwargs: dict, match: str) -> None:
    trainer = make_trainer(3)
    with pytest.raises(ValueError, match=match):
        trainer.fit(FederatedLightningModule(_net(), lr=0.1, loss="cross_entropy", **kwargs), datamodule=_data())
    assert trainer.global_step == 0


def test_an_lr_scheduler_steps_after_every_local_step() -> None:
    module = FederatedLightningModule(_net(), lr=0.1, loss="cross_entropy")
    module.set_local_optimizer("SGD", {"class_path": "torch.optim.lr_scheduler.StepLR",
                                       "init_args": {"step_size": 4, "gamma": 0.5}})
    trainer = make_trainer(10, proxskip(p=0.5, seed=0))
    trainer.fit(module, datamodule=_data())
    assert module.current_lr() == pytest.approx(0.1 * 0.5 ** (10 // 4))
    with pytest.raises(ValueError, match="ReduceLROnPlateau needs a monitored metric"):
        module.set_local_optimizer(None, "ReduceLROnPlateau")
        make_trainer(2).fit(module, datamodule=_data())


def test_a_diverging_run_stops_by_default_and_keeps_the_last_finite_checkpoint(tmp_path: Path) -> None:
    module = FederatedLightningModule(_net(), lr=1e6, loss="cross_entropy")
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1)
    trainer = make_trainer(300, [*proxskip(p=0.25, seed=0), ckpt], enable_checkpointing=True, log_every_n_steps=5)
    with pytest.raises(DivergenceError, match=r"loss became NaN/Inf by step \d+ \(round \d+\)\. Lower the learning "
                                               r"rate \(lr=1e\+06, --model.lr\)"):
        trainer.fit(module, datamodule=_data())
    assert trainer.global_step < 300
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["global_step"] < trainer.global_step
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())


def test_check_finite_false_trains_on() -> None:
    module = FederatedLightningModule(_net(), lr=1e6, loss="cross_entropy", check_finite=False)
    trainer = make_trainer(40, proxskip(p=0.25, seed=0), log_every_n_steps=5)
    trainer.fit(module, datamodule=_data())
    assert trainer.global_step == 40
