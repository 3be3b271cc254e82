"""W&B (offline) and TensorBoard logging: dashboards, run names, the stored config, per-layer density.

Offline W&B runs are read back from the ``run-<id>.wandb`` transaction log with
:func:`fl_lightning.loggers.read_wandb_run` (no server, no network).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import wandb
import yaml
from lightning.pytorch.loggers import WandbLogger
from torch import nn

from fl_lightning import FederatedDataModule, FederatedLightningModule
from fl_lightning.algorithms import proxskip, sparse_proxskip
from fl_lightning.callbacks.metrics import CONFIG_FILE, LayerDensity, WandbFederatedMetrics
from fl_lightning.cli import FederatedCLI
from fl_lightning.loggers import iter_wandb_records, read_wandb_run
from fl_lightning.ops import density
from tests.conftest import make_trainer

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
SPARSE = ROOT / "configs" / "algorithms" / "sparse_proxskip.yaml"
SHORT = ["--trainer.max_steps", "40", "--model.eval_every", "2", "--trainer.limit_val_batches", "0",
         "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false", "--trainer.enable_checkpointing", "false"]


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield tmp_path
    wandb.finish()  # never leave a run open for the next test


def test_offline_wandb_quickstart_has_the_federated_dashboard(offline: Path) -> None:
    cli = FederatedCLI(args=[
        "fit", "--config", str(QUICKSTART), "--config", str(ROOT / "configs" / "loggers" / "wandb.yaml"),
        "--model.algorithm", "fl_lightning.algorithms.SparseProxSkip", "--model.algorithm.density", "0.2",
        "--model.algorithm.mode", "fixed", *SHORT, "--trainer.logger.init_args.save_dir", str(offline),
    ])
    wandb.finish()  # Lightning leaves the run open until the process exits
    module = cli.model
    run = read_wandb_run(offline / "wandb" / "latest-run", wait=60)

    # the metrics of DESIGN §3, in the rows W&B recorded on the logging steps (every 10 of 40 steps)
    assert sorted({row["trainer/global_step"] for row in run.history}) == [9, 19, 29, 39]
    for key in ("train/loss", "val/acc", "comm/rounds", "comm/bits_up", "comm/bits_down", "sparsity/density"):
        assert len(run.series(key)) >= 2, key
    assert run.series("comm/rounds")[-1] == module.round_index == 8  # k = 1/p = 5 steps per round
    assert run.series("comm/bits_up")[-1] == pytest.approx(float(module.comm.bits_up))
    assert run.summary["val/acc"] == {"max": max(run.series("val/acc"))}  # define_metric(summary="max")
    # per-layer density of the global model, equal to what the final model holds
    weights = {n: p for n, p in module.global_model.named_parameters() if n.endswith("weight")}
    for name, p in weights.items():
        assert run.series(f"sparsity/layer/{name}")[-1] == pytest.approx(float(density({name: p}, stacked=False)))
    assert run.series("sparsity/density")[-1] < 0.25

    # accuracy, loss and density plotted against communication rounds; bits and rounds declared as axes
    for key in ("val/acc", "val/loss", "sparsity/density", "sparsity/layer/net.0.weight"):
        assert run.metrics[key]["step_metric"] == "comm/rounds", key
    assert run.metrics["val/acc"]["summary"] == ["max"]
    assert {"comm/rounds", "comm/bits_up", "comm/bits_down"} <= set(run.metrics)
    # every row of a metric also holds the axes, so any panel can switch its x-axis to bits or steps
    for key in ("val/acc", "val/loss", "train/loss", "sparsity/density"):
        rows = [row for row in run.history if key in row]
        assert rows and all({"comm/rounds", "comm/bits_up", "trainer/global_step"} <= set(row) for row in rows), key

    # named after the preset; the resolved config travels with the run
    assert run.name == "sparse_proxskip-d0.2-p0.2"
    assert run.config["algorithm"]["name"] == "sparse_proxskip"
    assert run.config["model"]["algorithm"]["init_args"]["density"] == 0.2
    assert run.config["trainer"]["max_steps"] == 40
    assert CONFIG_FILE in run.files
    run_dir = next((offline / "wandb").glob("offline-run-*"))
    saved = yaml.safe_load((run_dir / "files" / CONFIG_FILE).read_text())
    assert saved["data"]["num_clients"] == 10 and saved["model"]["eval_every"] == 2


def _tiny_module() -> tuple[FederatedLightningModule, FederatedDataModule]:
    g = torch.Generator().manual_seed(0)
    clients = [(torch.randn(20, 5, generator=g), torch.randn(20, 1, generator=g)) for _ in range(3)]
    return FederatedLightningModule(nn.Linear(5, 1), lr=0.05, loss="mse"), FederatedDataModule.from_client_tensors(
        clients, batch_size=None, seed=0)


def test_trainer_logger_wandb_alone_gives_the_dashboard_and_a_name_with_the_preset(offline: Path) -> None:
    cli = FederatedCLI(args=[  # the quickstart's CSV logger swapped for W&B: its `name: quickstart` carries over
        "fit", "--config", str(QUICKSTART), "--trainer.logger", "WandbLogger", "--model.algorithm.p", "0.25", *SHORT,
        "--trainer.logger.init_args.save_dir", str(offline),
    ])
    wandb.finish()
    run = read_wandb_run(offline / "wandb" / "latest-run", wait=60)
    assert run.name == "quickstart-proxskip-p0.25"
    assert run.metrics["val/acc"]["step_metric"] == "comm/rounds"  # the CLI's default callbacks did it
    assert run.series("comm/bits_up")[-1] == pytest.approx(float(cli.model.comm.bits_up))
    assert run.series("sparsity/layer/net.0.weight")
    assert run.config["model"]["algorithm"]["init_args"]["p"] == 0.25 and CONFIG_FILE in run.files


def test_run_display_name_puts_the_preset_after_a_given_name() -> None:
    sparse = {"name": "sparse_proxskip", "p": 0.2, "density": 0.1}
    name = WandbFederatedMetrics.run_display_name
    assert name(None, sparse) == name("", sparse) == "sparse_proxskip-d0.1-p0.2"
    assert name("baseline", sparse) == "baseline-sparse_proxskip-d0.1-p0.2"
    assert name("sparse_proxskip-d0.1-p0.2-seed3", sparse) == "sparse_proxskip-d0.1-p0.2-seed3"  # says it already
    assert name("baseline", None) == "baseline" and name(None, None) == "no_algorithm"


def test_names_are_left_alone_when_asked(offline: Path) -> None:
    module, dm = _tiny_module()
    logger = WandbLogger(name="exactly-this", save_dir=str(offline), project="test")
    make_trainer(2, [*proxskip(p=0.5, mode="fixed"), WandbFederatedMetrics(name_runs=False)], logger=logger).fit(
        module, datamodule=dm)
    wandb.finish()
    assert read_wandb_run(offline / "wandb" / "latest-run", wait=60).name == "exactly-this"


def test_a_given_run_name_comes_first_and_a_second_dashboard_callback_does_nothing(offline: Path) -> None:
    module, dm = _tiny_module()
    logger = WandbLogger(name="my-run", save_dir=str(offline), project="test")
    callbacks = [*proxskip(p=0.5, mode="fixed"), WandbFederatedMetrics(), WandbFederatedMetrics(x_axis="comm/bits_up")]
    make_trainer(6, callbacks, logger=logger, log_every_n_steps=2).fit(module, datamodule=dm)
    wandb.finish()
    run = read_wandb_run(offline / "wandb" / "latest-run", wait=60)
    assert run.name == "my-run-custom-p0.5"
    assert run.metrics["sparsity/density"]["step_metric"] == "comm/rounds"  # the first callback's axis
    assert run.config["algorithm"] == {"name": "custom", "p": 0.5}  # callbacks given by hand, not a preset
    assert sorted({row["trainer/global_step"] for row in run.history}) == [1, 3, 5]  # log_every_n_steps=2


def test_callbacks_composed_by_hand_name_the_run_after_schedule_and_density(offline: Path) -> None:
    module, dm = _tiny_module()
    logger = WandbLogger(save_dir=str(offline), project="test")
    make_trainer(4, [*sparse_proxskip(p=0.5, density=0.4), WandbFederatedMetrics()], logger=logger).fit(
        module, datamodule=dm)
    wandb.finish()
    assert read_wandb_run(offline / "wandb" / "latest-run", wait=60).name == "custom-d0.4-p0.5"


def test_dashboard_callback_is_a_no_op_without_wandb() -> None:
    module, dm = _tiny_module()
    make_trainer(4, [*proxskip(p=0.5, mode="fixed"), WandbFederatedMetrics()]).fit(module, datamodule=dm)
    assert module.round_index == 2


def test_layer_density_reports_each_pruned_tensor_of_the_global_model() -> None:
    module, dm = _tiny_module()
    make_trainer(4, [*sparse_proxskip(p=0.5, density=0.4), LayerDensity(), LayerDensity("all")]).fit(
        module, datamodule=dm)
    assert module.round_metrics["sparsity/layer/weight"] == pytest.approx(0.4)  # ⌈0.4·5⌉ = 2 of 5 entries
    assert "sparsity/layer/bias" not in module.round_metrics  # the second (params="all") one stood down
    with pytest.raises(ValueError, match="params"):
        LayerDensity("biases")  # type: ignore[arg-type]


def test_reader_reassembles_records_larger_than_a_block(offline: Path) -> None:
    big = "x" * 100_000  # > 3 blocks of 32 KiB: first/middle/last chunks
    run = wandb.init(project="test", dir=str(offline), config={"big": big, "lr": 0.1})
    for step in range(3):
        run.log({"a": step, "nested": {"b": step * 2}})
    run.finish()
    back = read_wandb_run(offline / "wandb" / "latest-run", wait=60)
    assert back.config["big"] == big and back.config["lr"] == 0.1
    assert back.series("a") == [0, 1, 2]
    assert back.series("nested.b") == [0, 2, 4]
    kinds = [r.WhichOneof("record_type") for r in iter_wandb_records(offline / "wandb" / "latest-run")]
    assert kinds.count("history") == 3 and kinds[0] == "header" and kinds[-1] == "exit" and back.finished


def test_reader_rejects_a_file_that_is_not_a_wandb_log(tmp_path: Path) -> None:
    bogus = tmp_path / "run-x.wandb"
    bogus.write_bytes(b"not a log at all")
    with pytest.raises(ValueError, match="not a W&B transaction log"):
        read_wandb_run(bogus)
    with pytest.raises(FileNotFoundError):
        read_wandb_run(tmp_path / "missing")


def test_reader_waits_for_the_exit_record_only_when_asked(offline: Path) -> None:
    run = wandb.init(project="test", dir=str(offline))
    run.log({"a": 1})
    log = next((offline / "wandb").glob("offline-run-*"))
    assert not read_wandb_run(log).finished  # still open: no exit record, and no waiting
    with pytest.raises(TimeoutError, match="no exit record"):
        read_wandb_run(log, wait=0.3)
    run.finish()
    assert read_wandb_run(log, wait=60).series("a") == [1]


def test_tensorboard_config_logs_the_same_metrics(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli = FederatedCLI(args=[
        "fit", "--config", str(QUICKSTART), "--config", str(ROOT / "configs" / "loggers" / "tensorboard.yaml"),
        *SHORT, "--trainer.logger.init_args.save_dir", str(tmp_path),
    ])
    events = EventAccumulator(cli.trainer.logger.log_dir)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "val/acc", "comm/rounds", "comm/bits_up", "sparsity/density",
            "sparsity/layer/net.0.weight", "sparsity/layer/net.2.weight"} <= tags
    assert sorted({e.step for e in events.Scalars("comm/rounds")}) == [9, 19, 29, 39]
    assert events.Scalars("comm/rounds")[-1].value == cli.model.round_index


def test_csv_tensorboard_and_wandb_log_the_same_metrics(offline: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    loggers = offline / "loggers.yaml"
    loggers.write_text(yaml.safe_dump({"trainer": {"logger": [
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(offline), "name": "csv"}},
        {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
         "init_args": {"save_dir": str(offline), "name": "tb", "default_hp_metric": False}},
        {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"save_dir": str(offline)}},
    ]}}))
    cli = FederatedCLI(args=["fit", "--config", str(QUICKSTART), "--config", str(SPARSE), "--config", str(loggers),
                             *SHORT])
    wandb.finish()
    csv_logger, tb_logger, _ = cli.trainer.loggers
    with open(Path(csv_logger.log_dir) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    events = EventAccumulator(tb_logger.log_dir)
    events.Reload()
    run = read_wandb_run(offline / "wandb" / "latest-run", wait=60)

    bookkeeping = {"epoch", "step", "trainer/global_step", "_step", "_timestamp", "_runtime"}
    csv_keys = set(rows[0]) - bookkeeping
    tb_keys = set(events.Tags()["scalars"]) - bookkeeping
    wandb_keys = {key for row in run.history for key in row} - bookkeeping
    histograms = {key for key in wandb_keys if "_hist." in key}  # W&B alone gets the per-client vectors
    assert {key.split(".")[0] for key in histograms} == {"val/client_acc_hist"}
    assert csv_keys == tb_keys == wandb_keys - histograms
    assert {"train/loss", "val/acc", "val/loss", "comm/rounds", "comm/bits_up", "comm/bits_down", "sparsity/density",
            "sparsity/client_density", "cv/sum_norm", "sparsity/layer/net.0.weight"} <= csv_keys
    # and the same values: the last uplink count and density, in all three
    bits = float(cli.model.comm.bits_up)
    assert float([r for r in rows if r["comm/bits_up"]][-1]["comm/bits_up"]) == pytest.approx(bits)
    assert events.Scalars("comm/bits_up")[-1].value == pytest.approx(bits, rel=1e-6)  # TensorBoard stores fp32
    assert run.series("comm/bits_up")[-1] == pytest.approx(bits)
    assert run.series("sparsity/density")[-1] == pytest.approx(float(rows[-1]["sparsity/density"]))
    assert run.name == "quickstart-sparse_proxskip-d0.1-p0.2"  # the quickstart's logger name, then the preset
