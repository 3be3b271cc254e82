"""scikit-learn's bundled diabetes data (Efron et al. 2004): a small regression set that needs no download.

The study's offline stand-in for BlogFeedback (the seed paper's linear-regression experiment) when
``blogfeedback.zip`` is absent: 442 patients, 10 baseline features, a disease-progression target.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fl_lightning.data.datasets.base import DatasetSplits, as_float, register_dataset


@register_dataset("diabetes")
def load_diabetes(data_dir: Path | None = None, test_fraction: float = 0.2, seed: int = 0,
                  standardize_target: bool = True) -> DatasetSplits:
    """442 samples, 10 features (scikit-learn scales each to unit norm; here they are standardised with the
    training split's mean and std), float32 targets; a held-out test split of ``test_fraction``.

    ``standardize_target`` scales the target to zero mean and unit variance with the training split's
    statistics (so a mean-squared error of 1.0 is the constant predictor's). ``data_dir`` is accepted and ignored.
    """
    from sklearn.datasets import load_diabetes as _load
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    bunch = _load()
    x = bunch.data.astype(np.float64)
    y = bunch.target.astype(np.float64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed)
    mean, std = x_tr.mean(axis=0), x_tr.std(axis=0)
    std[std < 1e-12] = 1.0
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    if standardize_target:
        y_mean, y_std = y_tr.mean(), y_tr.std()
        y_tr, y_te = (y_tr - y_mean) / y_std, (y_te - y_mean) / y_std
    return DatasetSplits("diabetes", as_float(x_tr), as_float(y_tr), as_float(x_te), as_float(y_te), None)


__all__ = ["load_diabetes"]
