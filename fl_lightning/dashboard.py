"""W&B dashboards as code: a saved workspace (and optionally a report) for a project of fl-lightning runs.

::

    python -m fl_lightning.dashboard --entity E --project P [--name "fl-lightning"] [--report]
    python -m fl_lightning.dashboard --entity E --project P --url URL      # update that saved workspace
    python -m fl_lightning.dashboard --entity E --project P --report --dry-run --out spec.json   # no network

The dashboard is first described as plain data (:class:`Dashboard`, :class:`Report`: sections of line panels
over metric keys from :mod:`fl_lightning.metric_keys`, and a run table grouped by preset and density); only
:func:`to_workspace` / :func:`to_report` turn it into ``wandb-workspaces`` objects, which the extra ``[wandb]``
installs (``pip install -e ".[wandb]"``). ``--dry-run`` builds those objects too (so the library validates them)
but writes the plain description as JSON instead of saving anything.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fl_lightning import metric_keys as keys
from fl_lightning.extras import MissingExtraError, require

DEFAULT_NAME = "fl-lightning"


@dataclass(frozen=True)
class Line:
    """A line plot of the metrics ``y`` (and of every metric matching ``y_regex``) against the metric ``x``."""

    title: str
    y: tuple[str, ...]
    x: str = keys.ROUNDS
    log_x: bool = False
    log_y: bool = False
    y_regex: str | None = None


@dataclass(frozen=True)
class Section:
    """A named, collapsible group of panels."""

    name: str
    panels: tuple[Line, ...]
    is_open: bool = True


@dataclass(frozen=True)
class RunTable:
    """The runs table: runs grouped by the config keys ``groupby``; ``columns`` (summary metrics, then config
    keys ``config``) pinned next to the run name."""

    groupby: tuple[str, ...] = (keys.CONFIG_PRESET, keys.CONFIG_DENSITY)
    columns: tuple[str, ...] = (keys.VAL_ACC, keys.VAL_LOSS, keys.BITS_UP, keys.ROUNDS, keys.DENSITY)
    config: tuple[str, ...] = (keys.CONFIG_P,)


@dataclass(frozen=True)
class Dashboard:
    """A saved W&B workspace, as plain data."""

    entity: str
    project: str
    name: str
    sections: tuple[Section, ...]
    table: RunTable = field(default_factory=RunTable)
    x_axis: str = keys.ROUNDS

    def metric_keys(self) -> set[str]:
        """Every metric key a panel plots (x and y; regexes not expanded)."""
        return {k for s in self.sections for p in s.panels for k in (p.x, *p.y)}


@dataclass(frozen=True)
class Report:
    """A W&B report comparing presets: one panel grid over the project's runs, lines grouped by ``groupby``
    (mean over the runs of a group, min-max band)."""

    entity: str
    project: str
    title: str
    description: str
    panels: tuple[Line, ...]
    groupby: str = keys.CONFIG_PRESET


def accuracy_panels() -> tuple[Line, ...]:
    return (
        Line("accuracy vs rounds", (keys.VAL_ACC,)),
        Line("accuracy vs uplink bits (log)", (keys.VAL_ACC,), x=keys.BITS_UP, log_x=True),
    )


def client_accuracy_panels() -> tuple[Line, ...]:
    stats = keys.CLIENT_ACC_STATS
    return (
        Line("client accuracy (mean, p10, min over clients) vs rounds", stats),
        Line("client accuracy vs uplink bits (log)", stats, x=keys.BITS_UP, log_x=True),
        Line("client accuracy spread (std over clients)", (keys.CLIENT_ACC_STD,)),
    )


def density_panels() -> tuple[Line, ...]:
    return (
        Line("global model density", (keys.DENSITY,)),
        Line("client density (x̂_i, mean over the cohort)", (keys.CLIENT_DENSITY,)),
        Line("density per layer (global model)", (), y_regex=f"^{keys.LAYER_DENSITY_PREFIX}.*"),
    )


def drift_panels() -> tuple[Line, ...]:
    return (Line("control-variate drift ‖Σ w_i h_i‖", (keys.CV_SUM_NORM,)),)


def privacy_panels() -> tuple[Line, ...]:
    """DP runs (:class:`~fl_lightning.callbacks.DifferentialPrivacy`): the privacy spent, the accuracy it bought,
    and the clipping."""
    return (
        Line("privacy spent ε (at the run's δ)", (keys.EPSILON,)),
        Line("accuracy vs ε", (keys.VAL_ACC,), x=keys.EPSILON),
        Line("clip norm and clipped fraction", (keys.CLIP_NORM, keys.CLIPPED_FRACTION)),
    )


def loss_panels() -> tuple[Line, ...]:
    return (
        Line("training loss", (keys.TRAIN_LOSS,)),
        Line("validation loss", (keys.VAL_LOSS,)),
        Line("validation loss vs uplink bits (log)", (keys.VAL_LOSS,), x=keys.BITS_UP, log_x=True),
    )


def communication_panels() -> tuple[Line, ...]:
    return (
        Line("uplink bits (cumulative)", (keys.BITS_UP,), log_y=True),
        Line("downlink bits (cumulative)", (keys.BITS_DOWN,), log_y=True),
    )


def dashboard(entity: str, project: str, name: str = DEFAULT_NAME) -> Dashboard:
    """The fl-lightning workspace: accuracy (global, per-client statistics) against rounds and against uplink
    bits, density (global, client, per layer), control-variate drift, loss, privacy (DP runs), communication; runs
    grouped by preset and density."""
    return Dashboard(
        entity=entity,
        project=project,
        name=name,
        sections=(
            Section("Accuracy", accuracy_panels()),
            Section("Client accuracy (per-client evaluation)", client_accuracy_panels()),
            Section("Density", density_panels()),
            Section("Control variates", drift_panels()),
            Section("Loss", loss_panels()),
            Section("Privacy (DP runs)", privacy_panels(), is_open=False),
            Section("Communication", communication_panels(), is_open=False),
        ),
    )


def report(entity: str, project: str, title: str = "fl-lightning: presets compared") -> Report:
    """A report comparing the presets of a project: accuracy against rounds and uplink bits, density, drift."""
    return Report(
        entity=entity,
        project=project,
        title=title,
        description=(
            "Runs grouped by algorithm preset (mean over runs, min-max band). Accuracy of the global model against "
            "communication rounds and against cumulative uplink bits (log scale), its density, and the drift "
            "‖Σ w_i h_i‖ of the control variates (0 for zero-sum control variates)."
        ),
        panels=(*accuracy_panels(), density_panels()[0], *drift_panels(), loss_panels()[1]),
    )


def to_json(board: Dashboard, rep: Report | None = None) -> dict[str, Any]:
    """The plain description written by ``--dry-run``: ``{"workspace": ..., "report": ... or None}``."""
    return {"workspace": asdict(board), "report": None if rep is None else asdict(rep)}


# ---------------------------------------------------------------------------------------------- wandb-workspaces
def _libraries() -> tuple[Any, Any]:
    ws = require("wandb_workspaces.workspaces", extra="wandb", feature="fl_lightning.dashboard")
    wr = require("wandb_workspaces.reports.v2", extra="wandb", feature="fl_lightning.dashboard")
    return ws, wr


def _line(wr: Any, line: Line, **extra: Any) -> Any:
    return wr.LinePlot(
        title=line.title, x=line.x, y=list(line.y), log_x=line.log_x or None, log_y=line.log_y or None,
        metric_regex=line.y_regex, **extra,
    )


def to_workspace(board: Dashboard) -> Any:
    """The ``wandb_workspaces.workspaces.Workspace`` for ``board`` (not saved)."""
    ws, wr = _libraries()
    table = board.table
    return ws.Workspace(
        entity=board.entity,
        project=board.project,
        name=board.name,
        sections=[
            ws.Section(name=s.name, panels=[_line(wr, p) for p in s.panels], is_open=s.is_open)
            for s in board.sections
        ],
        settings=ws.WorkspaceSettings(x_axis=board.x_axis),
        runset_settings=ws.RunsetSettings(
            groupby=[ws.Config(k) for k in table.groupby],
            pinned_columns=[*(f"summary:{k}" for k in table.columns), *(_config_column(k) for k in table.config)],
        ),
    )


def _config_column(key: str) -> str:
    """A config key as a runs-table column: ``algorithm.p`` -> ``config:algorithm.value.p``."""
    head, *rest = key.split(".")
    return f"config:{head}.value" + "".join(f".{r}" for r in rest)


def to_report(rep: Report) -> Any:
    """The ``wandb_workspaces.reports.v2.Report`` for ``rep`` (not saved)."""
    _, wr = _libraries()
    group = wr.Config(rep.groupby)
    panels = [_line(wr, p, groupby=group, groupby_aggfunc="mean", groupby_rangefunc="minmax") for p in rep.panels]
    runset = wr.Runset(entity=rep.entity, project=rep.project, name="fl-lightning runs",
                       groupby=[f"config.{rep.groupby}"])
    return wr.Report(
        entity=rep.entity, project=rep.project, title=rep.title, description=rep.description,
        blocks=[wr.P(rep.description), wr.PanelGrid(runsets=[runset], panels=panels)],
    )


def save(board: Dashboard, rep: Report | None = None, url: str | None = None) -> list[str]:
    """Save the workspace (a new one, or the saved workspace at ``url`` with its sections and settings replaced)
    and the report; returns their URLs. Needs W&B credentials (``wandb login``)."""
    ws, _ = _libraries()
    workspace = to_workspace(board)
    if url is not None:
        existing = ws.Workspace.from_url(url)
        for attr in ("name", "sections", "settings", "runset_settings"):
            setattr(existing, attr, getattr(workspace, attr))
        workspace = existing
    workspace.save()
    urls = [workspace.url]
    if rep is not None:
        saved = to_report(rep).save()
        urls.append(saved.url)
    return urls


# ---------------------------------------------------------------------------------------------- command line
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fl_lightning.dashboard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--entity", required=True, help="W&B entity (user or team)")
    parser.add_argument("--project", required=True, help="W&B project holding the fl-lightning runs")
    parser.add_argument("--name", default=DEFAULT_NAME, help="the saved workspace's name")
    parser.add_argument("--url", default=None, help="update the saved workspace at this URL instead of creating one")
    parser.add_argument("--report", action="store_true", help="also create a report comparing the presets")
    parser.add_argument("--report-title", default="fl-lightning: presets compared")
    parser.add_argument("--dry-run", action="store_true", help="write the specification as JSON; no network")
    parser.add_argument("--out", type=Path, default=None, help="where --dry-run writes the JSON (default: stdout)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    board = dashboard(args.entity, args.project, args.name)
    rep = report(args.entity, args.project, args.report_title) if args.report else None
    try:
        if args.dry_run:
            to_workspace(board)  # the library validates every panel and setting; nothing is sent
            if rep is not None:
                to_report(rep)
            text = json.dumps(to_json(board, rep), indent=2, ensure_ascii=False)
            if args.out is None:
                print(text)
            else:
                args.out.write_text(text + "\n", encoding="utf-8")
                print(f"wrote {args.out}", file=sys.stderr)
            return 0
        for url in save(board, rep, args.url):
            print(url)
    except MissingExtraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
