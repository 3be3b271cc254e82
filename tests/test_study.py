"""The reproduction study's figures and convex check (fl_lightning.study, docs/reproduction.md)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fl_lightning import study
from fl_lightning.grid import Run, write_tables


def _fake_grid(out: Path, cells: tuple[tuple[str, float | None], ...] = (("proxskip", None),
                                                                        ("server_pruning", 0.1))) -> None:
    """A finished grid: results.csv and one CSVLogger-style metrics.csv per run (3 seeds, 2 p, 2 presets)."""
    results = []
    for preset, density in cells:
        for p in (0.2, 0.01):
            for seed in range(3):
                run = Run(preset, density, p, seed, 0.1)
                run_dir = out / "runs" / run.name
                run_dir.mkdir(parents=True)
                rows = []
                for step in range(1, 5):
                    rounds = step * 10
                    rows.append({"step": step * 50, "comm/rounds": rounds, "comm/bits_up": rounds * 1e6,
                                 "cv/sum_norm": 1e-7 if density is None else 3.0 * step, "val/acc": 0.5 + 0.05 * step,
                                 "val/loss": 1.0 / step})
                with (run_dir / "metrics.csv").open("w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                    writer.writeheader()
                    writer.writerows(rows)
                results.append({"preset": preset, "density": density, "p": p, "lr": 0.1, "seed": seed,
                                "val/acc": 0.7 + 0.01 * seed, "val/loss": 0.5, "comm/rounds": 40.0,
                                "comm/bits_up": 4e7, "comm/bits_down": 4e7, "sparsity/density": density or 1.0})
    write_tables(results, out)


def test_figures_of_a_finished_grid_are_accuracy_vs_p_vs_bits_and_the_control_variates_sum(tmp_path: Path) -> None:
    out = tmp_path / "grid"
    _fake_grid(out)
    rows = study.grid_results(out)
    assert len(rows) == 12 and rows[0]["dir"] == out / "runs" / "proxskip-p0.2-lr0.1-s0"
    written = study.figures(out, tmp_path / "fig" / "logreg")
    assert [p.name for p in written] == ["logreg_vs_p.png", "logreg_vs_bits.png", "logreg_cv.png"]
    assert all(p.stat().st_size > 10_000 for p in written)
    fig = study.plot_vs_p(rows, tmp_path / "again.png")
    bars = fig.axes[0].containers  # one errorbar container per (preset, δ), the sample std over the 3 seeds
    assert len(bars) == 2 and bars[0].lines[0].get_ydata() == pytest.approx([0.71, 0.71])
    cv = study.plot_cv(rows, tmp_path / "cv.png")
    assert cv.axes[0].get_yscale() == "log" and len(cv.axes[0].lines) == 2


def test_figures_of_several_grids_draw_their_runs_together_one_colour_per_preset_one_style_per_density(
        tmp_path: Path) -> None:
    _fake_grid(tmp_path / "main")
    _fake_grid(tmp_path / "density", cells=(("server_pruning", 0.5), ("server_pruning", 0.02)))
    written = study.figures([tmp_path / "main", tmp_path / "density"], tmp_path / "fig" / "both", ps=[0.01])
    assert [p.name for p in written] == ["both_vs_p.png", "both_vs_bits.png", "both_cv.png"]
    rows = [r for out in ("main", "density") for r in study.grid_results(tmp_path / out) if r["p"] == 0.01]
    lines = {line.get_label(): line for line in study.plot_vs_bits(rows, tmp_path / "bits.png").axes[0].lines}
    assert sorted(lines) == ["proxskip", "server_pruning δ=0.02", "server_pruning δ=0.1", "server_pruning δ=0.5"]
    server = [lines[f"server_pruning δ={d}"] for d in ("0.5", "0.1", "0.02")]
    assert len({line.get_color() for line in server}) == 1
    assert lines["proxskip"].get_color() != server[0].get_color()
    assert [line.get_linestyle() for line in server] == ["-", "--", ":"]
    with pytest.raises(ValueError, match="no finished runs at p"):
        study.figures([tmp_path / "main"], tmp_path / "none", ps=[0.5])


def test_least_squares_check_shows_the_pruned_mass_in_the_naive_control_variates_only(tmp_path: Path) -> None:
    result = study.least_squares_study(tmp_path, presets=("sparse_proxskip", "server_pruning"), ps=(0.1,),
                                       seeds=(0,), steps=40)
    sparse, server = result["records"]
    assert sparse["rounds"] == server["rounds"] == 4 and sparse["nnz"] <= 20 and server["nnz"] <= 20
    assert max(sparse["sum_norm"]) < 1e-9 < 1.0 < min(server["sum_norm"])
    assert json.loads((tmp_path / "least_squares.json").read_text())["records"][0]["preset"] == "sparse_proxskip"
    study.plot_least_squares(result, tmp_path / "ls.png")
    assert (tmp_path / "ls.png").stat().st_size > 10_000


def test_a_variant_names_a_preset_and_its_options() -> None:
    assert study.parse_variant("server_pruning") == ("server_pruning", {})
    assert study.parse_variant("sparse_proxskip_local:prune_broadcast=false,scope=layer") == (
        "sparse_proxskip_local", {"prune_broadcast": False, "scope": "layer"})
    with pytest.raises(ValueError, match="options are key=value"):
        study.parse_variant("sparse_proxskip:scope")
