"""The reproduction study (docs/reproduction.md): its figures and its convex check.

``python -m fl_lightning.study figures GRID_OUT [GRID_OUT ...] --out PREFIX [--p P ...]`` draws, from finished grids'
``results.csv`` and run logs (``python -m fl_lightning.grid``; several grids' runs together, optionally only at some p),
one colour per preset and one line style per δ:

- ``PREFIX_vs_p.png``: the final accuracy (``val/acc``; ``val/loss`` for regression) against p, mean ± std over seeds,
  one line per (preset, δ);
- ``PREFIX_vs_bits.png``: accuracy against cumulative uplink bits (log x), one panel per p, the mean over seeds at
  every evaluation;
- ``PREFIX_cv.png``: ‖Σ_i w_i h_i‖ (``cv/sum_norm``) against communication rounds (log y), one panel per p: the
  pruned mass naive server pruning feeds into the control variates, against the zero-sum methods' rounding error.

``python -m fl_lightning.study least-squares --out DIR`` runs the convex check: heterogeneous least squares
(:func:`sparse_regression`), full local gradients, γ = 0.5/L, δ = 0.2, k = 1/p local steps, the same number of local
steps at every p, several data seeds; it writes ``DIR/least_squares.json`` and ``DIR/least_squares.png`` (the final
loss relative to centralised iterative hard thresholding against p, and ‖Σ_i w_i h_i‖ over rounds).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from fl_lightning import metric_keys as keys
from fl_lightning.grid import Run
from fl_lightning.plot import read_metrics, series
from fl_lightning.progress import format_bits

__all__ = ["figures", "grid_results", "least_squares_study", "main", "parse_variant", "sparse_regression"]

DPI = 100
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def grid_results(out: str | Path) -> list[dict[str, Any]]:
    """The final runs of a grid (the rows of ``out/results.csv``), each with its run directory as ``dir``."""
    out = Path(out)
    rows = []
    with (out / "results.csv").open() as f:
        for row in csv.DictReader(f):
            density = None if row["density"] in ("", None) else float(row["density"])
            lr = None if row.get("lr") in ("", None) else float(row["lr"])
            run = Run(row["preset"], density, float(row["p"]), int(row["seed"]), lr)
            parsed = {k: (float(v) if v not in ("", None) else None) for k, v in row.items()
                      if k not in ("preset", "density", "p", "seed", "lr")}
            rows.append({**parsed, "preset": run.preset, "density": density, "p": run.p, "seed": run.seed, "lr": lr,
                         "dir": out / "runs" / run.name})
    return rows


def _label(preset: str, density: float | None) -> str:
    return preset if density is None else f"{preset} δ={density:g}"


def _groups(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, float | None], list[dict[str, Any]]]:
    groups: dict[tuple[str, float | None], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["preset"], row["density"]), []).append(row)
    return groups


_LINESTYLES = ("-", "--", ":", "-.")


def _styles(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, float | None], dict[str, Any]]:
    """One colour and marker per preset, one line style per δ (largest first), so a grid's δ sweep reads as
    families of lines."""
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    densities = sorted({r["density"] for r in rows if r["density"] is not None}, reverse=True)
    styles = {}
    for preset, density in _groups(rows):
        i = presets.index(preset)
        j = 0 if density is None else densities.index(density)
        styles[(preset, density)] = {"color": f"C{i % 10}", "marker": _MARKERS[i % len(_MARKERS)],
                                     "linestyle": _LINESTYLES[j % len(_LINESTYLES)]}
    return styles


def _figure(ncols: int, width: float = 5.0, height: float = 3.8) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def _y_metric(rows: Sequence[dict[str, Any]]) -> str:
    return keys.VAL_ACC if any(r.get(keys.VAL_ACC) is not None for r in rows) else keys.VAL_LOSS


def plot_vs_p(rows: Sequence[dict[str, Any]], out: str | Path, title: str | None = None) -> Figure:
    """Final ``val/acc`` (or ``val/loss``) against p, mean ± sample std over seeds, per (preset, δ)."""
    y = _y_metric(rows)
    fig, (ax,) = _figure(1, 6.5, 5.0)
    styles = _styles(rows)
    for (preset, density), members in _groups(rows).items():
        ps = sorted({m["p"] for m in members})
        mean, std = [], []
        for p in ps:
            values = np.array([m[y] for m in members if m["p"] == p and m.get(y) is not None], dtype=float)
            mean.append(values.mean() if len(values) else math.nan)
            std.append(values.std(ddof=1) if len(values) > 1 else 0.0)
        ax.errorbar(ps, mean, yerr=std, label=_label(preset, density), **styles[(preset, density)],
                    capsize=3, linewidth=1.2, markersize=4)
    ax.set_xscale("log")
    all_p = sorted({r["p"] for r in rows})
    ax.set_xticks(all_p, [f"{p:g}" for p in all_p])
    ax.minorticks_off()
    ax.set_xlabel("p (communication probability; k = 1/p local steps per round)")
    ax.set_ylabel(f"final {y} (mean ± std over seeds)")
    ax.grid(alpha=0.3, which="both")
    _finish(fig, ax, title, out)
    return fig


def _mean_curve(dirs: Sequence[Path], x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    """The seeds' curves of ``y`` averaged at the evaluations they share (same order), and the mean x there."""
    curves = []
    for d in dirs:
        if (d / "metrics.csv").is_file():
            curves.append(series(read_metrics(d / "metrics.csv"), x, y, drop_repeats=y.startswith("val/")))
    curves = [c for c in curves if len(c[0])]
    if not curves:
        return np.empty(0), np.empty(0)
    n = min(len(c[0]) for c in curves)
    xs = np.mean([c[0][:n] for c in curves], axis=0)
    ys = np.mean([c[1][:n] for c in curves], axis=0)
    return xs, ys


