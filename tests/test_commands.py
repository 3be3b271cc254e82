"""Every command line the README and the config headers show runs, with a tiny budget.

``train.py`` lines run through ``fl_lightning.cli.main`` (the function ``train.py`` calls) in this process, with
the line's own arguments followed by a budget (2 steps, no validation); ``python -m fl_lightning.grid`` lines
run with ``--dry-run`` (the grid's runs themselves are checked in test_grid.py); the README's ``plot`` line runs
on a tiny finished run; ``python -m fl_lightning.dashboard`` lines run with ``--dry-run`` (no W&B server here: the
spec they would save is built and validated by wandb-workspaces, see test_dashboard.py). Datasets this machine
does not have (Fashion-MNIST, FEMNIST, CIFAR-10, BlogFeedback, the Hugging Face Hub:
their loaders are tested on files in their real formats in tests/data) are replaced by random splits of their
shapes, so the rest of the command — config files, model, partition, preset — is exercised as written.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from fl_lightning.cli import main
from fl_lightning.data import datamodule as datamodule_module
from fl_lightning.data.datasets import DatasetSplits

ROOT = Path(__file__).resolve().parents[1]
BUDGET = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
          "--data.eval_batch_size", "64"]
#: A smaller budget for the ResNet-18 runs (a vmapped step of 10 clients × 64 images takes a minute on 2 cores)
HEAVY = {"cifar10": ["--data.num_clients", "2", "--data.batch_size", "2", "--trainer.max_steps", "1"]}
#: name -> (input shape, number of classes or None for regression, natural groups)
SHAPES = {"fashion_mnist": ((1, 28, 28), 10, False), "mnist": ((1, 28, 28), 10, False),
          "femnist": ((1, 28, 28), 62, True), "cifar10": ((3, 32, 32), 10, False),
          "blogfeedback": ((280,), None, False), "hf": ((784,), 10, False)}  # hf: configs/hf/mnist.yaml's Hub MNIST


def _commands() -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    readme = (ROOT / "README.md").read_text()
    for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.S):
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith(("python train.py", "python -m fl_lightning")):
                found.append(("README.md", line))
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            command = line.lstrip("# ").split(" #")[0].strip()
            if command.startswith(("python train.py", "python -m fl_lightning")):
                found.append((str(path.relative_to(ROOT)), command))
    return found


COMMANDS = _commands()


def test_the_readme_and_the_configs_show_commands() -> None:
    sources = {source for source, _ in COMMANDS}
    assert "README.md" in sources and "configs/quickstart.yaml" in sources
    assert len(COMMANDS) >= 40


def _synthetic(name: str, data_dir: Path, **kwargs: object) -> DatasetSplits:
    if name not in SHAPES:
        from fl_lightning.data.datasets import load_dataset

        return load_dataset(name, data_dir, **kwargs)
    shape, classes, grouped = SHAPES[name]
    g = torch.Generator().manual_seed(0)
    n, n_test = 6000, 200
    x, x_test = torch.rand(n, *shape, generator=g), torch.rand(n_test, *shape, generator=g)
    if classes is None:
        y, y_test = torch.randn(n, generator=g), torch.randn(n_test, generator=g)
    else:
        y, y_test = torch.randint(0, classes, (n,), generator=g), torch.randint(0, classes, (n_test,), generator=g)
    groups = np.arange(n) % 100 if grouped else None  # 100 writers of 60 samples
    return DatasetSplits(name, x, y, x_test, y_test, classes, groups)


@pytest.mark.parametrize(("source", "command"), COMMANDS, ids=[f"{s}: {c}" for s, c in COMMANDS])
def test_every_shown_command_runs_with_a_tiny_budget(source: str, command: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    args = shlex.split(command)
    monkeypatch.chdir(ROOT)  # the commands name configs relative to the repository root
    if args[:2] == ["python", "train.py"]:
        monkeypatch.setattr(datamodule_module, "load_dataset", _synthetic)
        extra = ["--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)]
        extra += next((v for k, v in HEAVY.items() if f"configs/{k}/" in command), [])
        if "--ckpt_path" in args:  # needs a run to continue from or to evaluate: a 2-step fit first
            base = args[2:args.index("--ckpt_path")]
            main(["fit", *base[1:], *BUDGET, *extra])
        cli = main([*args[2:], *BUDGET, *extra])
        assert cli is not None
        if args[2] == "fit":
            assert cli.trainer.global_step >= 1
    elif args[:3] == ["python", "-m", "fl_lightning.grid"]:
        from fl_lightning.grid import main as grid_main

        assert "train.py fit" in grid_main([*args[3:], "--dry-run"])
    elif args[:3] == ["python", "-m", "fl_lightning.plot"]:
        from fl_lightning.plot import main as plot_main

        run = tmp_path / "runs"
        main(["fit", "--config", "configs/quickstart.yaml", *BUDGET, "--trainer.logger.save_dir", str(run),
              "--trainer.logger.name", "tiny"])
        out = tmp_path / "curves.png"
        plot_main([*[str(p) for p in sorted((run / "tiny").glob("version_*"))], "--out", str(out)])
        assert out.stat().st_size > 0
    elif args[:3] == ["python", "-m", "fl_lightning.dashboard"]:
        from fl_lightning.dashboard import main as dashboard_main

        shown = [a.strip("[]") for a in args[3:]]  # optional parts, [--report], taken as given
        out = tmp_path / "spec.json"
        shown = [str(out) if a == "spec.json" else a for a in shown]
        dry = [] if "--dry-run" in shown else ["--dry-run", "--out", str(out)]
        assert dashboard_main([*shown, *dry]) == 0
        assert "panels" in out.read_text() or "sections" in out.read_text()
    else:  # pragma: no cover - a new kind of command: teach this test to run it
        pytest.fail(f"{source}: do not know how to run {command!r}")
