"""The command line: ``python train.py fit --config configs/quickstart.yaml`` (LightningCLI, DESIGN §3).

Model, data, trainer and callbacks all come from YAML (omegaconf mode, so configs can interpolate, e.g.
``${data.num_clients}``); any value can be overridden on the command line (``--model.lr 0.05``).
"""

from __future__ import annotations

import warnings
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI

from fl_lightning.callbacks.interrupt import GracefulInterrupt
from fl_lightning.callbacks.metrics import LayerDensity, WandbFederatedMetrics
from fl_lightning.callbacks.progress import use_federated_progress_bar
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
)


def quiet_irrelevant_warnings() -> None:
    for message in _IRRELEVANT_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


class FederatedCLI(LightningCLI):
    """LightningCLI for :class:`FederatedLightningModule` and :class:`FederatedDataModule`, with a
    CSVLogger under ``logs/``, :class:`GracefulInterrupt`, the W&B dashboard set-up, per-layer density and the
    federated progress bar (round, density, bits) and the one-line :class:`RunSummary` by default."""

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        quiet_irrelevant_warnings()
        trainer_defaults: dict[str, Any] = {
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "logs"}},
            # Ctrl-C finishes the current local step, so any checkpoint written on the way out resumes exactly
            "callbacks": [GracefulInterrupt(), WandbFederatedMetrics(), LayerDensity(), RunSummary()],
        }
        trainer_defaults.update(kwargs.pop("trainer_defaults", {}))
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

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        return use_federated_progress_bar(super().instantiate_trainer(**kwargs))


def main(args: Any = None) -> FederatedCLI:
    return FederatedCLI(args=args)


if __name__ == "__main__":
    main()
