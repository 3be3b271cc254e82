"""RunSummary: the line a finished fit prints, and the module's ``final_metrics`` behind it."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from fl_lightning import FederatedDataModule, FederatedLightningModule
from fl_lightning.algorithms import proxskip
from fl_lightning.callbacks import RunSummary
from fl_lightning.models import MLP
from tests.conftest import make_trainer
from tests.test_module import _separable


def test_summary_reports_steps_rounds_time_accuracy_and_bits(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    module = FederatedLightningModule(MLP(8, [16], 3), lr=0.1, loss="cross_entropy")
    summary = RunSummary()
    lightning_log = logging.getLogger("lightning.pytorch")  # does not propagate to caplog's root handler
    lightning_log.addHandler(caplog.handler)
    try:
        make_trainer(30, [*proxskip(p=0.2, mode="fixed"), summary]).fit(module, datamodule=_separable())
    finally:
        lightning_log.removeHandler(caplog.handler)
    final = module.final_metrics
    assert final["comm/rounds"] == 6 and final["comm/bits_up"] > 0  # 30 steps, k = 5
    line = summary.line
    assert line is not None and line in caplog.messages
    assert line.startswith("fl-lightning: 30 local steps, 6 rounds, 4 clients in ")
    seconds = float(re.search(r"in ([0-9.]+) s", line).group(1))
    assert 0 < seconds == pytest.approx(summary.seconds, abs=0.01)  # printed with two decimals
    assert f"val/acc {final['val/acc']:.3f}" in line and f"val/loss {final['val/loss']:.3f}" in line
    assert "global density 1.000" in line


def test_summary_of_a_run_without_held_out_data_leaves_out_the_accuracy() -> None:
    module = FederatedLightningModule(MLP(8, [16], 3), lr=0.1, loss="cross_entropy")
    summary = RunSummary()
    g = torch.Generator().manual_seed(0)
    clients = [(torch.randn(20, 8, generator=g), torch.randint(0, 3, (20,), generator=g)) for _ in range(3)]
    dm = FederatedDataModule.from_client_tensors(clients, batch_size=4, seed=0)  # no test split
    make_trainer(10, [*proxskip(p=0.5, mode="fixed"), summary]).fit(module, datamodule=dm)
    assert summary.line is not None and "val/" not in summary.line
    assert "10 local steps, 5 rounds" in summary.line
