"""ResNet-18 trains through the framework on tiny inputs: GroupNorm vectorised, BatchNorm sequentially."""

from __future__ import annotations

import pytest
import torch

from fl_lightning import FederatedDataModule, FederatedLightningModule
from fl_lightning.algorithms import proxskip
from fl_lightning.models import ResNet18
from tests.conftest import make_trainer


@pytest.mark.parametrize(("norm", "vectorized"), [("group", True), ("batch", False)])
def test_resnet18_trains_a_few_steps(norm: str, vectorized: bool) -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    clients = [(torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 10, (6,), generator=g)) for _ in range(2)]
    dm = FederatedDataModule.from_client_tensors(clients, batch_size=2, num_classes=10, seed=0)
    module = FederatedLightningModule(ResNet18(num_classes=10, norm=norm), lr=0.05, loss="cross_entropy")
    before = {k: v.detach().clone() for k, v in module.global_model.named_parameters()}
    make_trainer(4, proxskip(p=0.5, mode="fixed")).fit(module, datamodule=dm)
    assert module.vectorized is vectorized
    assert module.round_index == 2
    after = dict(module.global_model.named_parameters())
    assert all(torch.isfinite(v).all() for v in after.values())
    assert not torch.equal(after["fc.weight"], before["fc.weight"])  # the global model moved
    if norm == "batch":  # per-client BatchNorm statistics were averaged into the global model
        assert module.global_model.bn1.running_mean.abs().sum() > 0
