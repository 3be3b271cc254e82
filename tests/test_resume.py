"""Exact resume: a run checkpointed at any step (mid-round included) and resumed with fresh objects ends
bit-identical on CPU to the uninterrupted run, whatever the global seed is at resume time.

The state that has to survive: client weights x_i (and their optimizer momentum), control variates h_i,
TopK masks, the schedule's coin RNG, the cohort RNG and the current cohort, the data-sampling seed, the
round and bit counters, and whether a round is open. Every preset runs with seeds left to be derived
from the global seed (``seed=None``), so a resume that re-derived them instead of restoring them fails.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from fl_lightning import FederatedDataModule, FederatedLightningModule
from fl_lightning.algorithms import (
    fedavg,
    fedcomloc,
    proxskip,
    randprox_l1,
    server_pruning,
    sparse_proxskip,
    sparse_proxskip_local,
)
from fl_lightning.callbacks import ClientSampling, FederatedCallback, SkipSchedule
from fl_lightning.callbacks.divergence import DivergenceGuard
from tests.conftest import least_squares, make_trainer

PROBLEM = least_squares(n=6, d=5, m=12, kappa=10.0, seed=3)
TEST = (torch.cat([a for a, _ in PROBLEM.clients]), torch.cat([b for _, b in PROBLEM.clients]))
BATCH = 3  # minibatches: 4 steps per epoch, so 10 steps also cross epoch boundaries
STEPS = 10
SEED, OTHER_SEED = 0, 12345


# Each preset as a factory of fresh callbacks; seeds are left to be derived from the global seed.
PRESETS: dict[str, Callable[[], list[Callback]]] = {
    "proxskip": lambda: proxskip(p=0.3),
    "proxskip_fixed": lambda: proxskip(p=0.25, mode="fixed"),
    "fedavg_cohort": lambda: fedavg(local_steps=3, cohort_size=2),
    "sparse_proxskip": lambda: sparse_proxskip(p=0.3, mode="bernoulli", density=0.5),
    "sparse_proxskip_local": lambda: sparse_proxskip_local(p=0.3, mode="bernoulli", density=0.5),
    "server_pruning": lambda: server_pruning(p=0.3, mode="geometric", density=0.5),
    "randprox_l1": lambda: randprox_l1(p=0.3, lam=0.05),
    "fedcomloc_quantize": lambda: fedcomloc(p=0.3, mode="bernoulli", variant="com", method="quantize", bits=2),
    "fedcomloc_local": lambda: fedcomloc(p=0.25, variant="local", density=0.5),  # evaluated as TopK(x), x dense
}


def build(preset: str, guard: bool = False) -> tuple[FederatedLightningModule, FederatedDataModule, list[Callback]]:
    """Fresh module, datamodule and callbacks (momentum > 0, so the optimizer state matters too)."""
    model = nn.Linear(5, 1, bias=False).double()
    module = FederatedLightningModule(model, lr=0.02, loss="mse", momentum=0.5)
    dm = FederatedDataModule.from_client_tensors(PROBLEM.clients, test=TEST, batch_size=BATCH)
    callbacks = PRESETS[preset]() + ([DivergenceGuard(check_every_n_steps=2)] if guard else [])
    return module, dm, callbacks


def snapshot(trainer: L.Trainer, module: FederatedLightningModule, dm: FederatedDataModule) -> dict[str, Any]:
    """Everything the rest of a run depends on, as plain values and tensors."""
    federated: dict[str, Any] = {}
    module.on_save_checkpoint(federated)
    return {
        "module": {k: v.clone() for k, v in module.state_dict().items()},
        "optimizer": trainer.optimizers[0].state_dict(),
        "callbacks": {cb.state_key: cb.state_dict() for cb in trainer.callbacks
                      if isinstance(cb, (FederatedCallback, DivergenceGuard))},
        "datamodule": dm.state_dict(),
        "federated": federated["federated"],
        "global_step": trainer.global_step,
    }


def assert_identical(a: Any, b: Any, path: str = "") -> None:
    """Bitwise equality of nested dicts/lists/tuples of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{path}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_identical(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def resume(preset: str, ckpt: Path, guard: bool = False) -> dict[str, Any]:
    """Resume from ``ckpt`` with fresh objects under another global seed; the final snapshot."""
    L.seed_everything(OTHER_SEED)  # would re-derive every seed differently if they were not restored
    module, dm, callbacks = build(preset, guard)
    trainer = make_trainer(STEPS, callbacks)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    return snapshot(trainer, module, dm)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_resume_from_any_step_including_mid_round_is_bit_identical(preset: str, tmp_path: Path) -> None:
    L.seed_everything(SEED)
    module, dm, callbacks = build(preset)
    every_step = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    trainer = make_trainer(STEPS, [*callbacks, every_step], enable_checkpointing=True)
    trainer.fit(module, datamodule=dm)
    reference = snapshot(trainer, module, dm)
    assert reference["federated"]["round_index"] >= 2, "the run needs several rounds"

    open_rounds = []
    for step in range(1, STEPS):
        ckpt = tmp_path / f"step={step}.ckpt"
        open_rounds.append(torch.load(ckpt, weights_only=False)["federated"]["round_open"])
        assert_identical(reference, resume(preset, ckpt), f"resumed from step {step}")
    assert any(open_rounds) and not all(open_rounds), "the checkpoints must include mid-round and end-of-round ones"


def test_resume_restores_the_cohort_of_an_open_round(tmp_path: Path) -> None:
    """FedAvg with client sampling: a checkpoint in the middle of a round holds the cohort of that round,
    and the resumed run trains exactly those clients for the rest of the round."""
    L.seed_everything(SEED)
    module, dm, callbacks = build("fedavg_cohort")
    every_step = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    make_trainer(5, [*callbacks, every_step], enable_checkpointing=True).fit(module, datamodule=dm)
    federated = torch.load(tmp_path / "step=4.ckpt", weights_only=False)["federated"]
    assert federated["round_open"] and len(federated["active_clients"]) == 2  # round 1, step 1 of 3

    L.seed_everything(OTHER_SEED)
    resumed, dm2, callbacks2 = build("fedavg_cohort")
    make_trainer(5, callbacks2).fit(resumed, datamodule=dm2, ckpt_path=tmp_path / "step=4.ckpt")
    assert resumed.active_clients is not None
    assert resumed.active_clients.tolist() == federated["active_clients"]
    assert torch.equal(resumed.clients.x["weight"], module.clients.x["weight"])


def test_resume_with_a_divergence_guard_is_bit_identical(tmp_path: Path) -> None:
    L.seed_everything(SEED)
    module, dm, callbacks = build("proxskip", guard=True)
    every_step = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    trainer = make_trainer(STEPS, [*callbacks, every_step], enable_checkpointing=True)
    trainer.fit(module, datamodule=dm)
    assert_identical(snapshot(trainer, module, dm), resume("proxskip", tmp_path / "step=5.ckpt", guard=True))


def csv_rows(logger: CSVLogger) -> list[dict[str, str]]:
    lines = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    return [dict(zip(header, line.split(","))) for line in lines[1:]]


ROUND_METRICS = ("cv/sum_norm", "sparsity/density", "sparsity/client_density")


def test_resumed_run_keeps_epoch_boundaries_validation_times_and_step_metrics(tmp_path: Path) -> None:
    """Mid-epoch, mid-round resume: the rows logged from the resume step on (epoch, step, train/loss, bits,
    rounds, and the validation rows at the end of each epoch) equal the uninterrupted run's. The round
    metrics are compared in the next test."""
    logged = {"log_every_n_steps": 1, "limit_val_batches": 1.0}
    L.seed_everything(SEED)
    module, dm, callbacks = build("sparse_proxskip")
    every_step = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    logger = CSVLogger(tmp_path, name="full", version=0)
    make_trainer(STEPS, [*callbacks, every_step], enable_checkpointing=True, logger=logger, **logged).fit(
        module, datamodule=dm)
    resume_at = 6  # epoch 1 (4 steps per epoch), in the middle of it
    assert torch.load(tmp_path / f"step={resume_at}.ckpt", weights_only=False)["epoch"] == 1

    L.seed_everything(OTHER_SEED)
    module2, dm2, callbacks2 = build("sparse_proxskip")
    logger2 = CSVLogger(tmp_path, name="resumed", version=0)
    make_trainer(STEPS, callbacks2, logger=logger2, **logged).fit(
        module2, datamodule=dm2, ckpt_path=tmp_path / f"step={resume_at}.ckpt")

    def rows(lg: CSVLogger) -> list[dict[str, str]]:
        return [{k: v for k, v in row.items() if k not in ROUND_METRICS} for row in csv_rows(lg)
                if int(row["step"]) >= resume_at]

    expected = rows(logger)
    assert sum(row["val/loss"] != "" for row in expected) >= 1, "a validation must fall after the resume step"
    assert rows(logger2) == expected


def test_resumed_run_logs_the_same_metrics_from_the_resume_step_on(tmp_path: Path) -> None:
    L.seed_everything(SEED)
    module, dm, callbacks = build("sparse_proxskip")
    every_step = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    logger = CSVLogger(tmp_path, name="full", version=0)
    make_trainer(STEPS, [*callbacks, every_step], enable_checkpointing=True, logger=logger,
                 log_every_n_steps=1).fit(module, datamodule=dm)
    mid_round = [s for s in range(1, STEPS)
                 if torch.load(tmp_path / f"step={s}.ckpt", weights_only=False)["federated"]["round_open"]]
    resume_at = mid_round[-1]

    L.seed_everything(OTHER_SEED)
    module2, dm2, callbacks2 = build("sparse_proxskip")
    logger2 = CSVLogger(tmp_path, name="resumed", version=0)
    make_trainer(STEPS, callbacks2, logger=logger2, log_every_n_steps=1).fit(
        module2, datamodule=dm2, ckpt_path=tmp_path / f"step={resume_at}.ckpt")
    expected = [row for row in csv_rows(logger) if int(row["step"]) >= resume_at]
    assert csv_rows(logger2) == expected


class _Interrupt(FederatedCallback):
    """At step ``at``, ``how`` = ``keyboard`` raises KeyboardInterrupt from ``on_train_batch_end`` (a Ctrl-C
    between steps); ``sigterm`` sends this process SIGTERM in the middle of the step, after the local
    SGD step and before the round (what a cluster scheduler does at any moment)."""

    def __init__(self, at: int, how: str) -> None:
        self.at, self.how = at, how

    def on_local_step_end(self, trainer: L.Trainer, module: FederatedLightningModule) -> None:
        if self.how == "sigterm" and trainer.global_step == self.at:
            # Lightning registers its own SIGTERM handler for the run; without it the signal would kill pytest
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.how == "keyboard" and trainer.global_step == self.at:
            raise KeyboardInterrupt


@pytest.mark.parametrize("preset", ["proxskip", "sparse_proxskip"])
@pytest.mark.parametrize("how", ["keyboard", "sigterm"])
def test_interrupted_run_leaves_a_checkpoint_that_resumes_to_the_same_final_state(how: str, preset: str,
                                                                                  tmp_path: Path) -> None:
    """``OnExceptionCheckpoint`` saves a checkpoint from ``on_exception``, which Lightning calls for
    KeyboardInterrupt (then exits with status 1) and for SIGTERM (deferred to the end of the step, then
    raised as ``SIGTERMException``). A Ctrl-C *inside* a step needs ``GracefulInterrupt``
    (``tests/test_interrupt.py``)."""
    L.seed_everything(SEED)
    module, dm, callbacks = build(preset)
    trainer = make_trainer(STEPS, callbacks)
    trainer.fit(module, datamodule=dm)
    reference = snapshot(trainer, module, dm)

    L.seed_everything(SEED)
    module, dm, callbacks = build(preset)
    on_exception = OnExceptionCheckpoint(tmp_path)
    trainer = make_trainer(STEPS, [*callbacks, _Interrupt(6, how), on_exception], enable_checkpointing=True)
    with pytest.raises(SystemExit) as stopped:
        trainer.fit(module, datamodule=dm)
    # KeyboardInterrupt -> sys.exit(1); SIGTERMException is a SystemExit without a code (exit status 0)
    assert stopped.value.code == (1 if how == "keyboard" else None)
    ckpt = torch.load(on_exception.ckpt_path, weights_only=False)
    # saved with step 6 complete, also after a SIGTERM that came in the middle of it (global_step counts
    # the optimizer step that on_local_step_end follows)
    assert ckpt["global_step"] == 6 < STEPS

    L.seed_everything(OTHER_SEED)
    resumed, dm2, callbacks2 = build(preset)
    trainer2 = make_trainer(STEPS, callbacks2)
    trainer2.fit(resumed, datamodule=dm2, ckpt_path=on_exception.ckpt_path)
    assert trainer2.global_step == STEPS
    assert_identical(reference, snapshot(trainer2, resumed, dm2))


Factory = Callable[[], tuple[FederatedLightningModule, FederatedDataModule, list[Callback]]]


def run_checkpointing_every_step(factory: Factory, tmp_path: Path, steps: int = 6) -> tuple[L.Trainer, Any, Any]:
    """An uninterrupted reference run that writes ``step=<k>.ckpt`` after every step."""
    L.seed_everything(SEED)
    module, dm, callbacks = factory()
    every_step = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    trainer = make_trainer(steps, [*callbacks, every_step], enable_checkpointing=True)
    trainer.fit(module, datamodule=dm)
    return trainer, module, dm


def resume_with_other_seed(factory: Factory, ckpt: Path, steps: int = 6) -> tuple[L.Trainer, Any, Any]:
    """Fresh objects, another global seed, resumed from ``ckpt``."""
    L.seed_everything(OTHER_SEED)
    module, dm, callbacks = factory()
    trainer = make_trainer(steps, callbacks)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    return trainer, module, dm


def test_resume_restores_a_seed_dependent_partition_and_its_client_weights(tmp_path: Path) -> None:
    """A Dirichlet partition drawn from the derived data seed, and w_i ∝ |D_i|: at resume time the
    datamodule first re-partitions with a seed derived from the *new* global seed, then the checkpoint
    restores the original partition; the aggregation weights must follow the restored one."""

    def digits() -> tuple[FederatedLightningModule, FederatedDataModule, list[Callback]]:
        dm = FederatedDataModule(dataset="digits", num_clients=4, partition="dirichlet",
                                 partition_args={"alpha": 0.5}, batch_size=8, client_weighting="num_samples")
        return FederatedLightningModule(nn.Linear(64, 10), lr=0.05, loss="cross_entropy"), dm, proxskip(p=0.3)

    trainer, module, dm = run_checkpointing_every_step(digits, tmp_path)
    trainer2, resumed, dm2 = resume_with_other_seed(digits, tmp_path / "step=3.ckpt")
    assert torch.equal(resumed.client_weights, module.client_weights)
    assert_identical(snapshot(trainer, module, dm), snapshot(trainer2, resumed, dm2))


@settings(derandomize=True, deadline=None, max_examples=40)
@given(p=st.floats(min_value=0.05, max_value=1.0), mode=st.sampled_from(["bernoulli", "fixed", "geometric"]),
       seed=st.integers(min_value=0, max_value=2**32), split=st.integers(min_value=0, max_value=60))
def test_schedule_state_restored_at_any_step_continues_with_the_same_coins(p: float, mode: str, seed: int,
                                                                           split: int) -> None:
    """Mid-round included (fixed/geometric keep the position in the round and the drawn length)."""
    if mode == "fixed":
        p = 1.0 / round(1.0 / p)  # a fixed schedule takes only p = 1/k (SkipSchedule refuses others)
    original = SkipSchedule(p=p, mode=mode, seed=seed)
    for _ in range(split):
        original.step()
    restored = SkipSchedule(p=p, mode=mode, seed=seed + 1)  # another seed: the state must override it
    restored.load_state_dict(original.state_dict())
    assert [restored.step() for _ in range(100)] == [original.step() for _ in range(100)]


class _CohortRecorder:
    """Stands in for the module in ``ClientSampling.on_round_start``: records the cohorts drawn."""

    num_clients = 10

    def __init__(self) -> None:
        self.cohorts: list[list[int]] = []

    def set_active_clients(self, clients: list[int]) -> None:
        self.cohorts.append(list(clients))


def draw_cohorts(sampler: ClientSampling, rounds: int) -> list[list[int]]:
    recorder = _CohortRecorder()
    for r in range(rounds):
        sampler.on_round_start(None, recorder, r)  # type: ignore[arg-type]
    return recorder.cohorts


@settings(derandomize=True, deadline=None, max_examples=20)
@given(seed=st.integers(min_value=0, max_value=2**32), split=st.integers(min_value=0, max_value=20))
def test_cohort_sampler_state_restored_at_any_round_draws_the_same_cohorts(seed: int, split: int) -> None:
    original = ClientSampling(cohort_size=3, seed=seed)
    draw_cohorts(original, split)
    restored = ClientSampling(cohort_size=3, seed=seed + 1)
    restored.load_state_dict(original.state_dict())
    assert draw_cohorts(restored, 20) == draw_cohorts(original, 20)


class _DataDependentBranch(nn.Module):
    """Python control flow on a tensor value: passes the static vmap check, fails when run under vmap."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        return y if bool(y.sum() > 0) else -y


def test_resume_with_auto_vectorize_falls_back_like_the_first_run(tmp_path: Path) -> None:
    def branchy() -> tuple[FederatedLightningModule, FederatedDataModule, list[Callback]]:
        module = FederatedLightningModule(_DataDependentBranch().double(), lr=0.01, loss="mse", vectorize="auto")
        return module, FederatedDataModule.from_client_tensors(PROBLEM.clients, batch_size=BATCH), proxskip(p=0.3)

    trainer, module, dm = run_checkpointing_every_step(branchy, tmp_path)
    trainer2, resumed, dm2 = resume_with_other_seed(branchy, tmp_path / "step=3.ckpt")
    assert_identical(snapshot(trainer, module, dm), snapshot(trainer2, resumed, dm2))
