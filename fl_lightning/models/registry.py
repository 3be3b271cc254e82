"""Reference client models found by name: ``create_model("femnist_cnn", num_classes=62)``.

Modules of this package register their classes with :func:`register_model` on import (timm's
``@register_model`` pattern); :mod:`fl_lightning.models` imports them all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from fl_lightning.registry import Registry

M = TypeVar("M", bound=type[nn.Module])

MODELS: Registry[type[nn.Module]] = Registry("model")


def register_model(name: str) -> Callable[[M], M]:
    """Class decorator: make the model class available as ``create_model(name, ...)``."""
    return MODELS.register(name)  # type: ignore[return-value]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate the model registered as ``name`` with ``kwargs``.

    Raises:
        ValueError: ``name`` is not registered; the message lists the known names.
    """
    return MODELS.get(name)(**kwargs)
