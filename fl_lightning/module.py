"""``FederatedLightningModule``: n virtual clients inside one LightningModule (DESIGN §2.1).

One ``training_step`` is one local step of every participating client (DESIGN §1.2, the lines up to θ_t: the
forward/backward of :mod:`fl_lightning.local_step`); when the :class:`~fl_lightning.callbacks.SkipSchedule` coin
comes up, the same step ends with a communication round (:func:`fl_lightning.round.communicate`) whose stages call
the hooks of :class:`~fl_lightning.callbacks.FederatedCallback`. Without callbacks that change them, the round is
FedAvg's: x_i ← Σ_j w_j x̂_j. This file holds the Lightning hooks and the state; ``docs/extending.md`` says what
a callback may read and replace.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

import fl_lightning.strategy  # noqa: F401  (registers Trainer(strategy="federated_ddp"))
from fl_lightning import metric_keys as keys
from fl_lightning.algorithms import algorithm_class_of, resolve_algorithm
from fl_lightning.callbacks.base import FederatedCallback
from fl_lightning.callbacks.divergence import DivergenceError
from fl_lightning.callbacks.schedule import SkipSchedule, communication_schedule
from fl_lightning.client_evaluation import ClientEvaluation
from fl_lightning.clients import ClientState, TensorGroup, select_rows
from fl_lightning.cohort import Cohort, make_cohort
from fl_lightning.comm import CommCounter, Encoding
from fl_lightning.evaluation import GlobalEvaluation, as_model_input, warn_if_untrained
from fl_lightning.fused import fused_blocker
from fl_lightning.hparams import check_module_args, given_init_config, to_plain
from fl_lightning.local_step import CompileStep, HeldRows, LocalStep, Vectorize
from fl_lightning.loggers import log_client_histograms
from fl_lightning.losses import LossCallable, resolve_loss
from fl_lightning.objective import LocalObjective
from fl_lightning.ops import density
from fl_lightning.optim import (
    OptimizerSpec,
    client_optimizer_spec,
    configure_local_optimizer,
    optimizer_class,
    split_spec,
)
from fl_lightning.personal import personal_names
from fl_lightning.round import Tensors, communicate
from fl_lightning.step_metrics import StepMetrics
from fl_lightning.workspace import CohortWorkspace, workspace_blocker

if TYPE_CHECKING:
    from fl_lightning.algorithms import Algorithm
    from fl_lightning.data.datamodule import FederatedDataModule


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
        personal_params: glob patterns over the client model's parameter (and buffer) names, e.g. ``["head.*"]``:
            those stay on every client, never sent or averaged (FedPer's heads, FedBN's normalisation layers;
            :mod:`fl_lightning.personal`).
        personalize_steps: with client test splits (the datamodule's ``client_test_fraction``), also evaluate
            every client's model after this many local SGD steps from the global model on its own data
            (``val/personal_acc_*``; :mod:`fl_lightning.client_evaluation`). The global model's per-client
            metrics (``val/client_acc_*``) are logged whenever the datamodule has client test splits.
        cohort_workspace: with client sampling, run each local step on a copy of the cohort's rows only
            (:mod:`fl_lightning.workspace`; the same numbers, bit for bit, at a cost ∝ the cohort, not n).
            ``"auto"`` (default) does so whenever it is exact (plain SGD, no per-client state), ``True``
            refuses to train otherwise (saying why), ``False`` trains the cohort in place in the ``[n, ...]`` stack.
        compile_step: ``torch.compile`` the vectorised local step's forward + loss and its backward: ``True``
            (torch's defaults: inductor) or ``{"backend": ..., "mode": ..., "dynamic": ...}``; the same numbers as
            eager to floating-point rounding, on any accelerator (``docs/performance.md`` for when it pays off).
        fused_sgd: where the local step is plain SGD that nothing else needs the gradient of (FedAvg and its
            server-optimizer variants on fully connected clients), write the weight gradient straight into the
            update in the backward (:mod:`fl_lightning.fused`; SGD's numbers to floating-point rounding, about
            two passes over the weights fewer per step). ``False``: always autograd's gradient, then the optimizer.

    Hyper-parameters are saved as plain Python values: the preset as ``{"class_path", "init_args"}``
    (:meth:`~fl_lightning.algorithms.Algorithm.spec`), and the client model's config when LightningCLI built
    the module, so ``--ckpt_path`` and ``load_from_checkpoint`` re-create it (from Python, pass
    ``client_model=`` to ``load_from_checkpoint``).
    """

    def __init__(self, client_model: nn.Module, lr: float = 0.1, loss: str | LossCallable | None = None,
                 vectorize: Vectorize = "auto", clients_per_chunk: int | None = None,
                 algorithm: Algorithm | None = None, momentum: float = 0.0, weight_decay: float = 0.0,
                 encoding: Encoding = "auto", eval_every: int | None = None, num_clients: int | None = None,
                 optimizer: OptimizerSpec | None = None, check_finite: bool = True,
                 personal_params: list[str] | None = None, personalize_steps: int = 0,
                 cohort_workspace: bool | Literal["auto"] = "auto", compile_step: CompileStep = False,
                 fused_sgd: bool = True) -> None:
        super().__init__()
        if not isinstance(client_model, nn.Module):
            raise TypeError(f"client_model must be an nn.Module, got {type(client_model).__name__}")
        lr, momentum, weight_decay = to_plain(lr), to_plain(momentum), to_plain(weight_decay)  # NumPy scalars too
        check_module_args(lr=lr, momentum=momentum, weight_decay=weight_decay, vectorize=vectorize,
                          clients_per_chunk=clients_per_chunk, eval_every=eval_every, encoding=encoding,
                          cohort_workspace=cohort_workspace, fused_sgd=fused_sgd)
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
        self.algorithm = algorithm
        self.encoding: Encoding = encoding
        self.eval_every = eval_every
        self.global_model = copy.deepcopy(client_model)
        self.global_model.requires_grad_(False)
        self._client_optimizer = client_optimizer_spec(self.global_model)  # a client's unusable one fails here
        self.loss_fn = resolve_loss(loss)
        self.objective = LocalObjective(self.global_model, self.loss_fn)
        self.local_step = LocalStep(self.objective, vectorize, clients_per_chunk, to_plain(compile_step))
        self.evaluation = GlobalEvaluation(self.global_model, self.objective, self.loss_fn)
        self.personal_names = personal_names(self.global_model, personal_params)
        self.client_evaluation = ClientEvaluation(self.objective, self.loss_fn, personalize_steps, clients_per_chunk)
        self.client_metrics: dict[str, Tensor] = {}  # per-client vectors [n] of the latest client evaluation
        self.clients: ClientState | None = None
        self.server_state = nn.ModuleDict()  # add_server_state: SCAFFOLD's c, a server optimizer's moments
        self.comm = CommCounter()
        self.register_buffer("client_weights", torch.empty(0, dtype=torch.float64), persistent=False)
        self.register_buffer("client_ids", torch.empty(0, dtype=torch.long), persistent=False)
        self._num_clients_total: int | None = None
        self._step_metrics = StepMetrics()

        self.round_index = 0
        self._members: list[int] | None = None  # the cohort set_active_clients asked for (None = everyone)
        self._budgets: list[int] | None = None  # local-step budget of every client this round (None = no limit)
        self._cohort: Cohort | None = None  # made from the two above, once per round
        self._round_open = False
        self._round_step = 0  # local steps taken in the open round
        self.cohort_workspace = cohort_workspace
        self._workspace: CohortWorkspace | None = None  # open during a local step of a cohort of some clients
        self._workspace_blocker: str | None = None  # why it cannot be used in this fit ("" = it can), once known
        self.fused_sgd = fused_sgd
        self._fused_blocker: str | None = None  # likewise for the fused SGD update
        self._checkpoint_lr: float | None = None  # the lr of the checkpoint being resumed from
        self._finite: Tensor | None = None  # device flag: every loss since the last check was finite
        self.round_metrics: dict[str, Tensor] = {}
        self.final_metrics: dict[str, float] = {}  # the run's result, set when training ends
        self.federated_callbacks: list[FederatedCallback] = []
        self.schedule: SkipSchedule | None = None
        if num_clients is not None:
            self.allocate_clients(num_clients)

    # ------------------------------------------------------------------ state
    def allocate_clients(self, n: int, state_dict: Mapping[str, Tensor] | None = None) -> ClientState:
        """Allocate this process's clients out of ``n``: all of them, or the shard the strategy assigns
        (``strategy.client_shard(n) -> list of global ids``); with ``state_dict`` (a module state dict holding all
        n clients under ``clients.``), load this process's rows of it."""
        shard = getattr(self._trainer.strategy, "client_shard", None) if self._trainer is not None else None
        ids = list(range(n)) if shard is None else list(shard(n))
        self._num_clients_total = n
        self.client_ids = torch.tensor(ids, dtype=torch.long, device=self.client_ids.device)
        self.clients = ClientState(self.global_model, len(ids))
        self.client_weights = torch.full((n,), 1.0 / n, dtype=torch.float64, device=self.client_weights.device)
        self._cohort = None
        if state_dict is not None:
            state = select_rows(state_dict, "clients.", ids, n)
            self.clients.allocate_from_state_dict(state, "clients.")
            self.clients.load_state_dict({k[len("clients."):]: v for k, v in state.items() if k.startswith("clients.")})
        return self.clients

    def ensure_clients(self) -> ClientState:
        """The stacked client state, allocated from the datamodule's number of clients on first use."""
        if self.clients is None:
            self.allocate_clients(self._datamodule().num_clients)
        assert self.clients is not None
        return self.clients

    def add_client_state(self, name: str, *, dtype: torch.dtype | None = None, fill: float = 0.0) -> TensorGroup:
        """Per-client state shaped like the model (control variates, masks), saved in checkpoints."""
        return self.ensure_clients().add(name, dtype=dtype, fill=fill)

    def add_server_state(self, name: str, like: str | Mapping[str, Tensor] = "model", *,
                         dtype: torch.dtype | None = None, fill: float = 0.0) -> TensorGroup:
        """Server-side state (one copy, not per client): shaped like the global model's parameters
        (``like="model"``) or like the given tensors; filled with ``fill``; saved in checkpoints and moved by the
        accelerator. Idempotent, like :meth:`add_client_state`."""
        if name in self.server_state:
            return self.server_state[name]
        template = dict(self.global_model.named_parameters()) if like == "model" else like
        if not isinstance(template, Mapping):
            raise ValueError(f"add_server_state like must be 'model' or a dict of tensors, got {like!r}")
        group = TensorGroup({k: torch.full_like(v, fill, dtype=dtype or v.dtype, device=self.device).detach()
                             for k, v in template.items()})
        self.server_state[name] = group
        return group

    @property
    def num_clients(self) -> int:
        """n, the number of clients of the federation (over all processes)."""
        self.ensure_clients()
        assert self._num_clients_total is not None
        return self._num_clients_total

    @property
    def distributed(self) -> bool:
        return self._trainer is not None and self.trainer.world_size > 1

    def reduce(self, tensor: Tensor, op: str = "sum") -> Tensor:
        """Σ (or ``op="max"``) over the processes' client shards; the identity on one process."""
        if not self.distributed:
            return tensor
        return self.trainer.strategy.reduce(tensor, reduce_op=op)

    @property
    def vectorized(self) -> bool | None:
        """Whether local steps run vectorised (None until the path is chosen at ``setup``)."""
        return self.local_step.vectorized

    # ------------------------------------------------------------------ the cohort
    def set_active_clients(self, clients: Sequence[int] | None) -> None:
        """The cohort of the current round (global ids of the clients that train); None = all clients."""
        self._members = None if clients is None else sorted(int(i) for i in clients)
        self._cohort = None

    def set_local_steps(self, budgets: Sequence[int] | None) -> None:
        """Local-step budget τ_i of every client (one per global id) from this round on: client i takes
        min(τ_i, round length) steps and keeps its model for the rest of the round; τ_i = 0 drops it out of
        the round (not counted, its weight renormalised away). None: every client takes every step."""
        if budgets is not None:
            budgets = [int(b) for b in budgets]
            if len(budgets) != self.num_clients or min(budgets) < 0:
                raise ValueError(f"set_local_steps needs {self.num_clients} budgets >= 0, got {budgets!r}")
        self._budgets = budgets
        self._cohort = None

    @property
    def cohort(self) -> Cohort:
        """This round's participants on this process (:class:`~fl_lightning.cohort.Cohort`); during a local step
        on the cohort's workspace, the workspace's (its rows are all the stacked rows then)."""
        if self._workspace is not None:
            return self._workspace.cohort
        if self._cohort is None:
            self.ensure_clients()
            self._cohort = make_cohort(self.round_index, self.client_ids.tolist(), self.client_weights, self._members,
                                       self._budgets)
        return self._cohort

    @property
    def active_clients(self) -> Tensor | None:
        """Local rows of the participating clients (None = all rows): ``cohort.rows``, the v0.1 name."""
        return self.cohort.rows

    # ------------------------------------------------------------------ set-up
    def _datamodule(self) -> FederatedDataModule:
        from fl_lightning.data.datamodule import FederatedDataModule

        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if not isinstance(dm, FederatedDataModule):
            raise TypeError("FederatedLightningModule needs a FederatedDataModule: trainer.fit(model, datamodule=...) "
                            f"(got {type(dm).__name__})")
        return dm

    def configure_callbacks(self) -> list[Any]:
        return [] if self.algorithm is None else self.algorithm.callbacks()

    def setup(self, stage: str) -> None:
        dm = self._datamodule()
        self.ensure_clients()
        if self.num_clients != dm.num_clients:
            raise ValueError(f"the module holds {self.num_clients} clients but the datamodule has {dm.num_clients}")
        self.client_weights = dm.client_weights.to(self.client_weights.device)
        self._cohort = None
        self.federated_callbacks = [cb for cb in self.trainer.callbacks if isinstance(cb, FederatedCallback)]
        self.schedule = communication_schedule(self.federated_callbacks, warn=stage == "fit")
        if self.loss_fn is not None and self.loss_fn.task == "classification" and dm.num_classes is None:
            raise ValueError("loss='cross_entropy' needs a classification dataset (integer labels)")
        self.local_step.choose_path(self.global_model, dm.padded)
        if self.personal_names and stage == "fit" and not dm.has_client_test_data:
            rank_zero_warn("personal_params keep parts of the model on the clients: the central test split sees the "
                           "global model with its initial personal parameters. Give the datamodule client test "
                           "splits (--data.client_test_fraction 0.2) to evaluate every client's own model")

    def on_train_start(self) -> None:
        # Lightning restores a checkpoint after ``setup``: the datamodule's partition (so w_i) and the round
        # metrics may have changed since, and the module has moved to its device.
        self.client_weights = self._datamodule().client_weights.to(self.client_weights.device)
        self._cohort = None
        self.round_metrics = {k: v.to(self.device) for k, v in self.round_metrics.items()}
        self._step_metrics.reset()  # agreed again at this fit's first logging step
        self._finite = None
        self._workspace_blocker = None
        self._fused_blocker = None
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
        """The local optimizer over the stacked client parameters: ``optimizer`` if given, else the client model's
        own ``configure_optimizers``, else SGD (:func:`~fl_lightning.optim.configure_local_optimizer`)."""
        return configure_local_optimizer(self.ensure_clients().x.parameters(), self._optimizer_spec,
                                         self._client_optimizer, self._scheduler_spec, lr=self.lr,
                                         momentum=self.hparams.momentum, weight_decay=self.hparams.weight_decay)

    def current_lr(self) -> float:
        """γ of the current step (an LR scheduler may change it)."""
        if self._trainer is not None and self.trainer.optimizers:
            return float(self.trainer.optimizers[0].param_groups[0]["lr"])
        return self.lr

    # ------------------------------------------------------------------ local step
    def _transformed(self, params: Tensors) -> Tensors:
        for cb in self.federated_callbacks:
            params = cb.transform_params(self.trainer, self, params)
        return params

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One local step of the cohort (DESIGN §1.2): g_i = ∇f_i, the optimizer step, ``on_local_step_end``;
        then, when the schedule's coin says so, the communication round."""
        dm = self._datamodule()
        if not self._round_open:
            for cb in self.federated_callbacks:
                cb.on_round_start(self.trainer, self, self.round_index)
            self._round_open, self._round_step, self._cohort = True, 0, None
        cohort, clients = self.cohort, self.ensure_clients()
        client_batch = dm.sample(self.global_step, None if cohort.rows is None else cohort.ids, self.device,
                                 dtype=next(iter(clients.x.values())).dtype)
        opt = self.optimizers()
        opt.zero_grad()
        self._workspace = self._open_workspace(cohort, clients, opt.optimizer)
        try:
            return self._local_step(dm, self.cohort, clients, client_batch, opt)
        finally:
            if self._workspace is not None:  # no round in this step: the cohort's rows go back into the stack
                self._workspace.close()
                self._workspace = None

    def _open_workspace(self, cohort: Cohort, clients: ClientState, optimizer: torch.optim.Optimizer
                        ) -> CohortWorkspace | None:
        """The cohort's workspace for this step (:mod:`fl_lightning.workspace`), or None (everyone trains, or
        ``cohort_workspace`` is off, or it would not be exact)."""
        if self.cohort_workspace is False or cohort.rows is None or len(cohort) == 0:
            return None
        if len(cohort) == next(iter(clients.x.values())).shape[0]:
            return None  # all of this process's rows (several processes, full participation)
        if self._workspace_blocker is None:
            self._workspace_blocker = workspace_blocker(self, optimizer) or ""
        if self._workspace_blocker:
            if self.cohort_workspace is True:
                raise ValueError(f"cohort_workspace=True cannot be exact here: {self._workspace_blocker}. "
                                 "Use cohort_workspace: auto (or false) to train the cohort in place")
            return None
        return CohortWorkspace(clients, cohort)

    def _fuses(self, cohort: Cohort, optimizer: torch.optim.Optimizer) -> bool:
        """Whether this step runs the fused SGD update (:mod:`fl_lightning.fused`): ``fused_sgd`` allows it, nothing
        in this fit needs the gradient (checked once per fit) and the step's path can (:meth:`LocalStep.fuses`)."""
        if self.fused_sgd is False or not self.local_step.fuses(cohort):
            return False
        if self._fused_blocker is None:
            self._fused_blocker = fused_blocker(self, optimizer) or ""
        return not self._fused_blocker

    def _local_step(self, dm: FederatedDataModule, cohort: Cohort, clients: ClientState, client_batch: Any,
                    opt: Any) -> Tensor:
        """The step itself, on ``clients`` (the cohort's workspace when one is open) and ``cohort``."""
        if self.local_step.vectorized is None:
            self.local_step.choose_path(self.global_model, dm.padded)
        spent = cohort.held_rows(self._round_step)  # rows whose budget τ_i is used up (None: everyone steps)
        fused = self.current_lr if spent is None and self._fuses(cohort, opt.optimizer) else None
        losses, client_logs = self.local_step(clients, cohort, client_batch, self._transformed, self.manual_backward,
                                              fused)
        held = None if spent is None else HeldRows(clients, opt.optimizer, spent)
        opt.step()
        for cb in self.federated_callbacks:
            cb.on_local_step_end(self.trainer, self)
        if held is not None:
            held.restore()
        self._round_step += 1
        weights = cohort.weights
        loss = self.reduce(torch.dot(weights.to(losses.dtype), losses))
        communicated = self.schedule is not None and self.schedule.step()
        if communicated:
            with torch.no_grad():
                self._communicate(cohort)
        logging = self._step_metrics.logging_step(self)
        if self.check_finite:
            finite = torch.isfinite(loss.detach())
            self._finite = finite if self._finite is None else self._finite & finite
            if logging or communicated:
                self.assert_finite()
        if logging:
            self._step_metrics.log(self, loss, weights, client_logs)
        scheduler = self.lr_schedulers() if self._scheduler_spec is not None else None
        if scheduler is not None:  # manual optimisation: the module steps it, after the round used this step's γ
            scheduler.step()  # type: ignore[union-attr]
        return loss

    def _communicate(self, cohort: Cohort) -> None:
        """The communication round (:func:`~fl_lightning.round.communicate`), then its metrics."""
        rnd = communicate(self, cohort, self._round_step)
        if self._workspace is not None:  # every row receives the broadcast before anyone looks at the clients
            self._workspace.close(rnd.received)
            self._workspace = None
        self.round_index += 1
        self._round_open = False
        for cb in self.federated_callbacks:
            cb.on_round_end(self.trainer, self, rnd)
        self.round_metrics[keys.DENSITY] = density(self.evaluated_params(rnd.received), stacked=False)
        assert rnd.client_density is not None
        self.round_metrics[keys.CLIENT_DENSITY] = rnd.client_density
        if self.eval_every is not None and self.round_index % self.eval_every == 0:
            self.round_metrics.update(self.evaluate_global())
            self.round_metrics.update(self.evaluate_clients())

    def assert_finite(self, context: str = "") -> None:
        """Raise :class:`~fl_lightning.callbacks.DivergenceError` if a training loss since the last check was
        NaN/Inf (one host synchronisation); the message names the step, the round and the lr to lower."""
        bad = self._finite is not None and not bool(self._finite)
        self._finite = None
        if bad:
            raise DivergenceError(
                f"training diverged: the loss became NaN/Inf by step {self.global_step} (round {self.round_index}). "
                f"Lower the learning rate (lr={self.current_lr():g}, --model.lr) and start again, or resume with the "
                f"lower lr from the last good checkpoint (--ckpt_path last){context}"
            )

    def on_train_end(self) -> None:
        """Record the run's result in ``final_metrics`` and write it to the loggers whatever
        ``log_every_n_steps`` is: counters, round metrics and the global model's held-out metrics (so a run's
        last logged row is its result)."""
        if self.check_finite:
            self.assert_finite()  # a run never ends quietly with a NaN loss
        metrics = self._step_metrics.counters(self)
        if self._datamodule().has_eval_data:
            metrics.update(self.evaluate_global())
        metrics.update(self.evaluate_clients())
        values = {k: float(v) for k, v in metrics.items()}
        self.final_metrics = values
        for logger in self.loggers:
            logger.log_metrics(values, step=max(self.global_step - 1, 0))
            logger.save()

    # ------------------------------------------------------------------ evaluation of the global model
    def forward(self, x: Tensor) -> Tensor:
        """The global model's output (x as it is; validation, test and predict use :attr:`evaluated_model`)."""
        return self.global_model(x)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """``val/loss`` (and ``val/acc``) of the evaluated model (:attr:`evaluated_model`), or the client model's
        own ``validation_step`` run on it."""
        if not self.evaluation.client_step("validation_step", batch, batch_idx, self.log):
            self.evaluation.step("val", batch, self.log)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """``test/loss`` (and ``test/acc``) of the global model on the test split, or the client model's own
        ``test_step``."""
        if not self.evaluation.client_step("test_step", batch, batch_idx, self.log):
            self.evaluation.step("test", batch, self.log)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """The outputs of the evaluated model (:attr:`evaluated_model`) for the inputs of ``batch`` (``x`` or
        ``(x, y)``)."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        model = self.evaluation.model
        return model(as_model_input(model, x))

    def on_validation_epoch_end(self) -> None:
        """``val/client_*`` (and ``val/personal_*``) with the held-out metrics, when there are client test splits."""
        self._log_client_metrics("val")

    def on_test_epoch_end(self) -> None:
        """``test/client_*`` (and ``test/personal_*``), when there are client test splits."""
        self._log_client_metrics("test")

    def _log_client_metrics(self, stage: str) -> None:
        metrics = self.evaluate_clients(stage=stage)
        if metrics:
            self.log_dict({k: v.float() for k, v in metrics.items()}, sync_dist=False)

    def on_validation_start(self) -> None:
        self.refresh_evaluated_model()
        if self.trainer.state.fn == "validate":
            warn_if_untrained(self)

    def on_test_start(self) -> None:
        self.refresh_evaluated_model()
        warn_if_untrained(self)

    def on_predict_start(self) -> None:
        self.refresh_evaluated_model()
        warn_if_untrained(self)

    def evaluated_params(self, params: Tensors | None = None) -> Tensors:
        """The weights the global model x (or ``params``, a model's parameters by name) is evaluated with: each
        federated callback's ``transform_evaluated_params`` in turn, i.e. the model clients compute with when they
        start from x. x itself unless one changes it: TopK(x) when clients prune in the forward pass only
        (FedComLoc-Local, an STE), where x stays dense because clients update, and resume from, the dense x."""
        out = dict(self.global_model.named_parameters()) if params is None else dict(params)
        for cb in self.federated_callbacks:
            out = cb.transform_evaluated_params(self._trainer, self, out)
        return out

    @property
    def evaluated_model(self) -> nn.Module:
        """The model that validation, test, predict and ``sparsity/density`` evaluate, with the weights of
        :meth:`evaluated_params`: :attr:`global_model` itself, or a copy of it (not in checkpoints, which hold the
        global model) when a callback transforms them. Export this one to deploy what was evaluated."""
        return self.refresh_evaluated_model()

    def refresh_evaluated_model(self) -> nn.Module:
        """Load :meth:`evaluated_params` of the current global model into the evaluated model, and return it."""
        params = dict(self.global_model.named_parameters())
        out = self.evaluated_params(params)
        same = all(out[k] is v for k, v in params.items())
        return self.evaluation.use(None if same else out)

    def evaluate_global(self, datamodule: FederatedDataModule | None = None) -> dict[str, Tensor]:
        """Loss (and accuracy) of the evaluated model (:attr:`evaluated_model`: the global model, as clients
        compute with it) on the held-out split of ``datamodule`` (default: the Trainer's)."""
        self.refresh_evaluated_model()
        return self.evaluation.over(datamodule if datamodule is not None else self._datamodule(), self.device)

    def evaluate_clients(self, datamodule: FederatedDataModule | None = None, stage: str = "val") -> dict[str, Tensor]:
        """Statistics over clients of the global model (and of the personalized models) on every client's own
        test split (:mod:`fl_lightning.client_evaluation`); the per-client vectors go to ``client_metrics`` (and
        to W&B as histograms). Empty when the datamodule has no client test splits."""
        dm = datamodule if datamodule is not None else self._datamodule()
        if not dm.has_client_test_data:
            return {}
        metrics, self.client_metrics = self.client_evaluation.run(self, dm, stage)
        if self._trainer is not None:
            log_client_histograms(self.trainer, self.client_metrics, stage, max(self.global_step - 1, 0))
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.check_finite and self._trainer is not None and self.trainer.state.status != TrainerStatus.INTERRUPTED:
            self.assert_finite("; this checkpoint was not written")  # never a diverged checkpoint (as last.ckpt)
        checkpoint["federated"] = {"round_index": self.round_index, "round_open": self._round_open,
                                   "active_clients": self._members, "local_steps": self._budgets,
                                   "round_step": self._round_step,
                                   "round_metrics": {k: v.detach().cpu() for k, v in self.round_metrics.items()}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("hyper_parameters", {}).get("algorithm")
        if "algorithm" in checkpoint.get("hyper_parameters", {}) and (
                algorithm_class_of(saved) != algorithm_class_of(self.algorithm)):
            raise ValueError(
                f"this checkpoint was written by the preset {algorithm_class_of(saved)}, the run uses "
                f"{algorithm_class_of(self.algorithm)}: their states differ. Resume with the checkpoint's preset, "
                "or start this one without --ckpt_path (give each preset its own --trainer.logger.init_args.name)"
            )
        state = checkpoint["state_dict"]
        if self.clients is None:
            first = next(k for k in state if k.startswith("clients.x."))
            self.allocate_clients(state[first].shape[0])
        assert self.clients is not None
        self.clients.allocate_from_state_dict(state, "clients.")
        state.update(select_rows(state, "clients.", self.client_ids.tolist(), self.num_clients))
        for name, group in TensorGroup.groups_in(state, "server_state.", dict(self.global_model.named_parameters())):
            if name not in self.server_state:  # a callback has not created it (loading outside the Trainer)
                self.server_state[name] = group
        fed = checkpoint.get("federated", {})
        self.round_index = fed.get("round_index", 0)
        self._round_open = fed.get("round_open", False)
        self._round_step = fed.get("round_step", 0)
        self.set_active_clients(fed.get("active_clients"))
        self._budgets = fed.get("local_steps")
        self.round_metrics = dict(fed.get("round_metrics", {}))
        self._checkpoint_lr = checkpoint.get("hyper_parameters", {}).get("lr")

    def client_model_params(self, i: int) -> Tensors:
        """Client i's current parameters x_i (views into the stacked state)."""
        return {k: v[i].detach() for k, v in self.ensure_clients().x.items()}
