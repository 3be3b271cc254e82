"""UCI BlogFeedback (Buza, 2014): predict how many comments a blog post receives in the next 24 hours.

The UCI archive holds ``blogData_train.csv`` (52,397 posts) and 60 files
``blogData_test-2012.MM.DD.HH_MM.csv`` (one per day of February and March 2012), all without a
header, each row 280 numeric features followed by the target (a comment count).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fl_lightning.data.datasets import download as dl
from fl_lightning.data.datasets.base import DatasetSplits, as_float, register_dataset

BLOGFEEDBACK_URL = "https://archive.ics.uci.edu/static/public/304/blogfeedback.zip"
# The archive's address before UCI's 2023 site change, kept as a second mirror (the same file: public projects
# pin the same sha256 to both addresses).
BLOGFEEDBACK_LEGACY_URL = "https://archive.ics.uci.edu/ml/machine-learning-databases/00304/BlogFeedback.zip"
BLOGFEEDBACK_URLS = (BLOGFEEDBACK_URL, BLOGFEEDBACK_LEGACY_URL)
BLOGFEEDBACK_ZIP = "blogfeedback.zip"
# UCI publishes no checksum; this is the sha256 of the zip UCI serves at BLOGFEEDBACK_URLS as pinned by
# independent public projects (pooch's ``known_hash`` for the new address, Julia's UCIData DataDeps for the
# legacy one). It was not recomputed here (no access to UCI).
BLOGFEEDBACK_SHA256 = "1ba74e5ad920f7cd037502b2968581cc695146a226a73eff52fe8ad875ed4bcf"
TRAIN_FILE = "blogData_train.csv"
TEST_PATTERN = "blogData_test-*.csv"
NUM_FEATURES = 280


def read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One BlogFeedback csv: float64 features [N, 280] and targets [N]."""
    table = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
    if table.shape[1] != NUM_FEATURES + 1:
        raise ValueError(f"{path}: expected {NUM_FEATURES + 1} columns (features + target), got {table.shape[1]}")
    return table[:, :-1], table[:, -1]


def _complete(folder: Path) -> bool:
    return (folder / TRAIN_FILE).is_file() and any(folder.glob(TEST_PATTERN))


@register_dataset("blogfeedback")
def load_blogfeedback(
    data_dir: Path, download: bool = True, log_target: bool = True, standardize: bool = True
) -> DatasetSplits:
    """BlogFeedback as a regression set (``num_classes`` None): float32 features [N, 280], float32 targets [N].

    Reads ``blogData_train.csv`` and every ``blogData_test-*.csv`` from ``data_dir/blogfeedback``
    (or ``data_dir/BlogFeedback``); extracts ``blogfeedback.zip`` (or ``BlogFeedback.zip``) found there;
    otherwise downloads the UCI zip into ``data_dir/blogfeedback``, checks its sha256 and extracts it.

    Args:
        log_target: predict log(1 + comments) instead of the heavy-tailed raw count.
        standardize: scale every feature to zero mean and unit variance with the training set's mean
            and standard deviation (constant columns are only centred).
    """
    data_dir = Path(data_dir)
    folders = (data_dir / "blogfeedback", data_dir / "BlogFeedback")

    def extract(archive: Path) -> Path:
        dl.extract_zip_members(archive, folders[0], "blogData_*.csv")
        return folders[0]

    folder = dl.locate_archive_dataset(
        "blogfeedback",
        folders=folders,
        is_complete=_complete,
        archives=[f / name for f in folders for name in (BLOGFEEDBACK_ZIP, "BlogFeedback.zip")],
        remote=dl.RemoteFile(BLOGFEEDBACK_ZIP, BLOGFEEDBACK_URLS, sha256=BLOGFEEDBACK_SHA256),
        extract=extract,
        download=download,
        instructions=(
            f"get it from {BLOGFEEDBACK_URLS[0]} (it is extracted on first use), or put the extracted "
            f"{TRAIN_FILE} and {TEST_PATTERN} files there"
        ),
        contents=f"{TRAIN_FILE} and {TEST_PATTERN}",
    )
    x_tr, y_tr = read_csv(folder / TRAIN_FILE)
    tests = [read_csv(p) for p in sorted(folder.glob(TEST_PATTERN))]
    x_te = np.concatenate([x for x, _ in tests])
    y_te = np.concatenate([y for _, y in tests])
    if standardize:
        mean = x_tr.mean(axis=0)
        std = x_tr.std(axis=0)
        std[std < 1e-12] = 1.0  # constant columns: centre only, never divide by zero
        x_tr = (x_tr - mean) / std
        x_te = (x_te - mean) / std
    if log_target:
        if (y_tr < 0).any() or (y_te < 0).any():
            raise ValueError("blogfeedback: negative targets cannot be log-transformed; pass log_target=False")
        y_tr, y_te = np.log1p(y_tr), np.log1p(y_te)
    return DatasetSplits("blogfeedback", as_float(x_tr), as_float(y_tr), as_float(x_te), as_float(y_te), None)


__all__ = ["BLOGFEEDBACK_SHA256", "BLOGFEEDBACK_URL", "BLOGFEEDBACK_URLS", "load_blogfeedback", "read_csv"]
