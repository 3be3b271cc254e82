"""Invalid inputs fail early, before any training step, with a message that names what to change.

Values are checked when the object is built; combinations that need the Trainer (the callbacks, the
datamodule's data, the model's layers) are checked in ``setup``, before the first step. The table of
rejected inputs and their messages is in ``docs/reliability.md``.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from fl_lightning import FederatedDataModule, FederatedLightningModule
from fl_lightning.algorithms import fedavg, proxskip, randprox_l1, sparse_proxskip
from fl_lightning.callbacks import (
    ClientSampling,
    Compression,
    ControlVariates,
    DivergenceGuard,
    L1Prox,
    SkipSchedule,
    TopKPruning,
)
from fl_lightning.data import partition as partition_module
from tests.conftest import least_squares, make_trainer

PROBLEM = least_squares(n=6, d=5, m=12, kappa=10.0, seed=0)
NAN, INF = float("nan"), float("inf")


def linear() -> nn.Module:
    return nn.Linear(5, 1, bias=False).double()


def module(model: nn.Module | None = None, **kwargs: Any) -> FederatedLightningModule:
    options: dict[str, Any] = {"lr": 0.01, "loss": "mse", **kwargs}
    return FederatedLightningModule(model if model is not None else linear(), **options)


def least_squares_data() -> FederatedDataModule:
    return FederatedDataModule.from_client_tensors(PROBLEM.clients, batch_size=4)


class StepProbe(L.Callback):
    """Counts the training steps that started."""

    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, *args: Any) -> None:
        self.steps += 1


def assert_fit_rejects(match: str, model: FederatedLightningModule | None = None,
                       dm: FederatedDataModule | None = None, callbacks: list[L.Callback] | None = None,
                       exception: type[Exception] = ValueError) -> None:
    """``trainer.fit`` raises ``exception`` matching ``match`` before the first training step."""
    probe = StepProbe()
    trainer = make_trainer(5, [*(callbacks or []), probe])
    with pytest.raises(exception, match=match):
        trainer.fit(model if model is not None else module(), datamodule=dm if dm is not None else least_squares_data())
    assert trainer.global_step == 0 and probe.steps == 0


# ------------------------------------------------------------------------------------------- values
# (what is built, the regex the message must match: the parameter's name and the accepted range)
P_RANGE = r"SkipSchedule p \(communication probability\) must lie in \(0, 1\], got "
DENSITY_RANGE = r"density must be in \(0, 1\] \(density = 1 − sparsity\), got "
LAM_RANGE = r"L1Prox lam \(λ, the ℓ1 weight\) must be >= 0, got "
AT_CONSTRUCTION: list[Any] = [
    # p, the communication probability, must lie in (0, 1]
    *[pytest.param(lambda p=p: SkipSchedule(p=p), P_RANGE, id=f"SkipSchedule-p={p}")
      for p in (0.0, -0.1, 1.5, NAN, INF)],
    pytest.param(lambda: proxskip(p=0.0), P_RANGE, id="proxskip-p=0"),
    pytest.param(lambda: sparse_proxskip(p=2.0, density=0.5), P_RANGE, id="sparse_proxskip-p=2"),
    pytest.param(lambda: SkipSchedule(), r"SkipSchedule needs p \(communication probability in \(0, 1\]\) or k",
                 id="SkipSchedule-no-p"),
    pytest.param(lambda: SkipSchedule(k=0), r"SkipSchedule k \(local steps per round\) must be an integer >= 1",
                 id="SkipSchedule-k=0"),
    pytest.param(lambda: SkipSchedule(p=0.3, k=2), r"give p or k, not both", id="SkipSchedule-p-and-k"),
    pytest.param(lambda: SkipSchedule(p=0.4, mode="fixed"), r"SkipSchedule p=0\.4 with mode='fixed'.*1/p must be an "
                 r"integer", id="SkipSchedule-fixed-p=0.4"),
    pytest.param(lambda: sparse_proxskip(p=0.3, density=0.5), r"SkipSchedule p=0\.3 with mode='fixed'",
                 id="sparse_proxskip-p=0.3"),
    pytest.param(lambda: SkipSchedule(p=0.5, mode="poisson"),
                 r"SkipSchedule mode must be one of \('bernoulli', 'fixed', 'geometric'\)", id="SkipSchedule-mode"),
    pytest.param(lambda: fedavg(local_steps=0), r"SkipSchedule k \(local steps per round\) must be an integer >= 1",
                 id="fedavg-local_steps=0"),
    # density δ ∈ (0, 1]
    *[pytest.param(lambda d=d: TopKPruning(density=d), DENSITY_RANGE, id=f"TopKPruning-density={d}")
      for d in (0.0, -0.5, 1.5, NAN, INF)],
    pytest.param(lambda: sparse_proxskip(p=0.2, density=0.0), DENSITY_RANGE, id="sparse_proxskip-density=0"),
    pytest.param(lambda: Compression("uplink", "topk", density=2.0), DENSITY_RANGE, id="Compression-density=2"),
    pytest.param(lambda: Compression("uplink", "topk"), r"Compression\(method='topk'\) needs density in \(0, 1\]",
                 id="Compression-topk-without-density"),
    pytest.param(lambda: Compression("uplink", "quantize", bits=0), r"Compression bits must be an integer in \[1, 24\]",
                 id="Compression-bits=0"),
    pytest.param(lambda: TopKPruning(density=0.5, at=("forward", "local")),
                 r"TopKPruning at: 'forward' \(STE, dense x_i\) conflicts with 'local' .*; keep one of them",
                 id="TopK-forward+local"),
    # lr = γ > 0 (and finite), and the local optimizer's options
    *[pytest.param(lambda lr=lr: module(lr=lr), r"^lr must be > 0, got ", id=f"lr={lr}")
      for lr in (0.0, -0.1, NAN, INF)],
    *[pytest.param(lambda m=m: module(momentum=m), r"momentum must lie in \[0, 1\)", id=f"momentum={m}")
      for m in (1.0, -0.1, NAN)],
    *[pytest.param(lambda w=w: module(weight_decay=w), r"weight_decay must be >= 0", id=f"weight_decay={w}")
      for w in (-1.0, NAN, INF)],
    # λ ≥ 0 (and finite) of the ℓ1 prox
    *[pytest.param(lambda lam=lam: L1Prox(lam=lam), LAM_RANGE, id=f"L1Prox-lam={lam}") for lam in (-0.1, NAN, INF)],
    pytest.param(lambda: randprox_l1(lam=-1.0), LAM_RANGE, id="randprox_l1-lam<0"),
    # the module's other options
    pytest.param(lambda: module(vectorize="maybe"), r"vectorize must be true, false or 'auto'", id="vectorize=maybe"),
    pytest.param(lambda: module(num_clients=0), r"num_clients must be >= 1", id="module-num_clients=0"),
    pytest.param(lambda: module(clients_per_chunk=0), r"clients_per_chunk must be >= 1", id="clients_per_chunk=0"),
    pytest.param(lambda: module(eval_every=0), r"eval_every must be >= 1 rounds", id="eval_every=0"),
    pytest.param(lambda: module(encoding="zip"), r"encoding must be one of \('auto', 'dense', 'coo', 'bitmask'\)",
                 id="encoding"),
    pytest.param(lambda: FederatedLightningModule(linear(), lr=0.1, loss="hinge"),
                 r"loss must be one of \['cross_entropy', 'mse'\] or a callable", id="loss"),
    # client sampling, control variates
    pytest.param(lambda: ClientSampling(cohort_size=0), r"ClientSampling cohort_size must be an integer >= 1",
                 id="cohort_size=0"),
    pytest.param(lambda: fedavg(cohort_size=0), r"ClientSampling cohort_size must be an integer >= 1",
                 id="fedavg-cohort_size=0"),
    pytest.param(lambda: ControlVariates(reference="x"), r"ControlVariates reference must be 'mean' or 'broadcast'",
                 id="ControlVariates-reference"),
    pytest.param(lambda: ControlVariates(uplink="local", reference="broadcast"),
                 r"uplink='local' relies on zero-sum control variates: use reference='mean'",
                 id="ControlVariates-local-uplink-naive"),
    # the data
    pytest.param(lambda: FederatedDataModule(num_clients=0), r"num_clients must be >= 1",
                 id="datamodule-num_clients=0"),
    pytest.param(lambda: FederatedDataModule(batch_size=0), r"batch_size must be >= 1 \(or null", id="batch_size=0"),
    pytest.param(lambda: FederatedDataModule(client_weighting="size"),
                 r"client_weighting must be 'uniform' or 'num_samples'", id="client_weighting"),
    pytest.param(lambda: FederatedDataModule(augment="mixup"), r"unknown augmentation 'mixup'; known: crop_flip",
                 id="augment"),
    pytest.param(lambda: FederatedDataModule.from_client_tensors([]), r"at least one client", id="no-clients"),
    pytest.param(lambda: FederatedDataModule.from_client_tensors(
        [(torch.ones(3, 5), torch.ones(3)), (torch.ones(0, 5), torch.ones(0))]), r"client 1 has no samples",
        id="from_client_tensors-empty-client"),
]


@pytest.mark.parametrize(("build", "match"), AT_CONSTRUCTION)
def test_invalid_value_is_rejected_at_construction_naming_the_parameter(build: Callable[[], Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


def test_client_model_must_be_a_module() -> None:
    with pytest.raises(TypeError, match="client_model"):
        FederatedLightningModule("resnet18", lr=0.1)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- combinations
def test_cohort_larger_than_the_number_of_clients_fails_before_training() -> None:
    assert_fit_rejects(r"cohort_size \(7\) must be <= the number of clients \(6\)", callbacks=fedavg(cohort_size=7))


def test_two_schedules_fail_before_training() -> None:
    # two of the same class: Lightning refuses two stateful callbacks with one state_key, at Trainer(...)
    with pytest.raises(RuntimeError, match=r"more than one stateful callback of type `SkipSchedule`"):
        make_trainer(5, [SkipSchedule(p=0.5), SkipSchedule(k=3)])

    class Every3(SkipSchedule):  # a subclass has its own state_key: the module's setup catches it
        def __init__(self) -> None:
            super().__init__(k=3)

    assert_fit_rejects(r"2 SkipSchedule callbacks; keep exactly one", callbacks=[SkipSchedule(p=0.5), Every3()])


@pytest.mark.parametrize("callback", [ControlVariates(), TopKPruning(density=0.5), L1Prox(lam=0.1)],
                         ids=["ControlVariates", "TopKPruning", "L1Prox"])
def test_algorithm_callbacks_without_a_schedule_fail_before_training(callback: L.Callback) -> None:
    assert_fit_rejects(rf"{type(callback).__name__} needs a communication schedule: add a SkipSchedule",
                       callbacks=[callback])


def test_control_variates_with_client_sampling_fail_unless_allowed() -> None:
    assert_fit_rejects(r"allow_partial_participation=True",
                       callbacks=[SkipSchedule(k=2), ControlVariates(), ClientSampling(cohort_size=3)])
    allowed = [SkipSchedule(k=2), ControlVariates(allow_partial_participation=True), ClientSampling(cohort_size=3)]
    trainer = make_trainer(4, allowed)
    trainer.fit(module(), datamodule=least_squares_data())
    assert trainer.global_step == 4


def test_two_topk_at_the_same_location_fail_before_training() -> None:
    callbacks = [SkipSchedule(k=2), TopKPruning(0.5, at="local"), TopKPruning(0.3, at=("local", "server"))]
    assert_fit_rejects(r"two TopKPruning callbacks prune at \['local'\]", callbacks=callbacks)


def test_vectorize_true_with_batchnorm_names_the_layer_before_training() -> None:
    model = nn.Sequential(OrderedDict(norm=nn.BatchNorm1d(5), head=nn.Linear(5, 1))).double()
    assert_fit_rejects(r"vectorize=True is impossible: layer norm \(BatchNorm1d with running stats\)",
                       model=module(model, vectorize=True), callbacks=proxskip(p=0.5))


def test_module_and_datamodule_disagreeing_on_the_number_of_clients_fail_before_training() -> None:
    assert_fit_rejects(r"module holds 3 clients but the datamodule has 6", model=module(num_clients=3))


def test_cross_entropy_on_regression_targets_fails_before_training() -> None:
    model = FederatedLightningModule(linear(), lr=0.1, loss="cross_entropy")
    assert_fit_rejects(r"loss='cross_entropy' needs a classification dataset", model=model)


# ------------------------------------------------------------------------------------------- datasets, partitions
def digits(**kwargs: Any) -> FederatedDataModule:
    return FederatedDataModule(dataset="digits", batch_size=8, seed=0, **kwargs)


def digits_model() -> FederatedLightningModule:
    return FederatedLightningModule(nn.Linear(64, 10), lr=0.1, loss="cross_entropy")


def test_more_clients_than_samples_fail_before_training() -> None:
    dm = digits(num_clients=5000, partition="iid")  # digits has 1,437 training samples
    assert_fit_rejects(r"num_clients must be in \[1, 1437\]", model=digits_model(), dm=dm)


@pytest.mark.parametrize("alpha", [0.0, -1.0, NAN])
def test_dirichlet_alpha_must_be_positive(alpha: float) -> None:
    dm = digits(num_clients=4, partition="dirichlet", partition_args={"alpha": alpha})
    assert_fit_rejects(r"alpha must be > 0 and finite", model=digits_model(), dm=dm)


def test_unknown_partition_option_names_the_accepted_ones() -> None:
    dm = digits(num_clients=4, partition="iid", partition_args={"alpha": 0.5})
    assert_fit_rejects(r"partitioner 'iid' got unknown option\(s\) alpha", model=digits_model(), dm=dm)


def test_partition_that_leaves_a_client_empty_fails_before_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped partitioners never leave a client empty; a custom one may, and the datamodule checks."""

    # the datamodule imports ``partition`` when it sets up; replacing it leaves the registry untouched
    monkeypatch.setattr(partition_module, "partition", empty_client_1)
    dm = digits(num_clients=4, partition="iid")
    assert_fit_rejects(r"clients \[1\] received no samples; use fewer clients or another partition",
                       model=digits_model(), dm=dm)


