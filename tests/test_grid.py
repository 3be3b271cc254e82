"""The experiment grid runner: runs every combination once, skips finished runs, tabulates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fl_lightning import grid as grid_module
from fl_lightning.grid import Grid, Run, command, main, write_tables

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
    assert len(rows) == 3 and rows[0].startswith("| `proxskip` | — | 0.25 |")
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
    path.write_text(yaml.safe_dump({"configs": ["x.yaml"], "presets": ["proxskip"], "baseline": "fedavg"}))
    with pytest.raises(ValueError, match=r"baseline 'fedavg' must be one of presets \['proxskip'\]"):
        Grid.load(path)


def test_a_failed_run_does_not_stop_the_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ran = []

    def fake_execute(grid: Grid, run: Run, log: object = None, digest: str | None = None) -> dict:
        ran.append(run.name)
        if run.density == 0.2:
            raise RuntimeError(f"run {run.name} failed (exit 1); see {tmp_path}/stdout.log")
        if run.density == 0.1:
            raise KeyError("val/acc")
        return {"name": run.name, "preset": run.preset, "density": run.density, "p": run.p, "seed": run.seed,
                "val/acc": 0.8}

    monkeypatch.setattr(grid_module, "execute", fake_execute)
    monkeypatch.setattr(grid_module, "config_digest", lambda grid, run: run.name)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"configs": ["x.yaml"], "presets": ["proxskip", "sparse_proxskip"],
                                    "density": [0.5, 0.2, 0.1], "out": str(tmp_path / "out")}))
    with pytest.raises(SystemExit) as exit_info:
        main([str(path), "--jobs", "2"])
    message = str(exit_info.value.code)
    assert message.startswith("2 of 4 runs failed") and "sparse_proxskip-d0.2-p0.2-s0 failed (exit 1)" in message
    assert "run sparse_proxskip-d0.1-p0.2-s0: KeyError" in message
    assert sorted(ran) == sorted(r.name for r in Grid.load(path).runs()), "every run was tried"
    rows = (tmp_path / "out" / "results.md").read_text().strip().splitlines()[2:]
    assert [r.split(" | ")[0] for r in rows] == ["| `proxskip`", "| `sparse_proxskip`"]


def test_table_reports_bytes_and_the_accuracy_difference_to_the_baseline(tmp_path: Path) -> None:
    def result(preset: str, density: float | None, acc: float | None, up: float, p: float = 0.2) -> dict:
        return {"preset": preset, "density": density, "p": p, "seed": 0, "val/acc": acc, "val/loss": 0.5,
                "comm/rounds": 400.0, "comm/bits_up": up, "comm/bits_down": up, "sparsity/density": density or 1.0}

    results = [result("proxskip", None, 0.837, 6.512e10), result("sparse_proxskip", 0.1, 0.791, 8.64e9),
               result("sparse_proxskip", 0.1, 0.5, 8.0e6, p=0.5)]
    md = write_tables(results, tmp_path, baseline="proxskip")
    header, _, dense, sparse, no_reference = md.strip().splitlines()
    assert header == ("| preset | δ | p | seed | val/acc | Δ vs proxskip | val/loss | rounds | uplink | downlink | "
                      "global density |")
    assert dense == "| `proxskip` | — | 0.2 | 0 | 0.837 |  | 0.5 | 400 | 8.14 GB | 8.14 GB | 1.000 |"
    assert sparse == "| `sparse_proxskip` | 0.1 | 0.2 | 0 | 0.791 | -4.6 pts | 0.5 | 400 | 1.08 GB | 1.08 GB | 0.100 |"
    assert "| 0.500 |  |" in no_reference and "1.0 MB" in no_reference  # no proxskip run at p = 0.5
    assert "Δ vs" not in write_tables(results, tmp_path)
    csv_rows = (tmp_path / "results.csv").read_text().splitlines()
    assert csv_rows[1].split(",")[-3] == "65120000000.0", "the CSV keeps the logged bits"


def test_run_paths_do_not_depend_on_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mine.yaml").write_text("trainer: {max_steps: 1}\n")
    monkeypatch.chdir(tmp_path)
    grid = Grid(configs=["mine.yaml", "configs/quickstart.yaml"], presets=["proxskip"], out="results")
    cmd = command(grid, grid.runs()[0])
    configs = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--config"]
    assert configs[:2] == [str(tmp_path / "mine.yaml"), "configs/quickstart.yaml"]  # the latter: from the root
    assert cmd[cmd.index("--trainer.logger.save_dir") + 1] == str(tmp_path / "results" / "runs")


def test_fedavg_gets_k_local_steps_and_options_go_only_to_presets_that_take_them(tmp_path: Path) -> None:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"configs": ["x.yaml"], "presets": ["fedavg", "proxskip"], "p": [0.25],
                                    "algorithm_args": {"mode": "fixed", "cohort_size": None}}))
    grid = Grid.load(path)
    fedavg, proxskip = (command(grid, run) for run in grid.runs())

    def value(cmd: list[str], flag: str) -> str | None:
        return cmd[cmd.index(flag) + 1] if flag in cmd else None

    assert value(fedavg, "--model.algorithm.local_steps") == "4" and value(fedavg, "--model.algorithm.p") is None
    assert value(fedavg, "--model.algorithm.mode") is None and value(fedavg, "--model.algorithm.cohort_size") == "null"
    assert value(proxskip, "--model.algorithm.p") == "0.25" and value(proxskip, "--model.algorithm.mode") == "fixed"
    assert value(proxskip, "--model.algorithm.cohort_size") is None
    path.write_text(yaml.safe_dump({"configs": ["x.yaml"], "presets": ["fedavg"], "algorithm_args": {"mode": "x"}}))
    with pytest.raises(ValueError, match=r"algorithm_args \['mode'\] are taken by none of the presets"):
        Grid.load(path)


def test_the_shipped_grid_is_the_readme_table(tmp_path: Path) -> None:
    grid = Grid.load(ROOT / "configs" / "grids" / "fashion_mnist.yaml")
    names = [r.name for r in grid.runs()]
    assert len(names) == 13 and names[0] == "proxskip-p0.2-s0" and grid.baseline == "proxskip"
    assert "sparse_proxskip-d0.1-p0.2-s0" in names and "server_pruning-d0.05-p0.2-s0" in names
    cmd = command(grid, grid.runs()[0])
    assert cmd[cmd.index("--model.algorithm.mode") + 1] == "fixed"


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "grids").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_grid_gives_runs_the_cli_accepts(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each run of each shipped grid is a command line that LightningCLI parses and instantiates (no fit)."""
    from fl_lightning.cli import FederatedCLI

    monkeypatch.chdir(ROOT)
    grid = Grid.load(path)
    assert grid.runs()
    for run in grid.runs():
        cli = FederatedCLI(args=command(grid, run)[3:], run=False)  # after "python train.py fit"
        algorithm = cli.model.algorithm.describe()
        assert algorithm["name"] == run.preset
        if "p" in algorithm:  # FedAvg has no p: k = 1/p local steps instead
            assert algorithm["p"] == pytest.approx(run.p)
        else:
            assert algorithm["local_steps"] == round(1 / run.p)
        assert algorithm.get("density") == run.density
    if path.stem == "fashion_mnist_wide":  # the grid's own overrides reach the model and the trainer
        assert sum(p.numel() for p in cli.model.global_model.parameters()) == 784 * 256 + 256 + 256 * 10 + 10
    if path.stem == "fashion_mnist_long":
        assert cli.trainer.max_steps == 6000


