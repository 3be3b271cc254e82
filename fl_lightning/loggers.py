"""Logger helpers: run names from the algorithm preset, the resolved CLI config, and W&B offline runs read back.

- :func:`run_name` / :func:`run_label` turn the preset's ``describe()`` dict (``module.algorithm.describe()``)
  into ``sparse_proxskip-d0.1-p0.2`` (a W&B run name) or ``sparse_proxskip δ=0.1 p=0.2`` (a legend entry).
- :func:`algorithm_from_config` recovers that dict from a LightningCLI ``config.yaml``.
- :func:`find_wandb_logger` and :func:`cli_config` find a run's WandbLogger and its resolved CLI config.
- :func:`read_wandb_run` reads a W&B run directory written in offline mode (``WANDB_MODE=offline``): the
  ``run-<id>.wandb`` transaction log, no server and no ``wandb-core`` subprocess needed.

The ``.wandb`` file is W&B's "datastore" format, unchanged since wandb 0.10 and still what 0.31 writes: a
7-byte header (``b":W&B"``, magic ``0xBEE1``, version 0), then LevelDB-log-style blocks of 32 KiB, each
holding records framed as ``crc32 (u32) | length (u16) | type (u8) | payload`` (type 1 = a whole record,
2/3/4 = first/middle/last chunk of a record that spans blocks; a block tail shorter than a header is zero
padding). Every payload is a ``wandb.proto.wandb_internal_pb2.Record`` protobuf. ``wandb leet inspect --json
RUN.wandb`` (wandb >= 0.31) prints the same records as JSON, which is handy for a look by hand.
"""

from __future__ import annotations

import importlib
import json
import struct
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from fl_lightning import metric_keys as keys

if TYPE_CHECKING:
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import WandbLogger

__all__ = [
    "OfflineRun",
    "algorithm_from_config",
    "cli_config",
    "find_wandb_logger",
    "iter_wandb_records",
    "log_client_histograms",
    "read_wandb_run",
    "run_label",
    "run_name",
]

# ----------------------------------------------------------------------------------------- run names
# (key in the preset's describe() dict, short prefix in run names, symbol in legends), in display order.
_NAME_PARTS: tuple[tuple[str, str, str], ...] = (
    ("variant", "", ""),
    ("density", "d", "δ="),
    ("p", "p", "p="),
    ("local_steps", "k", "k="),
    ("lam", "lam", "λ="),
)


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _parts(algorithm: Mapping[str, Any] | None) -> tuple[str, list[tuple[str, str, str]]]:
    if not algorithm:
        return "no_algorithm", []
    name = str(algorithm.get("name", "custom"))
    parts = [(prefix, symbol, _fmt(algorithm[key])) for key, prefix, symbol in _NAME_PARTS
             if algorithm.get(key) is not None]
    return name, parts


def run_name(algorithm: Mapping[str, Any] | None) -> str:
    """A run name that says the preset and its key hyper-parameters, e.g. ``sparse_proxskip-d0.1-p0.2``,
    ``proxskip-p0.2``, ``fedavg-k5``, ``fedcomloc-com-d0.1-p0.2``; ``no_algorithm`` for ``None``."""
    name, parts = _parts(algorithm)
    return "-".join([name, *(prefix + value for prefix, _, value in parts)])


def run_label(algorithm: Mapping[str, Any] | None) -> str:
    """The same as :func:`run_name`, for a legend: ``sparse_proxskip δ=0.1 p=0.2``."""
    name, parts = _parts(algorithm)
    return " ".join([name, *(symbol + value for _, symbol, value in parts)])


