"""The local objective f_i evaluated for many clients at once (``torch.func.vmap``) or one by one.

Both paths compute the same numbers: f_i(w_i; batch_i) for every participating client i, where w_i are
the client's (possibly transformed, e.g. STE-pruned) parameters. The caller sums the losses and runs
one backward; because clients' parameters are disjoint slices of the stacked tensors, the gradient of
the sum with respect to client i's slice is exactly ∇f_i (DESIGN §2.1).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.func import functional_call, vmap

from fl_lightning.batched import FeatureMajorLinear, StackedForward, compile_stacked, stacked_losses
from fl_lightning.losses import Loss


@dataclass
class ClientBatch:
    """One local step's data, stacked over the participating clients.

    ``inputs``: [c, B, ...]; ``targets``: [c, B, ...]; ``mask``: [c, B] bool marking real (not padding)
    samples, or None when every row is real. Padding only happens with full-batch steps on clients of
    unequal sizes, and always sits at the end of a client's rows.
    """

    inputs: Tensor
    targets: Tensor
    mask: Tensor | None = None

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def client(self, i: int) -> tuple[Tensor, Tensor]:
        """Client i's real samples (padding removed)."""
        x, y = self.inputs[i], self.targets[i]
        if self.mask is not None:
            m = int(self.mask[i].sum())
            x, y = x[:m], y[:m]
        return x, y


class _LogRecorder:
    """Stands in for ``LightningModule.log`` on the client template: collects tensor values so a user's
    unchanged ``training_step`` can call ``self.log`` (under vmap the values come back per client)."""

    def __init__(self) -> None:
        self.values: dict[str, Tensor] = {}

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(value, (int, float)):
            value = torch.tensor(float(value))
        if isinstance(value, Tensor) and value.numel() == 1:
            self.values[name] = value.detach().reshape(()).float()

    def pop(self) -> dict[str, Tensor]:
        values, self.values = self.values, {}
        return values


@contextmanager
def shadow_log(module: nn.Module, log: Callable[..., Any]) -> Iterator[None]:
    """Within the block, ``module.log`` (and so ``log_dict``, which calls it) is ``log``; afterwards the
    module's own method is back, so the client model stays a working LightningModule
    (``Trainer.validate(module.global_model)`` logs as usual)."""
    if not isinstance(module, LightningModule):
        yield
        return
    saved = module.__dict__.get("log")
    module.log = log  # type: ignore[method-assign]
    try:
        yield
    finally:
        del module.log
        if saved is not None:
            module.log = saved  # type: ignore[method-assign]


class _TrainingStepCall(nn.Module):
    """Routes ``functional_call`` to a LightningModule's ``training_step`` instead of ``forward``."""

    def __init__(self, module: LightningModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: Any, batch_idx: int) -> Any:
        return self.module.training_step(batch, batch_idx)