def test_changing_a_grids_args_reruns_its_finished_runs_instead_of_reusing_them(tmp_path: Path) -> None:
    path = _grid(tmp_path)
    spec = yaml.safe_load(path.read_text())
    spec["presets"], spec["density"] = ["proxskip"], [0.5]
    path.write_text(yaml.safe_dump(spec))
    main([str(path)])
    final = tmp_path / "out" / "runs" / "proxskip-p0.25-s0" / "final.json"
    first = json.loads(final.read_text())
    assert first["comm/rounds"] > 0 and len(first["config_sha256"]) == 64
    main([str(path)])
    assert json.loads(final.read_text()) == first  # same config: reused as it is
    spec["args"][1] = "32"  # --trainer.max_steps 16 -> 32: the identity changes, so the run is repeated
    path.write_text(yaml.safe_dump(spec))
    main([str(path)])
    second = json.loads(final.read_text())
    assert second["config_sha256"] != first["config_sha256"]
    assert second["comm/rounds"] > first["comm/rounds"], "the longer run really ran"


def test_a_grid_run_whose_config_does_not_parse_fails_alone(tmp_path: Path) -> None:
    path = _grid(tmp_path)
    spec = yaml.safe_load(path.read_text())
    spec["presets"], spec["args"] = ["proxskip"], ["--model.lr", "not-a-number"]
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SystemExit, match=r"(?s)1 of 1 runs failed.*proxskip-p0.25-s0: its config does not parse"):
        main([str(path)])


