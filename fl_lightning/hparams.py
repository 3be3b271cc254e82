"""Hyper-parameters in the form checkpoints can carry: plain Python values only.

Checkpoints are read with ``torch.load(weights_only=True)`` (torch's default, and what LightningCLI uses for
``--ckpt_path``), which refuses NumPy scalars and arbitrary objects; and LightningCLI re-parses the saved
hyper-parameters as the model's config, so an object must be saved as the ``class_path`` / ``init_args``
dict the CLI itself writes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

import numpy as np
import torch

try:  # LightningCLI hands the parsed config of the module to save_hyperparameters through this variable
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
except ImportError:  # pragma: no cover - older Lightning: the module's own arguments are saved instead
    _given_hyperparameters = None


def to_plain(value: Any) -> Any:
    """``value`` with NumPy / 0-dim torch scalars turned into Python numbers, tuples into lists, paths into
    strings, recursively through dicts and lists. Other objects are returned unchanged."""
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, (bool, int, float, str)) or value is None:
        return _python_scalar(value)
    if isinstance(value, np.generic):
        return _python_scalar(value.item())
    if isinstance(value, np.ndarray):
        return to_plain(value.tolist())
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        return _python_scalar(value.item())
    return value


def _python_scalar(value: Any) -> Any:
    """bool/int/float/str subclasses (``numpy.float64`` is a float) as the exact Python type."""
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    return value


def given_init_config() -> Mapping[str, Any] | None:
    """The config LightningCLI parsed for the module being built (``class_path``s as dicts), or None
    outside LightningCLI."""
    if _given_hyperparameters is None:
        return None
    given = _given_hyperparameters.get()
    return given if isinstance(given, Mapping) else None


def _check_positive(name: str, value: object, *, allow_zero: bool = False) -> None:
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
            or not (value >= 0 if allow_zero else value > 0)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value!r}")


def check_module_args(*, lr: object, momentum: object, weight_decay: object, vectorize: object,
                      clients_per_chunk: int | None, eval_every: int | None, encoding: object,
                      cohort_workspace: object = "auto", fused_sgd: object = True) -> None:
    """Validate ``FederatedLightningModule``'s scalar arguments, saying what to change."""
    from fl_lightning.comm import ENCODINGS

    _check_positive("lr", lr)
    _check_positive("weight_decay", weight_decay, allow_zero=True)
    if not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
    if vectorize not in (True, False, "auto"):
        raise ValueError(f"vectorize must be true, false or 'auto', got {vectorize!r}")
    if clients_per_chunk is not None and clients_per_chunk < 1:
        raise ValueError(f"clients_per_chunk must be >= 1 (or null for all), got {clients_per_chunk!r}")
    if eval_every is not None and eval_every < 1:
        raise ValueError(f"eval_every must be >= 1 rounds (or null), got {eval_every!r}")
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    if cohort_workspace not in (True, False, "auto"):
        raise ValueError(f"cohort_workspace must be true, false or 'auto', got {cohort_workspace!r}")
    if not isinstance(fused_sgd, bool):
        raise ValueError(f"fused_sgd must be true or false, got {fused_sgd!r}")