def algorithm_from_config(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The preset's ``describe()`` dict from a LightningCLI config (``model.algorithm`` with ``class_path`` and
    ``init_args``), with the preset's defaults filled in; ``None`` when the config has no algorithm.

    Works for any :class:`~fl_lightning.algorithms.Algorithm` subclass the ``class_path`` names; a class that
    cannot be imported or built gives ``{"name": <class name>, **init_args}``.
    """
    spec = (config.get("model") or {}).get("algorithm")
    if not isinstance(spec, Mapping) or "class_path" not in spec:
        return None
    init_args = dict(spec.get("init_args") or {})
    module_name, _, cls_name = str(spec["class_path"]).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
        return dict(cls(**init_args).describe())
    except Exception:  # an unknown class or a changed signature: keep what the config says
        return {"name": cls_name, **init_args}


# ----------------------------------------------------------------------------------------- trainer helpers
def find_wandb_logger(trainer: Trainer) -> WandbLogger | None:
    """The first :class:`~lightning.pytorch.loggers.WandbLogger` among ``trainer.loggers``, else ``None``."""
    from lightning.pytorch.loggers import WandbLogger

    return next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)


def log_client_histograms(trainer: Trainer, vectors: Mapping[str, Any], stage: str, step: int) -> None:
    """The per-client accuracy (or loss, for regression) vectors of a client evaluation as W&B histograms
    ``<stage>/client_acc_hist`` (and ``<stage>/personal_acc_hist``), when W&B logs the run (rank 0 only);
    clients without test data are left out."""
    logger = find_wandb_logger(trainer)
    if logger is None or not trainer.is_global_zero:
        return
    import wandb

    hists = {}
    for kind in ("client", "personal"):
        values = vectors.get(f"{kind}_acc", vectors.get(f"{kind}_loss"))
        if values is not None:
            metric = "acc" if f"{kind}_acc" in vectors else "loss"
            finite = [float(v) for v in values.tolist() if v == v]
            hists[keys.client_histogram(stage, kind, metric)] = wandb.Histogram(finite)
    if hists:
        logger.log_metrics(hists, step=step)


def cli_config(trainer: Trainer) -> dict[str, Any] | None:
    """The resolved LightningCLI config of this run as a plain dict (what ``config.yaml`` holds), found through
    the CLI's :class:`~lightning.pytorch.cli.SaveConfigCallback` among ``trainer.callbacks``; ``None`` when the
    Trainer was not built by a LightningCLI."""
    from lightning.pytorch.cli import SaveConfigCallback

    for cb in trainer.callbacks:
        if isinstance(cb, SaveConfigCallback):
            dumped = cb.parser.dump(cb.config, skip_none=False)
            return yaml.safe_load(dumped)
    return None


# ----------------------------------------------------------------------------------------- offline runs
_HEADER = struct.Struct("<4sHB")  # ident, magic, version
_RECORD_HEADER = struct.Struct("<IHB")  # crc32, length, type
_IDENT, _MAGIC, _BLOCK = b":W&B", 0xBEE1, 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _wandb_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_file():
        return path
    candidates = sorted(path.glob("run-*.wandb"))
    if not candidates:  # a wandb/ folder or a logger save_dir: take the latest run
        latest = path / "latest-run" if (path / "latest-run").exists() else path / "wandb" / "latest-run"
        candidates = sorted(latest.glob("run-*.wandb"))
    if len(candidates) != 1:
        raise FileNotFoundError(f"expected one run-*.wandb file under {path}, found {len(candidates)}")
    return candidates[0]


def iter_wandb_records(path: str | Path) -> Iterator[Any]:
    """The ``wandb_internal_pb2.Record`` protobufs of a ``.wandb`` transaction log, in write order.

    ``path`` is the ``.wandb`` file, its run directory (``wandb/offline-run-*``), a ``wandb/`` directory or a
    logger ``save_dir`` (then the ``latest-run``). A record cut off at the end (a run still being written)
    is skipped.
    """
    from wandb.proto import wandb_internal_pb2

    data = _wandb_file(path).read_bytes()
    if len(data) < _HEADER.size:  # just created, nothing written yet
        return
    ident, magic, version = _HEADER.unpack_from(data, 0)
    if ident != _IDENT or magic != _MAGIC or version != 0:
        raise ValueError(f"{path} is not a W&B transaction log (header {data[:7]!r})")
    pos, pending = _HEADER.size, b""
    while pos + _RECORD_HEADER.size <= len(data):
        if _BLOCK - pos % _BLOCK < _RECORD_HEADER.size:  # block trailer: zero padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _, length, kind = _RECORD_HEADER.unpack_from(data, pos)
        pos += _RECORD_HEADER.size
        chunk = data[pos : pos + length]
        pos += length
        if len(chunk) < length:
            break
        if kind == _FULL:
            payload = chunk
        elif kind == _FIRST:
            pending = chunk
            continue
        elif kind == _MIDDLE:
            pending += chunk
            continue
        elif kind == _LAST:
            payload, pending = pending + chunk, b""
        else:  # type 0: zero padding up to the end of the block
            pos = -(-pos // _BLOCK) * _BLOCK
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def _key(item: Any) -> str:
    return ".".join(item.nested_key) if item.nested_key else item.key


def _value(item: Any) -> Any:
    """An item's value: ``value_json``, or (history items) one of the typed fields of its ``value`` oneof."""
    typed = item.WhichOneof("value") if "value" in item.DESCRIPTOR.oneofs_by_name else None
    if typed is None:
        return json.loads(item.value_json) if item.value_json else None
    if typed == "none":
        return None
    if typed == "json":
        return json.loads(item.json)
    return getattr(item, typed)