def plot_vs_bits(rows: Sequence[dict[str, Any]], out: str | Path, title: str | None = None) -> Figure:
    """Accuracy (or loss) against cumulative uplink bits, log x, one panel per p, mean over seeds."""
    y = _y_metric(rows)
    ps = sorted({r["p"] for r in rows}, reverse=True)
    fig, axes = _figure(len(ps), 4.6, 3.8)
    styles = _styles(rows)
    for ax, p in zip(axes, ps):
        for (preset, density), members in _groups([r for r in rows if r["p"] == p]).items():
            xs, ys = _mean_curve([m["dir"] for m in members], keys.BITS_UP, y)
            keep = xs > 0
            ax.plot(xs[keep], ys[keep], label=_label(preset, density), **styles[(preset, density)],
                    markersize=3, linewidth=1.2)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: format_bits(v)))
        ax.set_title(f"p = {p:g}", fontsize="medium")
        ax.set_xlabel("uplink bits (all clients, cumulative)")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel(f"{y} (mean over seeds)")
    _finish(fig, axes[0], title, out)
    return fig


def plot_cv(rows: Sequence[dict[str, Any]], out: str | Path, title: str | None = None) -> Figure:
    """``cv/sum_norm`` = ‖Σ_i w_i h_i‖ against communication rounds (log y), one panel per p, mean over seeds."""
    ps = sorted({r["p"] for r in rows}, reverse=True)
    fig, axes = _figure(len(ps), 4.6, 3.8)
    styles = _styles(rows)
    for ax, p in zip(axes, ps):
        for (preset, density), members in _groups([r for r in rows if r["p"] == p]).items():
            xs, ys = _mean_curve([m["dir"] for m in members], keys.ROUNDS, keys.CV_SUM_NORM)
            keep = ys > 0
            if keep.any():
                ax.plot(xs[keep], ys[keep], label=_label(preset, density), **styles[(preset, density)],
                        markersize=2, linewidth=1.0, markevery=max(1, int(keep.sum()) // 15))
        ax.set_yscale("log")
        ax.set_title(f"p = {p:g}", fontsize="medium")
        ax.set_xlabel("communication rounds")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("‖Σ_i w_i h_i‖ (cv/sum_norm)")
    _finish(fig, axes[0], title, out)
    return fig


def _finish(fig: Figure, ax: Any, title: str | None, out: str | Path) -> None:
    """The legend of every panel's lines (``ax``'s first) below the panels, the title, and the file."""
    handles, labels = ax.get_legend_handles_labels()
    for other in fig.axes:
        for handle, label in zip(*other.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    ncols = min(len(fig.axes) + 1, max(1, len(labels)))
    fig.legend(handles, labels, loc="outside lower center", ncols=ncols, frameon=False, fontsize="small")
    if title:
        fig.suptitle(title)
    _save(fig, out)


def _save(fig: Figure, out: str | Path) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)


def figures(grid_out: str | Path | Sequence[str | Path], prefix: str | Path, title: str | None = None,
            ps: Sequence[float] | None = None) -> list[Path]:
    """The three figures of a finished grid, or of several together (their runs in one plot, e.g. a δ sweep next
    to the main grid), only at ``ps`` if given (see the module docstring); returns the files written."""
    outs = [grid_out] if isinstance(grid_out, (str, Path)) else list(grid_out)
    rows = [r for out in outs for r in grid_results(out) if ps is None or r["p"] in ps]
    if not rows:
        raise ValueError(f"{', '.join(map(str, outs))}: results.csv lists no finished runs"
                         + ("" if ps is None else f" at p = {list(ps)}"))
    prefix = str(prefix)
    written = [Path(f"{prefix}_vs_p.png"), Path(f"{prefix}_vs_bits.png")]
    plot_vs_p(rows, written[0], title)
    plot_vs_bits(rows, written[1], title)
    if any((r["dir"] / "metrics.csv").is_file() and keys.CV_SUM_NORM in read_metrics(r["dir"] / "metrics.csv")
           for r in rows):
        written.append(Path(f"{prefix}_cv.png"))
        plot_cv([r for r in rows if r["preset"] != "fedavg"], written[-1], title)
    return written


# ------------------------------------------------------------------------------------------- the convex check
def sparse_regression(n: int = 10, d: int = 100, m: int = 200, seed: int = 0) -> list[tuple[Any, Any]]:
    """Heterogeneous least squares whose dense optimum is not sparse (the problem of
    ``tests/test_sparse.py``): client i fits its own x_true + N(0, I) target with a Gaussian design."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x_true = 2 * torch.randn(d, generator=g, dtype=torch.float64)
    clients = []
    for _ in range(n):
        A = torch.randn(m, d, generator=g, dtype=torch.float64)
        x_i = x_true + torch.randn(d, generator=g, dtype=torch.float64)
        clients.append((A, A @ x_i + 0.1 * torch.randn(m, generator=g, dtype=torch.float64)))
    return clients


def _loss(clients: Sequence[tuple[Any, Any]], w: Any) -> float:
    return float(sum(((A @ w - b) ** 2).mean() for A, b in clients) / len(clients))


def _iht(clients: Sequence[tuple[Any, Any]], density: float, gamma: float, iters: int = 3000) -> float:
    """Centralised iterative hard thresholding x ← TopK(x − γ∇f(x)): the sparse reference loss."""
    import torch

    from fl_lightning.ops import topk

    G = sum(2.0 / len(b) * A.T @ A for A, b in clients) / len(clients)
    c = sum(2.0 / len(b) * A.T @ b for A, b in clients) / len(clients)
    x = torch.zeros(G.shape[0], dtype=torch.float64)
    for _ in range(iters):
        x = topk({"x": x - gamma * (G @ x - c)}, density, stacked=False)["x"]
    return _loss(clients, x)


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``"sparse_proxskip_local:prune_broadcast=false,scope=layer"`` → the preset's name and its options (YAML
    values)."""
    import yaml

    name, _, rest = text.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"variant {text!r}: options are key=value, got {item!r}")
        options[key.strip()] = yaml.safe_load(value)
    return name, options


LS_PRESETS = ("proxskip", "sparse_proxskip", "sparse_proxskip_local", "server_pruning", "server_pruning_modified")


def least_squares_study(out: str | Path, presets: Sequence[str] = LS_PRESETS,
                        ps: Sequence[float] = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01), seeds: Sequence[int] = (0, 1, 2),
                        density: float = 0.2, steps: int = 1000) -> dict[str, Any]:
    """Run every (preset, p, data seed) on :func:`sparse_regression` through the framework (full local gradients,
    γ = 0.5/L, fixed k = 1/p) and record the final loss and ‖Σ_i w_i h_i‖ after every round."""
    import lightning as L
    import torch
    from torch import nn

    from fl_lightning import FederatedDataModule, FederatedLightningModule
    from fl_lightning.algorithms import ALGORITHMS
    from fl_lightning.callbacks import FederatedCallback

    class _SumNorm(FederatedCallback):
        def __init__(self) -> None:
            self.values: list[float] = []

        def on_round_end(self, trainer: Any, module: Any, rnd: Any) -> None:
            if "cv_h" in module.clients.extra:
                h = module.clients.extra["cv_h"]
                total = torch.tensordot(module.client_weights.to(h["weight"].dtype), h["weight"], dims=1)
                self.values.append(float(total.norm()))

    start = time.perf_counter()
    records = []
    for seed in seeds:
        clients = sparse_regression(seed=seed)
        smooth = max(float(2 * torch.linalg.eigvalsh(A.T @ A / len(b)).max()) for A, b in clients)
        gamma = 0.5 / smooth
        iht = _iht(clients, density, gamma)
        for label in presets:
            preset, options = parse_variant(label)
            for p in ps:
                cls = ALGORITHMS.get(preset)
                kwargs: dict[str, Any] = {"p": p, "mode": "fixed", **options}
                if "density" in cls.__dataclass_fields__:
                    kwargs["density"] = density
                log = _SumNorm()
                model = nn.Linear(clients[0][0].shape[1], 1, bias=False).double()
                nn.init.zeros_(model.weight)
                dm = FederatedDataModule.from_client_tensors(clients, batch_size=None, seed=0)
                module = FederatedLightningModule(model, lr=gamma, loss="mse", algorithm=cls(**kwargs))
                L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                          num_sanity_val_steps=0, callbacks=[log]).fit(module, datamodule=dm)
                w = module.global_model.weight[0].detach()
                records.append({"preset": label, "p": p, "seed": seed, "loss": _loss(clients, w), "iht_loss": iht,
                                "nnz": int((w != 0).sum()), "rounds": module.round_index, "sum_norm": log.values})
    result = {"density": density, "steps": steps, "gamma": "0.5 / L", "records": records,
              "seconds": time.perf_counter() - start}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "least_squares.json").write_text(json.dumps(result, indent=1))
    return result


