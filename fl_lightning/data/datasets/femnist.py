"""FEMNIST (LEAF, Caldas et al. 2018) from LEAF's JSON files, keeping each training sample's writer.

LEAF writes ``data/train/*.json`` and ``data/test/*.json``; each file is an object
``{"users": [...], "num_samples": [...], "user_data": {user: {"x": [[784 floats]], "y": [ints]}}}``
where ``x`` holds 28x28 images flattened row-major with values in [0, 1] (as LEAF wrote them) and
``y`` labels in [0, 61] (10 digits, 26 upper-case, 26 lower-case letters).

There is no single official download: LEAF builds the files from NIST Special Database 19 with its
own scripts, which is what :data:`LEAF_INSTRUCTIONS` describes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fl_lightning.data.datasets.base import DatasetSplits, as_float, as_labels, register_dataset
from fl_lightning.data.datasets.download import missing_files_message

NUM_CLASSES = 62
LEAF_REPO = "https://github.com/TalwalkarLab/leaf"


def leaf_instructions(target: Path) -> str:
    """How to generate the LEAF JSON files and where to put them."""
    return (
        f"LEAF has no prebuilt download; generate the files with its scripts: `git clone {LEAF_REPO} && "
        "cd leaf/data/femnist && ./preprocess.sh -s niid --sf 0.05 -k 0 -t sample` (downloads NIST SD19 "
        "and writes data/train/*.json and data/test/*.json; --sf 1.0 for the full 3,550 writers, -t user to "
        f"hold out whole writers), then copy the two folders so that {target}/train/*.json and "
        f"{target}/test/*.json exist"
    )


def _json_dir(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("*.json"))


def _find_root(data_dir: Path) -> Path | None:
    for root in (data_dir / "femnist", data_dir / "femnist" / "data", data_dir / "leaf" / "data" / "femnist" / "data"):
        if _json_dir(root / "train") and _json_dir(root / "test"):
            return root
    return None


def read_leaf_split(folder: Path, writers: dict[str, int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read every ``*.json`` in ``folder`` (sorted by name).

    Returns float32 images [N, 1, 28, 28], int64 labels [N] and the writer index of every sample.
    ``writers`` maps writer ids to indices; new writers are appended to it in order of appearance.
    """
    writers = {} if writers is None else writers
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    ids: list[np.ndarray] = []
    for path in sorted(folder.glob("*.json")):
        with open(path, encoding="utf-8") as f:
            blob = json.load(f)
        missing = {"users", "user_data"} - set(blob)
        if missing:
            raise ValueError(f"{path}: not a LEAF file, it lacks {sorted(missing)}")
        counts = blob.get("num_samples", [None] * len(blob["users"]))
        for user, count in zip(blob["users"], counts):
            data = blob["user_data"][user]
            x = np.asarray(data["x"], dtype=np.float32)
            y = np.asarray(data["y"], dtype=np.int64)
            if len(x) == 0:
                continue
            if x.ndim != 2 or x.shape[1] != 28 * 28 or len(y) != len(x):
                raise ValueError(f"{path}: user {user}: expected x [m, 784] and m labels, got {x.shape}, {y.shape}")
            if count is not None and count != len(y):
                raise ValueError(f"{path}: user {user}: num_samples says {count} but user_data holds {len(y)}")
            if y.min() < 0 or y.max() >= NUM_CLASSES:
                raise ValueError(f"{path}: user {user}: labels must lie in [0, {NUM_CLASSES - 1}]")
            xs.append(x.reshape(-1, 1, 28, 28))
            ys.append(y)
            ids.append(np.full(len(y), writers.setdefault(user, len(writers)), dtype=np.int64))
    if not xs:
        raise ValueError(f"{folder}: the LEAF files hold no samples")
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(ids)


@register_dataset("femnist")
def load_femnist(data_dir: Path) -> DatasetSplits:
    """FEMNIST: handwritten digits and letters by writer, float32 [N, 1, 28, 28], 62 classes.

    Reads LEAF's ``train/*.json`` and ``test/*.json`` from ``data_dir/femnist`` (or from
    ``data_dir/femnist/data`` or ``data_dir/leaf/data/femnist/data``, LEAF's own layout).
    ``train_groups`` holds the writer index of every training sample (writers numbered in order of
    appearance), for the ``natural`` partition. Nothing is downloaded: LEAF must be run first (see
    the error message when the files are missing).
    """
    data_dir = Path(data_dir)
    root = _find_root(data_dir)
    if root is None:
        target = data_dir / "femnist"
        raise FileNotFoundError(
            missing_files_message(
                "femnist", target, ["train/*.json", "test/*.json"], "LEAF's JSON files were not found",
                leaf_instructions(target),
                searched=[data_dir / "femnist" / "data", data_dir / "leaf" / "data" / "femnist" / "data"],
            )
        )
    writers: dict[str, int] = {}
    x_tr, y_tr, groups = read_leaf_split(root / "train", writers)
    x_te, y_te, _ = read_leaf_split(root / "test", dict(writers))
    return DatasetSplits(
        "femnist", as_float(x_tr), as_labels(y_tr), as_float(x_te), as_labels(y_te), NUM_CLASSES, train_groups=groups
    )


__all__ = ["NUM_CLASSES", "leaf_instructions", "load_femnist", "read_leaf_split"]