def _items(items: Any) -> dict[str, Any]:
    """The ``key`` (or ``nested_key``) / value items of a config, summary or history record, as a dict."""
    return {_key(item): _value(item) for item in items}


@dataclass
class OfflineRun:
    """What an offline W&B run recorded.

    Attributes:
        run_id: the run's id. name: its display name (``None`` if never set; offline runs get no random name).
        config: the run config (``wandb.config``), W&B's own ``_wandb`` entry removed.
        history: one dict per ``log`` call (``wandb.log`` / ``Trainer`` logging step), in order.
        summary: the final summary values.
        metrics: ``define_metric`` definitions by metric name (or glob): ``{"step_metric": ..., "summary": [...]}``.
        files: file names the run saved in its ``files/`` directory.
        finished: whether the log ends with the run's ``exit`` record (``wandb.finish()`` or process exit).
    """

    run_id: str
    name: str | None
    config: dict[str, Any]
    history: list[dict[str, Any]]
    summary: dict[str, Any]
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    finished: bool = False

    def series(self, key: str) -> list[Any]:
        """The values ``key`` took in the history, in order (rows without it skipped)."""
        return [row[key] for row in self.history if key in row]


def read_wandb_run(path: str | Path, wait: float = 0.0) -> OfflineRun:
    """Read back an offline W&B run (see :func:`iter_wandb_records` for ``path``).

    ``wandb-core`` writes the log in a separate process and may still be writing it for a moment after
    ``wandb.finish()`` returns; ``wait`` > 0 re-reads it until it ends with the run's ``exit`` record, for at
    most ``wait`` seconds (then ``TimeoutError``). With ``wait=0`` the records written so far are returned.

    Example::

        run = read_wandb_run("logs/wandb/latest-run", wait=30)
        run.series(keys.VAL_ACC), run.config["model"]["lr"], run.metrics[keys.VAL_ACC]["step_metric"]
    """
    deadline = time.monotonic() + wait
    while True:
        run = _read_wandb_run(path)
        if run.finished or wait <= 0:
            return run
        if time.monotonic() > deadline:
            raise TimeoutError(f"the W&B log under {path} has no exit record after {wait} s (run still open?)")
        time.sleep(0.1)


def _read_wandb_run(path: str | Path) -> OfflineRun:
    run_id, name = "", None
    config: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    metrics: dict[str, dict[str, Any]] = {}
    finished = False
    for record in iter_wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id or run_id
            name = record.run.display_name or name
            config.update(_items(record.run.config.update))
        elif kind == "config":
            config.update(_items(record.config.update))
            for item in record.config.remove:
                config.pop(_key(item), None)
        elif kind == "history":
            history.append(_items(record.history.item))
        elif kind == "summary":
            summary.update(_items(record.summary.update))
        elif kind == "exit":
            finished = True
        elif kind == "metric":
            m = record.metric
            metrics[m.name or m.glob_name] = {
                "step_metric": m.step_metric or None,
                "summary": [s for s in ("min", "max", "mean", "last", "best") if getattr(m.summary, s, False)],
            }
    config.pop("_wandb", None)
    run_dir = _wandb_file(path).parent
    files = sorted(p.name for p in (run_dir / "files").iterdir()) if (run_dir / "files").is_dir() else []
    return OfflineRun(run_id, name, config, history, summary, metrics, files, finished)
