"""Every client's accuracy: the global model (and each client's personalized model) on every client's own test split.

For client i with test split T_i (``client_test_fraction`` / ``client_test`` of the datamodule) and model w_i:

- ``loss_i = (1/|T_i|) Σ_{(x,y)∈T_i} ℓ(w_i; x, y)`` and ``acc_i = (1/|T_i|) Σ 1[argmax w_i(x) = y]``, with
  w_i = the global model x (its shared part, and client i's own personal parameters, :mod:`fl_lightning.personal`);
- with ``personalize_steps = k``, also w_i^k: k plain SGD steps w ← w − γ ∇f_i(w; minibatch) from w_i on client
  i's training data (no control variates, no momentum, the model in eval mode), ``personal_*``;
- statistics over the clients that have test data, each client counting once (the fairness view): mean, std
  (ddof = 0), the 10th percentile (``numpy.percentile``'s linear interpolation; the worst decile) and the minimum
  of acc_i; the mean of loss_i (regression: mean, std, 90th percentile and maximum of loss_i).

All clients are evaluated at once: their models stacked ``[c, ...]`` (the global model as an expanded view, no
copy), their test samples stacked ``[c, T, ...]`` with a padding mask, one batched forward per chunk; clients are
sorted by test size so that a chunk of ``c`` clients pads little, and chunks hold at most ``eval_batch_size``
samples (or ``clients_per_chunk`` clients). With several processes each evaluates its own clients and the
per-client vectors are summed over processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from fl_lightning import metric_keys as keys
from fl_lightning.batched import stacked_losses
from fl_lightning.evaluation import as_model_input
from fl_lightning.losses import Loss
from fl_lightning.objective import ClientBatch, LocalObjective
from fl_lightning.seeding import step_seed

if TYPE_CHECKING:
    from fl_lightning.data.datamodule import FederatedDataModule
    from fl_lightning.module import FederatedLightningModule

Tensors = dict[str, Tensor]
_PERSONALIZE_STREAM = 0x9E50  # the personalization steps' minibatch stream, apart from training's


@dataclass
class ClientScores:
    """Per-client results over all n clients: mean loss ``[n]``, accuracy ``[n]`` (classification, else None)
    and the test-split sizes ``[n]``; loss and accuracy are NaN for a client without test data."""

    loss: Tensor
    acc: Tensor | None
    count: Tensor

    def statistics(self, prefix: str) -> dict[str, Tensor]:
        """``<stage>/<kind>_acc_mean/std/p10/min`` and ``_loss_mean`` (regression: ``_loss_mean/std/p90/max``;
        :data:`~fl_lightning.metric_keys.CLASSIFICATION_STATS`) over the clients with test data, for ``prefix`` =
        ``<stage>/<kind>``; empty when no client has test data."""
        valid = self.count > 0
        if not bool(valid.any()):
            return {}
        stage, kind = prefix.split("/")
        loss = self.loss[valid].double()
        values = {"loss_mean": loss.mean()}
        if self.acc is None:
            values.update(loss_std=loss.std(unbiased=False), loss_p90=torch.quantile(loss, 0.9), loss_max=loss.max())
            names = keys.REGRESSION_STATS
        else:
            acc = self.acc[valid].double()
            values.update(acc_mean=acc.mean(), acc_std=acc.std(unbiased=False), acc_p10=torch.quantile(acc, 0.1),
                          acc_min=acc.min())
            names = keys.CLASSIFICATION_STATS
        return {keys.client_metric(stage, kind, name): values[name] for name in names}

    def as_dict(self, prefix: str) -> dict[str, Tensor]:
        """The per-client vectors on the CPU: ``<prefix>_loss``, ``<prefix>_acc``, and ``count``."""
        out = {f"{prefix}_loss": self.loss.detach().cpu(), "count": self.count.detach().cpu()}
        if self.acc is not None:
            out[f"{prefix}_acc"] = self.acc.detach().cpu()
        return out


class ClientEvaluation:
    """Scores of stacked client models on the clients' test splits (see the module docstring).

    Args:
        objective: f_i (its vectorised forward and, for a LightningModule client, its ``training_step``).
        loss: the built-in or custom loss (None: the client's ``training_step`` gives the loss, no accuracy).
        personalize_steps: k, the local steps of the personalized evaluation (0: none).
        clients_per_chunk: at most this many clients per forward (None: by ``eval_batch_size``).
    """

    def __init__(self, objective: LocalObjective, loss: Loss | None, personalize_steps: int = 0,
                 clients_per_chunk: int | None = None) -> None:
        if isinstance(personalize_steps, bool) or not isinstance(personalize_steps, int) or personalize_steps < 0:
            raise ValueError(f"personalize_steps must be an integer >= 0 (0: no personalized evaluation), got "
                             f"{personalize_steps!r}")
        self.objective = objective
        self.loss = loss
        self.personalize_steps = personalize_steps
        self.clients_per_chunk = clients_per_chunk
        self._warned_empty = False

    @property
    def classification(self) -> bool:
        return self.loss is not None and self.loss.task == "classification"

    # ------------------------------------------------------------------ the whole evaluation
    def run(self, module: FederatedLightningModule, dm: FederatedDataModule,
            stage: str = "val") -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(statistics ``<stage>/client_*`` and ``<stage>/personal_*``, the per-client vectors) of ``module``'s
        clients on ``dm``'s client test splits."""
        self._warn_empty(dm)
        template = module.global_model
        was_training = template.training
        template.eval()
        try:
            scores = self._scores(module, dm, personalize=False)
            metrics = scores.statistics(f"{stage}/client")
            vectors = scores.as_dict("client")
            if self.personalize_steps:
                personal = self._scores(module, dm, personalize=True)
                metrics.update(personal.statistics(f"{stage}/personal"))
                vectors.update(personal.as_dict("personal"))
        finally:
            template.train(was_training)
        return metrics, vectors

    def _warn_empty(self, dm: FederatedDataModule) -> None:
        empty = [i for i, size in enumerate(dm.client_test_sizes.tolist()) if size == 0]
        if empty and not self._warned_empty:
            self._warned_empty = True
            rank_zero_warn(f"{len(empty)} of {dm.num_clients} clients have no test samples (clients {empty[:10]}"
                           f"{' ...' if len(empty) > 10 else ''}): they are left out of the client statistics "
                           "(NaN in module.client_metrics). A larger client_test_fraction gives them some")

    def _scores(self, module: FederatedLightningModule, dm: FederatedDataModule, *, personalize: bool) -> ClientScores:
        device = module.device
        x_all, y_all, table, counts = dm.client_test_data(device)
        ids = module.client_ids.to(device)  # this process's clients (global ids), in row order
        n = module.num_clients
        loss = torch.zeros(n, dtype=torch.float64, device=device)
        correct = torch.zeros(n, dtype=torch.float64, device=device)
        count = torch.zeros(n, dtype=torch.float64, device=device)
        for rows in self._chunks(counts[ids], dm.eval_batch_size):
            params, buffers = self._models(module, rows)
            if personalize:
                params = self._personalize(module, dm, params, buffers, ids[rows])
            chunk_loss, chunk_correct = self._score(params, buffers, x_all, y_all, table[ids[rows]],
                                                    counts[ids[rows]], module.global_model)
            loss[ids[rows]] = chunk_loss.double()
            correct[ids[rows]] = chunk_correct.double()
            count[ids[rows]] = counts[ids[rows]].double()
        loss, correct, count = module.reduce(loss), module.reduce(correct), module.reduce(count)
        empty = count == 0
        loss = loss.masked_fill(empty, float("nan"))
        acc = (correct / count).masked_fill(empty, float("nan")) if self.classification else None
        return ClientScores(loss, acc, count)

    def _chunks(self, counts: Tensor, eval_batch_size: int) -> Iterator[Tensor]:
        """Local rows in chunks of clients of similar test size, ≤ eval_batch_size samples (padded) each."""
        order = torch.argsort(counts, descending=True, stable=True)
        sizes = counts[order].tolist()
        start = 0
        while start < len(sizes):
            width = max(sizes[start], 1)
            limit = self.clients_per_chunk or max(1, eval_batch_size // width)
            end = min(len(sizes), start + limit)
            yield order[start:end]
            start = end

    # ------------------------------------------------------------------ models
    @staticmethod
    def _models(module: FederatedLightningModule, rows: Tensor) -> tuple[Tensors, Tensors]:
        """The stacked models of the local ``rows``: the evaluated global model's shared tensors (expanded views;
        ``module.evaluated_params``) and the clients' own personal ones."""
        c = len(rows)
        personal = module.personal_names
        clients = module.ensure_clients()

        def stack(name: str, value: Tensor, own: Tensor) -> Tensor:
            return own[rows] if name in personal else value.detach().unsqueeze(0).expand(c, *value.shape)

        evaluated = module.evaluated_params()  # x as clients compute with it (e.g. TopK(x) with an STE forward)
        params = {k: stack(k, v, clients.x[k]) for k, v in evaluated.items()}
        buffers = {k: stack(k, v, clients.model_buffers[k]) for k, v in module.global_model.named_buffers()}
        return params, buffers

    def _personalize(self, module: FederatedLightningModule, dm: FederatedDataModule, params: Tensors,
                     buffers: Tensors, ids: Tensor) -> Tensors:
        """k plain SGD steps of every client of the chunk on its own training minibatches (drawn from a stream
        seeded by the data seed and the round, so a resumed run draws the same)."""
        assert dm.seed is not None
        seed = step_seed(dm.seed ^ _PERSONALIZE_STREAM, module.round_index)
        lr = module.current_lr()
        dtype = next(iter(params.values())).dtype
        with torch.inference_mode(False), torch.enable_grad():  # also inside Lightning's validation loop
            w = {k: v.clone().requires_grad_() for k, v in params.items()}
            local_buffers = {k: v.clone() for k, v in buffers.items()}
            for step in range(self.personalize_steps):
                batch = dm.sample(step, ids, ids.device, dtype=dtype, seed=seed)
                batch = ClientBatch(batch.inputs.clone(), batch.targets.clone(),
                                    None if batch.mask is None else batch.mask.clone())
                losses, _ = self.objective.vectorized(w, local_buffers, batch)
                grads = torch.autograd.grad(losses.sum(), list(w.values()))
                w = {k: (v - lr * g).detach().requires_grad_() for (k, v), g in zip(w.items(), grads)}
        return {k: v.detach() for k, v in w.items()}

    # ------------------------------------------------------------------ scores
    @torch.no_grad()
    def _score(self, params: Tensors, buffers: Tensors, x_all: Tensor, y_all: Tensor, table: Tensor,
               counts: Tensor, model: nn.Module) -> tuple[Tensor, Tensor]:
        """(mean loss [c], correct predictions [c]) of the stacked models on their clients' test samples."""
        c, width = table.shape
        flat = table.reshape(-1)
        inputs = x_all.index_select(0, flat).view(c, width, *x_all.shape[1:])
        targets = y_all.index_select(0, flat).view(c, width, *y_all.shape[1:])
        inputs = as_model_input(model, inputs)
        if targets.is_floating_point():
            targets = targets.to(next(iter(params.values())).dtype)
        nan = torch.tensor(float("nan"), device=table.device)
        mask = torch.arange(width, device=table.device).unsqueeze(0) < counts.unsqueeze(1)
        if self.loss is None:  # the client's training_step gives the loss: one call per client
            return self._loss_per_client(params, buffers, inputs, targets, counts, nan), counts * 0
        outputs = self.objective.outputs(params, buffers, inputs)
        if self.loss.supports_padding:
            losses = stacked_losses(self.loss, outputs, targets, mask)
        else:  # a custom callable takes unpadded batches only
            losses = torch.stack([self.loss(outputs[i, :m], targets[i, :m]) if m else nan.to(outputs.dtype)
                                  for i, m in enumerate(counts.tolist())])
        correct = ((outputs.argmax(-1) == targets) & mask).sum(1) if self.classification else counts * 0
        return losses, correct

    def _loss_per_client(self, params: Tensors, buffers: Tensors, inputs: Tensor, targets: Tensor,
                         counts: Tensor, nan: Tensor) -> Tensor:
        out = []
        for i, m in enumerate(counts.tolist()):
            if m == 0:
                out.append(nan)
                continue
            loss, _ = self.objective.single({k: v[i] for k, v in params.items()},
                                            {k: v[i] for k, v in buffers.items()}, inputs[i, :m], targets[i, :m])
            out.append(loss.detach().to(nan.dtype))
        return torch.stack(out)


__all__ = ["ClientEvaluation", "ClientScores"]
