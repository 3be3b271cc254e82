"""FederatedLightningModule: client models, paths, validation of its inputs (DESIGN §2.1)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fl_lightning import FederatedDataModule, FederatedLightningModule
from fl_lightning.algorithms import fedavg, proxskip
from fl_lightning.callbacks import ClientSampling, ControlVariates, SkipSchedule
from tests.conftest import make_trainer


class UserClassifier(L.LightningModule):
    """A user's own LightningModule, written for ordinary training, used unchanged as the client model."""

    def __init__(self, in_features: int = 8, num_classes: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, 16), nn.ReLU(), nn.Linear(16, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log("user_loss", loss, prog_bar=True)
        self.log("batch_acc", (logits.argmax(-1) == y).float().mean())
        self.log("constant", 1.0)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _separable(n_clients: int = 4, m: int = 40) -> FederatedDataModule:
    g = torch.Generator().manual_seed(0)
    centers = 3 * torch.randn(3, 8, generator=g)
    clients = []
    for _ in range(n_clients):
        y = torch.randint(0, 3, (m,), generator=g)
        clients.append((centers[y] + torch.randn(m, 8, generator=g), y))
    y = torch.randint(0, 3, (200,), generator=g)
    return FederatedDataModule.from_client_tensors(clients, test=(centers[y] + torch.randn(200, 8, generator=g), y),
                                                   batch_size=8, seed=0)


@pytest.mark.parametrize("vectorize", [True, False])
def test_users_lightning_module_with_self_log_trains_unchanged(vectorize: bool) -> None:
    torch.manual_seed(0)
    module = FederatedLightningModule(UserClassifier(), lr=0.1, vectorize=vectorize)
    dm = _separable()
    dm.setup()
    before = float(module.evaluate_global(dm)["val/loss"])
    trainer = make_trainer(60, fedavg(local_steps=5), log_every_n_steps=1)
    trainer.fit(module, datamodule=dm)
    after = float(module.evaluate_global(dm)["val/loss"])
    assert module.vectorized is vectorize
    assert after < 0.5 * before
    metrics = trainer.callback_metrics
    assert "train/user_loss" in metrics and "train/batch_acc" in metrics
    assert float(metrics["train/constant"]) == pytest.approx(1.0)
    assert isinstance(module.global_model, UserClassifier)


def test_validation_loop_reports_accuracy_of_the_global_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    module = FederatedLightningModule(model, lr=0.1, loss="cross_entropy", eval_every=5)
    trainer = make_trainer(100, proxskip(p=0.2), limit_val_batches=None, val_check_interval=50,
                           check_val_every_n_epoch=None)
    trainer.fit(module, datamodule=_separable())
    assert float(trainer.callback_metrics["val/acc"]) > 0.9
    assert 0.0 < float(trainer.callback_metrics["val/loss"]) < 0.5
    assert "val/acc" in module.round_metrics  # eval_every: evaluated after rounds too


def test_batchnorm_model_falls_back_to_the_sequential_loop_and_trains() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    module = FederatedLightningModule(model, lr=0.1, loss="cross_entropy")
    with pytest.warns(UserWarning, match="sequential"):
        make_trainer(10, fedavg(local_steps=5)).fit(module, datamodule=_separable())
    assert module.vectorized is False
    stats = module.clients.model_buffers["1.running_mean"]
    assert stats.abs().sum() > 0  # BatchNorm statistics were updated, per client, then averaged
    torch.testing.assert_close(module.global_model[1].running_mean, stats[0])


def test_vectorize_true_names_the_layer_that_cannot_be_vectorised() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    module = FederatedLightningModule(model, lr=0.1, loss="cross_entropy", vectorize=True)
    trainer = make_trainer(5, fedavg(local_steps=5))
    with pytest.raises(ValueError, match=r"vectorize=True.*1 \(BatchNorm1d"):
        trainer.fit(module, datamodule=_separable())
    assert trainer.global_step == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": 0.0}, "lr"),
        ({"lr": -1.0}, "lr"),
        ({"vectorize": "yes"}, "vectorize"),
        ({"clients_per_chunk": 0}, "clients_per_chunk"),
        ({"momentum": 1.0}, "momentum"),
        ({"eval_every": 0}, "eval_every"),
        ({"encoding": "zip"}, "encoding"),
        ({"loss": "hinge"}, "loss"),
    ],
)
def test_invalid_module_arguments_name_the_parameter(kwargs: dict, match: str) -> None:
    args = {"lr": 0.1, "loss": "mse", **kwargs}
    with pytest.raises(ValueError, match=match):
        FederatedLightningModule(nn.Linear(2, 1), **args)


def test_plain_module_without_loss_is_rejected() -> None:
    with pytest.raises(ValueError, match="loss is required"):
        FederatedLightningModule(nn.Linear(2, 1), lr=0.1)


@pytest.mark.parametrize(
    ("callbacks", "match"),
    [
        (lambda: [SkipSchedule(p=0.5), SkipSchedule(k=3)], "more than one"),
        (lambda: [ControlVariates()], "SkipSchedule"),
        (lambda: [SkipSchedule(p=0.5), ClientSampling(10)], "cohort_size"),
        (lambda: [SkipSchedule(p=0.5), ControlVariates(), ClientSampling(2)], "allow_partial_participation"),
    ],
)
def test_invalid_callback_combinations_fail_before_the_first_step(callbacks, match: str) -> None:
    module = FederatedLightningModule(nn.Linear(8, 3), lr=0.1, loss="cross_entropy")
    with pytest.raises((ValueError, RuntimeError), match=match):  # RuntimeError: Lightning's own check
        trainer = make_trainer(5, callbacks())
        trainer.fit(module, datamodule=_separable())
    assert module._trainer is None or module.trainer.global_step == 0


@pytest.mark.parametrize(("kwargs", "match"), [({"p": 0.0}, "p"), ({"p": 1.5}, "p"), ({"mode": "poisson"}, "mode"),
                                               ({"k": 0}, "k"), ({}, "p")])
def test_invalid_schedules_name_the_parameter(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SkipSchedule(**kwargs)


def test_client_sampling_trains_only_the_cohort_each_round() -> None:
    module = FederatedLightningModule(nn.Linear(8, 3), lr=0.1, loss="cross_entropy")
    seen: list[list[int]] = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            seen.append(list(pl_module.cohort.members))

    make_trainer(12, [*fedavg(local_steps=3, cohort_size=2, seed=0), Spy()]).fit(module, datamodule=_separable())
    rounds = [seen[i] for i in range(0, 12, 3)]
    assert all(len(c) == 2 for c in rounds)
    assert all(seen[i] == seen[i - i % 3] for i in range(12))  # fixed within a round
    assert len({tuple(c) for c in rounds}) > 1  # and redrawn between rounds
    assert float(module.comm.bits_up) == 4 * 2 * 32 * (8 * 3 + 3)  # only the cohort uploads
