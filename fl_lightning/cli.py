"""The command line: ``python train.py fit --config configs/quickstart.yaml`` (LightningCLI, DESIGN §3).

Model, data, trainer and callbacks all come from YAML (omegaconf mode, so configs can interpolate, e.g.
``${data.num_clients}``); any value can be overridden on the command line (``--model.lr 0.05``). On top of
LightningCLI:

- ``--model.algorithm sparse_proxskip`` takes a preset's registered name (as well as its class name or path);
- ``--optimizer Adam`` / ``--lr_scheduler StepLR`` configure the clients' local optimizer
  (:mod:`fl_lightning.optim`) instead of an optimizer over ``model.parameters()``;
- ``last.ckpt`` is kept every ``--checkpoint.every_n_train_steps`` steps (default 100) and on Ctrl-C / SIGTERM,
  and ``--ckpt_path last`` finds the newest one of the configured logger's runs, for ``fit`` (resume),
  ``validate``, ``test`` and ``predict``;
- an invalid value, or a run that diverges, ends with one ``error:`` line and a non-zero exit status
  (``FL_LIGHTNING_TRACEBACK=1`` shows the traceback).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from fl_lightning.algorithms import ALGORITHMS, class_path_of
from fl_lightning.callbacks.checkpointing import LastOnInterrupt, find_last_checkpoint
from fl_lightning.callbacks.divergence import DivergenceError
from fl_lightning.callbacks.interrupt import GracefulInterrupt
from fl_lightning.callbacks.metrics import LayerDensity, WandbFederatedMetrics
from fl_lightning.callbacks.progress import names_a_progress_bar, use_federated_progress_bar
from fl_lightning.callbacks.summary import RunSummary
from fl_lightning.data.datamodule import FederatedDataModule
from fl_lightning.module import FederatedLightningModule

# Lightning's advice about DataLoader workers and batch-size inference does not apply: the data are
# in-memory tensors sampled on the module's device.
_IRRELEVANT_WARNINGS = (
    ".*does not have many workers.*",
    ".*Trying to infer the `batch_size`.*",
    ".*isinstance\\(treespec, LeafSpec\\).*",
    ".*no pre-optimization state was saved.*",  # ModelCheckpoint, manual optimisation: the post-step state resumes
    ".*The dirpath has changed from.*",  # a resumed run writes its checkpoints into its own version directory
)
#: Errors a user's input causes (a config value, data that cannot be split, a diverging lr): one line each.
USER_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, MisconfigurationException, DivergenceError)
CHECKPOINT_EVERY_N_STEPS = 100


def quiet_irrelevant_warnings() -> None:
    for message in _IRRELEVANT_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def expand_preset_names(args: Sequence[str]) -> list[str]:
    """``--model.algorithm sparse_proxskip`` (or ``=sparse_proxskip``) → the preset's class path, which is
    what jsonargparse resolves; every other argument is left as it is."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg == "--model.algorithm" and i + 1 < len(out) and out[i + 1] in ALGORITHMS:
            out[i + 1] = class_path_of(out[i + 1])
        elif arg.startswith("--model.algorithm=") and arg.partition("=")[2] in ALGORITHMS:
            out[i] = f"--model.algorithm={class_path_of(arg.partition('=')[2])}"
    return out


def _spec(value: Any) -> dict[str, Any] | None:
    """A parsed ``--optimizer`` / ``--lr_scheduler`` (jsonargparse Namespace) as a plain class_path dict."""
    if value is None:
        return None
    value = value.as_dict() if hasattr(value, "as_dict") else dict(value)
    return value if value.get("class_path") else None


