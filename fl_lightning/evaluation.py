"""Evaluation of the global model x (the server's model after the latest round, DESIGN §2.1).

:class:`GlobalEvaluation` computes loss (and accuracy, for classification) of x on a batch, over a datamodule's
held-out split (:meth:`GlobalEvaluation.over`), and holds the ``MeanMetric`` s of Lightning's validation and
test loops. A client LightningModule's own ``validation_step`` / ``test_step`` take precedence (they run on the
global model, their ``self.log`` going to the federated module's).

What is evaluated is the model clients compute with when they start from x: x itself, unless a callback's
``transform_evaluated_params`` changes it (TopK(x) for an STE forward pass, FedComLoc-Local). Then
:meth:`GlobalEvaluation.use` loads those weights into a copy of the model that is not a submodule (not in
checkpoints, which keep x, the state clients resume from) and evaluation runs on the copy.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from torchmetrics import MeanMetric

from fl_lightning import metric_keys as keys
from fl_lightning.losses import Loss
from fl_lightning.objective import LocalObjective, shadow_log

if TYPE_CHECKING:
    from fl_lightning.data.datamodule import FederatedDataModule

Log = Callable[..., Any]


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(iter(model.parameters())).dtype


def as_model_input(model: nn.Module, x: Tensor) -> Tensor:
    """Floating-point inputs in the model's dtype (integer inputs, e.g. token ids, as they are)."""
    return x.to(model_dtype(model)) if x.is_floating_point() else x


class GlobalEvaluation(nn.Module):
    """Loss and accuracy of ``model`` (the global model), and the metrics of the validation/test loops."""

    def __init__(self, model: nn.Module, objective: LocalObjective, loss: Loss | None) -> None:
        super().__init__()
        self._model = [model]  # not a submodule: the federated module owns it
        self._shadow: list[nn.Module] = []  # the copy that holds transformed weights (not a submodule either)
        self._transformed = False
        self.objective = objective
        self.loss = loss
        self.val_loss, self.val_acc = MeanMetric(), MeanMetric()
        self.test_loss, self.test_acc = MeanMetric(), MeanMetric()

    @property
    def global_model(self) -> nn.Module:
        """The global model x itself."""
        return self._model[0]

    @property
    def model(self) -> nn.Module:
        """The model evaluated: the global model, or its copy holding the weights of the latest :meth:`use`."""
        return self._shadow[0] if self._transformed else self._model[0]

    @torch.no_grad()
    def use(self, params: Mapping[str, Tensor] | None) -> nn.Module:
        """Evaluate the global model with these parameters from now on (None: with its own); buffers are the
        global model's. Returns the model evaluated."""
        self._transformed = params is not None
        if params is None:
            return self.model
        source = self.global_model
        first = next(iter(source.parameters()))
        if not self._shadow or next(iter(self._shadow[0].parameters())).device != first.device:
            self._shadow = [copy.deepcopy(source)]
        shadow = self._shadow[0]
        for k, v in shadow.named_parameters():
            v.copy_(params[k])
        for (_, v), (_, b) in zip(shadow.named_buffers(), source.named_buffers()):
            v.copy_(b)
        shadow.train(source.training)
        return shadow

    @property
    def classification(self) -> bool:
        return self.loss is not None and self.loss.task == "classification"

    def batch(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor | None]:
        """(mean loss, accuracy or None) of the global model on one batch."""
        x = as_model_input(self.model, x)
        if self.loss is None:
            return self.objective.evaluate(self.model, x, y), None
        out = self.model(x)
        loss = self.loss(out, y)
        acc = (out.argmax(-1) == y).float().mean() if self.classification else None
        return loss, acc

    @torch.no_grad()
    def over(self, dm: FederatedDataModule, device: torch.device) -> dict[str, Tensor]:
        """``val/loss`` (and ``val/acc``) over the held-out split of ``dm``, each sample counting once."""
        was_training = self.model.training
        self.model.eval()
        total_loss = total_acc = torch.zeros((), device=device)
        count = 0
        for x, y in dm.eval_batches(device):
            loss, acc = self.batch(x, y)
            total_loss = total_loss + loss * len(y)
            if acc is not None:
                total_acc = total_acc + acc * len(y)
            count += len(y)
        self.model.train(was_training)
        metrics = {keys.VAL_LOSS: total_loss / max(count, 1)}
        if self.classification:
            metrics[keys.VAL_ACC] = total_acc / max(count, 1)
        return metrics

    def client_step(self, hook: str, batch: Any, batch_idx: int, log: Log) -> bool:
        """Run the client LightningModule's own ``validation_step`` / ``test_step`` on the global model, its
        ``self.log`` going to ``log``; False when it has none."""
        model = self.model
        if not (isinstance(model, LightningModule) and is_overridden(hook, model, LightningModule)):
            return False
        with shadow_log(model, log):
            getattr(model, hook)(batch, batch_idx)
        return True

    def step(self, stage: str, batch: tuple[Tensor, Tensor], log: Log) -> None:
        """``<stage>/loss`` (and ``<stage>/acc``) of one batch into the loop's metrics (``stage``: val, test)."""
        x, y = batch
        loss, acc = self.batch(x, y)
        loss_metric, acc_metric = (self.val_loss, self.val_acc) if stage == "val" else (self.test_loss, self.test_acc)
        loss_metric.update(loss, weight=len(y))
        log(f"{stage}/loss", loss_metric, prog_bar=True, batch_size=len(y))
        if acc is not None:
            acc_metric.update(acc, weight=len(y))
            log(f"{stage}/acc", acc_metric, prog_bar=True, batch_size=len(y))


def warn_if_untrained(module: LightningModule) -> None:
    """Warn when ``validate`` / ``test`` / ``predict`` run on a model that has not trained (no checkpoint given);
    called from the module's ``on_*_start`` hooks, so under a Trainer."""
    trainer = module.trainer
    if module.global_step == 0 and trainer.ckpt_path is None:
        rank_zero_warn(
            f"{trainer.state.fn.value} of an untrained model (no checkpoint given): the metrics are those of "
            "the initial weights. Pass a checkpoint (--ckpt_path last, or a path) to evaluate a trained one"
        )


__all__ = ["GlobalEvaluation", "as_model_input", "warn_if_untrained"]
