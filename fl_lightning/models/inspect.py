"""Can a client model run all clients at once under ``torch.func.vmap`` in training?

The framework asks :func:`is_vmappable` to choose between the vectorised path and the sequential
client loop (``vectorize="auto"``) and to explain why ``vectorize=True`` is impossible.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _NormBase


def _reason(module: nn.Module) -> str | None:
    """Why ``module`` itself (not its children) breaks under vmap in training, or ``None``."""
    if isinstance(module, nn.SyncBatchNorm):
        return "SyncBatchNorm synchronises statistics across processes"
    if isinstance(module, _NormBase) and module.track_running_stats:
        # BatchNorm*d, LazyBatchNorm*d and InstanceNorm*d(track_running_stats=True) update their
        # running mean/var in place during the forward pass. vmap raises on that unless every
        # running-stat buffer is itself batched (one per client) and the update reaches the stored
        # tensor (a view, not a gathered copy), so we send these models to the sequential loop.
        return f"{type(module).__name__} with running stats"
    return None


def is_vmappable(model: nn.Module) -> tuple[bool, str | None]:
    """Whether ``model`` can be trained under ``torch.func.vmap`` over stacked client parameters.

    A conservative check for layers known to break vectorised training: any BatchNorm (or
    InstanceNorm) that tracks running statistics (its in-place update of the running mean/var
    fails under vmap unless the buffers are batched per client), and ``nn.SyncBatchNorm``
    (cross-process statistics). Models with data-dependent Python control flow are not detected;
    they fail when first run under vmap.

    Returns:
        ``(True, None)``, or ``(False, description)`` for the first offending layer in
        ``named_modules()`` order, e.g. ``"layer1.0.bn1 (BatchNorm2d with running stats)"``.
    """
    for name, module in model.named_modules():
        reason = _reason(module)
        if reason is not None:
            return False, f"{name or type(module).__name__} ({reason})"
    return True, None
