"""Datasets, found by name: ``load_dataset("digits")``. Each module registers its loaders on import."""

from fl_lightning.data.datasets import blogfeedback, cifar10, digits, femnist, hf, idx, libsvm  # noqa: F401  (registers)
from fl_lightning.data.datasets.base import DATASETS, DatasetSplits, load_dataset, register_dataset

__all__ = ["DATASETS", "DatasetSplits", "load_dataset", "register_dataset"]