class FederatedCLI(LightningCLI):
    """LightningCLI for :class:`FederatedLightningModule` and :class:`FederatedDataModule`, with a
    CSVLogger under ``logs/``, :class:`GracefulInterrupt`, ``last.ckpt`` every 100 steps and on a clean stop
    (``--checkpoint.*`` configures the ``ModelCheckpoint``), the W&B dashboard set-up, per-layer density, the
    federated progress bar (round, density, bits) and the one-line :class:`RunSummary` by default."""

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        quiet_irrelevant_warnings()
        trainer_defaults: dict[str, Any] = {
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "logs"}},
            # Ctrl-C finishes the current local step, so the last.ckpt written on the way out resumes exactly
            "callbacks": [GracefulInterrupt(), LastOnInterrupt(), WandbFederatedMetrics(), LayerDensity(),
                          RunSummary()],
        }
        trainer_defaults.update(kwargs.pop("trainer_defaults", {}))
        if args is None:  # LightningCLI reads sys.argv itself (and warns when given both)
            sys.argv[1:] = expand_preset_names(sys.argv[1:])
        elif isinstance(args, (list, tuple)):
            args = expand_preset_names(args)
        super().__init__(
            FederatedLightningModule,
            FederatedDataModule,
            args=args,
            run=run,
            parser_kwargs={"parser_mode": "omegaconf"},
            save_config_kwargs={"overwrite": True},
            trainer_defaults=trainer_defaults,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True,
                             "checkpoint.every_n_train_steps": CHECKPOINT_EVERY_N_STEPS})

    def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
        """``--optimizer`` / ``--lr_scheduler`` become the clients' local optimizer and scheduler
        (:meth:`FederatedLightningModule.set_local_optimizer`). LightningCLI's own version builds the optimizer
        over ``model.parameters()`` now, before the client parameters exist, and so trains nothing."""
        if not self.auto_configure_optimizers:
            return
        optimizer = _spec(self._get(self.config_init, "optimizer", default=None))
        scheduler = _spec(self._get(self.config_init, "lr_scheduler", default=None))
        if optimizer is None and scheduler is not None:
            optimizer = {"class_path": "torch.optim.SGD", "init_args": {}}
        if optimizer is not None:
            self.model.set_local_optimizer(optimizer, scheduler)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Trainer:
        if config.get("enable_checkpointing") is False:  # the user turned checkpoints off: drop ours
            callbacks = [cb for cb in callbacks if not isinstance(cb, ModelCheckpoint)]
        self._chosen_progress_bar = names_a_progress_bar(config.get("callbacks")) or names_a_progress_bar(callbacks)
        return super()._instantiate_trainer(config, callbacks)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)  # Lightning's default bar is Rich when rich is installed
        return use_federated_progress_bar(trainer, replace_rich=not getattr(self, "_chosen_progress_bar", False))

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        """``--ckpt_path last``: the newest ``last.ckpt`` of this config's runs (Lightning's own lookup only
        searches the new run's empty directory); an error when there is none."""
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if kwargs.get("ckpt_path") == "last":
            found = find_last_checkpoint(self.trainer, self.model)
            if found is None:
                raise FileNotFoundError(
                    "--ckpt_path last: no last.ckpt under this config's log directory "
                    f"({getattr(self.trainer.logger, 'root_dir', self.trainer.default_root_dir)}); "
                    "give a checkpoint's path, or run fit without --ckpt_path"
                )
            print(f"--ckpt_path last: {found}", file=sys.stderr)
            kwargs["ckpt_path"] = str(found)
        return kwargs


def main(args: Any = None) -> FederatedCLI | None:
    """``train.py``: run the CLI; a user error (see :data:`USER_ERRORS`) prints one ``error:`` line and exits
    with status 1 (2 for an invalid config), unless ``FL_LIGHTNING_TRACEBACK=1``."""
    try:
        return FederatedCLI(args=args)
    except USER_ERRORS as err:
        if os.environ.get("FL_LIGHTNING_TRACEBACK", "") not in ("", "0"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        kind = "" if isinstance(err, (ValueError, DivergenceError)) else f"{type(err).__name__}: "
        print(f"error: {kind}{message}\n(FL_LIGHTNING_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
