"""Fused local SGD for stacked fully connected clients: the weight gradient is written into the update.

Plain SGD on the stacked weights, x ← x − γ∇f_i(x) (DESIGN §1.2 without control variates), done the usual way
materialises the gradient: the backward writes g = δ zᵀ ([c, out, in], a full copy of the weights) and the
optimizer reads x and g and writes x — five passes over c·out·in floats per layer and step. For a layer
z_out = W z + b of the stacked fast path (:mod:`fl_lightning.batched`), :class:`FusedLinearSGD`'s backward does
instead, with δ = ∂(Σ_i f_i)/∂z_out:

    ∂/∂z = Wᵀ δ            (for the layer below, with W before the update)
    W ← W − γ δ zᵀ         (one ``baddbmm_`` into W: no gradient tensor)
    b ← b − γ Σ_B δ

three passes instead of five; the optimizer then finds no gradient and does nothing. The numbers are SGD's up to
floating-point rounding (the product is accumulated into W rather than added to it afterwards).

It applies only where nothing else needs the gradient (:func:`fused_blocker`): the local optimizer is plain SGD
(no momentum, no weight decay), no callback shifts or reads the gradient (``on_before_optimizer_step``: control
variates, FedProx, SCAFFOLD; ``on_after_backward``) or transforms the parameters (an STE), the model runs on the
stacked fast path in one chunk, every participant steps (no held rows), and the precision is full (32 or 64 bit:
mixed precision scales or casts the gradient). FedAvg and its server-optimizer
variants (FedAdam, FedYogi, FedAvgM, DP-FedAvg) qualify; the ProxSkip family does not (its step is x − γ(g − h)).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import Callback, LightningModule
from torch import Tensor

if TYPE_CHECKING:
    from fl_lightning.module import FederatedLightningModule

#: hooks that see (or change) the gradient or the forward's parameters; a callback overriding one blocks fusing
GRADIENT_HOOKS: tuple[str, ...] = ("on_before_optimizer_step", "on_after_backward", "on_before_backward")


class FusedLinearSGD(torch.autograd.Function):
    """``baddbmm(b, W, z)`` whose backward applies the SGD step to W and b in place (module docstring).

    ``forward(z [c, in, B], weight [c, out, in], bias [c, out] | None, lr: () -> γ)`` → ``[c, out, B]``."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, weight: Tensor, bias: Tensor | None, lr: Callable[[], float]) -> Tensor:
        ctx.save_for_backward(z, weight)
        ctx.bias, ctx.lr = bias, lr
        return torch.bmm(weight, z) if bias is None else torch.baddbmm(bias.unsqueeze(-1), weight, z)

    @staticmethod
    def backward(ctx: Any, delta: Tensor) -> tuple[Tensor | None, None, None, None]:
        z, weight = ctx.saved_tensors
        grad_z = torch.bmm(weight.transpose(1, 2), delta) if ctx.needs_input_grad[0] else None  # W before the step
        gamma = ctx.lr()
        with torch.no_grad():
            weight.baddbmm_(delta, z.transpose(1, 2), alpha=-gamma)
            if ctx.bias is not None:
                ctx.bias.add_(delta.sum(2), alpha=-gamma)
        return grad_z, None, None, None


def _overrides(obj: object, base: type, hooks: tuple[str, ...]) -> str | None:
    for hook in hooks:
        if getattr(type(obj), hook, None) is not getattr(base, hook, None):
            return hook
    return None


def fused_blocker(module: FederatedLightningModule, optimizer: torch.optim.Optimizer) -> str | None:
    """Why the fused SGD step would not be plain SGD here, or could not run (``None``: it can); the per-fit part
    of the conditions (the per-step ones: one chunk, no held rows, are the caller's)."""
    from fl_lightning.callbacks.base import FederatedCallback

    if type(optimizer) is not torch.optim.SGD:
        return f"the local optimizer is {type(optimizer).__name__}, not plain SGD"
    for group in optimizer.param_groups:
        if group.get("momentum", 0) or group.get("weight_decay", 0) or group.get("nesterov") or group.get("maximize"):
            return "SGD with momentum or weight decay needs the gradient"
    if module.objective.stacked is None:  # (the vectorised path itself is LocalStep.fuses's per-step check)
        return "the client model is not on the stacked fast path (fully connected layers only)"
    if module.local_step.compiled is not None:
        return "compile_step traces the plain step"
    precision = str(module.trainer.precision)
    if precision not in ("32-true", "64-true", "32", "64"):
        return f"precision {precision} scales or casts the gradient"
    hook = _overrides(module, LightningModule, GRADIENT_HOOKS)
    if hook:
        return f"the module overrides {hook}"
    for cb in module.trainer.callbacks:  # a server-side TopK (FedAvg + TopK) leaves the local step alone
        hook = _overrides(cb, Callback, GRADIENT_HOOKS)
        if hook:
            return f"{type(cb).__name__} uses {hook}"
        if isinstance(cb, FederatedCallback) and cb.transforms_forward():
            return f"{type(cb).__name__} transforms the parameters of the forward pass"
    return None


__all__ = ["GRADIENT_HOOKS", "FusedLinearSGD", "fused_blocker"]
