"""Curves of finished runs from their CSV logs: ``python -m fl_lightning.plot LOG_DIR... --out FILE.png``.

Each LOG_DIR is a Lightning CSVLogger run directory (``metrics.csv`` + ``hparams.yaml``, e.g.
``logs/quickstart/version_0``) or any folder above such directories (every run found below it is drawn).
Runs are overlaid in three panels:

1. accuracy against communication rounds (``val/acc``; ``val/loss`` when no run has an accuracy, then
   ``train/loss``),
2. the same against cumulative uplink bits (``comm/bits_up``), on a log scale by default (dense and sparse
   runs differ by orders of magnitude), ticks labelled ``100 kb``, ``1 Mb``, ...,
3. the density of the global model (``sparsity/density``) against communication rounds.

With client test splits (``val/client_acc_mean`` logged), panels 1 and 2 also shade every run's clients'
accuracy, mean ± std over clients, behind its global accuracy: the spread the central test set hides.

The legend says each run's algorithm, density and p (``sparse_proxskip δ=0.1 p=0.2``), read from the
``algorithm`` entry of ``hparams.yaml`` or, failing that, from the LightningCLI ``config.yaml`` next to it.

From Python: ``fl_lightning.plot.plot_runs(["logs/quickstart"], out="curves.png")`` returns the matplotlib
Figure, drawn with the Agg canvas without changing pyplot's backend (a notebook shows it inline). Rows logged
without the communication counters (validation at the end of an epoch) take the counters of the last training
row logged before them.
"""

from __future__ import annotations

import argparse
import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import matplotlib as mpl
import numpy as np
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from fl_lightning import metric_keys as keys
from fl_lightning.loggers import algorithm_from_config, run_label
from fl_lightning.progress import format_bits

__all__ = ["Run", "find_runs", "load_run", "main", "plot_runs", "read_metrics", "series"]

Metrics = dict[str, np.ndarray]

#: y-axis of panels 1 and 2, in order of preference.
Y_METRICS: tuple[str, ...] = (keys.VAL_ACC, keys.VAL_LOSS, keys.TRAIN_LOSS)
#: Columns that are cumulative counters, carried forward into rows that lack them.
COUNTERS: tuple[str, ...] = (keys.ROUNDS, keys.BITS_UP, keys.BITS_DOWN, keys.DENSITY)
_LINESTYLES = ("-", "--", "-.", ":")
_AXIS_LABELS = {
    keys.VAL_ACC: "validation accuracy", keys.VAL_LOSS: "validation loss", keys.TRAIN_LOSS: "training loss",
    keys.ROUNDS: "communication rounds", keys.BITS_UP: "uplink bits (all clients, cumulative)",
    keys.DENSITY: "density of the global model",
}
_TITLES = {keys.VAL_ACC: "accuracy", keys.VAL_LOSS: "validation loss", keys.TRAIN_LOSS: "training loss"}


class _Loader(yaml.SafeLoader):
    """A safe YAML loader that reads Python-object tags (hparams of arbitrary objects) as ``None``."""


_Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = yaml.load(path.read_text(), Loader=_Loader)  # a SafeLoader subclass
    return data if isinstance(data, dict) else {}


@dataclass
class Run:
    """One finished run: its directory, legend label, algorithm (the preset's ``describe()`` dict, or None),
    and its ``metrics.csv`` as columns (see :func:`read_metrics`)."""

    path: Path
    label: str
    algorithm: dict[str, Any] | None
    metrics: Metrics


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """The run directories (holding ``metrics.csv``) at or below ``paths``, in the given order, each once."""
    found: list[Path] = []
    for path in map(Path, paths):
        if (path / "metrics.csv").is_file():
            dirs = [path]
        elif path.is_file() and path.name == "metrics.csv":
            dirs = [path.parent]
        else:
            dirs = sorted(p.parent for p in path.rglob("metrics.csv"))
        if not dirs:
            raise FileNotFoundError(f"no metrics.csv at or below {path} (expected a CSVLogger run directory)")
        found += [d for d in dirs if d not in found]
    return found


def load_run(path: str | Path) -> Run:
    """Read a CSVLogger run directory (see :func:`find_runs`)."""
    path = Path(path)
    metrics = read_metrics(path / "metrics.csv")
    algorithm = _read_yaml(path / "hparams.yaml").get("algorithm")
    if isinstance(algorithm, dict) and "class_path" in algorithm:  # the preset's spec (Algorithm.spec)
        algorithm = algorithm_from_config({"model": {"algorithm": algorithm}})
    if not isinstance(algorithm, dict):
        algorithm = algorithm_from_config(_read_yaml(path / "config.yaml"))
    label = run_label(algorithm) if algorithm else path.name
    return Run(path, label, algorithm, metrics)


