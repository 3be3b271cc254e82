"""fl-lightning: federated learning with ProxSkip and Sparse-ProxSkip in PyTorch Lightning.

The heavy classes are imported lazily so that ``import fl_lightning.models`` (or any
sub-package) stays cheap and independent of the training machinery.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from fl_lightning.data.datamodule import FederatedDataModule
    from fl_lightning.module import FederatedLightningModule

__all__ = ["FederatedDataModule", "FederatedLightningModule", "__version__"]

_LAZY = {
    "FederatedLightningModule": "fl_lightning.module",
    "FederatedDataModule": "fl_lightning.data.datamodule",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fl_lightning' has no attribute {name!r}")
