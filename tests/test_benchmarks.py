"""The benchmark's hand-written baseline computes what the framework computes, so the speed ratio compares
the same math (benchmarks/handwritten.py; not a speed test)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fl_lightning.models import MLP, LogisticRegression

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from handwritten import check_against_framework


@pytest.mark.parametrize(("template", "shape", "classes"), [(LogisticRegression(20, 5), (20,), 5),
                                                            (MLP(8, [6], 3), (8,), 3)], ids=["logreg", "mlp"])
def test_handwritten_proxskip_follows_the_frameworks_trajectory(template, shape, classes) -> None:
    # same initial weights, batches and rounds (10 steps, k = 3); float32 with other summation orders: the
    # weights agree to ~1e-7, and a wrong shift, round or batch would move them by ~1e-2
    assert check_against_framework(template, shape, classes) < 1e-5