def test_unknown_dataset_lists_the_known_ones() -> None:
    assert_fit_rejects(r"unknown dataset 'femnist_typo'; known: .*digits", model=digits_model(),
                       dm=FederatedDataModule(dataset="femnist_typo"))


@pytest.mark.parametrize(("dataset", "args", "files"), [
    ("cifar10", {"download": False}, r"cifar-10-python\.tar\.gz"),
    ("blogfeedback", {"download": False}, r"blogfeedback\.zip"),
    ("femnist", {}, r"train/\*\.json"),
    # (fashion_mnist shares mnist's loader and also reads a system-wide copy, so it is not missing everywhere)
    ("mnist", {"download": False}, r"train-images-idx3-ubyte\.gz"),
], ids=["cifar10", "blogfeedback", "femnist", "mnist"])
def test_missing_dataset_files_name_the_files_and_the_folder_before_training(
        dataset: str, args: dict[str, Any], files: str, tmp_path: Path) -> None:
    dm = FederatedDataModule(dataset=dataset, data_dir=tmp_path, dataset_args=args, num_clients=2)
    folder = re.escape(str(tmp_path))
    assert_fit_rejects(rf"{dataset}: missing {files}.* in {folder}.*Put .* into {folder}", model=digits_model(),
                       dm=dm, exception=FileNotFoundError)



