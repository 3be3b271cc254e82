"""Experiment grids: ``python -m fl_lightning.grid GRID.yaml [--jobs N]``.

A grid file names base configs and the axes to sweep; every combination runs ``train.py fit`` in its own
process (sequentially, or ``--jobs N`` at a time), finished runs are skipped, and a table of final
metrics is written as Markdown and CSV::

    # configs/grids/fashion_mnist.yaml
    configs: [configs/fashion_mnist/proxskip.yaml]      # the base run (complete config, or several layered)
    presets: [proxskip, sparse_proxskip, server_pruning] # configs/algorithms/<preset>.yaml layered on top
    density: [0.5, 0.2, 0.1, 0.05]                        # for presets that take a density
    p: [0.2]
    seed: [0]
    args: ["--trainer.max_steps", "2000"]                # passed to every run
    out: results/fashion_mnist

Each run logs to ``<out>/runs/<name>/`` (CSV) and writes ``<out>/runs/<name>/final.json``; a run whose
``final.json`` exists is not run again.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fl_lightning.algorithms import ALGORITHMS

ROOT = Path(__file__).resolve().parents[1]
FINAL_METRICS = ("val/acc", "val/loss", "comm/rounds", "comm/bits_up", "comm/bits_down", "sparsity/density")


@dataclass(frozen=True)
class Run:
    """One point of the grid."""

    preset: str
    density: float | None
    p: float
    seed: int

    @property
    def name(self) -> str:
        dens = "" if self.density is None else f"-d{self.density:g}"
        return f"{self.preset}{dens}-p{self.p:g}-s{self.seed}"


@dataclass
class Grid:
    configs: list[str]
    presets: list[str]
    density: list[float] = field(default_factory=lambda: [0.1])
    p: list[float] = field(default_factory=lambda: [0.2])
    seed: list[int] = field(default_factory=lambda: [0])
    args: list[str] = field(default_factory=list)
    out: str = "results/grid"

    @classmethod
    def load(cls, path: str | Path) -> Grid:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        unknown = set(raw) - set(inspect.signature(cls).parameters)
        if unknown:
            raise ValueError(f"grid file {path}: unknown keys {sorted(unknown)}")
        for key in ("configs", "presets"):
            if not raw.get(key):
                raise ValueError(f"grid file {path}: '{key}' must list at least one entry")
        for preset in raw["presets"]:
            ALGORITHMS.get(preset)  # fails with the known names
        return cls(**raw)

    def runs(self) -> list[Run]:
        runs: list[Run] = []
        for preset, p, seed in itertools.product(self.presets, self.p, self.seed):
            takes_density = "density" in inspect.signature(ALGORITHMS.get(preset)).parameters
            for density in self.density if takes_density else [None]:
                runs.append(Run(preset, density, p, seed))
        return runs


def command(grid: Grid, run: Run) -> list[str]:
    """The ``train.py fit`` command line of one run."""
    out = Path(grid.out) / "runs"
    cmd = [sys.executable, str(ROOT / "train.py"), "fit"]
    for cfg in grid.configs:
        cmd += ["--config", cfg]
    cmd += ["--config", str(ROOT / "configs" / "algorithms" / f"{run.preset}.yaml")]
    cmd += ["--model.algorithm.p", str(run.p), "--seed_everything", str(run.seed)]
    if run.density is not None:
        cmd += ["--model.algorithm.density", str(run.density)]
    cmd += ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.save_dir", str(out), "--trainer.logger.name", run.name,
            "--trainer.logger.version", "", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_checkpointing", "false"]
    return cmd + list(grid.args)


def final_metrics(metrics_csv: Path) -> dict[str, float]:
    """The last logged value of each metric of a Lightning CSV log."""
    last: dict[str, float] = {}
    with metrics_csv.open() as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if value not in ("", None):
                    last[key] = float(value)
    return last


def execute(grid: Grid, run: Run, log: Any = None) -> dict[str, Any]:
    """Run one point unless its ``final.json`` exists; return its final metrics."""
    run_dir = Path(grid.out) / "runs" / run.name
    done = run_dir / "final.json"
    if done.exists():
        return json.loads(done.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with (run_dir / "stdout.log").open("w") as out:
        proc = subprocess.run(command(grid, run), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"run {run.name} failed (exit {proc.returncode}); see {run_dir / 'stdout.log'}")
    metrics = final_metrics(run_dir / "metrics.csv")
    result = {"name": run.name, "preset": run.preset, "density": run.density, "p": run.p, "seed": run.seed,
              **{k: metrics.get(k) for k in FINAL_METRICS}}
    done.write_text(json.dumps(result, indent=1))
    if log is not None:
        log(f"done {run.name}: " + ", ".join(f"{k}={v:.4g}" for k, v in result.items()
                                               if k in FINAL_METRICS and v is not None))
    return result


def write_tables(results: Sequence[dict[str, Any]], out: Path) -> str:
    """``results.csv`` and ``results.md`` in ``out``; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    cols = ["preset", "density", "p", "seed", *FINAL_METRICS]
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)

    def fmt(key: str, value: Any) -> str:
        if value is None:
            return "—" if key == "density" else ""
        if key.startswith("comm/bits"):
            return f"{value / 8e6:.1f} MB"
        if key == "comm/rounds":
            return f"{value:.0f}"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    header = ["preset", "density", "p", "seed", "val/acc", "val/loss", "rounds", "uplink", "downlink",
              "density (global)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        lines.append("| " + " | ".join(fmt(k, r.get(k)) for k in cols) + " |")
    md = "\n".join(lines) + "\n"
    (out / "results.md").write_text(md)
    return md


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m fl_lightning.grid", description=__doc__.split("\n\n")[0])
    parser.add_argument("grid", help="grid YAML file")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    grid = Grid.load(args.grid)
    runs = grid.runs()
    if args.dry_run:
        text = "\n".join(" ".join(command(grid, r)) for r in runs)
        print(text)
        return text
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda r: execute(grid, r, log=print), runs))
    md = write_tables(results, Path(grid.out))
    print(md)
    return md


if __name__ == "__main__":
    main()