def read_metrics(path: str | Path) -> Metrics:
    """A CSVLogger ``metrics.csv`` as float columns (NaN where a row did not log the metric), rows sorted by
    ``step`` (stable: rows of one step keep their order)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    names = list(rows[0]) if rows else []
    columns = {name: np.array([_float(row.get(name)) for row in rows]) for name in names}
    if "step" in columns:
        order = np.argsort(columns["step"], kind="stable")
        columns = {name: values[order] for name, values in columns.items()}
    return columns


def _float(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:  # a non-numeric column
        return math.nan


def _ffill(values: np.ndarray) -> np.ndarray:
    """Carry the last non-NaN value forward; leading NaNs become 0."""
    idx = np.where(np.isnan(values), 0, np.arange(len(values)))
    np.maximum.accumulate(idx, out=idx)
    filled = values[idx]
    return np.where(np.isnan(filled), 0.0, filled)


def series(metrics: Metrics, x: str, y: str, *, drop_repeats: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The points (x, y) of one curve: rows where ``y`` was logged, with the counters (:data:`COUNTERS`) carried
    forward into rows that lack them (a row before the first round counts 0 rounds and 0 bits).

    ``drop_repeats`` keeps only the first of consecutive rows with the same ``y`` (an evaluation every few
    rounds is logged again at each logging step until the next one; its first row is the closest to when it
    was measured).
    """
    if y not in metrics or x not in metrics:
        return np.empty(0), np.empty(0)
    xs = _ffill(metrics[x]) if x in COUNTERS else metrics[x]
    keep = ~np.isnan(metrics[y]) & ~np.isnan(xs)
    xs, ys = xs[keep], metrics[y][keep]
    if drop_repeats and len(ys):
        first = np.ones(len(ys), dtype=bool)
        first[1:] = ys[1:] != ys[:-1]
        xs, ys = xs[first], ys[first]
    return xs, ys


def _unique_labels(runs: list[Run]) -> None:
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.label] = counts.get(run.label, 0) + 1
    for run in runs:
        if counts[run.label] > 1:
            run.label = f"{run.label} ({run.path.parent.name}/{run.path.name})"


def _choose_y(runs: list[Run]) -> str:
    for y in Y_METRICS:  # the first metric every run has, else the first any run has
        if all(y in r.metrics and not np.isnan(r.metrics[y]).all() for r in runs):
            return y
    for y in Y_METRICS:
        if any(y in r.metrics and not np.isnan(r.metrics[y]).all() for r in runs):
            return y
    raise ValueError(f"none of {Y_METRICS} was logged in {[str(r.path) for r in runs]}")


def _client_band(ax: Any, run: Run, x: str, color: str, *, log_x: bool) -> None:
    """Shade mean ± std of the clients' accuracy (``val/client_acc_mean`` / ``_std``) against ``x``."""
    if keys.CLIENT_ACC_MEAN not in run.metrics or keys.CLIENT_ACC_STD not in run.metrics:
        return
    xs, mean = series(run.metrics, x, keys.CLIENT_ACC_MEAN)
    xs_std, std = series(run.metrics, x, keys.CLIENT_ACC_STD)  # logged in the same rows
    if len(xs) == 0 or len(xs_std) != len(xs):
        return
    keep = np.ones(len(xs), dtype=bool)
    keep[1:] = (mean[1:] != mean[:-1]) | (std[1:] != std[:-1])  # an evaluation's first row (see series)
    if log_x:
        keep &= xs > 0
    ax.fill_between(xs[keep], (mean - std)[keep], np.minimum(1.0, mean + std)[keep], color=color, alpha=0.15,
                    linewidth=0, label=f"{run.label}: clients' acc ± std")


