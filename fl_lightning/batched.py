"""Fast paths for stacked client models: weight gradients that autograd does not have to copy.

The vectorised path runs ``functional_call`` under ``torch.func.vmap``. For ``nn.Linear`` that computes
``x @ Wᵀ`` per client, so the gradient of the stacked weight ``[c, out, in]`` comes back from the batched
matmul as a *transposed* view, and autograd's ``AccumulateGrad`` copies it into a contiguous ``.grad``:
one extra strided pass over ``c·out·in`` floats per layer and step, into freshly allocated (page-faulting)
memory. On the CPU that copy costs about as much as the two matmuls themselves; for the FEMNIST CNN,
whose 3136→2048 layer holds 97% of the weights, it doubles the step.

Two remedies, both giving the numbers of ``vmap`` (to floating-point rounding):

- :class:`FeatureMajorLinear`, a ``TorchFunctionMode``: inside it, ``F.linear(x, W, b)`` is computed as
  ``(W @ xᵀ)ᵀ + b``, whose weight gradient ``δᵀ x`` comes out ``[out, in]``, contiguous. It applies to any
  model (every ``nn.Linear``, a user's LightningModule too); wrap the vmapped forward in it.
- :class:`StackedForward` (:func:`compile_stacked`), for models that are only ``nn.Linear``, activations
  and ``nn.Flatten``: no vmap at all, the activations kept as ``[c, features, B]`` (feature-major) and
  every layer one ``z ← baddbmm(b, W, z)``. The input is read through a transposed view (no copy); only
  the final logits are transposed back to ``[c, B, out]``.

Supported models (anything else gets ``None`` from :func:`compile_stacked` and keeps the vmap path):
``nn.Linear``; ``nn.Sequential`` (nested) of ``nn.Linear``, ``nn.Flatten()`` and the stateless
element-wise activations in :data:`ELEMENTWISE`; the repository's ``LogisticRegression``,
``LinearRegression`` and ``MLP``. Models with buffers, dropout or other layers are not compiled.

Usage (``params`` as in :meth:`fl_lightning.objective.LocalObjective.vectorized`, stacked over clients)::

    with FeatureMajorLinear():              # any model: the forward pass that autograd records
        losses = vmap(per_client_loss)(params, buffers, inputs, targets)

    fwd = compile_stacked(model)            # None when the model is not supported
    out = fwd(params, inputs)               # inputs [c, B, ...] -> outputs [c, B, out]
    losses = stacked_losses(loss, out, targets, mask)   # [c], f_i as ``Loss`` defines it
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap
from torch.overrides import TorchFunctionMode

from fl_lightning.losses import Loss
from fl_lightning.models.linear import MLP, LinearRegression, LogisticRegression


class FeatureMajorLinear(TorchFunctionMode):
    """Computes ``F.linear(x, W, b)`` as ``(W @ xᵀ)ᵀ + b`` while active (every ``nn.Linear`` calls it).

    The value is the same up to floating-point rounding; what changes is the backward graph: the weight
    gradient is produced as ``δᵀ x``, already in ``W``'s ``[out, in]`` layout, instead of the transpose
    of ``xᵀ δ``. Under ``vmap`` over stacked weights ``[c, out, in]`` that saves autograd a strided copy
    of every weight gradient. Only the forward pass needs to run inside the mode (autograd records the
    graph there); inputs of fewer than two dimensions and non-matrix weights are left to ``F.linear``.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            x = args[0] if args else kwargs["input"]
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if isinstance(x, Tensor) and isinstance(weight, Tensor) and x.dim() >= 2 and weight.dim() == 2:
                if x.dim() == 2 and bias is not None:
                    return torch.addmm(bias.unsqueeze(-1), weight, x.mT).mT
                out = torch.matmul(weight, x.mT).mT
                return out if bias is None else out + bias
        return func(*args, **kwargs)


#: Stateless element-wise modules that commute with any layout of the activations.
ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh,
    nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink,
    nn.Identity,
)


@dataclass(frozen=True)
class _Linear:
    weight: str
    bias: str | None


@dataclass(frozen=True)
class _Elementwise:
    fn: Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class _Flatten:
    pass


@dataclass(frozen=True)
class _Squeeze:
    """``LinearRegression`` with one output squeezes the trailing dimension."""


_Op = _Linear | _Elementwise | _Flatten | _Squeeze


class _Unsupported(Exception):
    pass


def _plan(module: nn.Module, prefix: str) -> list[_Op]:
    kind = type(module)
    if kind is nn.Linear:
        assert isinstance(module, nn.Linear)
        return [_Linear(f"{prefix}weight", f"{prefix}bias" if module.bias is not None else None)]
    if kind is nn.Flatten:
        assert isinstance(module, nn.Flatten)
        if (module.start_dim, module.end_dim) != (1, -1):
            raise _Unsupported(f"{prefix or 'model'}: Flatten(start_dim={module.start_dim}, end_dim={module.end_dim})")
        return [_Flatten()]
    if kind in ELEMENTWISE:
        if getattr(module, "inplace", False):
            raise _Unsupported(f"{prefix or 'model'}: in-place {kind.__name__}")
        return [_Elementwise(module)]
    if kind is nn.Sequential:
        return [op for name, child in module.named_children() for op in _plan(child, f"{prefix}{name}.")]
    if kind in (LogisticRegression, LinearRegression):
        ops: list[_Op] = [_Flatten(), *_plan(module.linear, f"{prefix}linear.")]  # type: ignore[arg-type]
        if kind is LinearRegression and module.out_features == 1:  # type: ignore[union-attr]
            ops.append(_Squeeze())
        return ops
    if kind is MLP:
        return [_Flatten(), *_plan(module.net, f"{prefix}net.")]  # type: ignore[arg-type]
    raise _Unsupported(f"{prefix or 'model'}: {kind.__name__}")


