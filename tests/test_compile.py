"""``compile_step``: the vectorised local step under ``torch.compile`` computes what the eager step computes, on the
CPU too (fused kernels may round differently, so equal to float32 rounding, not bit for bit)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from fl_lightning import FederatedDataModule, FederatedLightningModule
from fl_lightning.algorithms import fedavg, proxskip
from fl_lightning.local_step import compile_options
from tests.conftest import make_trainer

ROOT = Path(__file__).resolve().parents[1]


def _data() -> FederatedDataModule:
    g = torch.Generator().manual_seed(0)
    centers = 3 * torch.randn(4, 6, generator=g)
    clients = []
    for _ in range(6):
        y = torch.randint(0, 4, (30,), generator=g)
        clients.append((centers[y] + torch.randn(30, 6, generator=g), y))
    return FederatedDataModule.from_client_tensors(clients, batch_size=8, seed=0)


class _Residual(nn.Module):
    """Not a plain stack of Linear layers, so it runs under vmap (the stacked fast path does not take it)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(6, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + torch.tanh(self.inner(x)))


def _fit(model: nn.Module, compile_step: Any, callbacks: list[Any], steps: int = 12) -> FederatedLightningModule:
    torch.manual_seed(0)
    module = FederatedLightningModule(model, lr=0.2, loss="cross_entropy", compile_step=compile_step)
    make_trainer(steps, callbacks).fit(module, datamodule=_data())
    return module


def _assert_same_run(a: FederatedLightningModule, b: FederatedLightningModule) -> None:
    # float32: 12 steps of γ = 0.2 on O(1) weights; fused kernels reorder sums, ~1e-7 relative per op
    for (k, x), (_, y) in zip(a.global_model.state_dict().items(), b.global_model.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=k)
    for k in a.clients.x:
        torch.testing.assert_close(a.clients.x[k], b.clients.x[k], rtol=1e-5, atol=1e-6)


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))


def test_inductor_compiled_step_matches_eager_on_the_cpu() -> None:
    """torch's default backend (inductor, C++ kernels on the CPU), the stacked fast path, ProxSkip's rounds."""
    eager = _fit(_mlp(), False, proxskip(p=0.25, mode="fixed"))
    compiled = _fit(_mlp(), True, proxskip(p=0.25, mode="fixed"))
    _assert_same_run(eager, compiled)
    assert not torch.equal(compiled.global_model[0].weight, _mlp()[0].weight)  # it trained


def test_compiled_vmap_path_matches_eager_with_client_sampling() -> None:
    """A model the stacked fast path does not take runs under vmap; AOTAutograd's backend traces vmap, the loss
    and the backward; the cohort's workspace changes the stacked rows' shape between rounds (3 of 6 clients)."""
    from fl_lightning.batched import compile_stacked

    assert compile_stacked(_Residual()) is None
    torch.manual_seed(2)
    state = _Residual().state_dict()
    models = [_Residual(), _Residual()]
    for m in models:
        m.load_state_dict(state)
    eager = _fit(models[0], False, fedavg(local_steps=4, cohort_size=3, seed=0))
    compiled = _fit(models[1], {"backend": "aot_eager"}, fedavg(local_steps=4, cohort_size=3, seed=0))
    assert eager.vectorized and compiled.vectorized  # a failed compile would have fallen back to the loop
    _assert_same_run(eager, compiled)


@pytest.mark.parametrize(("value", "expected"), [(False, None), (None, None), (True, {}),
                                                 ({"backend": "aot_eager", "dynamic": False},
                                                  {"backend": "aot_eager", "dynamic": False})])
def test_compile_options(value: Any, expected: Any) -> None:
    assert compile_options(value) == expected


@pytest.mark.parametrize(("value", "match"), [({"backnd": "inductor"}, r"unknown \['backnd'\]"),
                                             ("yes", "true, false")])
def test_invalid_compile_step_is_refused_when_the_module_is_built(value: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FederatedLightningModule(_mlp(), lr=0.1, loss="cross_entropy", compile_step=value)


def test_the_cli_takes_compile_step() -> None:
    out = subprocess.run([sys.executable, "train.py", "fit", "--config", "configs/quickstart.yaml",
                          "--model.compile_step", '{"backend": "aot_eager", "mode": null}', "--print_config"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "compile_step:" in out.stdout and "backend: aot_eager" in out.stdout