def plot_runs(paths: Sequence[str | Path] | str | Path, out: str | Path | None = None, *,
              labels: Sequence[str] | None = None, title: str | None = None,
              bits_scale: Literal["log", "linear"] = "log") -> Figure:
    """Overlay the runs at or below ``paths`` in three panels (see the module docstring); save to ``out``
    when given (any format matplotlib writes: png, pdf, svg) and return the Figure.

    Every panel's lines carry the run labels, in the order of ``paths``; ``labels`` (one per run found)
    replaces the labels derived from the runs' configs. ``bits_scale`` is the scale of the uplink-bits axis
    (on the log scale, points at 0 bits, i.e. before the first round, are left out of that panel).
    """
    if bits_scale not in ("log", "linear"):
        raise ValueError(f"bits_scale must be 'log' or 'linear', got {bits_scale!r}")
    if isinstance(paths, (str, Path)):
        paths = [paths]
    runs = [load_run(p) for p in find_runs(paths)]
    if labels is not None:
        if len(labels) != len(runs):
            raise ValueError(f"got {len(labels)} labels for {len(runs)} runs ({[str(r.path) for r in runs]})")
        for run, label in zip(runs, labels):
            run.label = label
    _unique_labels(runs)
    y = _choose_y(runs)
    fig = Figure(figsize=(15, 4.2), layout="constrained")
    FigureCanvasAgg(fig)  # Agg, without touching pyplot's global backend (notebooks keep theirs)
    axes = fig.subplots(1, 3)
    panels = [(axes[0], keys.ROUNDS, y), (axes[1], keys.BITS_UP, y), (axes[2], keys.ROUNDS, keys.DENSITY)]
    colors = mpl.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        for ax, x, metric in panels:
            xs, ys = series(run.metrics, x, metric, drop_repeats=metric.startswith("val/"))
            if x == keys.BITS_UP and bits_scale == "log":
                xs, ys = xs[xs > 0], ys[xs > 0]
            if len(xs):
                ax.plot(xs, ys, label=run.label, color=colors[i % len(colors)],
                        linestyle=_LINESTYLES[i % len(_LINESTYLES)],  # equal curves (density) stay visible
                        marker="o" if len(xs) < 30 else None, markersize=3)
    if y == keys.VAL_ACC:
        for i, run in enumerate(runs):
            for ax, x, _ in panels[:2]:
                _client_band(ax, run, x, colors[i % len(colors)], log_x=x == keys.BITS_UP and bits_scale == "log")
    for ax, x, metric in panels:
        ax.set_xlabel(_AXIS_LABELS.get(x, x))
        ax.set_ylabel(_AXIS_LABELS.get(metric, metric))
        ax.grid(alpha=0.3)
    for ax, text in zip(axes, (f"{_TITLES.get(y, y)} vs rounds", f"{_TITLES.get(y, y)} vs uplink bits",
                               "density vs rounds")):
        ax.set_title(text, fontsize="medium")
    if bits_scale == "log" and axes[1].has_data():
        axes[1].set_xscale("log")
        axes[1].grid(alpha=0.15, which="minor")
    axes[1].xaxis.set_major_formatter(FuncFormatter(lambda v, _: format_bits(v)))
    if y == keys.VAL_ACC:
        for ax in axes[:2]:
            ax.set_ylim(top=min(1.0, max(1e-9, ax.get_ylim()[1])))
    lo = axes[2].get_ylim()[0]
    axes[2].set_ylim(0.0 if math.isfinite(lo) else None, 1.05)
    handles, labels = axes[0].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[2].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(4, max(1, len(labels))), frameon=False)
    if title:
        fig.suptitle(title)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=150)
    return fig


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m fl_lightning.plot LOG_DIR... --out FILE.png``."""
    parser = argparse.ArgumentParser(
        prog="python -m fl_lightning.plot",
        description="Overlay finished runs (CSVLogger directories, or folders above them): accuracy against "
                    "rounds and uplink bits, and density against rounds.",
    )
    parser.add_argument("log_dirs", nargs="+", metavar="LOG_DIR", help="a run directory with metrics.csv, or a "
                        "folder above several (e.g. logs/quickstart)")
    parser.add_argument("--out", default="curves.png", help="output file (png, pdf, svg); default: curves.png")
    parser.add_argument("--labels", nargs="+", default=None, metavar="LABEL",
                        help="legend entries, one per run found (default: from each run's config)")
    parser.add_argument("--title", default=None, help="a title above the panels")
    parser.add_argument("--bits-scale", choices=("log", "linear"), default="log",
                        help="scale of the uplink-bits axis (default: log)")
    args = parser.parse_args(argv)
    try:
        plot_runs(args.log_dirs, out=args.out, labels=args.labels, title=args.title, bits_scale=args.bits_scale)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
