"""Client loss functions f_i, averaged over a client's (possibly padded) batch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

LossCallable = Callable[[Tensor, Tensor], Tensor]


def _cross_entropy(output: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(output, target, reduction="none")


def _squared_error(output: Tensor, target: Tensor) -> Tensor:
    if output.shape != target.shape and output.numel() == target.numel():
        output = output.reshape(target.shape)
    err = (output - target.to(output.dtype)) ** 2
    return err.reshape(err.shape[0], -1).mean(dim=1)


_PER_SAMPLE: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "cross_entropy": _cross_entropy,
    "mse": _squared_error,
}


@dataclass(frozen=True)
class Loss:
    """f_i(w; batch) = Σ_b m_b ℓ(model(x_b), y_b) / Σ_b m_b, with m the padding mask (all ones when the
    batch is not padded). Built-in names support padding; a user callable gets unpadded batches only."""

    name: str
    fn: LossCallable

    @property
    def supports_padding(self) -> bool:
        return self.name in _PER_SAMPLE

    @property
    def task(self) -> str | None:
        return {"cross_entropy": "classification", "mse": "regression"}.get(self.name)

    def __call__(self, output: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        if self.name not in _PER_SAMPLE:
            if mask is not None:
                raise ValueError("a custom loss callable cannot take padded batches")
            return self.fn(output, target)
        per_sample = _PER_SAMPLE[self.name](output, target)
        if mask is None:
            return per_sample.mean()
        mask = mask.to(per_sample.dtype)
        return (per_sample * mask).sum() / mask.sum()


def resolve_loss(loss: str | LossCallable | None) -> Loss | None:
    """``"cross_entropy"``, ``"mse"``, a callable ``(output, target) -> scalar``, or None."""
    if loss is None:
        return None
    if isinstance(loss, str):
        if loss not in _PER_SAMPLE:
            raise ValueError(f"loss must be one of {sorted(_PER_SAMPLE)} or a callable, got {loss!r}")
        return Loss(loss, _PER_SAMPLE[loss])
    if callable(loss):
        return Loss(getattr(loss, "__name__", "custom"), loss)
    raise TypeError(f"loss must be a string or a callable, got {type(loss).__name__}")
