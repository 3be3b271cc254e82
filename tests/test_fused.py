"""The fused SGD update (fl_lightning/fused.py): the backward writes the weight gradient into the update. It is plain
SGD to float32 rounding, it runs wherever nothing else needs the gradient, and nowhere else."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

from fl_lightning import FederatedDataModule, FederatedLightningModule
from fl_lightning.algorithms import dp_fedavg, fedadam, fedavg, fedprox, proxskip, sparse_proxskip_local
from fl_lightning.batched import compile_stacked
from fl_lightning.clients import stack_copies
from fl_lightning.fused import FusedLinearSGD
from tests.conftest import make_trainer


def _data() -> FederatedDataModule:
    g = torch.Generator().manual_seed(0)
    centers = 3 * torch.randn(4, 6, generator=g)
    clients = []
    for i in range(8):
        y = torch.randint(0, 4, (30 + i,), generator=g)
        clients.append((centers[y] + torch.randn(30 + i, 6, generator=g), y))
    return FederatedDataModule.from_client_tensors(clients, batch_size=8, seed=0)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))


def _fit(callbacks: Callable[[], list[Any]], fused: bool, model: Callable[[], nn.Module] = _mlp, steps: int = 20,
         trainer_args: dict[str, Any] | None = None,
         **module_args: Any) -> tuple[FederatedLightningModule, list[float]]:
    module = FederatedLightningModule(model(), lr=0.2, loss="cross_entropy", fused_sgd=fused, **module_args)
    losses: list[float] = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, *args: Any) -> None:
            losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))

    make_trainer(steps, [*callbacks(), Losses()], **(trainer_args or {})).fit(module, datamodule=_data())
    return module, losses


RUNS: dict[str, Callable[[], list[Any]]] = {
    "fedavg": lambda: fedavg(local_steps=4),
    "fedavg_cohort": lambda: fedavg(local_steps=4, cohort_size=3, seed=1),  # on the cohort's workspace
    "fedadam": lambda: fedadam(local_steps=4, cohort_size=4, seed=1, server_lr=0.05),
    "dp_fedavg": lambda: dp_fedavg(local_steps=4, cohort_size=4, seed=1, clip_norm=0.5, noise_multiplier=0.3),
}


@pytest.mark.parametrize("run", sorted(RUNS))
def test_fused_update_is_plain_sgd_to_float32_rounding(run: str) -> None:
    fused, fused_losses = _fit(RUNS[run], True)
    plain, plain_losses = _fit(RUNS[run], False)
    assert fused._fused_blocker == "" and plain._fused_blocker is None  # fused ran; the other never asked
    # 20 steps of γ = 0.2 on O(1) weights in float32: each step differs by the rounding of the accumulation
    # (~1e-7 relative), a few steps of which compound; 1e-5 is ~100× that and far below a step's change (~1e-2)
    torch.testing.assert_close(torch.tensor(fused_losses), torch.tensor(plain_losses), rtol=1e-5, atol=1e-6)
    for (k, a), (_, b) in zip(fused.global_model.state_dict().items(), plain.global_model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
        assert not torch.equal(a, _mlp().state_dict()[k])  # trained
    assert fused.comm.bits_up == plain.comm.bits_up


class _GradientWatcher(L.Callback):
    def on_after_backward(self, trainer: L.Trainer, pl_module: Any) -> None:
        pass


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner, self.head = nn.Linear(6, 6), nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + torch.tanh(self.inner(x)))


@pytest.mark.parametrize(("callbacks", "module_args", "reason"), [
    (lambda: fedavg(local_steps=4), {"momentum": 0.9}, "momentum or weight decay"),
    (lambda: fedavg(local_steps=4), {"weight_decay": 0.01}, "momentum or weight decay"),
    (lambda: fedavg(local_steps=4), {"optimizer": "Adam"}, "Adam, not plain SGD"),
    (lambda: proxskip(p=0.25, mode="fixed"), {}, "ControlVariates uses on_before_optimizer_step"),
    (lambda: fedprox(local_steps=4, mu=0.1), {}, "ProximalTerm uses on_before_optimizer_step"),
    (lambda: sparse_proxskip_local(p=0.25, mode="fixed"), {}, "uses on_before_optimizer_step"),
    (lambda: [*fedavg(local_steps=4), _GradientWatcher()], {}, "_GradientWatcher uses on_after_backward"),
    (lambda: fedavg(local_steps=4), {"model": _Residual}, "stacked fast path"),
    (lambda: fedavg(local_steps=4), {"compile_step": {"backend": "eager"}}, "compile_step"),
    (lambda: fedavg(local_steps=4), {"trainer_args": {"precision": "bf16-mixed"}}, "precision bf16-mixed"),
])
def test_the_fused_update_stays_off_where_something_needs_the_gradient(callbacks: Callable[[], list[Any]],
                                                                       module_args: dict[str, Any],
                                                                       reason: str) -> None:
    module, _ = _fit(callbacks, True, steps=4, **module_args)
    assert module._fused_blocker and reason in module._fused_blocker


def test_the_fused_update_stays_off_for_the_sparse_presets_transform() -> None:
    """An STE forward (TopK at "forward") transforms the parameters: its gradient must reach the dense x."""
    from fl_lightning.callbacks import TopKPruning

    module, _ = _fit(lambda: [*fedavg(local_steps=4), TopKPruning(0.5, at=("forward",))], True, steps=4)
    assert "transforms the parameters" in module._fused_blocker


def test_invalid_fused_sgd_is_refused() -> None:
    with pytest.raises(ValueError, match="fused_sgd must be true or false"):
        FederatedLightningModule(_mlp(), lr=0.1, loss="cross_entropy", fused_sgd="auto")


def test_fused_linear_applies_the_sgd_step_and_passes_the_input_gradient_down() -> None:
    """Two stacked layers: after one fused backward, W = W₀ − γ ∂L/∂W and b = b₀ − γ ∂L/∂b, with ∂L/∂W of the lower
    layer computed through the upper layer's weights *before* their update (autograd's gradients as reference)."""
    model = _mlp()
    forward = compile_stacked(model)
    assert forward is not None
    params = {k: v.requires_grad_() for k, v in stack_copies(dict(model.named_parameters()), 3).items()}
    with torch.no_grad():
        for v in params.values():
            v.add_(0.3 * torch.randn_like(v))  # clients differ
    start = {k: v.detach().clone() for k, v in params.items()}
    x, y = torch.randn(3, 5, 6), torch.randint(0, 4, (3, 5))

    def loss(out: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out.reshape(15, 4), y.reshape(15), reduction="sum")

    loss(forward(params, x)).backward()
    grads = {k: v.grad.clone() for k, v in params.items()}
    for v in params.values():
        v.grad = None
    gamma = 0.1
    loss(forward(params, x, lambda: gamma)).backward()
    for k, v in params.items():
        assert v.grad is None, k  # no gradient tensor: the step is done
        torch.testing.assert_close(v.detach(), start[k] - gamma * grads[k], rtol=1e-6, atol=1e-6, msg=k)


def test_fused_linear_without_bias_and_without_input_gradient() -> None:
    w = torch.randn(2, 3, 4, requires_grad=True)
    z = torch.randn(2, 4, 5)  # the input needs no gradient
    w0 = w.detach().clone()
    out = FusedLinearSGD.apply(z, w, None, lambda: 0.5)
    torch.testing.assert_close(out, torch.bmm(w0, z))
    out.sum().backward()
    torch.testing.assert_close(w.detach(), w0 - 0.5 * torch.ones(2, 3, 5) @ z.transpose(1, 2))
    assert w.grad is None


def test_a_server_side_topk_keeps_the_local_step_fused() -> None:
    """FedAvg + TopK prunes the server's average (TopKPruning at "round"): the local step is plain SGD, fused."""
    from fl_lightning.algorithms import fedavg_topk

    module, _ = _fit(lambda: fedavg_topk(local_steps=4, density=0.5), True, steps=8)
    assert module._fused_blocker == ""