def plot_least_squares(result: dict[str, Any], out: str | Path) -> Figure:
    """Final loss / IHT loss against p (mean ± std over data seeds), and ‖Σ_i w_i h_i‖ over rounds at the
    smallest p (seed 0)."""
    records = result["records"]
    presets = list(dict.fromkeys(r["preset"] for r in records))
    ps = sorted({r["p"] for r in records})
    fig, (left, right) = _figure(2, 5.6, 4.0)
    colors = [f"C{i}" for i in range(len(presets))]
    for i, preset in enumerate(presets):
        mean, std = [], []
        for p in ps:
            ratios = np.array([r["loss"] / r["iht_loss"] for r in records if r["preset"] == preset and r["p"] == p])
            mean.append(ratios.mean())
            std.append(ratios.std(ddof=1) if len(ratios) > 1 else 0.0)
        left.errorbar(ps, mean, yerr=std, label=preset, marker=_MARKERS[i % len(_MARKERS)], capsize=3, markersize=4,
                      color=colors[i])
    left.set_xscale("log")
    left.set_xticks(ps, [f"{p:g}" for p in ps])
    left.minorticks_off()
    left.set_xlabel("p (k = 1/p local steps per round)")
    seeds = len({r["seed"] for r in records})
    left.set_ylabel(f"final f(x̄) / f(IHT) (mean ± std, {seeds} data seeds)")
    left.set_title(f"heterogeneous least squares, δ = {result['density']:g}, {result['steps']} steps",
                   fontsize="medium")
    left.grid(alpha=0.3, which="both")
    left.legend(fontsize="small")
    for i, preset in enumerate(presets):
        for j, p in enumerate((max(ps), min(ps))):
            rec = next((r for r in records if r["preset"] == preset and r["p"] == p and r["seed"] == 0), None)
            if rec and rec["sum_norm"]:
                values = np.maximum(np.array(rec["sum_norm"]), 1e-17)
                right.plot(np.arange(1, len(values) + 1), values, label=f"{preset} p={p:g}", color=colors[i],
                           linestyle="-" if j else "--", marker=_MARKERS[i % len(_MARKERS)], markersize=2,
                           markevery=max(1, len(values) // 10))
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("communication rounds")
    right.set_ylabel("‖Σ_i w_i h_i‖ (seed 0)")
    right.grid(alpha=0.3, which="both")
    right.legend(fontsize="x-small")
    _save(fig, out)
    return fig


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fl_lightning.study", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fig = sub.add_parser("figures", help="the three figures of a finished grid")
    fig.add_argument("grid_out", nargs="+", help="the grid's out directory (holding results.csv and runs/); "
                     "several: their runs in the same figures")
    fig.add_argument("--p", type=float, nargs="+", default=None, help="only the runs at these p")
    fig.add_argument("--out", required=True, help="file prefix: PREFIX_vs_p.png, PREFIX_vs_bits.png, PREFIX_cv.png")
    fig.add_argument("--title", default=None)
    ls = sub.add_parser("least-squares", help="the convex check on heterogeneous least squares")
    ls.add_argument("--out", required=True, help="directory for least_squares.json")
    ls.add_argument("--figure", default=None, help="also draw the figure to this file")
    ls.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ls.add_argument("--presets", nargs="+", default=list(LS_PRESETS),
                    help="presets, or variants PRESET:KEY=VALUE,... (e.g. sparse_proxskip_local:prune_broadcast=false)")
    ls.add_argument("--p", type=float, nargs="+", default=[0.5, 0.2, 0.1, 0.05, 0.02, 0.01])
    ls.add_argument("--steps", type=int, default=1000)
    ls.add_argument("--plot-only", action="store_true", help="redraw from DIR/least_squares.json")
    args = parser.parse_args(argv)
    if args.command == "figures":
        for path in figures(args.grid_out, args.out, args.title, args.p):
            print(f"wrote {path}")
        return
    if args.plot_only:
        result = json.loads((Path(args.out) / "least_squares.json").read_text())
    else:
        result = least_squares_study(args.out, presets=args.presets, ps=args.p, seeds=args.seeds, steps=args.steps)
        print(f"least squares: {len(result['records'])} runs in {result['seconds']:.0f} s")
    if args.figure:
        plot_least_squares(result, args.figure)
        print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
