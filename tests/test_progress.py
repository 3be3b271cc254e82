"""The progress bar shows round, density and uplink bits; data-preparation progress helpers."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from torch import nn

from fl_lightning import FederatedDataModule, FederatedLightningModule
from fl_lightning.algorithms import sparse_proxskip
from fl_lightning.callbacks.progress import FederatedProgressBar, federated_metrics, use_federated_progress_bar
from fl_lightning.cli import FederatedCLI
from fl_lightning.data.datasets.download import download_url
from fl_lightning.progress import byte_progress, format_bits, progress, progress_enabled, stage
from tests.conftest import make_trainer


def _fit(steps: int, extra: list | None = None, **trainer_kwargs) -> tuple[FederatedLightningModule, Trainer]:
    g = torch.Generator().manual_seed(0)
    clients = [(torch.randn(30, 8, generator=g), torch.randn(30, 1, generator=g)) for _ in range(4)]
    dm = FederatedDataModule.from_client_tensors(clients, batch_size=None, seed=0)
    module = FederatedLightningModule(nn.Linear(8, 1), lr=0.05, loss="mse")
    trainer = make_trainer(steps, [*sparse_proxskip(p=0.25, density=0.25), *(extra or [])], **trainer_kwargs)
    trainer.fit(module, datamodule=dm)
    return module, trainer


@pytest.mark.parametrize(("bits", "text"), [
    (0, "0 b"), (950, "950 b"), (999.4, "999 b"), (999.6, "1 kb"), (1_234_567, "1.23 Mb"), (1.2e6, "1.2 Mb"),
    (37.5e9, "37.5 Gb"), (4e15, "4 Pb"), (5e18, "5e+03 Pb"),
])
def test_format_bits_uses_decimal_prefixes(bits: float, text: str) -> None:
    assert format_bits(bits) == text


def test_bar_leads_with_round_density_and_uplink_bits(capsys: pytest.CaptureFixture[str]) -> None:
    module, trainer = _fit(12, enable_progress_bar=True, log_every_n_steps=1)
    bar = trainer.progress_bar_callback
    assert type(bar) in (TQDMProgressBar, RichProgressBar)  # Lightning's default bar (Rich when rich is installed)
    bar = use_federated_progress_bar(trainer, replace_rich=True).progress_bar_callback
    assert isinstance(bar, FederatedProgressBar)  # ... swapped for ours
    items = bar.get_metrics(trainer, module)
    assert list(items)[:3] == ["round", "density", "up"]
    assert items["round"] == module.round_index == 3  # k = 1/p = 4 steps per round
    assert items["density"] == f"{float(module.round_metrics['sparsity/density']):.3f}"
    assert items["up"] == format_bits(float(module.comm.bits_up))
    assert "loss" in items  # the module's own progress-bar metrics stay
    capsys.readouterr()


def test_federated_bar_renders_during_fit(capsys: pytest.CaptureFixture[str]) -> None:
    module, _ = _fit(12, [FederatedProgressBar()], enable_progress_bar=True)
    out = capsys.readouterr().out  # Lightning's TQDM bars write to stdout
    assert f"round={module.round_index}, density=0.333, up=1.26 kb" in out  # 3 of 9 entries; 3 rounds


def test_swap_leaves_a_trainer_without_bar_alone() -> None:
    _, trainer = _fit(4)
    assert trainer.progress_bar_callback is None
    assert use_federated_progress_bar(trainer).progress_bar_callback is None
    assert federated_metrics(nn.Linear(2, 2)) == {}  # not a federated module: nothing added


def test_progress_helpers_obey_the_environment(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FL_LIGHTNING_PROGRESS", "1")
    assert progress_enabled()
    assert list(progress(range(5), desc="items")) == [0, 1, 2, 3, 4]
    with byte_progress("file.bin", total=10) as bar:
        bar.update(4)
        bar.update(6)
        assert bar.n == 10
    with stage("slow step", after=0):
        pass
    with stage("fast step", after=3600):
        pass
    err = capsys.readouterr().err
    assert "slow step ..." in err and "slow step: done in" in err and "fast step" not in err
    assert "items" in err and "file.bin" in err
    monkeypatch.setenv("RANK", "1")
    assert not progress_enabled()
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("FL_LIGHTNING_PROGRESS", "0")
    with stage("quiet", after=0):
        pass
    assert list(progress(range(3), desc="quiet")) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_cli_runs_get_the_federated_bar(tmp_path: Path) -> None:
    cli = FederatedCLI(args=["--config", str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"),
                             "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert isinstance(cli.trainer.progress_bar_callback, FederatedProgressBar)


def test_data_preparation_shows_download_and_slow_partitioning_progress(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import fl_lightning.data.partition as partition_module

    monkeypatch.setenv("FL_LIGHTNING_PROGRESS", "1")
    blob = tmp_path / "archive.bin"
    blob.write_bytes(bytes(3 << 20))  # a 3 MiB "download" from a file:// URL (it sends Content-Length)
    download_url(blob.as_uri(), tmp_path / "data" / "archive.bin", sha256=hashlib.sha256(blob.read_bytes()).hexdigest())
    err = capsys.readouterr().err
    assert "archive.bin" in err and "3.00M" in err  # the byte bar, with its total

    real = partition_module.partition

    def slow_partition(*args, **kwargs):  # a partitioning that outlasts stage()'s 1 s threshold
        time.sleep(1.2)
        return real(*args, **kwargs)

    monkeypatch.setattr(partition_module, "partition", slow_partition)
    FederatedDataModule(dataset="digits", num_clients=5, partition="iid", batch_size=8, seed=0).setup("fit")
    err = capsys.readouterr().err
    assert "partitioning into 5 clients (iid) ..." in err and "partitioning into 5 clients (iid): done in" in err
    assert "loading digits" not in err  # fast steps stay silent


def test_a_rich_bar_is_replaced_only_when_it_is_lightnings_default(tmp_path: Path) -> None:
    chosen = make_trainer(1, [RichProgressBar()], enable_progress_bar=True)
    assert type(use_federated_progress_bar(chosen).progress_bar_callback) is RichProgressBar
    config = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
    cli = FederatedCLI(args=["--config", config, "--trainer.default_root_dir", str(tmp_path),
                             "--trainer.callbacks+=RichProgressBar"], run=False)
    assert type(cli.trainer.progress_bar_callback) is RichProgressBar  # the config chose it: kept
