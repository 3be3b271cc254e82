"""Any LibSVM / SVMlight text file (the format of the LIBSVM data sets page), read into dense tensors.

One sample per line: ``label index:value index:value ...`` with 1-based, increasing feature indices;
absent features are zero. ``qid:`` tokens are skipped and ``#`` starts a comment. Files may be
gzip-, bzip2- or xz-compressed (recognised by their first bytes), as LIBSVM distributes many of them.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Literal

import numpy as np

from fl_lightning.data.datasets import download as dl
from fl_lightning.data.datasets.base import DatasetSplits, as_float, as_labels, register_dataset

LIBSVM_DATASETS_URL = "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/"

_MAGIC: tuple[tuple[bytes, object], ...] = ((b"\x1f\x8b", gzip.open), (b"BZh", bz2.open), (b"\xfd7zXZ\x00", lzma.open))


def _open_text(path: Path) -> IO[str]:
    with open(path, "rb") as f:
        head = f.read(6)
    for magic, opener in _MAGIC:
        if head.startswith(magic):
            return io.TextIOWrapper(opener(path, "rb"), encoding="utf-8")  # type: ignore[operator]
    return open(path, encoding="utf-8")


def read_libsvm(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Parse a LibSVM file into COO parts.

    Returns (labels float64 [N], rows, zero-based columns, values, number of samples).

    Raises:
        ValueError: with the file and line of a malformed token, a 0 or negative index, or a
            multi-label line (comma-separated labels are not supported).
    """
    path = Path(path)
    labels: list[float] = []
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            body = line.split("#", 1)[0].split()
            if not body:
                continue
            where = f"{path}:{lineno}"
            if "," in body[0]:
                raise ValueError(f"{where}: multi-label lines ({body[0]!r}) are not supported")
            try:
                labels.append(float(body[0]))
            except ValueError:
                raise ValueError(f"{where}: the label {body[0]!r} is not a number") from None
            row = len(labels) - 1
            for token in body[1:]:
                index, sep, value = token.partition(":")
                if index == "qid":
                    continue
                try:
                    if not sep:
                        raise ValueError
                    col, val = int(index), float(value)
                except ValueError:
                    raise ValueError(f"{where}: expected index:value, got {token!r}") from None
                if col < 1:
                    raise ValueError(f"{where}: feature indices are 1-based, got {col}")
                rows.append(row)
                cols.append(col - 1)
                vals.append(val)
    if not labels:
        raise ValueError(f"{path}: no samples")
    return (
        np.asarray(labels, dtype=np.float64),
        np.asarray(rows, dtype=np.int64),
        np.asarray(cols, dtype=np.int64),
        np.asarray(vals, dtype=np.float32),
        len(labels),
    )


def _dense(parts: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int], n_features: int) -> np.ndarray:
    _, rows, cols, vals, n = parts
    x = np.zeros((n, n_features), dtype=np.float32)
    x[rows, cols] = vals
    return x


def _is_url(path: str | Path) -> bool:
    return isinstance(path, str) and path.startswith(("https://", "http://"))


def _resolve(
    data_dir: Path, path: str | Path, option: str, download: bool, sha256: Mapping[str, str]
) -> Path:
    """The local file for ``path``: a URL is downloaded once into ``data_dir/libsvm/``; a relative path is looked
    up in ``data_dir``, then in the working directory."""
    if _is_url(path):
        url = str(path)
        name = url.rstrip("/").rsplit("/", 1)[-1]
        target = data_dir / "libsvm"
        if not (target / name).is_file():
            remote = dl.RemoteFile(name, (url,), sha256=sha256.get(name))
            dl.fetch("libsvm", target, [remote], download=download,
                     instructions=f"download {url} by hand (compressed .bz2/.gz/.xz files can be used as they are)")
        return target / name
    path = Path(path).expanduser()
    candidates = [path] if path.is_absolute() else [data_dir / path, path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"libsvm: {option}={str(path)!r} not found (looked for {', '.join(str(c) for c in candidates)}); put the "
        f"file there, pass its full path, or pass its URL to download it. LibSVM-format data sets are at "
        f"{LIBSVM_DATASETS_URL} (e.g. binary/a9a and binary/a9a.t); compressed .bz2/.gz/.xz files can be used as "
        "they are"
    )