class Compiled:
    """Versions of the functions a caller runs compiled with ``torch.compile``, one per key, on first use with
    ``options`` (``torch.compile``'s keyword arguments)."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.options = dict(options)
        self._fns: dict[Any, Callable[..., Any]] = {}

    def wrap(self, key: Any, fn: Callable[..., Any]) -> Callable[..., Any]:
        if key not in self._fns:
            self._fns[key] = torch.compile(fn, **self.options)
        return self._fns[key]


class LocalObjective:
    """f_i for a client template: ``forward`` + ``loss``, or a LightningModule's ``training_step``."""

    def __init__(self, template: nn.Module, loss: Loss | None) -> None:
        self.template = template
        self.loss = loss
        self.uses_training_step = loss is None
        if self.uses_training_step and not isinstance(template, LightningModule):
            raise ValueError(
                "loss is required for a plain nn.Module client model: pass loss='cross_entropy', "
                "'mse' or a callable (output, target) -> scalar"
            )
        self.recorder = _LogRecorder()
        self._step_call = _TrainingStepCall(template) if self.uses_training_step else None
        # Fully connected models skip vmap: one baddbmm per layer (fl_lightning/batched.py)
        self._stacked = None if self.uses_training_step else compile_stacked(template)

    @property
    def supports_padding(self) -> bool:
        return self.loss is not None and self.loss.supports_padding

    def recording(self) -> AbstractContextManager[None]:
        """The client model's ``self.log`` / ``self.log_dict`` collect into :attr:`recorder` in this block."""
        return shadow_log(self.template, self.recorder.log)

    def _call(self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], x: Tensor, y: Tensor,
              mask: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        if self._step_call is not None:
            state = {f"module.{k}": v for k, v in {**params, **buffers}.items()}
            out = functional_call(self._step_call, state, ((x, y), 0))
            loss = out["loss"] if isinstance(out, Mapping) else out
            if not isinstance(loss, Tensor):
                raise TypeError("the client LightningModule's training_step must return the loss tensor")
            return loss, self.recorder.pop()
        assert self.loss is not None
        output = functional_call(self.template, (dict(params), dict(buffers)), (x,))
        return self.loss(output, y, mask), {}

    @property
    def stacked(self) -> StackedForward | None:
        """The stacked fast path's forward (:mod:`fl_lightning.batched`), or None for models it does not take."""
        return self._stacked

    def _stacked_losses(self, params: Mapping[str, Tensor], inputs: Tensor, targets: Tensor,
                        mask: Tensor | None, fused_lr: Callable[[], float] | None = None) -> Tensor:
        assert self.loss is not None and self._stacked is not None
        return stacked_losses(self.loss, self._stacked(params, inputs, fused_lr), targets, mask)

    def vectorized(self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], batch: ClientBatch,
                   compiled: Compiled | None = None, fused_lr: Callable[[], float] | None = None
                   ) -> tuple[Tensor, dict[str, Tensor]]:
        """Losses [c] (and logged values [c] each) for all clients of the batch in one vmapped call (the
        computation compiled with ``torch.compile`` when ``compiled`` is given)."""
        if batch.mask is not None and not self.supports_padding:
            raise RuntimeError("padded batches need a built-in loss; use the sequential path")
        # a LightningModule's training_step stays eager: its self.log values escape the traced graph
        wrap = (lambda key, f: f) if compiled is None or self.uses_training_step else compiled.wrap
        if self._stacked is not None and not buffers and self._stacked.accepts(batch.inputs):
            if fused_lr is not None:  # SGD applied in the backward (fl_lightning/fused.py); never compiled
                return self._stacked_losses(params, batch.inputs, batch.targets, batch.mask, fused_lr), {}
            return wrap("stacked", self._stacked_losses)(params, batch.inputs, batch.targets, batch.mask), {}
        in_dims = (0, 0, 0, 0, None if batch.mask is None else 0)
        fn = wrap(("vmap", in_dims), vmap(self._call, in_dims=in_dims, randomness="different"))
        self.recorder.pop()
        with FeatureMajorLinear(), self.recording():  # contiguous nn.Linear weight gradients (no copy)
            return fn(dict(params), dict(buffers), batch.inputs, batch.targets, batch.mask)

    def outputs(self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], inputs: Tensor) -> Tensor:
        """The client model's outputs ``[c, B, ...]`` for stacked ``params`` and ``inputs`` [c, B, ...] (the
        forward of the stacked fast path when the model has one, else one vmapped ``functional_call``)."""
        if self._stacked is not None and not buffers and self._stacked.accepts(inputs):
            return self._stacked(params, inputs)

        def forward(p: Mapping[str, Tensor], b: Mapping[str, Tensor], x: Tensor) -> Tensor:
            return functional_call(self.template, (dict(p), dict(b)), (x,))

        return vmap(forward, randomness="different")(dict(params), dict(buffers), inputs)

    def single(self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], x: Tensor,
               y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """f_i for one client's unpadded batch (the sequential path)."""
        self.recorder.pop()
        with self.recording():
            return self._call(params, buffers, x, y, None)

    def evaluate(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Mean loss of a materialised model (the global model) on a batch."""
        if self.loss is not None:
            return self.loss(model(x), y)
        with warnings.catch_warnings(), shadow_log(model, self.recorder.log):
            warnings.simplefilter("ignore")
            out = model.training_step((x, y), 0)
        self.recorder.pop()
        return out["loss"] if isinstance(out, Mapping) else out
