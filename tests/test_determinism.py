"""Determinism: the same seed gives the same run (CPU), and the schedule's coin follows its law.

On a GPU some kernels are not bitwise reproducible by default; ``docs/reliability.md`` says what to set
there (``Trainer(deterministic=True)`` and ``CUBLAS_WORKSPACE_CONFIG``). These tests run on the CPU: they
check that this recipe runs every code path and changes nothing there; no GPU run is tested.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from fl_lightning import FederatedDataModule, FederatedLightningModule
from fl_lightning.algorithms import fedavg, proxskip, sparse_proxskip
from fl_lightning.callbacks import ClientSampling, ControlVariates, SkipSchedule
from tests.conftest import make_trainer

PRESETS = {
    "proxskip": lambda: proxskip(p=0.3),
    "fedavg_cohort": lambda: fedavg(local_steps=3, cohort_size=3),
    "sparse_proxskip": lambda: sparse_proxskip(p=0.3, mode="bernoulli", density=0.3),
    # control variates of a sampled cohort: the index_add_ path
    "proxskip_cohort": lambda: [SkipSchedule(p=0.3), ControlVariates(allow_partial_participation=True),
                                ClientSampling(cohort_size=3)],
}


def logged_run(seed: int, preset: str, save_dir: Path, **trainer_args: Any) -> str:
    """Train on a Dirichlet split of digits with every seed derived from ``seed``; the metrics.csv text."""
    L.seed_everything(seed)
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    module = FederatedLightningModule(model, lr=0.1, loss="cross_entropy", eval_every=2)
    dm = FederatedDataModule(dataset="digits", num_clients=5, partition="dirichlet", partition_args={"alpha": 0.5},
                             batch_size=8, steps_per_epoch=6)
    logger = CSVLogger(save_dir, name=f"seed{seed}", version=0)
    trainer = make_trainer(12, PRESETS[preset](), logger=logger, log_every_n_steps=1, limit_val_batches=1.0,
                           val_check_interval=6, **trainer_args)
    trainer.fit(module, datamodule=dm)
    return (Path(logger.log_dir) / "metrics.csv").read_text()


@pytest.mark.parametrize("preset", list(PRESETS))
def test_same_seed_logs_identical_metrics(preset: str, tmp_path: Path) -> None:
    first = logged_run(7, preset, tmp_path / "a")
    again = logged_run(7, preset, tmp_path / "b")
    other = logged_run(8, preset, tmp_path / "c")
    header = first.splitlines()[0].split(",")
    assert {"train/loss", "val/loss", "val/acc", "comm/bits_up", "comm/rounds"} <= set(header), header
    assert len(first.splitlines()) > 12, "one row per step at least"
    assert first == again
    assert first != other, "the metrics must depend on the seed, or this test proves nothing"


@pytest.fixture
def restores_deterministic_mode() -> Iterator[None]:
    """``Trainer(deterministic=True)`` switches process-wide settings on; put them back for the other tests."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.benchmark = saved[2]
    if saved[3] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[3]


@pytest.mark.parametrize("preset", list(PRESETS))
def test_the_gpu_determinism_recipe_runs_every_path_and_changes_nothing_on_cpu(
        preset: str, tmp_path: Path, restores_deterministic_mode: None) -> None:
    """``deterministic=True`` raises for an operation without a deterministic implementation and fills
    uninitialised memory (``torch.empty``) with NaN, so a path that relied on either would fail or change
    the metrics here."""
    default = logged_run(7, preset, tmp_path / "default")
    strict = logged_run(7, preset, tmp_path / "strict", deterministic=True)
    assert torch.are_deterministic_algorithms_enabled()  # the run really was in that mode
    assert torch.utils.deterministic.fill_uninitialized_memory
    assert strict == default


# ------------------------------------------------------------------------------------------- SkipSchedule
def round_lengths(schedule: SkipSchedule, rounds: int) -> list[int]:
    """The number of local steps in each of the next ``rounds`` rounds."""
    lengths, steps = [], 0
    while len(lengths) < rounds:
        steps += 1
        if schedule.step():
            lengths.append(steps)
            steps = 0
    return lengths


ROUNDS = 1000


@settings(derandomize=True, deadline=None, max_examples=40)
@given(p=st.floats(min_value=0.02, max_value=1.0), mode=st.sampled_from(["bernoulli", "geometric"]),
       seed=st.integers(min_value=0, max_value=2**32))
def test_random_round_length_has_mean_one_over_p(p: float, mode: str, seed: int) -> None:
    """Round lengths are i.i.d. Geometric(p) on {1, 2, ...}: mean 1/p, variance (1 − p)/p². The mean of
    N = 1000 of them has standard error √(1 − p)/(p√N); a 5-standard-error band is missed with probability
    ≈ 6e-7 per example (normal approximation, accurate at N = 1000), and ``derandomize`` fixes the
    examples, so the test is deterministic. A wrong law (e.g. lengths from 0, or a coin of p/2) is off by
    at least 1 or by 1/p ≫ 5 SE."""
    lengths = round_lengths(SkipSchedule(p=p, mode=mode, seed=seed), ROUNDS)
    mean = sum(lengths) / ROUNDS
    standard_error = math.sqrt(1.0 - p) / (p * math.sqrt(ROUNDS))
    assert abs(mean - 1.0 / p) <= 5 * standard_error + 1e-12
    assert min(lengths) >= 1


@settings(derandomize=True, deadline=None)
@given(k=st.integers(min_value=1, max_value=50), steps=st.integers(min_value=0, max_value=400),
       seed=st.integers(min_value=0, max_value=2**32))
def test_fixed_mode_communicates_exactly_every_k_steps(k: int, steps: int, seed: int) -> None:
    schedule = SkipSchedule(k=k, seed=seed)
    coins = [schedule.step() for _ in range(steps)]
    assert coins == [(t + 1) % k == 0 for t in range(steps)]
    assert schedule.p == 1.0 / k and schedule.mode == "fixed"


@settings(derandomize=True, deadline=None)
@given(p=st.floats(min_value=0.01, max_value=1.0))
def test_fixed_mode_from_p_runs_k_equal_one_over_p_or_refuses_p_that_is_not_one_over_an_integer(p: float) -> None:
    k = max(1, round(1.0 / p))
    if abs(1.0 / p - k) > 1e-9 * (1.0 / p):  # p = 0.4 would run as p = 0.5: refused, not rounded
        with pytest.raises(ValueError, match=r"1/p must be an integer.*mode='bernoulli'"):
            SkipSchedule(p=p, mode="fixed", seed=0)
        p = 1.0 / k
    schedule = SkipSchedule(p=p, mode="fixed", seed=0)
    assert round_lengths(schedule, 5) == [k] * 5
    assert schedule.p == 1.0 / k  # the control variates use 1/k


@settings(derandomize=True, deadline=None, max_examples=30)
@given(p=st.floats(min_value=0.05, max_value=1.0), mode=st.sampled_from(["bernoulli", "fixed", "geometric"]),
       seed=st.integers(min_value=0, max_value=2**32))
def test_same_seed_gives_the_same_coins(p: float, mode: str, seed: int) -> None:
    if mode == "fixed":
        p = 1.0 / round(1.0 / p)  # a fixed schedule takes only p = 1/k
    a, b = SkipSchedule(p=p, mode=mode, seed=seed), SkipSchedule(p=p, mode=mode, seed=seed)
    assert [a.step() for _ in range(300)] == [b.step() for _ in range(300)]