@register_dataset("libsvm")
def load_libsvm(
    data_dir: Path,
    path: str | Path | None = None,
    test_path: str | Path | None = None,
    n_features: int | None = None,
    test_fraction: float = 0.2,
    task: Literal["classification", "regression"] = "classification",
    seed: int = 0,
    download: bool = True,
    sha256: Mapping[str, str] | None = None,
) -> DatasetSplits:
    """A LibSVM-format file as dense float32 inputs [N, n_features].

    Args:
        path: the training file; a relative path is looked up in ``data_dir`` first, then in the
            working directory; an ``https://`` (or ``http://``) URL such as
            ``https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/binary/a9a`` is downloaded once
            into ``data_dir/libsvm/``.
        test_path: the test file (e.g. ``a9a.t``), a path or a URL like ``path``; without one a random
            ``test_fraction`` of ``path`` is held out (stratified for classification when every class allows it).
        n_features: the input dimension; default the largest feature index in the files (pass it
            when the test file may use indices the training file does not, as with a9a: 123).
        task: ``classification``: labels (e.g. a9a's -1/+1) are mapped to 0..C-1 in increasing
            order; ``regression``: float32 targets, ``num_classes`` None.
        seed: seeds the held-out split.
        download: False: never download a URL's file (fail with a message that says where to put it).
        sha256: the sha256 of downloaded files by file name (``{"a9a": "..."}``); a download whose digest
            differs is refused. The LIBSVM site publishes no checksums, so pin them yourself when you need them.
    """
    if path is None:
        raise ValueError(f"libsvm needs path=<a LibSVM-format file> (data sets: {LIBSVM_DATASETS_URL})")
    if task not in ("classification", "regression"):
        raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
    if test_path is None and not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    data_dir = Path(data_dir)
    digests = dict(sha256 or {})
    train = read_libsvm(_resolve(data_dir, path, "path", download, digests))
    test = read_libsvm(_resolve(data_dir, test_path, "test_path", download, digests)) if test_path is not None else None
    largest = max(int(p[2].max()) + 1 if len(p[2]) else 0 for p in (train, test) if p is not None)
    if n_features is None:
        n_features = max(largest, 1)
    elif isinstance(n_features, bool) or not isinstance(n_features, int) or n_features < 1:
        raise ValueError(f"n_features must be a positive integer (or None: the largest index), got {n_features!r}")
    elif largest > n_features:
        raise ValueError(f"n_features={n_features} but the files use feature index {largest}; raise n_features")
    x_tr, y_tr = _dense(train, n_features), train[0]
    if test is not None:
        x_te, y_te = _dense(test, n_features), test[0]
    else:
        x_tr, x_te, y_tr, y_te = _split(x_tr, y_tr, test_fraction, seed, stratify=task == "classification")
    if task == "regression":
        return DatasetSplits("libsvm", as_float(x_tr), as_float(y_tr), as_float(x_te), as_float(y_te), None)
    values = np.unique(np.concatenate([y_tr, y_te]))
    if not np.all(values == np.round(values)):
        raise ValueError("libsvm: task='classification' needs integer labels; use task='regression' for real targets")
    return DatasetSplits(
        "libsvm",
        as_float(x_tr),
        as_labels(np.searchsorted(values, y_tr)),
        as_float(x_te),
        as_labels(np.searchsorted(values, y_te)),
        len(values),
    )


def _split(
    x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int, stratify: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    if stratify:
        _, counts = np.unique(y, return_counts=True)
        n_test = int(np.ceil(test_fraction * len(y)))
        stratify = counts.min() >= 2 and len(y) - n_test >= len(counts) and n_test >= len(counts)
    if len(y) < 2:
        raise ValueError("libsvm: a file of one sample cannot be split; pass test_path")
    return train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y if stratify else None)


__all__ = ["LIBSVM_DATASETS_URL", "load_libsvm", "read_libsvm"]
