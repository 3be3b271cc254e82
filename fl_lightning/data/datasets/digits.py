"""scikit-learn's bundled ``load_digits`` (8x8 handwritten digits): the embedded default dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fl_lightning.data.datasets.base import DatasetSplits, as_float, as_labels, register_dataset


@register_dataset("digits")
def load_digits(data_dir: Path | None = None, test_fraction: float = 0.2, seed: int = 0) -> DatasetSplits:
    """1,797 images of 64 pixels in [0, 16] scaled to [0, 1]; 10 classes; a stratified held-out test split.

    Needs no download: the data ships inside scikit-learn. ``data_dir`` is accepted and ignored.
    """
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    bunch = _load()
    x = bunch.data.astype(np.float32) / 16.0
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return DatasetSplits("digits", as_float(x_tr), as_labels(y_tr), as_float(x_te), as_labels(y_te), 10)