def unsupported_reason(model: nn.Module) -> str | None:
    """Why :func:`compile_stacked` returns ``None`` for ``model`` (``None`` when it is supported)."""
    try:
        ops = _plan(model, "")
    except _Unsupported as err:
        return f"{err} is not supported by the stacked fast path"
    if any(True for _ in model.buffers()):
        return "models with buffers are not supported by the stacked fast path"
    used = {name for op in ops if isinstance(op, _Linear) for name in (op.weight, op.bias) if name is not None}
    missing = sorted(set(dict(model.named_parameters())) - used)
    if missing:
        return f"parameters {missing} are not used by the stacked fast path"
    if not any(isinstance(op, _Linear) for op in ops):
        return "the model has no Linear layer"
    return None


class StackedForward:
    """The forward pass of many clients' copies of one fully connected model, stacked over clients.

    Built by :func:`compile_stacked`. Calling it with stacked parameters (``{name: [c, *shape]}``, as
    ``model.named_parameters()`` names them) and inputs ``[c, B, *in_shape]`` returns the outputs
    ``[c, B, out]`` (``[c, B]`` for a one-output ``LinearRegression``): client i's slice equals
    ``model(inputs[i])`` with client i's parameters, and autograd gives each client's gradient in a
    contiguous ``[c, *shape]`` tensor.
    """

    def __init__(self, ops: list[_Op]) -> None:
        self.ops = ops
        first = next(op for op in ops if not isinstance(op, _Elementwise))
        self.flattens_input = isinstance(first, _Flatten)

    def accepts(self, inputs: Tensor) -> bool:
        """Whether ``inputs`` ([c, B, ...]) fit: [c, B, features], or any sample shape when the model
        flattens its input first (an ``nn.Linear`` on [B, T, F] samples maps the last axis only)."""
        return inputs.dim() == 3 or (inputs.dim() > 3 and self.flattens_input)

    def __call__(self, params: Mapping[str, Tensor], inputs: Tensor,
                 fused_lr: Callable[[], float] | None = None) -> Tensor:
        """``fused_lr``: the backward applies SGD with step size ``fused_lr()`` to the weights in place instead of
        leaving their gradients (:class:`fl_lightning.fused.FusedLinearSGD`)."""
        if not self.accepts(inputs):
            raise ValueError(f"stacked inputs of shape {tuple(inputs.shape)} do not fit this model")
        z = inputs.flatten(2)  # [c, B, F]; a view for contiguous inputs
        feature_major = False  # z is [c, B, F] until the first Linear, then [c, F, B]
        squeeze = False
        for op in self.ops:
            if isinstance(op, _Linear):
                if not feature_major:
                    z = z.transpose(1, 2)  # a view: bmm reads it as a column-major matrix
                    feature_major = True
                weight = params[op.weight]
                bias = None if op.bias is None else params[op.bias]
                if fused_lr is not None:
                    from fl_lightning.fused import FusedLinearSGD

                    z = FusedLinearSGD.apply(z, weight, bias, fused_lr)
                else:
                    z = torch.bmm(weight, z) if bias is None else torch.baddbmm(bias.unsqueeze(-1), weight, z)
            elif isinstance(op, _Elementwise):
                z = op.fn(z)
            elif isinstance(op, _Squeeze):
                squeeze = True
            # _Flatten: the input is flattened above; after a Linear the features are already flat
        out = z.transpose(1, 2) if feature_major else z
        return out.squeeze(-1) if squeeze else out


def compile_stacked(model: nn.Module) -> StackedForward | None:
    """A :class:`StackedForward` for ``model``, or ``None`` when the model is not a stack of ``nn.Linear``
    layers, ``nn.Flatten`` and element-wise activations (see :func:`unsupported_reason`)."""
    if unsupported_reason(model) is not None:
        return None
    return StackedForward(_plan(model, ""))


def stacked_losses(loss: Loss, outputs: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
    """f_i for every client, ``[c]``: ``loss`` applied to each client's slice of ``outputs`` [c, B, ...] and
    ``targets`` [c, B, ...] (and ``mask`` [c, B]), exactly as :class:`~fl_lightning.losses.Loss` defines it.

    Built-in losses run once on the flattened ``[c·B, ...]`` batch; a custom callable runs per client
    under ``vmap`` (it may reduce over the batch in any way)."""
    if not loss.supports_padding:
        if mask is not None:
            raise ValueError("a custom loss callable cannot take padded batches")
        return vmap(loss.fn)(outputs, targets)
    c, batch = targets.shape[:2]
    per_sample = loss.fn(outputs.flatten(0, 1), targets.flatten(0, 1)).view(c, batch)
    if mask is None:
        return per_sample.mean(1)
    weights = mask.to(per_sample.dtype)
    return (per_sample * weights).sum(1) / weights.sum(1)
