"""Experiment grids: ``python -m fl_lightning.grid GRID.yaml [--jobs N]``.

A grid file names base configs and the axes to sweep; every combination runs ``train.py fit`` in its own
process (sequentially, or ``--jobs N`` at a time), finished runs are skipped, and a table of final
metrics is written as Markdown and CSV::

    # configs/grids/fashion_mnist.yaml
    configs: [configs/fashion_mnist/base.yaml]          # the base run (complete config, or several layered)
    presets: [proxskip, sparse_proxskip, server_pruning] # configs/algorithms/<preset>.yaml layered on top
    density: [0.5, 0.2, 0.1, 0.05]                        # for presets that take a density
    p: [0.2]                                              # FedAvg, which has no p, gets k = 1/p local steps
    seed: [0]
    algorithm_args: {mode: fixed}                         # to every preset that takes the option
    args: ["--trainer.max_steps", "2000"]                # passed to every run
    baseline: proxskip                                   # optional: a "Δ vs proxskip" accuracy column
    out: results/fashion_mnist

Each run logs to ``<out>/runs/<name>/`` (CSV) and writes ``<out>/runs/<name>/final.json``; a run whose
``final.json`` exists is not run again, as long as it was made with the same fully resolved config (every
config file's contents, ``args`` and the grid's values, as ``train.py fit --print_config`` would print it; its
SHA-256 is stored in ``final.json``): change anything and the run is repeated. A failed run does not stop
the others: the table lists the finished ones, the failures are listed with their logs, and the command
exits with status 1.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
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

from fl_lightning import metric_keys as keys
from fl_lightning.algorithms import ALGORITHMS

ROOT = Path(__file__).resolve().parents[1]
FINAL_METRICS = (keys.VAL_ACC, keys.VAL_LOSS, keys.ROUNDS, keys.BITS_UP, keys.BITS_DOWN, keys.DENSITY)


def _options(preset: str) -> set[str]:
    """The hyper-parameters the preset's algorithm takes."""
    return set(inspect.signature(ALGORITHMS.get(preset)).parameters)


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
    algorithm_args: dict[str, Any] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    baseline: str | None = None
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
        taken = set().union(*(_options(preset) for preset in raw["presets"]))
        unused = sorted(set(raw.get("algorithm_args") or {}) - taken)
        if unused:
            raise ValueError(f"grid file {path}: algorithm_args {unused} are taken by none of the presets")
        if raw.get("baseline") is not None and raw["baseline"] not in raw["presets"]:
            raise ValueError(f"grid file {path}: baseline {raw['baseline']!r} must be one of presets {raw['presets']}")
        return cls(**raw)

    def runs(self) -> list[Run]:
        runs: list[Run] = []
        for preset, p, seed in itertools.product(self.presets, self.p, self.seed):
            for density in self.density if "density" in _options(preset) else [None]:
                runs.append(Run(preset, density, p, seed))
        return runs


def _run_dir(grid: Grid, run: Run) -> Path:
    """Where ``run`` logs: ``<out>/runs/<name>``, ``out`` taken relative to the working directory."""
    return Path(grid.out).resolve() / "runs" / run.name


def command(grid: Grid, run: Run) -> list[str]:
    """The ``train.py fit`` command line of one run (it runs in the repository root; config paths that exist
    relative to the working directory are passed as absolute paths, the others are taken from the root)."""
    out = _run_dir(grid, run).parent
    cmd = [sys.executable, str(ROOT / "train.py"), "fit"]
    for cfg in grid.configs:
        cmd += ["--config", str(Path(cfg).resolve()) if Path(cfg).exists() else cfg]
    cmd += ["--config", str(ROOT / "configs" / "algorithms" / f"{run.preset}.yaml")]
    options = _options(run.preset)
    if "p" in options:
        cmd += ["--model.algorithm.p", str(run.p)]
    elif "local_steps" in options:  # FedAvg: k = 1/p local steps per round, like the fixed schedule of the others
        cmd += ["--model.algorithm.local_steps", str(max(1, round(1 / run.p)))]
    cmd += ["--seed_everything", str(run.seed)]
    if run.density is not None:
        cmd += ["--model.algorithm.density", str(run.density)]
    for key, value in grid.algorithm_args.items():
        if key in options:
            cmd += [f"--model.algorithm.{key}", value if isinstance(value, str) else json.dumps(value)]
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


class _Parsed(Exception):
    def __init__(self, text: str) -> None:
        self.text = text


def resolved_config(grid: Grid, run: Run) -> str:
    """The run's config as LightningCLI resolves it (YAML text, nothing instantiated): its identity."""
    import warnings

    from fl_lightning.cli import FederatedCLI

    class _ParseOnly(FederatedCLI):
        def before_instantiate_classes(self) -> None:
            raise _Parsed(self.parser.dump(self.config, skip_none=False))

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "args given while sys.argv holds the grid's own arguments"
            _ParseOnly(args=command(grid, run)[2:], run=True)
    except _Parsed as parsed:
        return parsed.text
    raise RuntimeError(f"run {run.name}: the config could not be resolved")  # pragma: no cover


def config_digest(grid: Grid, run: Run) -> str:
    """SHA-256 of :func:`resolved_config`, with the grid's ``out`` directory written as ``<out>`` (a moved
    results directory keeps its runs)."""
    text = resolved_config(grid, run).replace(str(_run_dir(grid, run).parent.parent), "<out>")
    return hashlib.sha256(text.encode()).hexdigest()


