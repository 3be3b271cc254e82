"""The in-memory form every dataset loader returns, and the dataset registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fl_lightning.registry import Registry


@dataclass
class DatasetSplits:
    """A dataset held in memory as tensors.

    ``train_y``/``test_y`` are int64 class labels for classification (``num_classes`` set)
    and float targets for regression (``num_classes`` None). ``train_groups`` holds a natural
    client id per training sample (FEMNIST writer, ...) when the dataset has one.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int | None
    train_groups: np.ndarray | None = None

    def __post_init__(self) -> None:
        if len(self.train_x) != len(self.train_y) or len(self.test_x) != len(self.test_y):
            raise ValueError(f"dataset {self.name!r}: inputs and targets differ in length")
        if self.train_groups is not None and len(self.train_groups) != len(self.train_x):
            raise ValueError(f"dataset {self.name!r}: train_groups must have one id per training sample")

    @property
    def task(self) -> str:
        return "regression" if self.num_classes is None else "classification"


DatasetLoader = Callable[..., DatasetSplits]
DATASETS: Registry[DatasetLoader] = Registry("dataset")
register_dataset = DATASETS.register


def load_dataset(name: str, data_dir: str | Path = "data", **kwargs: object) -> DatasetSplits:
    """Load a registered dataset by name; loaders take ``data_dir`` and their own keyword options."""
    return DATASETS.get(name)(data_dir=Path(data_dir), **kwargs)


def as_float(x: np.ndarray) -> Tensor:
    return torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)


def as_labels(y: np.ndarray) -> Tensor:
    return torch.as_tensor(np.ascontiguousarray(y), dtype=torch.int64)
