"""``python -m fl_lightning.plot`` / ``plot_runs``: curves of real CSV logs, checked against the CSV."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fl_lightning.cli import FederatedCLI
from fl_lightning.loggers import algorithm_from_config, run_label, run_name
from fl_lightning.plot import find_runs, main, plot_runs, series

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
SPARSE = ROOT / "configs" / "algorithms" / "sparse_proxskip.yaml"
DENSE_LABEL, SPARSE_LABEL = "proxskip p=0.2", "sparse_proxskip δ=0.1 p=0.2"


def _run(save_dir: Path, *extra: str) -> Path:
    """A 60-step quickstart run on digits, evaluated every 2 rounds; returns its CSVLogger directory."""
    cli = FederatedCLI(args=[
        "fit", "--config", str(QUICKSTART), *extra,
        "--trainer.max_steps", "60", "--trainer.log_every_n_steps", "5", "--model.eval_every", "2",
        "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.enable_checkpointing", "false", "--trainer.logger.init_args.save_dir", str(save_dir),
    ])
    return Path(cli.trainer.logger.log_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("logs")
    dense = _run(root / "dense")
    sparse = _run(root / "sparse", "--config", str(SPARSE), "--model.algorithm.density", "0.1")
    return dense, sparse


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _evaluations(rows: list[dict[str, str]], x: str) -> tuple[list[float], list[float]]:
    """Each distinct val/acc value, at the x of the first row that logged it (an evaluation every 2 rounds is
    repeated on the following logging steps until the next one)."""
    first: dict[str, float] = {}
    for row in rows:  # training rows only (no validation loop): they all hold the counters
        if row["val/acc"] and row["val/acc"] not in first:
            first[row["val/acc"]] = float(row[x])
    return list(first.values()), [float(v) for v in first]


def test_plot_runs_overlays_both_runs_with_their_csv_data(runs: tuple[Path, Path], tmp_path: Path) -> None:
    dense, sparse = runs
    out = tmp_path / "curves.png"
    fig = plot_runs([dense, sparse], out=out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    acc_rounds, acc_bits, density = fig.axes[:3]
    assert acc_rounds.get_ylabel() == "validation accuracy" and acc_bits.get_xlabel().startswith("uplink bits")
    assert acc_bits.get_xscale() == "log" and density.get_ylabel() == "density of the global model"
    assert [ax.get_title() for ax in fig.axes[:3]] == ["accuracy vs rounds", "accuracy vs uplink bits",
                                                       "density vs rounds"]
    for ax in (acc_rounds, acc_bits, density):
        assert [line.get_label() for line in ax.get_lines()] == [DENSE_LABEL, SPARSE_LABEL]
    for i, path in enumerate((dense, sparse)):
        rows = _rows(path)
        assert [int(r["step"]) for r in rows] == sorted(int(r["step"]) for r in rows)
        for ax, x in ((acc_rounds, "comm/rounds"), (acc_bits, "comm/bits_up")):
            xs, ys = _evaluations(rows, x)
            assert len(xs) >= 3
            np.testing.assert_allclose(ax.get_lines()[i].get_xdata(), xs)
            np.testing.assert_allclose(ax.get_lines()[i].get_ydata(), ys)
        logged = [r for r in rows if r["sparsity/density"]]
        np.testing.assert_allclose(density.get_lines()[i].get_xdata(), [float(r["comm/rounds"]) for r in logged])
        np.testing.assert_allclose(density.get_lines()[i].get_ydata(),
                                   [float(r["sparsity/density"]) for r in logged])
    # what the figure is for: the sparse run sends far fewer bits and its global model is sparse
    dense_bits, sparse_bits = (acc_bits.get_lines()[i].get_xdata()[-1] for i in (0, 1))
    assert sparse_bits < 0.5 * dense_bits
    assert density.get_lines()[0].get_ydata()[-1] == 1.0
    assert 0.1 <= density.get_lines()[1].get_ydata()[-1] < 0.15  # TopK on weights; biases stay dense


def test_a_folder_above_the_runs_plots_every_run_below_it(runs: tuple[Path, Path]) -> None:
    dense, sparse = runs
    root = dense.parents[2]
    assert find_runs([root]) == sorted([dense, sparse])
    fig = plot_runs(root)
    assert sorted(line.get_label() for line in fig.axes[0].get_lines()) == [DENSE_LABEL, SPARSE_LABEL]


def test_python_m_fl_lightning_plot_writes_the_png(runs: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "sub" / "fig.png"
    done = subprocess.run([sys.executable, "-m", "fl_lightning.plot", *map(str, runs), "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bits_axis_is_labelled_in_bits_and_can_be_linear(runs: tuple[Path, Path]) -> None:
    log_fig = plot_runs(list(runs))
    log_fig.canvas.draw()
    ticks = [t.get_text() for t in log_fig.axes[1].get_xticklabels() if t.get_text()]
    assert ticks and all(t.endswith(("kb", "Mb", "Gb")) for t in ticks), ticks
    linear = plot_runs(list(runs), bits_scale="linear").axes[1]
    assert linear.get_xscale() == "linear"
    # the same points on both scales (no evaluation happens before the first round, so none sits at 0 bits)
    np.testing.assert_allclose(linear.get_lines()[1].get_xdata(), log_fig.axes[1].get_lines()[1].get_xdata())
    with pytest.raises(ValueError, match="bits_scale"):
        plot_runs(list(runs), bits_scale="sqrt")  # type: ignore[arg-type]


def test_labels_replace_the_derived_ones_and_must_match_the_runs(runs: tuple[Path, Path]) -> None:
    fig = plot_runs(list(runs), labels=["dense", "sparse"])
    assert [line.get_label() for line in fig.axes[1].get_lines()] == ["dense", "sparse"]
    with pytest.raises(ValueError, match="1 labels for 2 runs"):
        plot_runs(list(runs), labels=["dense"])


def test_cli_names_the_missing_metrics_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "--out", str(tmp_path / "x.png")])
    assert exit_info.value.code == 2
    assert "no metrics.csv" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_loss_is_plotted_when_no_run_has_an_accuracy(tmp_path: Path) -> None:
    run = tmp_path / "version_0"
    run.mkdir()
    (run / "metrics.csv").write_text(  # rows out of step order; the validation row holds no counters
        "step,train/loss,val/loss,comm/rounds,comm/bits_up,sparsity/density\n"
        "14,1.0,,3,30,1\n4,3.0,,1,10,1\n9,2.0,,2,20,1\n9,,2.5,,,\n")
    (run / "hparams.yaml").write_text("lr: 0.1\nalgorithm:\n  name: fedavg\n  local_steps: 5\n")
    fig = plot_runs(run)
    assert fig.axes[0].get_ylabel() == "validation loss"
    line = fig.axes[0].get_lines()[0]
    assert line.get_label() == "fedavg k=5"
    # the validation row (no counters) takes the counters of the training row logged before it
    assert list(line.get_xdata()) == [2] and list(line.get_ydata()) == [2.5]


def test_series_carries_counters_forward_and_starts_at_zero() -> None:
    metrics = {"comm/rounds": np.array([np.nan, 1, np.nan, 3]), "val/acc": np.array([0.1, 0.2, 0.3, 0.3])}
    xs, ys = series(metrics, "comm/rounds", "val/acc")
    assert list(xs) == [0, 1, 1, 3] and list(ys) == [0.1, 0.2, 0.3, 0.3]
    xs, ys = series(metrics, "comm/rounds", "val/acc", drop_repeats=True)
    assert list(xs) == [0, 1, 1] and list(ys) == [0.1, 0.2, 0.3]


def test_run_names_and_labels_say_preset_density_and_p() -> None:
    sparse = {"name": "sparse_proxskip", "p": 0.2, "mode": "fixed", "density": 0.1, "scope": "global"}
    assert run_name(sparse) == "sparse_proxskip-d0.1-p0.2"
    assert run_label(sparse) == SPARSE_LABEL
    assert run_name({"name": "fedavg", "local_steps": 5, "cohort_size": None}) == "fedavg-k5"
    assert run_name({"name": "fedcomloc", "variant": "com", "density": 0.05, "p": 0.25}) == "fedcomloc-com-d0.05-p0.25"
    assert run_name(None) == "no_algorithm"
    config = {"model": {"algorithm": {"class_path": "fl_lightning.algorithms.SparseProxSkip",
                                      "init_args": {"density": 0.1}}}}
    assert algorithm_from_config(config) == {"name": "sparse_proxskip", "p": 0.2, "mode": "fixed", "density": 0.1,
                                             "scope": "global", "params": "weights", "seed": None}
    assert algorithm_from_config({"model": {"lr": 0.1}}) is None