def execute(grid: Grid, run: Run, log: Any = None, digest: str | None = None) -> dict[str, Any]:
    """Run one point unless its ``final.json`` exists and was made with the same resolved config (``digest``,
    computed here if not given); return its final metrics."""
    run_dir = _run_dir(grid, run)
    done = run_dir / "final.json"
    digest = digest or config_digest(grid, run)
    if done.exists():
        previous = json.loads(done.read_text())
        if previous.get("config_sha256") == digest:
            return previous
        if log is not None:
            log(f"rerunning {run.name}: its config changed since {done} was written")
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with (run_dir / "stdout.log").open("w") as out:
        proc = subprocess.run(command(grid, run), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"run {run.name} failed (exit {proc.returncode}); see {run_dir / 'stdout.log'}")
    if not (run_dir / "metrics.csv").is_file():
        raise RuntimeError(f"run {run.name} logged no metrics ({run_dir / 'metrics.csv'} is missing); "
                           f"see {run_dir / 'stdout.log'}")
    metrics = final_metrics(run_dir / "metrics.csv")
    result = {"name": run.name, "preset": run.preset, "density": run.density, "p": run.p, "seed": run.seed,
              **{k: metrics.get(k) for k in FINAL_METRICS}, "config_sha256": digest}
    done.write_text(json.dumps(result, indent=1))
    if log is not None:
        log(f"done {run.name}: " + ", ".join(f"{k}={v:.4g}" for k, v in result.items()
                                               if k in FINAL_METRICS and v is not None))
    return result


def _bytes(bits: float) -> str:
    """Bits as a human-readable byte count: 8.14 GB, 63.1 MB, 12.0 kB."""
    size = bits / 8
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.{2 if unit == 'GB' else 1}f} {unit}"
    return f"{size:.0f} B"


def _delta_vs(results: Sequence[dict[str, Any]], baseline: str) -> list[float | None]:
    """Accuracy minus the ``baseline`` preset's at the same p and seed, in points (None where either is missing)."""
    reference = {(r["p"], r["seed"]): r.get(keys.VAL_ACC) for r in results if r["preset"] == baseline}
    deltas: list[float | None] = []
    for r in results:
        ref = reference.get((r["p"], r["seed"]))
        acc = r.get(keys.VAL_ACC)
        deltas.append(None if r["preset"] == baseline or ref is None or acc is None else 100 * (acc - ref))
    return deltas


def write_tables(results: Sequence[dict[str, Any]], out: Path, baseline: str | None = None) -> str:
    """``results.csv`` (raw values, bits as logged) and ``results.md`` in ``out``; returns the Markdown.

    With ``baseline`` (a preset), a column gives every run's accuracy minus the baseline run's at the same
    p and seed, in percentage points.
    """
    out.mkdir(parents=True, exist_ok=True)
    cols = ["preset", "density", "p", "seed", *FINAL_METRICS]
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)

    def fmt(key: str, value: Any) -> str:
        if value is None:
            return "—" if key == "density" else ""
        if key == "preset":
            return f"`{value}`"
        if key.startswith("comm/bits"):
            return _bytes(value)
        if key == keys.ROUNDS:
            return f"{value:.0f}"
        if key in (keys.VAL_ACC, keys.DENSITY):
            return f"{value:.3f}"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    header = ["preset", "δ", "p", "seed", keys.VAL_ACC, keys.VAL_LOSS, "rounds", "uplink", "downlink", "global density"]
    deltas = _delta_vs(results, baseline) if baseline is not None else None
    if deltas is not None:
        header.insert(5, f"Δ vs {baseline}")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, r in enumerate(results):
        cells = [fmt(k, r.get(k)) for k in cols]
        if deltas is not None:
            cells.insert(5, "" if deltas[i] is None else f"{deltas[i]:+.1f} pts")
        lines.append("| " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    (out / "results.md").write_text(md)
    return md


def run_grid(grid: Grid, runs: Sequence[Run], jobs: int = 1, log: Any = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Execute ``runs`` (``jobs`` at a time); return the finished runs' results (in ``runs`` order) and the
    error of every run that failed. A failure does not stop the other runs."""
    results: list[dict[str, Any]] = []
    failures: list[str] = []
    digests: dict[Run, str] = {}
    for run in runs:  # parsed here, one after the other: jsonargparse is not thread-safe
        try:
            digests[run] = config_digest(grid, run)
        except (Exception, SystemExit) as err:  # a config that does not parse (jsonargparse exits) fails the run
            why = "the parser's message is above" if isinstance(err, SystemExit) else f"{type(err).__name__}: {err}"
            failures.append(f"run {run.name}: its config does not parse ({why})")
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [(run, pool.submit(execute, grid, run, log, digests[run])) for run in runs if run in digests]
        for run, future in futures:
            try:
                results.append(future.result())
            except RuntimeError as err:  # a failed run: its message names it and its log
                failures.append(str(err))
            except Exception as err:  # anything else (an unreadable log, ...) must not stop the other runs either
                failures.append(f"run {run.name}: {type(err).__name__}: {err}")
    return results, failures


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
    results, failures = run_grid(grid, runs, args.jobs, log=print)
    md = write_tables(results, Path(grid.out), baseline=grid.baseline)
    print(md)
    if failures:
        raise SystemExit(f"{len(failures)} of {len(runs)} runs failed (the table lists the others):\n"
                         + "\n".join(failures))
    return md


if __name__ == "__main__":
    main()
