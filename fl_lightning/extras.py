"""Optional extras: import a package that only an extra installs, or fail with one line saying how to get it.

The core never imports these packages at module import time; the features that need them call
:func:`require` when they run::

    datasets = require("datasets", extra="hf", feature="dataset: hf")
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: extra -> the packages it installs (as in pyproject.toml's ``[project.optional-dependencies]``)
EXTRAS: dict[str, tuple[str, ...]] = {
    "wandb": ("wandb-workspaces",),
    "hf": ("datasets", "flwr-datasets"),
    "privacy": ("dp-accounting",),
}


class MissingExtraError(ImportError):
    """An optional package is not installed; the message is one line that says how to install it."""


def install_hint(extra: str) -> str:
    """``pip install "fl-lightning[hf]"`` (or the editable form from a checkout)."""
    return f'pip install "fl-lightning[{extra}]" (from a checkout: pip install -e ".[{extra}]")'


def require(module: str, *, extra: str, feature: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming the ``feature`` and the ``extra`` to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        packages = ", ".join(EXTRAS.get(extra, (module,)))
        raise MissingExtraError(
            f"{feature} needs the optional extra [{extra}] ({packages}), which is not installed "
            f"(import {module} failed: {e}); install it with: {install_hint(extra)}"
        ) from e


__all__ = ["EXTRAS", "MissingExtraError", "install_hint", "require"]
