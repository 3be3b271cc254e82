"""MNIST and Fashion-MNIST from their original IDX files (gzip'd or not).

The IDX format (LeCun et al.): a 4-byte magic number — two zero bytes, a type code (0x08 unsigned
byte, ...) and the number of dimensions — then one big-endian uint32 per dimension, then the data
in row-major, big-endian order. ``*-images-idx3-ubyte`` holds [N, 28, 28] uint8 images and
``*-labels-idx1-ubyte`` [N] uint8 labels.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fl_lightning.data.datasets import download as dl
from fl_lightning.data.datasets.base import DatasetSplits, as_float, as_labels, register_dataset

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

# The published md5 of the upstream .gz files (the values torchvision checks, and for Fashion-MNIST
# the table in zalandoresearch/fashion-mnist's README).
MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
FASHION_MNIST_MIRRORS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
)
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
# Debian's ``dataset-fashion-mnist`` package (``apt-get install dataset-fashion-mnist``) installs the
# four files here. Debian recompressed the .gz files, so their md5 differs from the published one
# even though the decompressed IDX bytes are the same; checksums are therefore verified on the files
# this module downloads, and files found on disk (here or in ``data_dir``) are checked structurally by
# :func:`read_idx` instead (magic number, dimensions, exact data length).
SYSTEM_DIRS: dict[str, tuple[Path, ...]] = {
    "mnist": (),
    "fashion_mnist": (Path("/usr/share/datasets/fashion-mnist"),),
}

_IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    """A file's bytes, decompressed when it is gzip'd (recognised by its magic, whatever its name)."""
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    if not gzipped:
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:  # truncated, CRC or length mismatch, bad deflate
        raise ValueError(f"{path}: damaged gzip file ({err}); delete it and get it again") from err


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (gzip'd or not) into an array of its declared type and shape (native byte order).

    Raises:
        ValueError: not an IDX file, an unknown type code, or a data length that does not match the header.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (magic {raw[:4].hex() or 'missing'}, expected 0000xxyy)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_TYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, {ndim} dimensions declared)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_TYPES[code]
    count = math.prod(dims)
    if len(raw) - header != count * dtype.itemsize:
        raise ValueError(
            f"{path}: the header declares shape {dims} ({count * dtype.itemsize} data bytes) but the file holds "
            f"{len(raw) - header}; it is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find(directory: Path, name: str) -> Path | None:
    """``name`` or ``name.gz`` in ``directory`` (the decompressed file first), or None."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _complete(directory: Path) -> dict[str, Path] | None:
    found = {name: _find(directory, name) for name in IDX_FILES}
    return None if any(p is None for p in found.values()) else found  # type: ignore[return-value]


def _load_idx_pair(images_path: Path, labels_path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3:
        raise ValueError(f"{images_path}: expected [N, H, W] images, got shape {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{labels_path}: expected {len(images)} labels, got shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{labels_path}: labels must lie in [0, {num_classes - 1}]")
    return images, labels


@dataclass(frozen=True)
class IdxSource:
    """Where a 10-class MNIST-style dataset's four IDX files are looked for and downloaded from.

    Args:
        name: the registered dataset name (also the key of :data:`SYSTEM_DIRS`).
        folders: folders relative to ``data_dir``, in order: the first receives downloads.
        mirrors: base URLs that serve the ``.gz`` files, tried in order.
        md5: the published md5 of each ``.gz`` file.
        instructions: where to get the files by hand, for the error message.
    """

    name: str
    folders: tuple[str, ...]
    mirrors: tuple[str, ...]
    md5: Mapping[str, str]
    instructions: str


MNIST = IdxSource(
    "mnist",
    folders=("mnist", "MNIST/raw"),
    mirrors=MNIST_MIRRORS,
    md5=MNIST_MD5,
    instructions=f"get the .gz files from {MNIST_MIRRORS[0]} (or {MNIST_MIRRORS[1]}); gzip'd or not both work",
)
FASHION_MNIST = IdxSource(
    "fashion_mnist",
    folders=("fashion_mnist", "FashionMNIST/raw"),
    mirrors=FASHION_MNIST_MIRRORS,
    md5=FASHION_MNIST_MD5,
    instructions=(
        f"get the .gz files from {FASHION_MNIST_MIRRORS[0]} or {FASHION_MNIST_MIRRORS[1]} "
        "(gzip'd or not both work), or on Debian/Ubuntu `apt-get install dataset-fashion-mnist`, "
        "which installs them into /usr/share/datasets/fashion-mnist"
    ),
)


def load_idx_dataset(source: IdxSource, data_dir: Path, download: bool = True) -> DatasetSplits:
    """Load ``source`` from the first of its folders under ``data_dir`` (then :data:`SYSTEM_DIRS`) that holds
    all four IDX files, else download the missing ``.gz`` files into the first folder and check their md5.

    Returns float32 images [N, 1, H, W] scaled to [0, 1] and int64 labels in [0, 9].
    """
    local_dirs = (*(Path(data_dir) / f for f in source.folders), *SYSTEM_DIRS.get(source.name, ()))
    for directory in local_dirs:
        found = _complete(directory)
        if found is not None:
            break
    else:
        target = local_dirs[0]
        missing = [
            dl.RemoteFile(f"{f}.gz", tuple(m + f"{f}.gz" for m in source.mirrors), md5=source.md5[f"{f}.gz"])
            for f in IDX_FILES
            if _find(target, f) is None
        ]
        dl.fetch(source.name, target, missing, download=download, instructions=source.instructions,
                 searched=local_dirs[1:])
        found = _complete(target)
        assert found is not None
    x_tr, y_tr = _load_idx_pair(found["train-images-idx3-ubyte"], found["train-labels-idx1-ubyte"], 10)
    x_te, y_te = _load_idx_pair(found["t10k-images-idx3-ubyte"], found["t10k-labels-idx1-ubyte"], 10)

    def images(x: np.ndarray) -> np.ndarray:
        return (x.astype(np.float32) / 255.0)[:, None]

    return DatasetSplits(
        source.name, as_float(images(x_tr)), as_labels(y_tr), as_float(images(x_te)), as_labels(y_te), 10
    )


@register_dataset("mnist")
def load_mnist(data_dir: Path, download: bool = True) -> DatasetSplits:
    """MNIST: 60,000 + 10,000 handwritten digits, float32 [N, 1, 28, 28] in [0, 1], 10 classes.

    Reads the four IDX files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each gzip'd or not) from
    ``data_dir/mnist`` or torchvision's ``data_dir/MNIST/raw``; otherwise downloads the .gz files
    into ``data_dir/mnist`` and checks their published md5.
    """
    return load_idx_dataset(MNIST, data_dir, download)


@register_dataset("fashion_mnist")
def load_fashion_mnist(data_dir: Path, download: bool = True) -> DatasetSplits:
    """Fashion-MNIST: 60,000 + 10,000 Zalando article images, float32 [N, 1, 28, 28] in [0, 1], 10 classes.

    Reads the four IDX files (same names as MNIST's, gzip'd or not) from ``data_dir/fashion_mnist``,
    torchvision's ``data_dir/FashionMNIST/raw``, or Debian's ``/usr/share/datasets/fashion-mnist``
    (package ``dataset-fashion-mnist``); otherwise downloads the .gz files into
    ``data_dir/fashion_mnist`` and checks their published md5.
    """
    return load_idx_dataset(FASHION_MNIST, data_dir, download)


__all__ = ["FASHION_MNIST", "MNIST", "IdxSource", "load_fashion_mnist", "load_idx_dataset", "load_mnist", "read_idx"]
