"""``FederatedLightningModule``: n virtual clients inside one LightningModule (DESIGN §2.1).

One ``training_step`` is one local step of every participating client (DESIGN §1.2, the lines up to
θ_t); when the :class:`~fl_lightning.callbacks.SkipSchedule` coin comes up, the same step ends with a
communication round whose stages call the hooks of :class:`~fl_lightning.callbacks.FederatedCallback`.
Without callbacks that change them, the round is FedAvg's: x_i ← Σ_j w_j x̂_j.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from torchmetrics import MeanMetric

import fl_lightning.strategy  # noqa: F401  (registers Trainer(strategy="federated_ddp"))
from fl_lightning.algorithms import resolve_algorithm
from fl_lightning.callbacks.base import FederatedCallback
from fl_lightning.callbacks.divergence import DivergenceError
from fl_lightning.callbacks.schedule import SkipSchedule
from fl_lightning.clients import ClientState, TensorGroup
from fl_lightning.comm import ENCODINGS, CommCounter, Encoding, encoded_bits, message_bits
from fl_lightning.hparams import given_init_config, to_plain
from fl_lightning.losses import LossCallable, resolve_loss
from fl_lightning.objective import ClientBatch, LocalObjective, shadow_log
from fl_lightning.ops import density, nonzeros
from fl_lightning.optim import (
    OptimizerSpec,
    build_local_optimizer,
    build_lr_scheduler,
    client_optimizer_spec,
    optimizer_class,
    split_spec,
)
from fl_lightning.round import Round, Tensors

if TYPE_CHECKING:
    from fl_lightning.algorithms import Algorithm
    from fl_lightning.data.datamodule import FederatedDataModule

Vectorize = bool | Literal["auto"]


def _check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
            or not (value >= 0 if allow_zero else value > 0)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value!r}")


class FederatedLightningModule(LightningModule):
    """Simulates the clients of a federated algorithm, vectorised over a leading client dimension.

    Args:
        client_model: the model every client trains: an ``nn.Module`` (then give ``loss``) or a
            LightningModule whose ``training_step(batch, batch_idx)`` returns the loss (used unchanged;
            its ``self.log`` values are collected and logged as ``train/<name>``, averaged over clients).
        lr: the local step size γ (plain SGD).
        loss: ``"cross_entropy"``, ``"mse"`` or a callable ``(output, target) -> scalar``.
        vectorize: ``True`` runs all clients in one ``torch.func.vmap`` call, ``False`` loops over clients,
            ``"auto"`` vectorises when the model allows it (no BatchNorm running statistics, no custom loss
            on padded full batches) and falls back to the loop otherwise.
        clients_per_chunk: at most this many clients per forward/backward (bounds activation memory).
        algorithm: an :class:`~fl_lightning.algorithms.Algorithm` preset whose callbacks are added to the
            Trainer's (``configure_callbacks``). Callbacks can also be given to the Trainer directly.
        momentum, weight_decay: of the default local optimizer, SGD (momentum is per client; it interacts
            with the control variates, so the theory's default is 0).
        optimizer: the local optimizer instead of SGD, elementwise over the stacked clients: a
            ``torch.optim`` class name (``"Adam"``) or ``{"class_path": ..., "init_args": {...}}``
            (:mod:`fl_lightning.optim`; LightningCLI's ``--optimizer Adam`` sets it). Its step size is ``lr``.
            Default: the client LightningModule's own ``configure_optimizers`` if it has one, else SGD.
        encoding: how message bits are counted: ``auto`` (the smallest), ``dense``, ``coo``, ``bitmask``.
        eval_every: also evaluate the global model on the held-out split after every ``eval_every``
            rounds (logged at that step); the usual Lightning validation loop runs as configured.
        num_clients: allocate client state now rather than from the datamodule at ``setup``.
        check_finite: stop training with a :class:`~fl_lightning.callbacks.DivergenceError` when the loss is
            NaN/Inf, checked at every logging step and round and before every checkpoint (one host
            synchronisation each; :class:`~fl_lightning.callbacks.DivergenceGuard` also checks the weights).

    Hyper-parameters are saved as plain Python values: the preset as ``{"class_path", "init_args"}``
    (:meth:`~fl_lightning.algorithms.Algorithm.spec`), and the client model's config when LightningCLI built
    the module, so ``--ckpt_path`` and ``load_from_checkpoint`` re-create it (from Python, pass
    ``client_model=`` to ``load_from_checkpoint``).
    """

    def __init__(
        self,
        client_model: nn.Module,
        lr: float = 0.1,
        loss: str | LossCallable | None = None,
        vectorize: Vectorize = "auto",
        clients_per_chunk: int | None = None,
        algorithm: Algorithm | None = None,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        encoding: Encoding = "auto",
        eval_every: int | None = None,
        num_clients: int | None = None,
        optimizer: OptimizerSpec | None = None,
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(client_model, nn.Module):
            raise TypeError(f"client_model must be an nn.Module, got {type(client_model).__name__}")
        lr, momentum, weight_decay = to_plain(lr), to_plain(momentum), to_plain(weight_decay)  # NumPy scalars too
        _check_positive("lr", lr)
        _check_positive("weight_decay", weight_decay, allow_zero=True)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
        if vectorize not in (True, False, "auto"):
            raise ValueError(f"vectorize must be true, false or 'auto', got {vectorize!r}")
        if clients_per_chunk is not None and clients_per_chunk < 1:
            raise ValueError(f"clients_per_chunk must be >= 1 (or null for all), got {clients_per_chunk!r}")
        if eval_every is not None and eval_every < 1:
            raise ValueError(f"eval_every must be >= 1 rounds (or null), got {eval_every!r}")
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
        algorithm = resolve_algorithm(algorithm)  # also a preset name or a spec dict (a checkpoint's)
        self.save_hyperparameters(ignore=["client_model", "loss", "algorithm"])
        # a second call merges into hparams *and* hparams_initial (what the loggers write), all plain values
        plain: dict[str, Any] = {k: to_plain(v) for k, v in self.hparams.items()}
        plain["loss"] = loss if isinstance(loss, str) or loss is None else None  # a callable is passed again
        plain["algorithm"] = None if algorithm is None else algorithm.spec()
        given = given_init_config()
        if given is not None and isinstance(given.get("client_model"), Mapping):
            plain["client_model"] = to_plain(given["client_model"])  # LightningCLI's class_path/init_args
        self.save_hyperparameters(plain)
        self.automatic_optimization = False
        self.check_finite = bool(check_finite)
        self._optimizer_spec: OptimizerSpec | None = None
        self._scheduler_spec: OptimizerSpec | None = None
        self.set_local_optimizer(optimizer)  # an unsupported optimizer fails here

        self.lr = float(lr)
        self.vectorize = vectorize
        self.clients_per_chunk = clients_per_chunk
        self.algorithm = algorithm
        self.encoding: Encoding = encoding
        self.eval_every = eval_every

        self.global_model = copy.deepcopy(client_model)
        self.global_model.requires_grad_(False)
        self._client_optimizer = client_optimizer_spec(self.global_model)
        self.loss_fn = resolve_loss(loss)
        self.objective = LocalObjective(self.global_model, self.loss_fn)
        self.clients: ClientState | None = None
        self.comm = CommCounter()
        self.val_loss, self.val_acc = MeanMetric(), MeanMetric()
        self.test_loss, self.test_acc = MeanMetric(), MeanMetric()
        self.register_buffer("client_weights", torch.empty(0, dtype=torch.float64), persistent=False)
        self.register_buffer("client_ids", torch.empty(0, dtype=torch.long), persistent=False)
        self._num_clients_total: int | None = None
        self._client_log_names: list[str] | None = None  # names the client model logs (several processes)

        self.round_index = 0
        self.active_clients: Tensor | None = None  # local rows of the participating clients (None = all)
        self._active_global: Tensor | None = None  # their global ids (for data sampling)
        self._active_list: list[int] | None = None  # the whole cohort's global ids (None = everyone)
        self._round_open = False
        self._vectorized: bool | None = None
        self._vmap_proven = False  # "auto": a vectorised step has run in this process
        self._checkpoint_lr: float | None = None  # the lr of the checkpoint being resumed from
        self._finite: Tensor | None = None  # device flag: every loss since the last check was finite
        self.round_metrics: dict[str, Tensor] = {}
        self.final_metrics: dict[str, float] = {}  # the run's result, set when training ends
        self.federated_callbacks: list[FederatedCallback] = []
        self.schedule: SkipSchedule | None = None
        if num_clients is not None:
            self._init_clients(num_clients)

    # ------------------------------------------------------------------ set-up
    def _init_clients(self, n: int) -> None:
        """Allocate this process's clients out of ``n``: all of them, or the shard the strategy assigns
        (``strategy.client_shard(n) -> list of global ids``, for clients spread over ranks)."""
        shard = getattr(self._trainer.strategy, "client_shard", None) if self._trainer is not None else None
        ids = list(range(n)) if shard is None else list(shard(n))
        self._num_clients_total = n
        self.client_ids = torch.tensor(ids, dtype=torch.long, device=self.client_ids.device)
        self.clients = ClientState(self.global_model, len(ids))
        self.client_weights = torch.full((n,), 1.0 / n, dtype=torch.float64, device=self.client_weights.device)

    def _datamodule(self) -> FederatedDataModule:
        from fl_lightning.data.datamodule import FederatedDataModule

        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if not isinstance(dm, FederatedDataModule):
            raise TypeError(
                "FederatedLightningModule needs a FederatedDataModule: trainer.fit(model, datamodule=...) "
                f"(got {type(dm).__name__})"
            )
        return dm

    def ensure_clients(self) -> ClientState:
        """The stacked client state, allocated from the datamodule's number of clients on first use."""
        if self.clients is None:
            self._init_clients(self._datamodule().num_clients)
        assert self.clients is not None
        return self.clients

    def add_client_state(self, name: str, *, dtype: torch.dtype | None = None, fill: float = 0.0) -> TensorGroup:
        """Per-client state shaped like the model (control variates, masks), saved in checkpoints."""
        return self.ensure_clients().add(name, dtype=dtype, fill=fill)

    def configure_callbacks(self) -> list[Any]:
        return [] if self.algorithm is None else self.algorithm.callbacks()

    def setup(self, stage: str) -> None:
        dm = self._datamodule()
        self.ensure_clients()
        if self.num_clients != dm.num_clients:
            raise ValueError(f"the module holds {self.num_clients} clients but the datamodule has {dm.num_clients}")
        self.client_weights = dm.client_weights.to(self.client_weights.device)
        callbacks = self.trainer.callbacks
        self.federated_callbacks = [cb for cb in callbacks if isinstance(cb, FederatedCallback)]
        schedules = [cb for cb in callbacks if isinstance(cb, SkipSchedule)]
        if len(schedules) > 1:
            raise ValueError(f"got {len(schedules)} SkipSchedule callbacks; keep exactly one")
        self.schedule = schedules[0] if schedules else None
        others = [type(cb).__name__ for cb in self.federated_callbacks
                  if not isinstance(cb, SkipSchedule) and getattr(cb, "requires_schedule", True)]
        if self.schedule is None and others:
            verb = "needs" if len(others) == 1 else "need"
            raise ValueError(f"{', '.join(others)} {verb} a communication schedule: add a SkipSchedule callback")
        if self.schedule is None and stage == "fit":
            rank_zero_warn("no SkipSchedule callback: clients train independently and never communicate")
        if self.loss_fn is not None and self.loss_fn.task == "classification" and dm.num_classes is None:
            raise ValueError("loss='cross_entropy' needs a classification dataset (integer labels)")
        self._vectorized = self._choose_path(dm)

    def _choose_path(self, dm: FederatedDataModule) -> bool:
        from fl_lightning.models.inspect import is_vmappable

        if self.vectorize is False:
            return False
        ok, layer = is_vmappable(self.global_model)
        reasons = [] if ok else [f"layer {layer} cannot run under vmap in training"]
        if dm.padded and not self.objective.supports_padding:
            reasons.append("full-batch steps on clients of unequal sizes need a built-in loss to be vectorised")
        if not reasons:
            return True
        if self.vectorize is True:
            raise ValueError(f"vectorize=True is impossible: {'; '.join(reasons)}. Use vectorize: auto or false")
        rank_zero_warn(f"using the sequential client loop: {'; '.join(reasons)}")
        return False

    def on_train_start(self) -> None:
        # Lightning restores a checkpoint after ``setup``: the datamodule's partition (so w_i) and the round
        # metrics may have changed since, and the module has moved to its device.
        self.client_weights = self._datamodule().client_weights.to(self.client_weights.device)
        self.round_metrics = {k: v.to(self.device) for k, v in self.round_metrics.items()}
        self._client_log_names = None  # agreed again at this fit's first logging step (see _client_log_values)
        self._finite = None
        # fit(ckpt_path=...) restores the optimizer state, lr included, after configure_optimizers used this
        # module's lr: a module built with another lr than the checkpoint's means "resume with this lr" (the
        # way out of a divergence: lower lr, resume from the last good checkpoint)
        saved, self._checkpoint_lr = self._checkpoint_lr, None
        if saved is not None and saved != self.lr and self.trainer.optimizers:
            for group in self.trainer.optimizers[0].param_groups:
                group["lr"] = self.lr
            rank_zero_info(f"resumed with lr={self.lr} (the checkpoint's was {saved})")

    def set_local_optimizer(self, optimizer: OptimizerSpec | None, lr_scheduler: OptimizerSpec | None = None) -> None:
        """Use this local optimizer (see ``optimizer`` in the class docs) and LR scheduler (a
        ``torch.optim.lr_scheduler`` class, stepped after every local step) from the next ``fit`` on; this is
        what LightningCLI's ``--optimizer`` / ``--lr_scheduler`` do (:class:`~fl_lightning.cli.FederatedCLI`)."""
        if optimizer is not None:
            optimizer_class(split_spec(optimizer)[0])
        self._optimizer_spec = to_plain(optimizer)
        self._scheduler_spec = to_plain(lr_scheduler)

    def configure_optimizers(self) -> Any:
        """The local optimizer over the stacked client parameters (:func:`~fl_lightning.optim.build_local_optimizer`):
        ``optimizer`` if given, else the client model's own ``configure_optimizers``, else SGD."""
        clients = self.ensure_clients()
        spec, from_client = self._optimizer_spec, False
        if spec is None and self._client_optimizer is not None:
            spec, from_client = self._client_optimizer, True
        elif spec is not None and self._client_optimizer is not None:
            rank_zero_info(f"the client model's configure_optimizers is replaced by the optimizer {spec!r}")
        optimizer = build_local_optimizer(spec, clients.x.parameters(), lr=self.lr, momentum=self.hparams.momentum,
                                          weight_decay=self.hparams.weight_decay, chosen_by_client=from_client)
        scheduler = build_lr_scheduler(self._scheduler_spec, optimizer)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def current_lr(self) -> float:
        """γ of the current step (an LR scheduler may change it)."""
        if self._trainer is not None and self.trainer.optimizers:
            return float(self.trainer.optimizers[0].param_groups[0]["lr"])
        return self.lr

    @property
    def num_clients(self) -> int:
        """n, the number of clients of the federation (over all processes)."""
        self.ensure_clients()
        assert self._num_clients_total is not None
        return self._num_clients_total

    @property
    def distributed(self) -> bool:
        return self._trainer is not None and self.trainer.world_size > 1

    def _reduce(self, tensor: Tensor, op: str = "sum") -> Tensor:
        """Σ (or max) over the processes' client shards; the identity on one process."""
        if not self.distributed:
            return tensor
        return self.trainer.strategy.reduce(tensor, reduce_op=op)

    # ------------------------------------------------------------------ local step
    def set_active_clients(self, clients: list[int] | None) -> None:
        """Restrict the next local steps to these clients (global ids: a cohort); None = all clients."""
        if clients is None:
            self.active_clients = self._active_global = self._active_list = None
            return
        self._active_list = sorted(int(i) for i in clients)
        ids = self.client_ids.tolist()
        cohort = set(self._active_list)
        rows = [r for r, i in enumerate(ids) if i in cohort]
        self.active_clients = torch.tensor(rows, device=self.device, dtype=torch.long)
        self._active_global = torch.tensor([ids[r] for r in rows], device=self.device, dtype=torch.long)

    def _client_slice(self, tensors: TensorGroup, start: int, end: int) -> Tensors:
        if self.active_clients is None:  # the whole stack is not sliced: a slice's backward zero-fills [n, ...]
            return {k: v if start == 0 and end == v.shape[0] else v[start:end] for k, v in tensors.items()}
        idx = self.active_clients[start:end]
        return {k: v[idx] for k, v in tensors.items()}

    def _add_leaf_grads(self, leaves: Tensors, rows: Tensor | slice) -> None:
        """x.grad[rows] += the gradients autograd left on ``leaves`` (detached copies or views of those rows).

        Running a client (chunk) on leaves rather than on slices of the stacked parameters keeps the backward
        from building a zero-filled full-size [n, ...] gradient for every client (chunk): O(n·d), not O(n²·d)."""
        for k, x in self.ensure_clients().x.items():
            if x.grad is None:
                x.grad = torch.zeros_like(x)
            g = leaves[k].grad
            if g is None:
                continue
            if isinstance(rows, slice):
                x.grad[rows].add_(g)
            else:
                x.grad.index_add_(0, rows, g)

    def _transformed(self, params: Tensors) -> Tensors:
        for cb in self.federated_callbacks:
            params = cb.transform_params(self.trainer, self, params)
        return params

    def _chunks(self, c: int) -> Iterator[tuple[int, int]]:
        size = self.clients_per_chunk or c
        for start in range(0, c, size):
            yield start, min(c, start + size)

    def _vectorized_backward(self, batch: ClientBatch) -> tuple[Tensor, dict[str, Tensor]]:
        clients = self.ensure_clients()
        chunks = list(self._chunks(len(batch)))
        losses, logs = [], []
        for s, e in chunks:
            stacked = self._client_slice(clients.x, s, e)
            if len(chunks) > 1:
                stacked = {k: v.detach().requires_grad_() for k, v in stacked.items()}
            params = self._transformed(stacked)
            buffers = self._client_slice(clients.model_buffers, s, e)
            sub = ClientBatch(batch.inputs[s:e], batch.targets[s:e], None if batch.mask is None else batch.mask[s:e])
            loss, logged = self.objective.vectorized(params, buffers, sub)
            self.manual_backward(loss.sum())
            if len(chunks) > 1:
                rows = slice(s, e) if self.active_clients is None else self.active_clients[s:e]
                self._add_leaf_grads(stacked, rows)
            losses.append(loss.detach())
            logs.append(logged)
        return torch.cat(losses), {k: torch.cat([lg[k] for lg in logs]) for k in logs[0]}

    def _sequential_backward(self, batch: ClientBatch) -> tuple[Tensor, dict[str, Tensor]]:
        clients = self.ensure_clients()
        rows = self.active_clients.tolist() if self.active_clients is not None else range(clients.num_clients)
        losses, logs = [], []
        for j, cid in enumerate(rows):
            leaves = {k: p[cid : cid + 1].detach().requires_grad_() for k, p in clients.x.items()}
            params = {k: v[0] for k, v in self._transformed(leaves).items()}
            buffers = {k: b[cid] for k, b in clients.model_buffers.items()}  # views: BatchNorm updates in place
            x, y = batch.client(j)
            loss, logged = self.objective.single(params, buffers, x, y)
            self.manual_backward(loss)
            self._add_leaf_grads(leaves, slice(cid, cid + 1))
            losses.append(loss.detach())
            logs.append(logged)
        return torch.stack(losses), {k: torch.stack([lg[k] for lg in logs]) for k in logs[0]}

    def _forward_backward(self, batch: ClientBatch) -> tuple[Tensor, dict[str, Tensor]]:
        if len(batch) == 0:  # none of this process's clients is in the cohort
            for p in self.ensure_clients().x.values():  # zero gradients, as the idle rows get on one process:
                p.grad = torch.zeros_like(p)  # momentum and weight decay then act the same on any number of ranks
            return batch.inputs.new_zeros(0), {}
        if self._vectorized is None:
            self._vectorized = self._choose_path(self._datamodule())
        if not self._vectorized:
            return self._sequential_backward(batch)
        if self.vectorize is True or self._vmap_proven:
            return self._vectorized_backward(batch)
        try:  # "auto": the first step of this process (also after a resume) proves the model runs under vmap
            result = self._vectorized_backward(batch)
        except Exception as err:  # any vmap failure means: use the loop
            for p in self.ensure_clients().x.values():
                p.grad = None
            rank_zero_warn(f"vectorised step failed ({type(err).__name__}: {err}); using the sequential loop")
            self._vectorized = False
            return self._sequential_backward(batch)
        self._vmap_proven = True
        return result

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        dm = self._datamodule()
        if not self._round_open:
            for cb in self.federated_callbacks:
                cb.on_round_start(self.trainer, self, self.round_index)
            self._round_open = True
        client_batch = dm.sample(self.global_step, self._sampled_ids(), self.device,
                                 dtype=next(iter(self.ensure_clients().x.values())).dtype)
        opt = self.optimizers()
        opt.zero_grad()
        losses, client_logs = self._forward_backward(client_batch)
        opt.step()
        for cb in self.federated_callbacks:
            cb.on_local_step_end(self.trainer, self)
        weights = self._round_weights()
        loss = self._reduce(torch.dot(weights.to(losses.dtype), losses))
        communicated = self.schedule is not None and self.schedule.step()
        if communicated:
            with torch.no_grad():
                self._communicate(weights)
            self._round_open = False
        logging = self._logging_step()
        if self.check_finite:
            finite = torch.isfinite(loss.detach())
            self._finite = finite if self._finite is None else self._finite & finite
            if logging or communicated:
                self.assert_finite()
        if logging:
            self._log_step_metrics(loss, weights, client_logs)
        scheduler = self.lr_schedulers() if self._scheduler_spec is not None else None
        if scheduler is not None:  # manual optimisation: the module steps it, after the round used this step's γ
            scheduler.step()  # type: ignore[union-attr]
        return loss

    def assert_finite(self, context: str = "") -> None:
        """Raise :class:`~fl_lightning.callbacks.DivergenceError` if a training loss since the last check was
        NaN/Inf (one host synchronisation); the message names the step, the round and the lr to lower."""
        bad = self._finite is not None and not bool(self._finite)
        self._finite = None
        if not bad:
            return
        raise DivergenceError(
            f"training diverged: the loss became NaN/Inf by step {self.global_step} (round {self.round_index}). "
            f"Lower the learning rate (lr={self.current_lr():g}, --model.lr) and start again, or resume with the "
            f"lower lr from the last good checkpoint (--ckpt_path last){context}"
        )

    def _logging_step(self) -> bool:
        """Whether the loggers write this step (``Trainer(log_every_n_steps=...)``): ``self.log`` costs
        about a millisecond per metric, so the per-step metrics are only handed over when they are used."""
        connector = getattr(self.trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True)) or self.trainer.fast_dev_run

    def _log_step_metrics(self, loss: Tensor, weights: Tensor, client_logs: dict[str, Tensor]) -> None:
        metrics = {"train/loss": loss, "comm/rounds": self.comm.rounds.float(),
                   "comm/bits_up": self.comm.bits_up, "comm/bits_down": self.comm.bits_down,
                   **self.round_metrics,
                   **{f"train/{k}": v for k, v in self._client_log_values(weights, client_logs).items()}}
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        self.log_dict({"round": float(self.round_index), "loss": loss}, prog_bar=True, on_step=True,
                      on_epoch=False, batch_size=1, logger=False)

    def _client_log_values(self, weights: Tensor, client_logs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Σ_i w_i v_i over all n clients (every process's) of each value the client model logs.

        Under several processes the names are agreed once per fit, at its first logging step (the same step on
        every rank), so that a rank without participating clients (no values) still joins the all-reduce."""
        if not self.distributed:
            return {k: torch.dot(weights.to(v.dtype), v) for k, v in client_logs.items()}
        if not self.objective.uses_training_step:  # forward + loss: the client model logs nothing
            return {}
        if self._client_log_names is None:
            everyone: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(everyone, sorted(client_logs))
            self._client_log_names = sorted(set().union(*everyone))
        if not self._client_log_names:
            return {}
        local = [torch.dot(weights.float(), client_logs[k].float()) if k in client_logs
                 else torch.zeros((), device=weights.device) for k in self._client_log_names]
        return dict(zip(self._client_log_names, self._reduce(torch.stack(local)).unbind()))

    def _sampled_ids(self) -> Tensor | None:
        """Global ids of the clients that step now (None = all n, on one process)."""
        if self._active_global is not None:
            return self._active_global
        return None if len(self.client_ids) == self.num_clients else self.client_ids

    def _round_weights(self) -> Tensor:
        """w_i of this process's participating clients, normalised over the whole cohort (Σ = 1 over ranks)."""
        local = self.client_weights[self.client_ids]
        if self.active_clients is None:
            return local / self.client_weights.sum()
        assert self._active_list is not None
        total = self.client_weights[self._active_list].sum()
        return local[self.active_clients] / total

    def on_train_end(self) -> None:
        """Record the run's result in ``final_metrics`` and write it to the loggers whatever
        ``log_every_n_steps`` is: counters, round metrics and the global model's held-out metrics (so a run's
        last logged row is its result)."""
        if self.check_finite:
            self.assert_finite()  # a run never ends quietly with a NaN loss
        metrics = {"comm/rounds": self.comm.rounds.float(), "comm/bits_up": self.comm.bits_up,
                   "comm/bits_down": self.comm.bits_down, **self.round_metrics}
        if self._datamodule().has_eval_data:
            metrics.update(self.evaluate_global())
        values = {k: float(v) for k, v in metrics.items()}
        self.final_metrics = values
        for logger in self.loggers:
            logger.log_metrics(values, step=max(self.global_step - 1, 0))
            logger.save()

    # ------------------------------------------------------------------ communication round
    def _call(self, hook: str, rnd: Round) -> None:
        for cb in self.federated_callbacks:
            getattr(cb, hook)(self.trainer, self, rnd)

    def _communicate(self, weights: Tensor) -> None:
        """One communication round, DESIGN §1.2 (the ``θ_t = 1`` branch)."""
        clients = self.ensure_clients()
        idx = self.active_clients
        local = {k: (x if idx is None else x[idx]).detach() for k, x in clients.x.items()}
        rnd = Round(self.round_index, self.global_step, idx, weights, local, {})
        self._call("on_before_uplink", rnd)
        rnd.uplink = dict(rnd.local)  # hooks replace entries (see Round), so no copy of every x̂_i is needed
        self._call("on_uplink", rnd)
        self._call("on_compress_uplink", rnd)
        # non-zeros of every x̂_i (one pass over the stacked models), for the clients' density and, when no hook
        # changed the uplink (u_i = x̂_i, as when clients prune), for its bits too
        idle = len(weights) == 0  # none of this process's clients is in the cohort
        local_nnz, d = (weights.new_zeros(0), 1) if idle else nonzeros(rnd.local, stacked=True)
        if rnd.uplink_bits is not None:
            up_bits = rnd.uplink_bits
        elif idle:
            up_bits = torch.zeros(0, dtype=torch.float64, device=weights.device)
        elif all(rnd.uplink[k] is v for k, v in rnd.local.items()):
            up_bits = encoded_bits(local_nnz, d, self.encoding)
        else:
            up_bits = message_bits(rnd.uplink, self.encoding, stacked=True)
        rnd.mean = {k: self._reduce(torch.tensordot(weights.to(u.dtype), u, dims=1)) for k, u in rnd.uplink.items()}
        rnd.server = dict(rnd.mean)
        self._call("on_aggregate", rnd)
        rnd.broadcast = dict(rnd.server)
        rnd.receivers = len(self._active_list) if self._active_list is not None else self.num_clients
        self._call("on_broadcast", rnd)
        down_bits = rnd.downlink_bits if rnd.downlink_bits is not None else message_bits(
            rnd.broadcast, self.encoding, stacked=False) * rnd.receivers
        rnd.received = dict(rnd.broadcast)
        self._call("on_receive", rnd)
        local_density = self._reduce(  # Σ_i w_i nnz(x̂_i) / d
            torch.zeros((), device=weights.device) if idle else torch.dot(weights.float(), local_nnz.float() / d))

        global_params = dict(self.global_model.named_parameters())
        for k, x in clients.x.items():
            x.copy_(rnd.received[k].unsqueeze(0).expand_as(x))
            global_params[k].copy_(rnd.received[k])
        self._average_buffers(weights)
        self.comm.record(self._reduce(up_bits.sum()), down_bits)
        self.round_index += 1
        self._call("on_round_end", rnd)
        self.round_metrics["sparsity/density"] = density(rnd.received, stacked=False)
        self.round_metrics["sparsity/client_density"] = local_density
        if self.eval_every is not None and self.round_index % self.eval_every == 0:
            self.round_metrics.update(self.evaluate_global())

    def _average_buffers(self, weights: Tensor) -> None:
        """Client model buffers (e.g. BatchNorm statistics) are averaged like the parameters."""
        clients = self.ensure_clients()
        global_buffers = dict(self.global_model.named_buffers())
        idx = self.active_clients
        for k, b in clients.model_buffers.items():
            part = b if idx is None else b[idx]
            if b.is_floating_point():
                value = self._reduce(torch.tensordot(weights.to(b.dtype), part, dims=1))
            else:
                value = self._reduce(part.max(dim=0).values, op="max")
            b.copy_(value.unsqueeze(0).expand_as(b))
            global_buffers[k].copy_(value)

    # ------------------------------------------------------------------ evaluation of the global model
    def _eval_batch(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor | None]:
        dtype = next(iter(self.global_model.parameters())).dtype
        x = x.to(dtype) if x.is_floating_point() else x
        if self.loss_fn is None:
            return self.objective.evaluate(self.global_model, x, y), None
        out = self.global_model(x)
        loss = self.loss_fn(out, y)
        acc = (out.argmax(-1) == y).float().mean() if self.loss_fn.task == "classification" else None
        return loss, acc

    def forward(self, x: Tensor) -> Tensor:
        """The global model's output."""
        return self.global_model(x)

    def _client_eval_step(self, hook: str, batch: Any, batch_idx: int) -> bool:
        """Run the client LightningModule's own ``validation_step`` / ``test_step`` on the global model, its
        ``self.log`` going to this module's; False when it has none."""
        model = self.global_model
        if not (isinstance(model, LightningModule) and is_overridden(hook, model, LightningModule)):
            return False
        with shadow_log(model, self.log):
            getattr(model, hook)(batch, batch_idx)
        return True

    def _eval_step(self, prefix: str, batch: tuple[Tensor, Tensor], metrics: tuple[MeanMetric, MeanMetric]) -> None:
        x, y = batch
        loss, acc = self._eval_batch(x, y)
        metrics[0].update(loss, weight=len(y))
        self.log(f"{prefix}/loss", metrics[0], prog_bar=True, batch_size=len(y))
        if acc is not None:
            metrics[1].update(acc, weight=len(y))
            self.log(f"{prefix}/acc", metrics[1], prog_bar=True, batch_size=len(y))

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """``val/loss`` (and ``val/acc``) of the global model, or the client model's own ``validation_step``."""
        if not self._client_eval_step("validation_step", batch, batch_idx):
            self._eval_step("val", batch, (self.val_loss, self.val_acc))

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """``test/loss`` (and ``test/acc``) of the global model on the test split, or the client model's own
        ``test_step``."""
        if not self._client_eval_step("test_step", batch, batch_idx):
            self._eval_step("test", batch, (self.test_loss, self.test_acc))

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """The global model's outputs for the inputs of ``batch`` (``x`` or ``(x, y)``)."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        dtype = next(iter(self.global_model.parameters())).dtype
        return self.global_model(x.to(dtype) if x.is_floating_point() else x)

    def _warn_if_untrained(self) -> None:
        if self.global_step == 0 and self._trainer is not None and self.trainer.ckpt_path is None:
            rank_zero_warn(
                f"{self.trainer.state.fn.value} of an untrained model (no checkpoint given): the metrics are those of "
                "the initial weights. Pass a checkpoint (--ckpt_path last, or a path) to evaluate a trained one"
            )

    def on_validation_start(self) -> None:
        if self.trainer.state.fn == "validate":
            self._warn_if_untrained()

    def on_test_start(self) -> None:
        self._warn_if_untrained()

    def on_predict_start(self) -> None:
        self._warn_if_untrained()

    @torch.no_grad()
    def evaluate_global(self, datamodule: FederatedDataModule | None = None) -> dict[str, Tensor]:
        """Loss (and accuracy) of the global model on the held-out split of ``datamodule`` (default: the
        Trainer's)."""
        dm = datamodule if datamodule is not None else self._datamodule()
        was_training = self.global_model.training
        self.global_model.eval()
        total_loss = total_acc = torch.zeros((), device=self.device)
        count = 0
        for x, y in dm.eval_batches(self.device):
            loss, acc = self._eval_batch(x, y)
            total_loss = total_loss + loss * len(y)
            if acc is not None:
                total_acc = total_acc + acc * len(y)
            count += len(y)
        self.global_model.train(was_training)
        metrics = {"val/loss": total_loss / max(count, 1)}
        if self.loss_fn is not None and self.loss_fn.task == "classification":
            metrics["val/acc"] = total_acc / max(count, 1)
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.check_finite and self._trainer is not None and self.trainer.state.status != TrainerStatus.INTERRUPTED:
            self.assert_finite("; this checkpoint was not written")  # never a diverged checkpoint (as last.ckpt)
        checkpoint["federated"] = {"round_index": self.round_index, "round_open": self._round_open,
                                   "active_clients": self._active_list,
                                   "round_metrics": {k: v.detach().cpu() for k, v in self.round_metrics.items()}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        if self.clients is None:
            first = next(k for k in state if k.startswith("clients.x."))
            self._init_clients(state[first].shape[0])
        assert self.clients is not None
        self.clients.allocate_from_state_dict(state, "clients.")
        self._select_shard(state)
        fed = checkpoint.get("federated", {})
        self.round_index = fed.get("round_index", 0)
        self._round_open = fed.get("round_open", False)
        self.set_active_clients(fed.get("active_clients"))
        self.round_metrics = dict(fed.get("round_metrics", {}))
        self._checkpoint_lr = checkpoint.get("hyper_parameters", {}).get("lr")

    def _select_shard(self, state: dict[str, Tensor]) -> None:
        """Checkpoints hold all n clients; keep the rows of this process's shard (in place)."""
        if len(self.client_ids) == self.num_clients and self.client_ids.tolist() == list(range(self.num_clients)):
            return
        ids = self.client_ids.cpu()
        for key, value in state.items():
            if key.startswith("clients.") and value.dim() > 0 and value.shape[0] == self.num_clients:
                state[key] = value[ids]

    def client_model_params(self, i: int) -> Tensors:
        """Client i's current parameters x_i (views into the stacked state)."""
        return {k: v[i].detach() for k, v in self.ensure_clients().x.items()}

