"""Hugging Face datasets (``dataset: hf``): a Hub dataset, a directory written by ``save_to_disk``, or local
parquet / arrow / csv / json files, read into the in-memory tensors every loader returns.

::

    FederatedDataModule(dataset="hf", dataset_args={"path": "ylecun/mnist", "input_column": "image",
                                                    "label_column": "label"})

Images (``datasets.Image`` columns, decoded by PIL) become float32 [N, C, H, W] in [0, 1]; arrays stay as they
are (uint8 arrays scaled to [0, 1]); scalar columns are stacked into tabular features [N, F]. Labels from a
``ClassLabel`` or integer column make a classification task, string labels are numbered in sorted order, and
float labels make a regression task. ``natural_id_column`` (a writer / user id) becomes ``train_groups`` for the
``natural`` partition.

Needs the extra ``[hf]`` (``pip install -e ".[hf]"``); nothing here imports ``datasets`` until a dataset is
loaded. Hub datasets are cached where the ``datasets`` library caches them (``HF_DATASETS_CACHE``, by default
``~/.cache/huggingface/datasets``; or ``cache_dir``), so a second run works offline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fl_lightning.data.datasets.base import DatasetSplits, as_float, as_labels, register_dataset
from fl_lightning.extras import require

#: file suffixes read with the ``datasets`` builder of the same kind
FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}

Task = Literal["classification", "regression"]


def _datasets() -> Any:
    return require("datasets", extra="hf", feature="dataset: hf")


def offline_message(path: str, error: BaseException) -> str:
    """What to do when a Hub dataset is neither cached nor reachable."""
    return (
        f"dataset: hf: the Hub dataset {path!r} is not in the local cache and the Hub cannot be reached ({error}). "
        "Run once with internet access to download and cache it (HF_DATASETS_CACHE, by default "
        "~/.cache/huggingface/datasets; HF_HUB_OFFLINE=1 then reads the cache without network), or, on a machine "
        f"with internet, save it with `python -c \"import datasets; datasets.load_dataset('{path}')"
        ".save_to_disk('DIR')\"`, copy DIR here and set dataset_args.path: DIR (local parquet / arrow files work too)"
    )


def _local(path: str, data_dir: Path) -> Path | None:
    for candidate in (Path(path).expanduser(), data_dir / path):
        if candidate.exists():
            return candidate
    return None


def open_splits(
    path: str,
    data_dir: Path,
    *,
    split: str = "train",
    name: str | None = None,
    revision: str | None = None,
    data_files: str | Sequence[str] | Mapping[str, str | Sequence[str]] | None = None,
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """The splits of ``path`` as ``{split name: datasets.Dataset}``.

    ``path`` is looked up as a local path (as given, then under ``data_dir``): a directory written by
    ``save_to_disk`` (a ``DatasetDict``, or one ``Dataset``, which becomes the split ``split``), a parquet /
    arrow / csv / json file (the split ``split``), or a directory of such files (split names inferred from the
    file names, as ``datasets.load_dataset`` does). Anything else is a Hub name, or a builder name such as
    ``parquet`` together with ``data_files``.
    """
    ds = _datasets()
    local = _local(path, data_dir)
    saved = local is not None and any((local / f).exists() for f in ("dataset_dict.json", "state.json"))
    if local is not None and local.is_dir() and saved:
        loaded = ds.load_from_disk(str(local))
        return {split: loaded} if isinstance(loaded, ds.Dataset) else dict(loaded)
    if local is not None and local.is_file():
        builder = FILE_BUILDERS.get(local.suffix.lower())
        if builder is None:
            raise ValueError(f"dataset: hf: cannot read {local}; expected one of {sorted(FILE_BUILDERS)}")
        return dict(ds.load_dataset(builder, data_files={split: str(local)}, cache_dir=cache_dir))
    if local is not None:
        return dict(ds.load_dataset(str(local), data_files=data_files, cache_dir=cache_dir))
    try:
        loaded = ds.load_dataset(path, name, revision=revision, data_files=data_files, cache_dir=cache_dir)
    except ConnectionError as e:
        raise FileNotFoundError(offline_message(path, e)) from e
    return dict(loaded)


# ---------------------------------------------------------------------------------------------- columns -> arrays
def _numeric(feature: Any) -> bool:
    dtype = getattr(feature, "dtype", "")
    return type(feature).__name__ in ("Value", "ClassLabel") and (
        dtype == "bool" or dtype.startswith(("int", "uint", "float"))
    )


def input_columns(
    features: Mapping[str, Any], input_column: str | Sequence[str] | None, exclude: set[str]
) -> list[str]:
    """The columns the inputs come from: ``input_column`` as given; else the one image column; else every numeric
    scalar column that is not the label or the natural id (tabular)."""
    ds = _datasets()
    if input_column is not None:
        columns = [input_column] if isinstance(input_column, str) else list(input_column)
        missing = [c for c in columns if c not in features]
        if missing:
            raise ValueError(f"dataset: hf: input_column {missing} not in the dataset's columns {list(features)}")
        return columns
    images = [c for c, f in features.items() if isinstance(f, ds.Image) and c not in exclude]
    if len(images) > 1:
        raise ValueError(f"dataset: hf: several image columns {images}; choose one with input_column")
    if images:
        return images
    tabular = [c for c, f in features.items() if c not in exclude and _numeric(f)]
    if not tabular:
        raise ValueError(
            f"dataset: hf: no image or numeric column besides {sorted(exclude)} in {list(features)}; set input_column"
        )
    return tabular


def _images(x: np.ndarray, column: str) -> np.ndarray:
    if x.dtype == object:
        raise ValueError(f"dataset: hf: the images of column {column!r} differ in size; resize them to one size first")
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    return x[:, None] if x.ndim == 3 else np.moveaxis(x, -1, 1)  # [N, H, W] -> [N, 1, H, W]; HWC -> CHW


def read_inputs(data: Any, columns: list[str], image_mode: str | None = None) -> np.ndarray:
    """float32 inputs of the ``datasets.Dataset`` ``data``: images [N, C, H, W], an array column as it is, or the
    scalar ``columns`` stacked [N, len(columns)]."""
    ds = _datasets()
    if len(columns) == 1 and isinstance(data.features[columns[0]], ds.Image):
        column = columns[0]
        if image_mode is not None:
            data = data.cast_column(column, ds.Image(mode=image_mode))
        return _images(np.asarray(data.select_columns([column]).with_format("numpy")[:][column]), column)
    if len(columns) == 1 and not _numeric(data.features[columns[0]]):
        x = np.asarray(data.select_columns(columns).with_format("numpy")[:][columns[0]])
        if x.dtype == object:
            raise ValueError(f"dataset: hf: the arrays of column {columns[0]!r} differ in shape")
        return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    table = data.select_columns(columns).with_format("numpy")[:]
    bad = [c for c in columns if not _numeric(data.features[c])]
    if bad:
        raise ValueError(f"dataset: hf: tabular input columns must hold numbers; {bad} do not")
    return np.stack([np.asarray(table[c], dtype=np.float32) for c in columns], axis=1)


def _column(data: Any, column: str) -> np.ndarray:
    if column not in data.features:
        raise ValueError(f"dataset: hf: column {column!r} not in the dataset's columns {list(data.features)}")
    return np.asarray(data.select_columns([column]).with_format("numpy")[:][column])


def _task_and_labels(
    feature: Any, train: np.ndarray, test: np.ndarray, task: Task | None
) -> tuple[np.ndarray, np.ndarray, int | None]:
    """Labels as int64 class indices (classification) or float32 targets (regression), and the class count."""
    if task not in (None, "classification", "regression"):
        raise ValueError(f"dataset: hf: task must be 'classification', 'regression' or null, got {task!r}")
    both = np.concatenate([train, test])
    if task is None:
        task = "regression" if both.dtype.kind == "f" else "classification"
    if task == "regression":
        return train.astype(np.float32), test.astype(np.float32), None
    if type(feature).__name__ == "ClassLabel":
        return train.astype(np.int64), test.astype(np.int64), int(feature.num_classes)
    if both.dtype.kind in "iub" and (len(both) == 0 or both.min() >= 0):
        return train.astype(np.int64), test.astype(np.int64), int(both.max()) + 1 if len(both) else 0
    classes, inverse = np.unique(both, return_inverse=True)  # strings (or negative ids): numbered in sorted order
    return inverse[: len(train)].astype(np.int64), inverse[len(train) :].astype(np.int64), len(classes)


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per channel (images, axis 1) or per feature: mean 0, std 1 over the training split."""
    axes = tuple(i for i in range(train.ndim) if i != 1)
    mean = train.mean(axis=axes, keepdims=True)
    std = train.std(axis=axes, keepdims=True) + 1e-8
    return (train - mean) / std, (test - mean) / std