def _tuned_grid(tmp_path: Path, **extra: object) -> Path:
    spec = {"configs": ["x.yaml"], "presets": ["proxskip", "sparse_proxskip"], "density": [0.1], "p": [0.5, 0.1],
            "seed": [0, 1, 2], "lr": [0.05, 0.2], "tune": {"metric": "val/client_acc_mean", "seeds": [0]},
            "baseline": "proxskip", "out": str(tmp_path / "out"), **extra}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_tuned_grid_runs_every_step_size_on_the_tuning_seed_then_the_other_seeds_at_the_chosen_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[str] = []

    def fake_execute(grid: Grid, run: Run, log: object = None, digest: str | None = None) -> dict:
        ran.append(run.name)
        # the held-out accuracy prefers γ = 0.2 for proxskip and γ = 0.05 for sparse_proxskip; the test accuracy
        # (val/acc) prefers the opposite, so a selection by the test set would show
        good = (run.lr == 0.2) == (run.preset == "proxskip")
        return {"name": run.name, "preset": run.preset, "density": run.density, "p": run.p, "seed": run.seed,
                "lr": run.lr, "val/acc": 0.5 if good else 0.9, "val/client_acc_mean": 0.8 if good else 0.7,
                "val/loss": 1.0 + run.seed, "comm/rounds": 10.0, "comm/bits_up": 8e6, "comm/bits_down": 8e6,
                "sparsity/density": 1.0}

    monkeypatch.setattr(grid_module, "execute", fake_execute)
    monkeypatch.setattr(grid_module, "config_digest", lambda grid, run: run.name)
    path = _tuned_grid(tmp_path)
    assert [r.name for r in Grid.load(path).runs()][:2] == ["proxskip-p0.5-lr0.05-s0", "proxskip-p0.5-lr0.2-s0"]
    main([str(path), "--jobs", "2"])
    assert len(ran) == 2 * 2 * 2 + 2 * 2 * 2 and len(set(ran)) == len(ran), "8 tuning runs, then 2 seeds × 4 cells"
    assert "proxskip-p0.1-lr0.2-s2" in ran and "proxskip-p0.1-lr0.05-s1" not in ran
    assert "sparse_proxskip-d0.1-p0.5-lr0.05-s1" in ran and "sparse_proxskip-d0.1-p0.5-lr0.2-s1" not in ran
    out = tmp_path / "out"
    tuning = (out / "tuning.md").read_text()
    assert "| `proxskip` | — | 0.5 | 0.7 | **0.8** | 0.2 |" in tuning
    assert "| `sparse_proxskip` | 0.1 | 0.1 | **0.8** | 0.7 | 0.05 |" in tuning
    rows = (out / "results.md").read_text().strip().splitlines()[2:]
    assert len(rows) == 12 and rows[0].startswith("| `proxskip` | — | 0.5 | 0.2 | 0 | 0.500 |")
    summary = (out / "summary.md").read_text().strip().splitlines()
    assert summary[0].startswith("| preset | δ | p | γ | seeds | val/acc | Δ vs proxskip | val/loss | rounds |")
    assert summary[2] == ("| `proxskip` | — | 0.5 | 0.2 | 3 | 0.500 ± 0.000 |  | 2.000 ± 1.000 | 10 | 1.0 MB | "
                          "1.0 MB | 1.000 |")
    assert "| `sparse_proxskip` | 0.1 | 0.5 | 0.05 | 3 | 0.500 ± 0.000 | +0.0 ± 0.0 pts |" in summary[4]


def test_summary_gives_mean_and_sample_std_over_seeds_and_the_paired_difference_to_the_baseline() -> None:
    def result(preset: str, seed: int, acc: float) -> dict:
        return {"preset": preset, "density": None if preset == "proxskip" else 0.1, "p": 0.1, "seed": seed,
                "val/acc": acc, "comm/rounds": 200.0}

    rows = grid_module.summarize([result("proxskip", 0, 0.80), result("proxskip", 1, 0.84),
                                  result("server_pruning", 0, 0.78), result("server_pruning", 1, 0.80)],
                                 baseline="proxskip")
    dense, server = rows
    assert dense["seeds"] == 2 and dense["val/acc_mean"] == pytest.approx(0.82)
    assert dense["val/acc_std"] == pytest.approx(0.04 / 2 ** 0.5)  # sample std (n - 1)
    assert server["delta_mean"] == pytest.approx(-3.0) and server["delta_std"] == pytest.approx(2 / 2 ** 0.5)


def test_tune_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tune needs the step sizes to choose from in lr"):
        Grid.load(_tuned_grid(tmp_path, lr=None))
    with pytest.raises(ValueError, match=r"tune seeds \[5\] must be among seed \[0, 1, 2\]"):
        Grid.load(_tuned_grid(tmp_path, tune={"seeds": [5]}))
    with pytest.raises(ValueError, match="tune mode must be 'max' or 'min'"):
        Grid.load(_tuned_grid(tmp_path, tune={"mode": "best"}))
    with pytest.raises(ValueError, match="lr must list step sizes > 0"):
        Grid.load(_tuned_grid(tmp_path, lr=[0.1, -1]))


