"""Datasets, found by name: ``load_dataset("digits")``. Each module registers its loaders on import."""

from fl_lightning.data.datasets import (  # noqa: F401  (registers)
    blogfeedback,
    cifar10,
    diabetes,
    digits,
    femnist,
    hf,
    idx,
    libsvm,
)
from fl_lightning.data.datasets.base import DATASETS, DatasetSplits, load_dataset, register_dataset

__all__ = ["DATASETS", "DatasetSplits", "load_dataset", "register_dataset"]