@register_dataset("hf")
def load_hf(
    data_dir: Path,
    path: str,
    split: str = "train",
    test_split: str | None = "test",
    input_column: str | list[str] | None = None,
    label_column: str = "label",
    natural_id_column: str | None = None,
    name: str | None = None,
    revision: str | None = None,
    data_files: str | list[str] | dict[str, str | list[str]] | None = None,
    cache_dir: str | None = None,
    test_fraction: float | None = None,
    task: Task | None = None,
    image_mode: str | None = None,
    normalize: bool = False,
    seed: int = 0,
) -> DatasetSplits:
    """A Hugging Face dataset as in-memory tensors.

    Args:
        path: a Hub name (``ylecun/mnist``), a ``save_to_disk`` directory, a parquet / arrow / csv / json file or a
            directory of them (see :func:`open_splits`); relative paths are tried as given, then under ``data_dir``.
        split: the training split.
        test_split: the held-out split (the global model's evaluation); None for none.
        input_column: the input column (an image or array column), or a list of scalar columns (tabular);
            default: the one image column, else every numeric column but the label and the natural id.
        label_column: the target column.
        natural_id_column: a natural client id per sample (writer, user) for ``partition: natural``.
        name, revision, data_files, cache_dir: passed to ``datasets.load_dataset``.
        test_fraction: hold out this fraction of ``split`` (seeded by ``seed``) instead of reading ``test_split``.
        task: ``classification`` or ``regression``; default: regression for float labels.
        image_mode: convert images with PIL first (``L`` for grey, ``RGB``), e.g. when modes are mixed.
        normalize: standardise the inputs per channel (images) or per feature with the training split's statistics.
    """
    splits = open_splits(path, Path(data_dir), split=split, name=name, revision=revision, data_files=data_files,
                         cache_dir=cache_dir)
    if split not in splits:
        raise ValueError(f"dataset: hf: {path!r} has no split {split!r}; it has {sorted(splits)}")
    train = splits[split]
    exclude = {label_column, *([natural_id_column] if natural_id_column else [])}
    columns = input_columns(train.features, input_column, exclude)
    x_tr, y_tr = read_inputs(train, columns, image_mode), _column(train, label_column)
    groups = _column(train, natural_id_column) if natural_id_column else None
    if test_fraction is not None:
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"dataset: hf: test_fraction must lie in (0, 1), got {test_fraction}")
        order = np.random.default_rng(seed).permutation(len(y_tr))
        cut = len(order) - max(1, round(test_fraction * len(order)))
        keep, held = np.sort(order[:cut]), np.sort(order[cut:])
        x_tr, x_te, y_tr, y_te = x_tr[keep], x_tr[held], y_tr[keep], y_tr[held]
        groups = None if groups is None else groups[keep]
    elif test_split is None:
        x_te, y_te = x_tr[:0], y_tr[:0]
    elif test_split in splits:
        x_te, y_te = read_inputs(splits[test_split], columns, image_mode), _column(splits[test_split], label_column)
    else:
        raise ValueError(
            f"dataset: hf: {path!r} has no split {test_split!r} (it has {sorted(splits)}); set test_split to one of "
            f"them, test_fraction: 0.2 to hold out part of {split!r}, or test_split: null for no held-out set"
        )
    y_tr, y_te, num_classes = _task_and_labels(train.features[label_column], y_tr, y_te, task)
    if normalize:
        x_tr, x_te = _standardise(x_tr, x_te)
    targets = (as_labels(y_tr), as_labels(y_te)) if num_classes is not None else (as_float(y_tr), as_float(y_te))
    train_groups = None if groups is None else np.unique(groups, return_inverse=True)[1].astype(np.int64)
    return DatasetSplits(f"hf:{path}", as_float(x_tr), targets[0], as_float(x_te), targets[1], num_classes,
                         train_groups=train_groups)


__all__ = ["FILE_BUILDERS", "input_columns", "load_hf", "offline_message", "open_splits", "read_inputs"]
