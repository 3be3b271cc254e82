"""``train.py`` driven as a user drives it, in subprocesses: fit → validate / test / predict → resume, a run
killed with SIGKILL or stopped with Ctrl-C continuing bit for bit, and failures that end with one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from fl_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
STEPS = 600
COMMON = ["--config", QUICKSTART, "--trainer.enable_progress_bar", "false", "--checkpoint.every_n_train_steps", "10"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def train(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def last_checkpoints(cwd: Path) -> list[Path]:
    return sorted((cwd / "logs" / "quickstart").glob("version_*/checkpoints/last.ckpt"))


def global_model(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=True)
    return {k: v for k, v in state["state_dict"].items() if k.startswith(("global_model.", "clients."))}


def assert_same_model(a: Path, b: Path) -> None:
    sa, sb = global_model(a), global_model(b)
    assert sa.keys() == sb.keys() and sa
    for key in sa:
        assert torch.equal(sa[key], sb[key]), f"{key} differs"  # bit for bit, not to a tolerance


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run of STEPS steps: its last.ckpt is what every interrupted run must end with."""
    cwd = tmp_path_factory.mktemp("reference")
    train(cwd, "fit", *COMMON, "--trainer.max_steps", str(STEPS))
    [last] = last_checkpoints(cwd)
    assert torch.load(last, weights_only=True)["global_step"] == STEPS
    return last


def test_fit_then_validate_test_predict_and_resume_from_last(tmp_path: Path, reference: Path) -> None:
    train(tmp_path, "fit", *COMMON, "--trainer.max_steps", "300")
    for sub, key in (("validate", "val/acc"), ("test", "test/acc"), ("predict", "Predicting")):
        proc = train(tmp_path, sub, "--config", QUICKSTART, "--ckpt_path", "last")
        assert key in proc.stdout + proc.stderr, sub
        assert "untrained" not in proc.stderr
    resumed = train(tmp_path, "fit", *COMMON, "--trainer.max_steps", str(STEPS), "--ckpt_path", "last")
    assert "Restored all states from the checkpoint" in resumed.stderr + resumed.stdout
    assert_same_model(last_checkpoints(tmp_path)[-1], reference)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_a_killed_or_interrupted_run_resumes_from_last_to_the_same_model(how: str, tmp_path: Path,
                                                                         reference: Path) -> None:
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "fit", *COMMON, "--trainer.max_steps",
                             str(STEPS)], cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not last_checkpoints(tmp_path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # a few periodic checkpoints later, mid-run
    proc.send_signal(getattr(signal, how))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, "the run was stopped before it finished"
    [last] = last_checkpoints(tmp_path)
    stopped_at = torch.load(last, weights_only=True)["global_step"]
    assert 0 < stopped_at < STEPS
    if how == "SIGINT":  # Ctrl-C: last.ckpt is the state at the step the run stopped (not the periodic one)
        assert b"resume with --ckpt_path last" in err
    train(tmp_path, "fit", *COMMON, "--trainer.max_steps", str(STEPS), "--ckpt_path", "last")
    assert_same_model(last_checkpoints(tmp_path)[-1], reference)


def _one_error_line(proc: subprocess.CompletedProcess[str], match: str) -> None:
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and match in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_a_diverging_cli_run_exits_non_zero_with_one_line_and_no_diverged_checkpoint(tmp_path: Path) -> None:
    proc = train(tmp_path, "fit", *COMMON, "--model.lr", "1e6", check=False)
    _one_error_line(proc, "training diverged: the loss became NaN/Inf by step")
    for path in last_checkpoints(tmp_path):
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_an_invalid_option_exits_with_status_1_and_one_line(tmp_path: Path) -> None:
    proc = train(tmp_path, "fit", *COMMON, "--model.lr", "-1", check=False)
    _one_error_line(proc, "lr must be > 0, got -1.0")


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--optimizer", "LBFGS"], "LBFGS' is not supported: clients need an optimizer that is elementwise"),
        (["--data.batch_size", "5000"], "batch_size=5000 exceeds every client's data"),
        (["--optimizer", "Adam", "--optimizer.lr", "0.5"], "differs from the model's lr"),
        (["--data.partition_args", "{dirichlet: {alpha: 0.5}, alpha: 0.5}"], "partition_args mixes options"),
    ],
)
def test_invalid_options_fail_before_the_first_step_with_one_line(args: list[str], match: str, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The same path as ``train.py`` (``fl_lightning.cli.main``), in this process: one ``error:`` line, exit 1."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        _fit(tmp_path, *args)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and match in errors[0], err[-2000:]
    assert not list(tmp_path.rglob("*.ckpt")), "nothing was trained"


def _fit(tmp_path: Path, *args: str) -> Any:
    return main(["fit", *COMMON, "--trainer.max_steps", "3", "--trainer.logger", "false", *args])


@pytest.mark.parametrize(
    ("args", "check"),
    [
        (["--data.partition", "iid"], lambda cli: cli.datamodule.partition == "iid"),
        (["--data.partition", "shard"], lambda cli: cli.datamodule.partition == "shard"),
        (["--data.num_clients", "40"], lambda cli: cli.model.num_clients == 40),  # derived min_partition_size
        (["--data.partition_args.dirichlet.alpha", "5"],
         lambda cli: cli.datamodule.partition_args == {"dirichlet": {"alpha": 5}}),
        (["--model.algorithm", "sparse_proxskip", "--model.algorithm.density", "0.05"],
         lambda cli: cli.model.algorithm.name == "sparse_proxskip" and cli.model.algorithm.density == 0.05),
        (["--model.algorithm=fedavg"], lambda cli: cli.model.algorithm.name == "fedavg"),
        (["--optimizer", "Adam", "--model.lr", "0.01"],
         lambda cli: isinstance(cli.trainer.optimizers[0], torch.optim.Adam)
         and cli.trainer.optimizers[0].param_groups[0]["lr"] == 0.01),
    ],
)
def test_command_line_switches_take_effect(args: list[str], check: Any, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = _fit(tmp_path, *args)
    assert cli.trainer.global_step == 3 and check(cli)


def test_last_picks_this_presets_run_and_another_presets_checkpoint_is_refused_in_one_line(tmp_path: Path) -> None:
    """The quickstart and quickstart + an algorithm overlay log under the same name: ``last`` takes the newest
    checkpoint of the run's own preset; when only another preset's exists, loading it fails with one line (not a
    state-dict traceback)."""
    scaffold = str(ROOT / "configs" / "algorithms" / "scaffold.yaml")
    train(tmp_path, "fit", *COMMON, "--config", scaffold, "--trainer.max_steps", "20")
    [scaffold_last] = last_checkpoints(tmp_path)
    refused = train(tmp_path, "validate", "--config", QUICKSTART, "--ckpt_path", "last", check=False)
    _one_error_line(refused, "written by the preset fl_lightning.algorithms.SCAFFOLD")
    train(tmp_path, "fit", *COMMON, "--trainer.max_steps", "20")  # ProxSkip, newer than SCAFFOLD's
    [proxskip_last] = [p for p in last_checkpoints(tmp_path) if p != scaffold_last]
    proc = train(tmp_path, "validate", "--config", QUICKSTART, "--ckpt_path", "last")
    assert f"--ckpt_path last: {proxskip_last.relative_to(tmp_path)}" in proc.stderr
    proc = train(tmp_path, "validate", "--config", QUICKSTART, "--config", scaffold, "--ckpt_path", "last")
    assert f"--ckpt_path last: {scaffold_last.relative_to(tmp_path)}" in proc.stderr  # not the newest: its own
