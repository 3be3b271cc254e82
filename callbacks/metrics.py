"""Metric callbacks: per-layer density of the global model, and a W&B dashboard for federated runs.

- :class:`LayerDensity` adds ``sparsity/layer/<parameter>`` (the fraction of non-zeros of each tensor of the
  global model, as it is evaluated: ``module.evaluated_params()``) to ``module.round_metrics`` after every round;
  the module logs them with the other round metrics on logging steps, so CSV, TensorBoard and W&B all get them.
- :class:`WandbFederatedMetrics` does nothing unless the Trainer has a
  :class:`~lightning.pytorch.loggers.WandbLogger`; then, at ``setup``, it declares which metrics W&B plots
  against communication rounds (``wandb.define_metric``), names the run after the algorithm preset
  (``sparse_proxskip-d0.1-p0.2``, after a name given to the logger), and stores the resolved LightningCLI config with
  the run (in ``wandb.config`` and as the file ``lightning_config.yaml``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import yaml
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from fl_lightning import metric_keys as keys
from fl_lightning.callbacks.base import FederatedCallback
from fl_lightning.loggers import cli_config, find_wandb_logger, run_name
from fl_lightning.ops import density, prunable

if TYPE_CHECKING:
    from fl_lightning.module import FederatedLightningModule
    from fl_lightning.round import Round

#: Metrics that describe the global model after a round (W&B plots them against ``comm/rounds`` by default) and the
#: possible x-axes, logged in the same rows as every per-step metric: both from :mod:`fl_lightning.metric_keys`.
ROUND_METRICS: tuple[str, ...] = keys.ROUND_METRICS
AXES: tuple[str, ...] = keys.AXES
#: Where the resolved CLI config lands in the W&B run's files (W&B reserves ``config.yaml`` for its own).
CONFIG_FILE = "lightning_config.yaml"


def algorithm_of(trainer: Trainer, pl_module: LightningModule) -> dict[str, Any] | None:
    """The run's algorithm: the preset's ``describe()`` dict (``module.algorithm.describe()``); for callbacks
    given to the Trainer by hand, ``{"name": "custom", "p": ..., "density": ...}`` read from its
    :class:`~fl_lightning.callbacks.SkipSchedule` and :class:`~fl_lightning.callbacks.TopKPruning`; else None."""
    from fl_lightning.callbacks.pruning import TopKPruning
    from fl_lightning.callbacks.schedule import SkipSchedule

    algorithm = getattr(pl_module, "algorithm", None)
    if algorithm is not None and hasattr(algorithm, "describe"):
        return dict(algorithm.describe())
    described: dict[str, Any] = {}
    for cb in trainer.callbacks:
        if isinstance(cb, SkipSchedule):
            described.setdefault("p", cb.p)
        elif isinstance(cb, TopKPruning):
            described.setdefault("density", cb.density)
    return {"name": "custom", **described} if described else None


class LayerDensity(FederatedCallback):
    """Log the density (fraction of non-zeros) of every pruned tensor of the global model after each round,
    as ``sparsity/layer/<parameter name>``.

    Computed on the module's device without a host synchronisation (one ``count_nonzero`` per tensor per
    round) and handed to the loggers through ``module.round_metrics``, i.e. written on logging steps only.

    Args:
        params: ``"weights"`` (default): the tensors TopK prunes by default (weights of Linear/Conv layers,
            see :func:`fl_lightning.ops.prunable`); ``"all"``: every parameter, biases and norms included.
    """

    #: Logging only: it needs no communication schedule (without one there are no rounds to report).
    requires_schedule: ClassVar[bool] = False

    def __init__(self, params: Literal["weights", "all"] = "weights") -> None:
        if params not in ("weights", "all"):
            raise ValueError(f"params must be 'weights' or 'all', got {params!r}")
        self.params = params
        self.names: list[str] = []

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        first = next(cb for cb in trainer.callbacks if isinstance(cb, LayerDensity))
        if first is not self:  # given twice (CLI default and a config): the first one does the work
            self.names = []
            return
        self.names = prunable(pl_module.global_model.named_parameters(), include=self.params, stacked=False)

    @override
    def on_round_end(self, trainer: Trainer, module: FederatedLightningModule, rnd: Round) -> None:
        params = module.evaluated_params()  # the global model as it is evaluated (TopK(x) for FedComLoc-Local)
        for name in self.names:
            module.round_metrics[keys.layer_density(name)] = density({name: params[name]}, stacked=False)


class WandbFederatedMetrics(Callback):
    """A W&B dashboard for federated runs; a no-op without a WandbLogger (safe to add to every run).

    At ``setup``, on the first :class:`~lightning.pytorch.loggers.WandbLogger` of the Trainer (works in
    offline mode, ``WANDB_MODE=offline``):

    - ``define_metric``: ``comm/rounds``, ``comm/bits_up`` and ``comm/bits_down`` are declared as axes, and
      accuracy, loss, density (also per layer) and ``cv/sum_norm`` are plotted against ``comm/rounds`` by
      default (``step_metric``), with ``val/acc``'s best value (max) and ``val/loss``'s (min) in the run
      summary. Train metrics keep Lightning's x-axis, ``trainer/global_step``. All of them are logged in the
      same rows as the ``comm/*`` counters, so any panel can switch its x-axis to bits or steps.
    - the run name says the preset, density and p: ``run_name(module.algorithm.describe())``, e.g.
      ``sparse_proxskip-d0.1-p0.2`` (callbacks composed by hand give ``custom-d0.1-p0.2``, see
      :func:`algorithm_of`). A name the logger was given comes first: ``--trainer.logger WandbLogger`` on the
      quickstart keeps the CSV logger's ``name: quickstart`` and gives ``quickstart-proxskip-p0.2``
      (see :meth:`run_display_name`); ``name_runs=False`` leaves names alone.
    - the config: the resolved LightningCLI config (when the run comes from a LightningCLI) is merged into
      ``wandb.config`` (keys ``model``, ``data``, ``trainer``, ...) and written to the run's files as
      ``lightning_config.yaml``; the preset's hyper-parameters go to ``wandb.config["algorithm"]``.

    Args:
        x_axis: the default x-axis of the round metrics (``comm/rounds``, or ``comm/bits_up``).
        name_runs: put the preset and its hyper-parameters in the run name.
        log_config: store the resolved CLI config with the run.
    """

    def __init__(self, x_axis: str = keys.ROUNDS, name_runs: bool = True, log_config: bool = True) -> None:
        if x_axis not in AXES:
            raise ValueError(f"x_axis must be one of {AXES}, got {x_axis!r}")
        self.x_axis = x_axis
        self.name_runs = name_runs
        self.log_config = log_config

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        logger = find_wandb_logger(trainer)
        if logger is None or not trainer.is_global_zero:
            return
        first = next(cb for cb in trainer.callbacks if isinstance(cb, WandbFederatedMetrics))
        if first is not self:  # given twice (CLI default and a config): the first one does the work
            return
        run = logger.experiment
        self.define_metrics(run, self.round_metric_names(trainer, pl_module))
        algorithm = algorithm_of(trainer, pl_module)
        if self.name_runs:
            run.name = self.run_display_name(run.settings.run_name, algorithm)
        if self.log_config:
            config = cli_config(trainer) or {}
            run.config.update({**config, "algorithm": algorithm}, allow_val_change=True)
            if config:
                Path(run.dir, CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning has logged the module's hyper-parameters by now, the preset as its class_path spec: the
        # config's "algorithm" is the readable describe() dict again (name, p, density, ...)
        logger = find_wandb_logger(trainer)
        first = next(cb for cb in trainer.callbacks if isinstance(cb, WandbFederatedMetrics))
        if logger is not None and trainer.is_global_zero and first is self and self.log_config:
            logger.experiment.config.update({"algorithm": algorithm_of(trainer, pl_module)}, allow_val_change=True)

    @staticmethod
    def run_display_name(given: str | None, algorithm: dict[str, Any] | None) -> str:
        """The W&B run name: ``run_name(algorithm)`` (``sparse_proxskip-d0.1-p0.2``) for an unnamed run; a
        given name followed by it (``quickstart-proxskip-p0.2``) unless the name already says it; a given
        name as it is when the run has no algorithm."""
        preset = run_name(algorithm)
        if not given:
            return preset
        if algorithm is None or preset in given:
            return given
        return f"{given}-{preset}"

    def round_metric_names(self, trainer: Trainer, pl_module: LightningModule) -> list[str]:
        """The metrics plotted against :attr:`x_axis`: :data:`ROUND_METRICS` and the per-layer densities."""
        names = list(ROUND_METRICS)
        for cb in trainer.callbacks:
            if isinstance(cb, LayerDensity):
                layers = prunable(pl_module.global_model.named_parameters(), include=cb.params, stacked=False)
                names += [keys.layer_density(n) for n in layers]
        return list(dict.fromkeys(names))

    def define_metrics(self, run: Any, names: list[str]) -> None:
        """``run.define_metric`` for the axes and the round metrics ``names``."""
        for axis in AXES:
            run.define_metric(axis)
        summaries = {keys.VAL_ACC: "max", keys.VAL_LOSS: "min"}
        for name in names:
            run.define_metric(name, step_metric=self.x_axis, summary=summaries.get(name))
        run.define_metric(keys.LAYER_DENSITY_PREFIX + "*", step_metric=self.x_axis)
