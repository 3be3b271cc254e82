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

Optional, for studies: ``lr: [0.05, 0.1, 0.2]`` sweeps the step size γ (``--model.lr``; run names gain
``-lr<γ>``), or per preset ``lr: {proxskip: 0.2, sparse_proxskip: [0.05, 0.2]}`` (a γ or a list for every
preset, e.g. to reuse the step sizes another grid chose), and
``tune: {metric: val/client_acc_mean, mode: max, seeds: [0]}`` chooses one γ per (preset, δ, p) instead of
running them all: every γ runs on the tuning seeds, the γ with the best mean ``metric`` is chosen, and
the other seeds run with that γ only (a tuning run at the chosen γ is that seed's result). Tune on a split held out
of the *training* data (e.g. ``--data.client_test_fraction 0.1`` in ``args`` and ``val/client_acc_mean``, every
client's held-out part), never on the test set that ``val/acc`` reports. ``tuning.md`` lists every γ tried.
``summary.md`` / ``summary.csv`` aggregate the seeds of each (preset, δ, p): mean ± sample std (n − 1).

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
#: Also kept in ``final.json`` when a run logs them (tuning on client splits, the control variates' sum).
EXTRA_METRICS = (keys.CLIENT_ACC_MEAN, keys.CLIENT_LOSS_MEAN, keys.CV_SUM_NORM)


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
    lr: float | None = None  #: γ, when the grid sweeps it (else the configs' ``model.lr``)

    @property
    def name(self) -> str:
        dens = "" if self.density is None else f"-d{self.density:g}"
        lr = "" if self.lr is None else f"-lr{self.lr:g}"
        return f"{self.preset}{dens}-p{self.p:g}{lr}-s{self.seed}"

    @property
    def cell(self) -> tuple[str, float | None, float]:
        """(preset, δ, p): the point seeds and step sizes are taken over."""
        return (self.preset, self.density, self.p)


@dataclass(frozen=True)
class Tune:
    """Choose γ per (preset, δ, p) by ``metric`` (``mode`` max or min, mean over ``seeds``)."""

    metric: str = keys.CLIENT_ACC_MEAN
    mode: str = "max"
    seeds: tuple[int, ...] = (0,)
    p: tuple[float, ...] | None = None  #: tune only at these p; the chosen γ of a (preset, δ) then serves every p


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
    lr: list[float] | dict[str, list[float]] | None = None  #: γ for every preset, or per preset
    tune: Tune | None = None

    def lrs(self, preset: str) -> list[float | None]:
        """The step sizes ``preset`` runs with (``[None]``: the configs' ``model.lr``)."""
        if self.lr is None:
            return [None]
        return list(self.lr[preset] if isinstance(self.lr, dict) else self.lr)

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
        if raw.get("lr") is not None:
            per_preset = raw["lr"] if isinstance(raw["lr"], dict) else {preset: raw["lr"] for preset in raw["presets"]}
            if set(per_preset) != set(raw["presets"]):
                raise ValueError(f"grid file {path}: an lr mapping must give the step sizes of exactly the presets "
                                 f"{raw['presets']}, got {sorted(per_preset)}")
            for preset, lrs in per_preset.items():
                lrs = [lrs] if isinstance(lrs, (int, float)) and isinstance(raw["lr"], dict) else lrs
                if not isinstance(lrs, list) or not lrs or not all(isinstance(v, (int, float)) and v > 0 for v in lrs):
                    raise ValueError(f"grid file {path}: lr must list step sizes > 0, got {raw['lr']!r}")
                per_preset[preset] = [float(v) for v in lrs]
            raw["lr"] = per_preset if isinstance(raw["lr"], dict) else per_preset[raw["presets"][0]]
        if raw.get("tune") is not None:
            spec = dict(raw["tune"])
            unknown = set(spec) - {"metric", "mode", "seeds", "p"}
            if unknown:
                raise ValueError(f"grid file {path}: unknown tune keys {sorted(unknown)} (metric, mode, seeds, p)")
            tune = Tune(**{**spec, "seeds": tuple(spec.get("seeds", (0,))),
                           "p": None if spec.get("p") is None else tuple(float(v) for v in spec["p"])})
            if tune.p is not None and (not tune.p or set(tune.p) - set(raw.get("p", [0.2]))):
                raise ValueError(f"grid file {path}: tune p {list(tune.p)} must be among p {raw.get('p', [0.2])}")
            if not raw.get("lr"):
                raise ValueError(f"grid file {path}: tune needs the step sizes to choose from in lr")
            if tune.mode not in ("max", "min"):
                raise ValueError(f"grid file {path}: tune mode must be 'max' or 'min', got {tune.mode!r}")
            missing = sorted(set(tune.seeds) - set(raw.get("seed", [0])))
            if missing or not tune.seeds:
                raise ValueError(f"grid file {path}: tune seeds {list(tune.seeds)} must be among seed "
                                 f"{raw.get('seed', [0])}")
            raw["tune"] = tune
        return cls(**raw)

    def _cells(self) -> list[tuple[str, float | None, float]]:
        cells = []
        for preset, p in itertools.product(self.presets, self.p):
            for density in self.density if "density" in _options(preset) else [None]:
                cells.append((preset, density, p))
        return cells

    def runs(self, chosen: dict[tuple[str, float | None, float], float] | None = None) -> list[Run]:
        """Every run (without ``tune``); with ``tune``, the tuning runs, or with ``chosen`` (γ per cell, see
        :func:`choose_lr`) the runs of every seed at its cell's chosen γ."""
        if self.tune is not None and chosen is None:
            return [Run(*cell, seed, lr) for cell in self._cells() for lr in self.lrs(cell[0])
                    for seed in self.seed if seed in self.tune.seeds
                    if self.tune.p is None or cell[2] in self.tune.p]
        runs: list[Run] = []
        for preset, density, p in self._cells():
            for seed in self.seed:
                if chosen is not None:
                    if (preset, density, p) in chosen:
                        runs.append(Run(preset, density, p, seed, chosen[(preset, density, p)]))
                else:
                    runs += [Run(preset, density, p, seed, lr) for lr in self.lrs(preset)]
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
    if run.lr is not None:
        cmd += ["--model.lr", str(run.lr)]
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
    if run.lr is not None:
        result["lr"] = run.lr
    wanted = EXTRA_METRICS + ((grid.tune.metric,) if grid.tune is not None else ())
    result.update({k: metrics[k] for k in wanted if k in metrics})
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
    with_lr = any(r.get("lr") is not None for r in results)
    cols = ["preset", "density", "p", *(["lr"] if with_lr else []), "seed", *FINAL_METRICS]
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

    header = ["preset", "δ", "p", *(["γ"] if with_lr else []), "seed", keys.VAL_ACC, keys.VAL_LOSS, "rounds", "uplink",
              "downlink", "global density"]
    deltas = _delta_vs(results, baseline) if baseline is not None else None
    at = 6 if with_lr else 5
    if deltas is not None:
        header.insert(at, f"Δ vs {baseline}")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, r in enumerate(results):
        cells = [fmt(k, r.get(k)) for k in cols]
        if deltas is not None:
            cells.insert(at, "" if deltas[i] is None else f"{deltas[i]:+.1f} pts")
        lines.append("| " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    (out / "results.md").write_text(md)
    return md


Cell = tuple[str, float | None, float]


def choose_lr(grid: Grid, results: Sequence[dict[str, Any]]) -> dict[Cell, float]:
    """The step size of every (preset, δ, p) whose tuning runs finished: the γ with the best mean of
    ``grid.tune.metric`` over the tuning seeds (and over the tuning p, with ``tune.p``, whose choice then serves
    every p of that preset and δ). A γ whose runs lack the metric (e.g. diverged) is not chosen; ties go to the
    smaller γ."""
    assert grid.tune is not None
    per_p = grid.tune.p is None

    def key(cell: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(cell) if per_p else tuple(cell[:2])

    scores: dict[tuple[Any, ...], dict[float, list[float]]] = {}
    for r in results:
        value = r.get(grid.tune.metric)
        if r.get("lr") is None or value is None or value != value:  # NaN
            continue
        scores.setdefault(key((r["preset"], r["density"], r["p"])), {}).setdefault(r["lr"], []).append(value)
    sign = 1.0 if grid.tune.mode == "max" else -1.0
    best = {k: max(sorted(by_lr), key=lambda lr: sign * sum(by_lr[lr]) / len(by_lr[lr])) for k, by_lr in scores.items()}
    return {cell: best[key(cell)] for cell in grid._cells() if key(cell) in best}


def write_tuning(grid: Grid, results: Sequence[dict[str, Any]], chosen: dict[Cell, float], out: Path) -> str:
    """``tuning.md``: per (preset, δ, p) the tuning metric at every γ tried (mean over the tuning seeds), the
    chosen one in bold."""
    assert grid.tune is not None
    metric = grid.tune.metric
    lrs = sorted({r["lr"] for r in results if r.get("lr") is not None})
    where = "" if grid.tune.p is None else f" at p = {', '.join(f'{v:g}' for v in grid.tune.p)}, for every p"
    seeds = list(grid.tune.seeds)
    lines = [f"Step size γ chosen by `{metric}` ({grid.tune.mode}, mean over seeds {seeds}{where}).", "",
             "| preset | δ | p | " + " | ".join(f"γ = {lr:g}" for lr in lrs) + " | chosen γ |",
             "|" + "---|" * (4 + len(lrs))]
    for cell in grid._cells():
        if grid.tune.p is not None and cell[2] not in grid.tune.p:
            continue
        by_lr: dict[float, list[float]] = {}
        for r in results:
            if (r["preset"], r["density"], r["p"]) == cell and r.get(metric) is not None:
                by_lr.setdefault(r["lr"], []).append(r[metric])
        values = []
        for lr in lrs:
            text = f"{sum(by_lr[lr]) / len(by_lr[lr]):.4g}" if lr in by_lr else "—"
            values.append(f"**{text}**" if chosen.get(cell) == lr else text)
        preset, density, p = cell
        pick = f"{chosen[cell]:g}" if cell in chosen else "—"
        lines.append(f"| `{preset}` | {'—' if density is None else f'{density:g}'} | {p:g} | " + " | ".join(values)
                     + f" | {pick} |")
    md = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "tuning.md").write_text(md)
    return md


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, var ** 0.5


def summarize(results: Sequence[dict[str, Any]], baseline: str | None = None) -> list[dict[str, Any]]:
    """One row per (preset, δ, p, γ), in the order of ``results``: the number of seeds and mean / sample std of
    every final metric (``<metric>_mean``, ``<metric>_std``), and with ``baseline`` the accuracy difference to
    the baseline preset at the same p, paired by seed (``delta_mean``, ``delta_std``, in points)."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["preset"], r["density"], r["p"], r.get("lr")), []).append(r)
    reference = {(r["p"], r["seed"]): r.get(keys.VAL_ACC) for r in results if r["preset"] == baseline}
    rows = []
    for (preset, density, p, lr), members in groups.items():
        row: dict[str, Any] = {"preset": preset, "density": density, "p": p, "lr": lr, "seeds": len(members)}
        for key in FINAL_METRICS + EXTRA_METRICS:
            values = [m[key] for m in members if m.get(key) is not None]
            if values:
                row[f"{key}_mean"], row[f"{key}_std"] = _mean_std(values)
        if baseline is not None and preset != baseline:
            deltas = [100 * (m[keys.VAL_ACC] - reference[(p, m["seed"])]) for m in members
                      if m.get(keys.VAL_ACC) is not None and reference.get((p, m["seed"])) is not None]
            if deltas:
                row["delta_mean"], row["delta_std"] = _mean_std(deltas)
        rows.append(row)
    return rows


def write_summary(results: Sequence[dict[str, Any]], out: Path, baseline: str | None = None) -> str:
    """``summary.csv`` and ``summary.md`` (mean ± std over seeds, see :func:`summarize`); returns the Markdown."""
    rows = summarize(results, baseline)
    out.mkdir(parents=True, exist_ok=True)
    first = ("preset", "density", "p", "lr", "seeds")
    fields = [*first, *sorted({k for row in rows for k in row} - set(first))]
    with (out / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    classification = any(f"{keys.VAL_ACC}_mean" in row for row in rows)
    header = ["preset", "δ", "p", "γ", "seeds", *([keys.VAL_ACC] if classification else []),
              *([f"Δ vs {baseline}"] if baseline and classification else []), keys.VAL_LOSS, "rounds", "uplink",
              "downlink", "global density"]

    def pm(row: dict[str, Any], key: str, digits: int) -> str:
        if f"{key}_mean" not in row:
            return ""
        return f"{row[f'{key}_mean']:.{digits}f} ± {row[f'{key}_std']:.{digits}f}"

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"`{row['preset']}`", "—" if row["density"] is None else f"{row['density']:g}", f"{row['p']:g}",
                 "" if row["lr"] is None else f"{row['lr']:g}", str(row["seeds"])]
        if classification:
            cells.append(pm(row, keys.VAL_ACC, 3))
            if baseline:
                cells.append(f"{row['delta_mean']:+.1f} ± {row['delta_std']:.1f} pts" if "delta_mean" in row else "")
        cells.append(pm(row, keys.VAL_LOSS, 4 if not classification else 3))
        cells.append(f"{row[f'{keys.ROUNDS}_mean']:.0f}" if f"{keys.ROUNDS}_mean" in row else "")
        for key in (keys.BITS_UP, keys.BITS_DOWN):
            cells.append(_bytes(row[f"{key}_mean"]) if f"{key}_mean" in row else "")
        cells.append(f"{row[f'{keys.DENSITY}_mean']:.3f}" if f"{keys.DENSITY}_mean" in row else "")
        lines.append("| " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(md)
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
        if grid.tune is not None:
            text = "# tuning runs (the other seeds follow at the chosen step sizes)\n" + text
        print(text)
        return text
    results, failures = run_grid(grid, runs, args.jobs, log=print)
    if grid.tune is not None:
        chosen = choose_lr(grid, results)
        print(write_tuning(grid, results, chosen, Path(grid.out)))
        tuned = {r["name"]: r for r in results}
        runs = grid.runs(chosen)
        pending = [r for r in runs if r.name not in tuned]
        more, more_failures = run_grid(grid, pending, args.jobs, log=print)
        done = tuned | {r["name"]: r for r in more}
        results, failures = [done[r.name] for r in runs if r.name in done], failures + more_failures
    md = write_tables(results, Path(grid.out), baseline=grid.baseline)
    print(md)
    print(write_summary(results, Path(grid.out), baseline=grid.baseline))
    if failures:
        raise SystemExit(f"{len(failures)} of {len(runs)} runs failed (the table lists the others):\n"
                         + "\n".join(failures))
    return md


if __name__ == "__main__":
    main()
