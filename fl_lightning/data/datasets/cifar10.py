"""CIFAR-10 from its original python-pickle batches (``cifar-10-python.tar.gz``).

The archive unpacks to ``cifar-10-batches-py/`` with ``data_batch_1`` ... ``data_batch_5`` (10,000
training images each) and ``test_batch``: pickled dicts whose ``data`` is a uint8 [10000, 3072]
array (the 1024 red, then green, then blue values of a 32x32 image, row-major) and whose ``labels``
is a list of ints in [0, 9].
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from fl_lightning.data.datasets import download as dl
from fl_lightning.data.datasets.base import DatasetSplits, as_float, as_labels, register_dataset

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"  # published on the CIFAR page; torchvision checks it too
CIFAR10_FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
# Per-channel mean and standard deviation of the 50,000 training images, pixels scaled to [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

_RECONSTRUCT = np.ndarray((0,)).__reduce__()[0]  # numpy's array-unpickling helper, whatever its module path
_ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # how numpy 1.x (and Python 2) pickled arrays
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # numpy 2.x
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # Python 3 writes bytes this way at pickle protocol 2
}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only, so a tampered batch cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[module, name]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")


def read_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: uint8 images [N, 3, 32, 32] and int64 labels [N]."""
    path = Path(path)
    with open(path, "rb") as f:
        # the batches were written by Python 2's cPickle: keys are byte strings
        batch = _BatchUnpickler(f, encoding="bytes").load()
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"{path}: a CIFAR-10 batch needs 'data' and 'labels', found {sorted(batch)}")
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise ValueError(f"{path}: expected data [N, 3072] and N labels, got {data.shape} and {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: labels must lie in [0, 9]")
    return data.reshape(-1, 3, 32, 32), labels


def _has_batches(folder: Path) -> bool:
    return all((folder / name).is_file() for name in (*TRAIN_BATCHES, TEST_BATCH))


def _normalise(images: np.ndarray, normalize: bool) -> np.ndarray:
    x = images.astype(np.float32) / 255.0
    if normalize:
        mean = np.asarray(CIFAR10_MEAN, dtype=np.float32)[:, None, None]
        std = np.asarray(CIFAR10_STD, dtype=np.float32)[:, None, None]
        x = (x - mean) / std
    return x


@register_dataset("cifar10")
def load_cifar10(data_dir: Path, download: bool = True, normalize: bool = True) -> DatasetSplits:
    """CIFAR-10: 50,000 + 10,000 colour images, float32 [N, 3, 32, 32], 10 classes.

    Reads ``data_dir/cifar-10-batches-py/`` (torchvision's layout) or
    ``data_dir/cifar10/cifar-10-batches-py/``; extracts ``cifar-10-python.tar.gz`` found in
    ``data_dir`` or ``data_dir/cifar10``; otherwise downloads the archive into ``data_dir``, checks
    its published md5 and extracts it.

    Args:
        normalize: subtract the standard per-channel CIFAR-10 mean and divide by its standard
            deviation (:data:`CIFAR10_MEAN`, :data:`CIFAR10_STD`); False keeps pixels in [0, 1].
    """
    data_dir = Path(data_dir)

    def extract(archive: Path) -> Path:
        dl.extract_tar(archive, archive.parent)
        return archive.parent / CIFAR10_FOLDER

    folder = dl.locate_archive_dataset(
        "cifar10",
        folders=(data_dir / CIFAR10_FOLDER, data_dir / "cifar10" / CIFAR10_FOLDER),
        is_complete=_has_batches,
        archives=(data_dir / CIFAR10_ARCHIVE, data_dir / "cifar10" / CIFAR10_ARCHIVE),
        remote=dl.RemoteFile(CIFAR10_ARCHIVE, (CIFAR10_URL,), md5=CIFAR10_ARCHIVE_MD5),
        extract=extract,
        download=download,
        instructions=(
            f"get it from {CIFAR10_URL} (it is extracted on first use), or put its extracted "
            f"{CIFAR10_FOLDER}/ folder (data_batch_1..5, test_batch) into {data_dir}/"
        ),
        contents=f"{CIFAR10_FOLDER}/ with data_batch_1..5 and test_batch",
    )
    train = [read_batch(folder / name) for name in TRAIN_BATCHES]
    x_te, y_te = read_batch(folder / TEST_BATCH)
    x_tr = np.concatenate([x for x, _ in train])
    y_tr = np.concatenate([y for _, y in train])
    return DatasetSplits(
        "cifar10",
        as_float(_normalise(x_tr, normalize)),
        as_labels(y_tr),
        as_float(_normalise(x_te, normalize)),
        as_labels(y_te),
        10,
    )


__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "load_cifar10", "read_batch"]
