"""The per-step metrics of a federated run: Σ_i w_i f_i, the communication counters, the latest round's metrics
and the values the client model logs (averaged over the cohort with the round's weights)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from fl_lightning import metric_keys as keys

if TYPE_CHECKING:
    from fl_lightning.module import FederatedLightningModule


class StepMetrics:
    """Hands a step's metrics to ``module.log_dict`` (on logging steps only: ``self.log`` costs about a
    millisecond per metric)."""

    def __init__(self) -> None:
        self._client_log_names: list[str] | None = None  # names the client model logs (several processes)

    def reset(self) -> None:
        """Agree on the client model's log names again (at the next logging step of every rank)."""
        self._client_log_names = None

    @staticmethod
    def logging_step(module: FederatedLightningModule) -> bool:
        """Whether the loggers write this step (``Trainer(log_every_n_steps=...)``)."""
        connector = getattr(module.trainer, "_logger_connector", None)  # Lightning's own decision, no public API
        return bool(getattr(connector, "should_update_logs", True)) or module.trainer.fast_dev_run

    @staticmethod
    def counters(module: FederatedLightningModule) -> dict[str, Tensor]:
        """``comm/rounds``, ``comm/bits_up``, ``comm/bits_down`` and the latest round's metrics."""
        return {keys.ROUNDS: module.comm.rounds.float(), keys.BITS_UP: module.comm.bits_up,
                keys.BITS_DOWN: module.comm.bits_down, **module.round_metrics}

    def log(self, module: FederatedLightningModule, loss: Tensor, weights: Tensor,
            client_logs: dict[str, Tensor]) -> None:
        metrics = {keys.TRAIN_LOSS: loss, **self.counters(module),
                   **{f"train/{k}": v for k, v in self.client_values(module, weights, client_logs).items()}}
        module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        module.log_dict({"round": float(module.round_index), "loss": loss}, prog_bar=True, on_step=True,
                        on_epoch=False, batch_size=1, logger=False)

    def client_values(self, module: FederatedLightningModule, weights: Tensor,
                      client_logs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Σ_i w_i v_i over the cohort (every process's) of each value the client model logs.

        Under several processes the names are agreed once per fit, at its first logging step (the same step on
        every rank), so that a rank without participating clients (no values) still joins the all-reduce."""
        if not module.distributed:
            return {k: torch.dot(weights.to(v.dtype), v) for k, v in client_logs.items()}
        if not module.objective.uses_training_step:  # forward + loss: the client model logs nothing
            return {}
        if self._client_log_names is None:
            everyone: list[Any] = [None] * module.trainer.world_size
            torch.distributed.all_gather_object(everyone, sorted(client_logs))
            self._client_log_names = sorted(set().union(*everyone))
        if not self._client_log_names:
            return {}
        local = [torch.dot(weights.float(), client_logs[k].float()) if k in client_logs
                 else torch.zeros((), device=weights.device) for k in self._client_log_names]
        return dict(zip(self._client_log_names, module.reduce(torch.stack(local)).unbind()))


__all__ = ["StepMetrics"]
