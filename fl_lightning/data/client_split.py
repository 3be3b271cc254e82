"""Each client's own held-out split (``client_test_fraction`` of :class:`~fl_lightning.data.FederatedDataModule`).

A client i with partition D_i keeps ``round(fraction·|D_i|)`` samples of it for testing, stratified by label:
label ℓ, of which D_i holds n_ℓ samples, contributes ⌊fraction·n_ℓ⌋ samples, and the remainder of the quota goes
to the labels with the largest fractional parts fraction·n_ℓ − ⌊fraction·n_ℓ⌋ (ties broken at random), so
every label keeps its share up to one sample. Which samples of a label are held out is drawn at random. Every
client keeps at least one training sample; a client with a single sample has an empty test split. The same
seed gives the same split.
"""

from __future__ import annotations

import numpy as np

_STREAM = 0x7E57  # the split's RNG stream, apart from the partitioner's (same seed)


def check_fraction(fraction: float) -> float:
    """``fraction`` as a float in [0, 1), or a ValueError saying what to change."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
        raise ValueError(f"client_test_fraction must be a number in [0, 1) (0: no client test splits), got "
                         f"{fraction!r}")
    return float(fraction)


def holdout_quota(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> dict[int, int]:
    """How many samples of each label to hold out: ⌊f·n_ℓ⌋, plus one for the labels with the largest fractional
    parts until the total is round(f·Σ n_ℓ), capped so that one training sample remains."""
    values, counts = np.unique(labels, return_counts=True)
    total = min(int(np.floor(fraction * len(labels) + 0.5)), len(labels) - 1)
    exact = fraction * counts
    quota = np.floor(exact).astype(np.int64)
    while quota.sum() > total:  # the cap bit: take back from the largest quotas
        quota[int(np.argmax(quota))] -= 1
    missing = total - int(quota.sum())
    if missing > 0:
        remainder = exact - quota
        order = np.lexsort((rng.random(len(values)), -remainder))  # largest remainder first, random ties
        quota[order[:missing]] += 1
    return {int(v): int(q) for v, q in zip(values, quota)}


def split_client(indices: np.ndarray, labels: np.ndarray, fraction: float,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) sorted index arrays of one client's partition ``indices``, stratified by ``labels``."""
    if fraction == 0.0 or len(indices) < 2:
        return np.sort(indices), indices[:0]
    own = labels[indices]
    test: list[np.ndarray] = []
    for label, q in holdout_quota(own, fraction, rng).items():
        if q:
            test.append(rng.choice(indices[own == label], size=q, replace=False))
    held = np.sort(np.concatenate(test)) if test else indices[:0]
    return np.setdiff1d(indices, held), held


def split_clients(parts: list[np.ndarray], labels: np.ndarray, fraction: float,
                  seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Split every client's partition (:func:`split_client`, client i drawing from its own seeded stream)."""
    train, test = [], []
    for i, idx in enumerate(parts):
        tr, te = split_client(np.asarray(idx, dtype=np.int64), labels, fraction,
                              np.random.default_rng([seed, _STREAM, i]))
        train.append(tr)
        test.append(te)
    return train, test


__all__ = ["check_fraction", "holdout_quota", "split_client", "split_clients"]
