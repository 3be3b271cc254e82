"""Every shipped YAML parses and instantiates; the quickstart reaches its accuracy target."""

from __future__ import annotations

import csv
import shlex
import time
from pathlib import Path
from typing import Any

import pytest

from fl_lightning.algorithms import ALGORITHMS, Algorithm
from fl_lightning.callbacks import ClientSampling, SkipSchedule
from fl_lightning.cli import FederatedCLI
from fl_lightning.data.datamodule import FederatedDataModule
from fl_lightning.module import FederatedLightningModule

ROOT = Path(__file__).resolve().parents[1]
FRAGMENTS = {"data.yaml", "trainer.yaml", "client_model.yaml"}  # included by the datasets' base.yaml
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
    assert set(PAPER_PRESETS) <= shipped
    for dataset in DATASETS:  # one base per dataset, the presets layered on it: no per-dataset copies of a preset
        assert {p.name for p in (ROOT / "configs" / dataset).glob("*.yaml")} == {"base.yaml", *FRAGMENTS}, dataset


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_parses_and_instantiates(path: Path, tmp_path: Path) -> None:
    text = path.read_text()
    assert text.startswith("#"), "configs start with a comment saying how to run them"
    assert "python train.py" in text.split("\n\n")[0] or "python train.py" in text[:800]
    cli = FederatedCLI(args=_args(path, tmp_path), run=False)
    assert isinstance(cli.model, FederatedLightningModule)
    assert isinstance(cli.datamodule, FederatedDataModule)
    if path.parent.name == "algorithms":
        assert isinstance(cli.model.algorithm, Algorithm)
        assert cli.model.algorithm.name == path.stem
        assert cli.model.configure_callbacks(), "a preset expands into callbacks"
    if path.name == "base.yaml":
        assert cli.model.algorithm is None, "a dataset's base leaves the algorithm to the preset layered on it"


#: The seed paper's presets as ``configs/<dataset>/<preset>.yaml`` ran them before those copies became one
#: ``configs/<dataset>/base.yaml`` with ``configs/algorithms/<preset>.yaml`` layered on top: the resolved
#: ``model.algorithm`` (``python train.py fit ... --print_config``), the same on every dataset.
PAPER_PRESETS: dict[str, dict[str, Any]] = {
    "fedavg": {"class_path": "fl_lightning.algorithms.FedAvg",
               "init_args": {"local_steps": 5, "cohort_size": None, "seed": None}},
    "proxskip": {"class_path": "fl_lightning.algorithms.ProxSkip",
                 "init_args": {"p": 0.2, "mode": "fixed", "reference": "mean", "seed": None}},
    **{name: {"class_path": f"fl_lightning.algorithms.{cls}",
              "init_args": {"p": 0.2, "mode": "fixed", "density": 0.1, "scope": "global", "params": "weights",
                            "seed": None, **extra}}
       for name, cls, extra in [("sparse_proxskip", "SparseProxSkip", {}),
                                ("sparse_proxskip_local", "SparseProxSkipLocal", {"prune_broadcast": True}),
                                ("server_pruning", "ServerPruning", {}),
                                ("server_pruning_modified", "ServerPruningModified", {})]},
}
#: What each dataset's base sets (and the old per-dataset presets all set): the key resolved values.
DATASETS: dict[str, dict[str, Any]] = {
    "fashion_mnist": {"lr": 0.05, "loss": "cross_entropy", "client_model": "fl_lightning.models.MLP",
                      "num_clients": 100, "partition": "dirichlet", "partition_args": {"dirichlet": {"alpha": 0.3}},
                      "batch_size": 32, "max_steps": 2000},
    "femnist": {"lr": 0.05, "loss": "cross_entropy", "client_model": "fl_lightning.models.LogisticRegression",
                "num_clients": 100, "partition": "natural", "partition_args": None, "batch_size": 32,
                "max_steps": 5000},
    "cifar10": {"lr": 0.05, "loss": "cross_entropy", "client_model": "fl_lightning.models.ResNet18",
                "num_clients": 10, "partition": "dirichlet", "partition_args": {"dirichlet": {"alpha": 0.3}},
                "batch_size": 64, "max_steps": 20000},
    "blogfeedback": {"lr": 0.01, "loss": "mse", "client_model": "fl_lightning.models.LinearRegression",
                     "num_clients": 10, "partition": "iid", "partition_args": None, "batch_size": None,
                     "max_steps": 2000},
}


