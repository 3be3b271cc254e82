"""Every shipped YAML parses and instantiates; the quickstart reaches its accuracy target."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest

from fl_lightning.algorithms import ALGORITHMS, Algorithm
from fl_lightning.callbacks import ClientSampling, SkipSchedule
from fl_lightning.cli import FederatedCLI
from fl_lightning.data.datamodule import FederatedDataModule
from fl_lightning.module import FederatedLightningModule

ROOT = Path(__file__).resolve().parents[1]
FRAGMENTS = {"data.yaml", "trainer.yaml", "client_model.yaml"}  # included by the dataset presets
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.name not in FRAGMENTS and p.parent.name != "grids")
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def _is_complete(path: Path) -> bool:
    """A full run config (model and data); the others are fragments layered on the quickstart."""
    text = path.read_text()
    return "\nmodel:" in text and "client_model:" in text and "\ndata:" in text


def _args(path: Path, tmp_path: Path) -> list[str]:
    base = [] if _is_complete(path) else ["--config", str(QUICKSTART)]
    return [*base, "--config", str(path), "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)]


def test_configs_are_shipped() -> None:
    assert QUICKSTART in CONFIGS
    shipped = {p.stem for p in (ROOT / "configs" / "algorithms").glob("*.yaml")}
    assert shipped == set(ALGORITHMS.names()), "every preset has a config and every config a preset"
    paper = {"fedavg", "proxskip", "sparse_proxskip", "sparse_proxskip_local", "server_pruning",
             "server_pruning_modified"}
    for dataset in ("fashion_mnist", "femnist", "cifar10", "blogfeedback"):
        assert paper <= {p.stem for p in (ROOT / "configs" / dataset).glob("*.yaml")}, dataset


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_parses_and_instantiates(path: Path, tmp_path: Path) -> None:
    text = path.read_text()
    assert text.startswith("#"), "configs start with a comment saying how to run them"
    assert "python train.py" in text.split("\n\n")[0] or "python train.py" in text[:800]
    cli = FederatedCLI(args=_args(path, tmp_path), run=False)
    assert isinstance(cli.model, FederatedLightningModule)
    assert isinstance(cli.datamodule, FederatedDataModule)
    if path.parent.name == "algorithms" or (path.parent / "data.yaml").exists():
        assert isinstance(cli.model.algorithm, Algorithm)
        assert cli.model.algorithm.name == path.stem
        assert cli.model.configure_callbacks(), "a preset expands into callbacks"
    if (path.parent / "data.yaml").exists():
        _assert_paper_setup(cli.model.configure_callbacks(), path)


def _assert_paper_setup(callbacks: list, path: Path) -> None:
    """The dataset presets run as the paper does: every client in every round, k = 1/p local steps."""
    assert not any(isinstance(cb, ClientSampling) for cb in callbacks), f"{path}: full participation"
    (schedule,) = [cb for cb in callbacks if isinstance(cb, SkipSchedule)]
    assert schedule.mode == "fixed" and schedule.k == 5 and schedule.p == pytest.approx(0.2), path
    assert "k = 1/p" in path.read_text().split("\n#   python")[0] and "Full participation" in path.read_text()


def test_command_line_overrides_reach_the_preset(tmp_path: Path) -> None:
    path = ROOT / "configs" / "algorithms" / "sparse_proxskip.yaml"
    cli = FederatedCLI(args=[*_args(path, tmp_path), "--model.algorithm.density", "0.05"], run=False)
    assert cli.model.algorithm.density == 0.05


def test_quickstart_reaches_90_percent_accuracy(tmp_path: Path) -> None:
    start = time.perf_counter()
    FederatedCLI(args=["fit", "--config", str(QUICKSTART), "--trainer.logger.init_args.save_dir", str(tmp_path),
                       "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)])
    elapsed = time.perf_counter() - start
    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))
    accs = [float(r["val/acc"]) for r in rows if r.get("val/acc")]
    print(f"quickstart: final val/acc {accs[-1]:.3f} in {elapsed:.1f} s")
    assert accs and accs[-1] >= 0.90
    assert any(r.get("comm/bits_up") for r in rows) and any(r.get("sparsity/density") for r in rows)