def test_a_step_size_axis_names_runs_and_sets_the_lr(tmp_path: Path) -> None:
    grid = Grid.load(_tuned_grid(tmp_path, tune=None))
    runs = grid.runs()
    assert len(runs) == 2 * 2 * 3 * 2 and runs[1].name == "proxskip-p0.5-lr0.2-s0"
    cmd = command(grid, runs[1])
    assert cmd[cmd.index("--model.lr") + 1] == "0.2"
    assert "--model.lr" not in command(grid, Run("proxskip", None, 0.5, 0))  # no lr axis: the configs' lr


def test_step_sizes_can_be_given_per_preset(tmp_path: Path) -> None:
    """``lr: {preset: γ or [γ, ...]}``: each preset runs (or is tuned over) its own step sizes."""
    grid = Grid.load(_tuned_grid(tmp_path, tune=None, lr={"proxskip": 0.2, "sparse_proxskip": [0.05, 0.1]}))
    names = [r.name for r in grid.runs()]
    assert len(names) == 2 * 3 * 1 + 2 * 3 * 2 and "proxskip-p0.5-lr0.2-s0" in names
    assert not any(n.startswith("proxskip") and "-lr0.2-" not in n for n in names)
    assert {r.lr for r in grid.runs() if r.preset == "sparse_proxskip"} == {0.05, 0.1}
    tuned = Grid.load(_tuned_grid(tmp_path, lr={"proxskip": [0.2], "sparse_proxskip": [0.05, 0.2]}))
    assert sorted(r.name for r in tuned.runs()) == sorted(
        ["proxskip-p0.5-lr0.2-s0", "proxskip-p0.1-lr0.2-s0", *(f"sparse_proxskip-d0.1-p{p}-lr{lr}-s0"
                                                              for p in ("0.5", "0.1") for lr in ("0.05", "0.2"))])
    with pytest.raises(ValueError, match="exactly the presets"):
        Grid.load(_tuned_grid(tmp_path, lr={"proxskip": 0.2}))
    with pytest.raises(ValueError, match="lr must list step sizes > 0"):
        Grid.load(_tuned_grid(tmp_path, lr={"proxskip": 0.2, "sparse_proxskip": [-1]}))


def test_rerunning_a_grid_cell_with_the_same_seed_gives_the_same_numbers(tmp_path: Path) -> None:
    """Reproducibility of the study: one cell run twice from scratch (two output folders) logs identical metrics."""
    finals = []
    for name in ("first", "second"):
        path = _grid(tmp_path)
        spec = yaml.safe_load(path.read_text())
        spec.update(presets=["sparse_proxskip"], density=[0.2], seed=[3], out=str(tmp_path / name))
        path.write_text(yaml.safe_dump(spec))
        main([str(path)])
        run_dir = tmp_path / name / "runs" / "sparse_proxskip-d0.2-p0.25-s3"
        finals.append((json.loads((run_dir / "final.json").read_text()), (run_dir / "metrics.csv").read_text()))
    (first, first_csv), (second, second_csv) = finals
    assert first.pop("config_sha256") == second.pop("config_sha256")
    assert first == second and first["val/acc"] is not None
    assert first_csv == second_csv, "every logged value, not only the last ones"


def test_a_grid_tuned_at_one_p_uses_the_chosen_step_size_at_every_p(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_execute(grid: Grid, run: Run, log: object = None, digest: str | None = None) -> dict:
        assert run.seed == 0 or run.lr == 0.05, "only γ = 0.05 runs after tuning"
        return {"name": run.name, "preset": run.preset, "density": run.density, "p": run.p, "seed": run.seed,
                "lr": run.lr, "val/acc": 0.5, "val/client_acc_mean": 0.9 if run.lr == 0.05 else 0.1}

    monkeypatch.setattr(grid_module, "execute", fake_execute)
    monkeypatch.setattr(grid_module, "config_digest", lambda grid, run: run.name)
    path = _tuned_grid(tmp_path, tune={"seeds": [0], "p": [0.1]})
    grid = Grid.load(path)
    assert {r.p for r in grid.runs()} == {0.1} and len(grid.runs()) == 4
    main([str(path)])
    rows = (tmp_path / "out" / "results.md").read_text().strip().splitlines()[2:]
    assert len(rows) == 2 * 2 * 3 and all("| 0.05 |" in row for row in rows)
    assert "at p = 0.1, for every p" in (tmp_path / "out" / "tuning.md").read_text()
    with pytest.raises(ValueError, match=r"tune p \[0.3\] must be among p"):
        Grid.load(_tuned_grid(tmp_path, tune={"p": [0.3]}))