def _header_commands(path: Path) -> dict[str, list[str]]:
    """The ``python train.py fit`` lines of a config's header, keyed by the preset they layer on it."""
    found: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        command = line.lstrip("# ").split("  #")[0]
        if command.startswith("python train.py fit"):
            args = shlex.split(command)
            configs = [args[i + 1] for i, a in enumerate(args) if a == "--config"]
            found[Path(configs[-1]).stem] = args[3:]
    return found


class _Resolved(Exception):
    pass


class _ParseOnly(FederatedCLI):
    def before_instantiate_classes(self) -> None:  # the config as --print_config shows it, nothing instantiated
        raise _Resolved(self.config.clone().as_dict())


def _resolve(args: list[str]) -> dict[str, Any]:
    with pytest.raises(_Resolved) as resolved:
        _ParseOnly(args=args, run=False)
    return resolved.value.args[0]


@pytest.mark.parametrize("dataset", DATASETS)
def test_a_dataset_base_with_each_preset_resolves_to_the_former_per_dataset_preset(dataset: str,
                                                                                    tmp_path: Path) -> None:
    """Each command the base's header shows (base.yaml + configs/algorithms/<preset>.yaml, + overrides) resolves
    to exactly what the removed configs/<dataset>/<preset>.yaml did: the paper's setup, every client in every round,
    k = 1/p = 5 local steps on a fixed schedule (proxskip.yaml's Bernoulli coin is overridden on its line)."""
    base = ROOT / "configs" / dataset / "base.yaml"
    commands = _header_commands(base)
    assert set(commands) == set(PAPER_PRESETS), "the header shows one command per paper preset"
    header = base.read_text().split("\n#   python")[0]
    assert "k = 1/p" in header and "Full participation" in header
    expected = DATASETS[dataset]
    for preset, args in commands.items():
        assert args[:2] == ["--config", f"configs/{dataset}/base.yaml"], args
        assert f"configs/algorithms/{preset}.yaml" in args
        args = [str(ROOT / a) if a.startswith("configs/") else a for a in args]
        config = _resolve(args)
        model, data, trainer = config["model"], config["data"], config["trainer"]
        assert model["algorithm"] == PAPER_PRESETS[preset], preset
        assert config["seed_everything"] == 0
        assert (model["lr"], model["loss"], model["client_model"]["class_path"]) == (
            expected["lr"], expected["loss"], expected["client_model"])
        assert data["dataset"] == dataset
        assert {k: data[k] for k in ("num_clients", "partition", "partition_args", "batch_size")} == {
            k: expected[k] for k in ("num_clients", "partition", "partition_args", "batch_size")}
        assert trainer["max_steps"] == expected["max_steps"] and trainer["logger"]["init_args"]["name"] == dataset
    # and what the schedule makes of it: the presets' callbacks, built once per dataset for the proxskip line
    cli = FederatedCLI(args=[*[str(ROOT / a) if a.startswith("configs/") else a for a in commands["proxskip"]],
                             "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)], run=False)
    callbacks = cli.model.configure_callbacks()
    assert not any(isinstance(cb, ClientSampling) for cb in callbacks), "full participation"
    (schedule,) = [cb for cb in callbacks if isinstance(cb, SkipSchedule)]
    assert schedule.mode == "fixed" and schedule.k == 5 and schedule.p == pytest.approx(0.2)


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