# ------------------------------------------------------------------------------------------- the README table
def fit_before_first_step(model: FederatedLightningModule | None = None, dm: FederatedDataModule | None = None,
                          callbacks: list[L.Callback] | None = None) -> None:
    """``trainer.fit``, asserting (also when it raises) that no training step started."""
    probe = StepProbe()
    trainer = make_trainer(5, [*(callbacks or []), probe])
    try:
        trainer.fit(model if model is not None else module(), datamodule=dm if dm is not None else least_squares_data())
    finally:
        assert trainer.global_step == 0 and probe.steps == 0, "a training step ran"


def batchnorm_model() -> nn.Module:
    return nn.Sequential(OrderedDict(norm=nn.BatchNorm1d(5), head=nn.Linear(5, 1))).double()


def empty_client_1(name: str, labels: np.ndarray, num_clients: int, **kwargs: Any) -> list[np.ndarray]:
    """A custom partitioner that leaves client 1 without samples (the shipped ones never do)."""
    idx = np.arange(len(labels))
    return [idx[: len(idx) // 2], idx[:0], *np.array_split(idx[len(idx) // 2 :], num_clients - 2)]


def fit_with_empty_client_1() -> None:
    """Fit with a partitioner that leaves client 1 empty (the datamodule imports ``partition`` at setup)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(partition_module, "partition", empty_client_1)
        fit_before_first_step(digits_model(), digits(num_clients=4, partition="iid"))


# (id, the input as the README shows it, what raises, the exception, its exact message). The README's table of
# rejected inputs is this list; a changed message fails here and names the row to update there.
README_TABLE: list[tuple[str, str, Callable[[], Any], type[Exception], str]] = [
    ("p", "`proxskip(p=0)` (any p ∉ (0, 1], NaN, ∞)", lambda: proxskip(p=0.0), ValueError,
     "SkipSchedule p (communication probability) must lie in (0, 1], got 0.0"),
    ("k", "`fedavg(local_steps=0)`, `SkipSchedule(k=0)`", lambda: fedavg(local_steps=0), ValueError,
     "SkipSchedule k (local steps per round) must be an integer >= 1, got 0"),
    ("density", "`sparse_proxskip(density=0)` (any δ ∉ (0, 1]; `TopKPruning`, `Compression` too)",
     lambda: sparse_proxskip(p=0.2, density=0.0), ValueError,
     "density must be in (0, 1] (density = 1 − sparsity), got 0.0"),
    ("lr", "`FederatedLightningModule(model, lr=0)` (also lr < 0, NaN, ∞)", lambda: module(lr=0.0), ValueError,
     "lr must be > 0, got 0.0"),
    ("lam", "`L1Prox(lam=-0.1)`, `randprox_l1(lam=-0.1)` (also NaN, ∞)", lambda: L1Prox(lam=-0.1), ValueError,
     "L1Prox lam (λ, the ℓ1 weight) must be >= 0, got -0.1"),
    ("momentum", "`momentum=1`", lambda: module(momentum=1.0), ValueError, "momentum must lie in [0, 1), got 1.0"),
    ("bits", "`Compression(method=\"quantize\", bits=0)`", lambda: Compression("uplink", "quantize", bits=0),
     ValueError, "Compression bits must be an integer in [1, 24], got 0"),
    ("num_clients", "`FederatedDataModule(num_clients=0)`", lambda: FederatedDataModule(num_clients=0), ValueError,
     "num_clients must be >= 1, got 0"),
    ("batch_size", "`batch_size=0`", lambda: FederatedDataModule(batch_size=0), ValueError,
     "batch_size must be >= 1 (or null for the full local dataset), got 0"),
    ("more-clients-than-samples", "5000 clients on digits (1437 training samples)",
     lambda: fit_before_first_step(digits_model(), digits(num_clients=5000, partition="iid")), ValueError,
     "num_clients must be in [1, 1437] (at most one client per sample), got 5000"),
    ("alpha", "`partition: dirichlet`, `alpha: 0` (also < 0, NaN)",
     lambda: fit_before_first_step(digits_model(), digits(num_clients=4, partition="dirichlet",
                                                          partition_args={"alpha": 0.0})), ValueError,
     "alpha must be > 0 and finite (small = heterogeneous, large = near IID), got 0.0"),
    ("empty-client-partition", "a partition that leaves client 1 empty", lambda: fit_with_empty_client_1(), ValueError,
     "clients [1] received no samples; use fewer clients or another partition"),
    ("empty-client-tensors", "`from_client_tensors` with an empty client",
     lambda: FederatedDataModule.from_client_tensors([(torch.ones(3, 5), torch.ones(3)),
                                                      (torch.ones(0, 5), torch.ones(0))]), ValueError,
     "client 1 has no samples"),
    ("cohort", "`fedavg(cohort_size=7)` with 6 clients", lambda: fit_before_first_step(callbacks=fedavg(cohort_size=7)),
     ValueError, "ClientSampling cohort_size (7) must be <= the number of clients (6)"),
    ("two-schedules", "two schedules of different classes",
     lambda: fit_before_first_step(callbacks=[SkipSchedule(p=0.5), type("Every3", (SkipSchedule,), {})(k=3)]),
     ValueError, "got 2 SkipSchedule callbacks; keep exactly one"),
    ("pruning-without-schedule", "`TopKPruning` without a `SkipSchedule`",
     lambda: fit_before_first_step(callbacks=[TopKPruning(density=0.5)]), ValueError,
     "TopKPruning needs a communication schedule: add a SkipSchedule callback"),
    ("prune-locations", "`TopKPruning(at=(\"forward\", \"local\"))`",
     lambda: TopKPruning(density=0.5, at=("forward", "local")), ValueError,
     "TopKPruning at: 'forward' (STE, dense x_i) conflicts with 'local' (x_i pruned after every step); "
     "keep one of them"),
    ("two-topk", "two `TopKPruning` at one location",
     lambda: fit_before_first_step(callbacks=[SkipSchedule(k=2), TopKPruning(0.5, at="local"),
                                              TopKPruning(0.3, at=("local", "server"))]), ValueError,
     "two TopKPruning callbacks prune at ['local']; merge them into one"),
    ("control-variates-sampling", "`ControlVariates` with `ClientSampling`",
     lambda: fit_before_first_step(callbacks=[SkipSchedule(k=2), ControlVariates(), ClientSampling(cohort_size=3)]),
     ValueError, "ControlVariates with ClientSampling: control variates assume full participation; "
     "set ControlVariates(allow_partial_participation=True) to run it anyway"),
    ("vectorize", "`vectorize: true` with a BatchNorm layer named `norm`",
     lambda: fit_before_first_step(module(batchnorm_model(), vectorize=True), callbacks=proxskip(p=0.5)), ValueError,
     "vectorize=True is impossible: layer norm (BatchNorm1d with running stats) cannot run under vmap in training. "
     "Use vectorize: auto or false"),
    ("clients-disagree", "module and datamodule disagree on n",
     lambda: fit_before_first_step(module(num_clients=3)), ValueError,
     "the module holds 3 clients but the datamodule has 6"),
    ("check_every_n_steps", "`DivergenceGuard(check_every_n_steps=0)`",
     lambda: DivergenceGuard(check_every_n_steps=0), ValueError,
     "DivergenceGuard check_every_n_steps must be an integer >= 1, got 0"),
]


@pytest.mark.parametrize(("build", "exception", "message"),
                         [pytest.param(b, e, m, id=i) for i, _, b, e, m in README_TABLE])
def test_readme_table_message(build: Callable[[], Any], exception: type[Exception], message: str) -> None:
    """Each row of the README's table: the exception and its exact message, before any training step."""
    with pytest.raises(exception) as err:
        build()
    assert str(err.value) == message


def test_readme_table_shows_these_messages() -> None:
    """The README's table of rejected inputs quotes the messages of README_TABLE, row by row (by id)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    cells = {}
    for line in readme.splitlines():
        parts = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(parts) == 3 and parts[2].startswith("`") and parts[2].endswith("`"):
            cells[parts[2].strip("`")] = parts[1]
    for row_id, _, _, exception, message in README_TABLE:
        assert row_id in cells, f"the README's table has no row {row_id!r}"
        assert cells[row_id].startswith(f"`{exception.__name__}: {message}`"), (row_id, cells[row_id])
