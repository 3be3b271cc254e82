"""The experiment grid runner: runs every combination once, skips finished runs, tabulates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fl_lightning.grid import Grid, main

ROOT = Path(__file__).resolve().parents[1]


def _grid(tmp_path: Path) -> Path:
    spec = {
        "configs": [str(ROOT / "configs" / "quickstart.yaml")],
        "presets": ["proxskip", "sparse_proxskip"],
        "density": [0.5, 0.2],
        "p": [0.25],
        "seed": [0],
        "args": ["--trainer.max_steps", "16", "--data.steps_per_epoch", "8", "--data.partition", "iid",
                 "--data.partition_args", "{}"],
        "out": str(tmp_path / "out"),
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_grid_expands_density_only_for_presets_that_take_one(tmp_path: Path) -> None:
    names = [r.name for r in Grid.load(_grid(tmp_path)).runs()]
    assert names == ["proxskip-p0.25-s0", "sparse_proxskip-d0.5-p0.25-s0", "sparse_proxskip-d0.2-p0.25-s0"]


def test_grid_runs_in_parallel_writes_tables_and_skips_finished_runs(tmp_path: Path) -> None:
    grid = _grid(tmp_path)
    md = main([str(grid), "--jobs", "2"])
    out = tmp_path / "out"
    assert (out / "results.csv").exists() and (out / "results.md").read_text() == md
    rows = md.strip().splitlines()[2:]
    assert len(rows) == 3 and rows[0].startswith("| proxskip | — | 0.25 |")
    finals = {p.parent.name: json.loads(p.read_text()) for p in out.glob("runs/*/final.json")}
    assert finals["sparse_proxskip-d0.2-p0.25-s0"]["sparsity/density"] < finals["proxskip-p0.25-s0"]["sparsity/density"]
    # the final row holds the end state: 16 steps with k = 1/p = 4 fixed steps per round (sparse presets)
    assert [f["comm/rounds"] for n, f in sorted(finals.items()) if n.startswith("sparse")] == [4, 4]
    # a finished run is not run again: its final.json is what the table reports
    marker = out / "runs" / "proxskip-p0.25-s0" / "final.json"
    marker.write_text(json.dumps({**finals["proxskip-p0.25-s0"], "val/acc": 0.123}))
    assert "| 0.123 |" in main([str(grid)])


def test_grid_file_errors_name_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"configs": ["x.yaml"], "presets": ["sparse_proxskipp"]}))
    with pytest.raises(ValueError, match="unknown algorithm 'sparse_proxskipp'"):
        Grid.load(path)
    path.write_text(yaml.safe_dump({"configs": ["x.yaml"], "presets": ["proxskip"], "densities": [0.1]}))
    with pytest.raises(ValueError, match="unknown keys"):
        Grid.load(path)
