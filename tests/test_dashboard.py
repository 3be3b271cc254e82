"""The W&B dashboard as code: the dry-run spec holds the panels over the exact keys a run logs."""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import pytest

from fl_lightning import dashboard as dash
from fl_lightning import metric_keys as keys
from fl_lightning.algorithms import get_algorithm
from fl_lightning.cli import FederatedCLI

ROOT = Path(__file__).resolve().parents[1]
#: logged by DP runs only: tests/test_privacy.py holds the privacy panels to the columns of a DP run
NOT_LOGGED_YET = set(keys.PRIVACY_METRICS)


def _dry_run(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "spec.json"
    assert dash.main(["--entity", "me", "--project", "fl", "--dry-run", "--out", str(out), *extra]) == 0
    return json.loads(out.read_text())


def _panels(spec: dict) -> dict[str, list[dict]]:
    return {s["name"]: s["panels"] for s in spec["workspace"]["sections"]}


@pytest.fixture(scope="module")
def logged_columns(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The columns of metrics.csv of a short quickstart run (ProxSkip: control variates on; LayerDensity is a
    CLI default)."""
    tmp = tmp_path_factory.mktemp("run")
    FederatedCLI(args=[
        "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.max_steps", "12",
        "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp), "--trainer.default_root_dir", str(tmp),
    ])
    with next(tmp.rglob("metrics.csv")).open() as f:
        return next(csv.reader(f))


def test_dry_run_spec_has_the_sections_and_panels(tmp_path: Path) -> None:
    spec = _dry_run(tmp_path, "--report")
    panels = _panels(spec)
    assert {"Accuracy", "Client accuracy (per-client evaluation)", "Density", "Control variates", "Loss"} <= set(panels)
    acc = {(p["x"], tuple(p["y"]), p["log_x"]) for p in panels["Accuracy"]}
    assert (keys.ROUNDS, (keys.VAL_ACC,), False) in acc
    assert (keys.BITS_UP, (keys.VAL_ACC,), True) in acc, "accuracy against cumulative uplink bits, log x"
    client = {(p["x"], p["log_x"]) for p in panels["Client accuracy (per-client evaluation)"]}
    assert client >= {(keys.ROUNDS, False), (keys.BITS_UP, True)}
    density = [k for p in panels["Density"] for k in p["y"]]
    assert density == [keys.DENSITY, keys.CLIENT_DENSITY]
    assert any(p["y_regex"] and re.match(p["y_regex"], keys.layer_density("net.0.weight")) for p in panels["Density"])
    assert [p["y"] for p in panels["Control variates"]] == [[keys.CV_SUM_NORM]]
    assert {k for p in panels["Loss"] for k in p["y"]} == {keys.TRAIN_LOSS, keys.VAL_LOSS}
    table = spec["workspace"]["table"]
    assert table["groupby"] == [keys.CONFIG_PRESET, keys.CONFIG_DENSITY], "run table grouped by preset and density"
    report_panels = spec["report"]["panels"]
    assert spec["report"]["groupby"] == keys.CONFIG_PRESET
    assert {(p["x"], p["log_x"]) for p in report_panels if p["y"] == [keys.VAL_ACC]} == {
        (keys.ROUNDS, False), (keys.BITS_UP, True)}


def test_dry_run_without_report_writes_none(tmp_path: Path) -> None:
    assert _dry_run(tmp_path)["report"] is None


def test_every_panel_key_is_a_key_a_run_logs(tmp_path: Path, logged_columns: list[str]) -> None:
    spec = _dry_run(tmp_path, "--report")
    board = dash.dashboard("me", "fl")
    wanted = board.metric_keys() | set(board.table.columns)
    wanted |= {k for p in spec["report"]["panels"] for k in (p["x"], *p["y"])}
    assert wanted - NOT_LOGGED_YET <= set(logged_columns), sorted(wanted - NOT_LOGGED_YET - set(logged_columns))
    regexes = [p["y_regex"] for panels in _panels(spec).values() for p in panels if p["y_regex"]]
    for regex in regexes:
        assert any(re.match(regex, c) for c in logged_columns), regex


def test_run_table_groups_by_the_config_keys_a_run_stores() -> None:
    described = get_algorithm("sparse_proxskip", p=0.2, density=0.1).describe()  # wandb.config["algorithm"]
    for key in (keys.CONFIG_PRESET, keys.CONFIG_DENSITY, keys.CONFIG_P):
        head, name = key.split(".")
        assert head == "algorithm" and name in described


def test_workspace_objects_carry_the_same_keys() -> None:
    board = dash.dashboard("me", "fl")
    workspace = dash.to_workspace(board)
    assert [s.name for s in workspace.sections] == [s.name for s in board.sections]
    plotted = {k for s in workspace.sections for p in s.panels for k in (p.x, *p.y)}
    assert plotted == board.metric_keys()
    log_x = [p.title for s in workspace.sections for p in s.panels if p.log_x]
    assert log_x and all("uplink bits" in t for t in log_x)
    assert [g.name for g in workspace.runset_settings.groupby] == [keys.CONFIG_PRESET, keys.CONFIG_DENSITY]
    assert "config:algorithm.value.p" in workspace.runset_settings.pinned_columns
    report = dash.to_report(dash.report("me", "fl"))
    assert report.title and report.blocks


def test_missing_wandb_extra_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in [m for m in sys.modules if m.startswith("wandb_workspaces")] + ["wandb_workspaces"]:
        monkeypatch.setitem(sys.modules, name, None)  # import of it raises ImportError
    assert dash.main(["--entity", "me", "--project", "fl", "--dry-run", "--out", str(tmp_path / "s.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "[wandb]" in err and 'pip install -e ".[wandb]"' in err
