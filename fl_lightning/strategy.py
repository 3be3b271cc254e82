"""``FederatedDDPStrategy``: the clients sharded across processes and machines (DESIGN §2.5).

``Trainer(strategy="federated_ddp", devices=N, num_nodes=M)`` runs the n virtual clients of a
:class:`~fl_lightning.FederatedLightningModule` on N·M processes, launched by anything Lightning's DDP
machinery understands: Lightning itself (it re-executes the script for the other local ranks), ``torchrun``,
SLURM (``srun``), or another cluster environment. See ``docs/scale_out.md``.

What differs from :class:`~lightning.pytorch.strategies.DDPStrategy`:

- no ``DistributedDataParallel`` wrapper: clients diverge between rounds, so gradients must not be averaged
  across processes; the module is used as it is;
- every process owns a contiguous block of clients (:meth:`client_shard`), the module allocates only those
  rows of the stacked client state, and the communication round sums the weighted uplinks of every block
  with one all-reduce per tensor (:meth:`reduce`, via ``FederatedLightningModule.reduce``);
- checkpoints hold all n clients: :meth:`lightning_module_state_dict` and :meth:`optimizer_state` gather the
  blocks, and loading slices them again (:func:`fl_lightning.clients.select_rows`,
  :meth:`load_optimizer_state_dict`), so a checkpoint resumes on any number of processes, one included;
- at start-up, the global model is broadcast from rank 0 (as DDP does), and the processes check that they
  agree on everything the shared random streams and the sequence of collectives depend on (seeds of the
  schedule, the cohort and the data, the schedule's state, the number of clients and their weights, the
  model's shapes, the federated callbacks, the length of the run) — a disagreement would otherwise surface
  as a deadlock or as silently different models;
- only a module with sharded clients (:class:`~fl_lightning.clients.ShardedClients`, which
  :class:`~fl_lightning.FederatedLightningModule` is) is accepted (any other module would train one
  unsynchronised replica per process).

Importing this module registers the strategy in Lightning's ``StrategyRegistry`` as ``"federated_ddp"``
(``fl_lightning.module`` imports it, so any use of the framework does). It uses the module through the public
:class:`~fl_lightning.clients.ShardedClients` interface only, and does not import ``fl_lightning.module``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.fabric.utilities.distributed import _distributed_is_initialized
from lightning.fabric.utilities.optimizer import _optimizer_to_device, _optimizers_to_device
from lightning.fabric.utilities.types import ReduceOp
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from fl_lightning.callbacks.base import FederatedCallback
from fl_lightning.clients import ShardedClients

STRATEGY_NAME = "federated_ddp"
_CLIENTS = "clients."  # prefix of the stacked client state in the module's state_dict


def shard_bounds(num_clients: int, world_size: int) -> list[tuple[int, int]]:
    """The ``[start, end)`` block of global client ids of every rank, in rank order.

    Contiguous and balanced: the first ``n % world_size`` ranks get ``⌈n / world_size⌉`` clients, the others
    ``⌊n / world_size⌋`` (``torch.tensor_split``'s rule). Contiguous blocks in rank order make the gathered
    checkpoint a plain concatenation, and the client → rank map depends on (n, world size) only.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if num_clients < world_size:
        raise ValueError(
            f"{num_clients} clients cannot be spread over {world_size} processes (every process needs at least "
            f"one client): use at most {num_clients} processes (Trainer devices × num_nodes)"
        )
    base, extra = divmod(num_clients, world_size)
    bounds, start = [], 0
    for rank in range(world_size):
        end = start + base + (1 if rank < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def client_shard(num_clients: int, rank: int, world_size: int) -> list[int]:
    """Global ids of the clients ``rank`` owns (see :func:`shard_bounds`)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
    start, end = shard_bounds(num_clients, world_size)[rank]
    return list(range(start, end))


def _require_federated_module(module: LightningModule) -> None:
    """``federated_ddp`` trains a :class:`~fl_lightning.FederatedLightningModule` (a
    :class:`~fl_lightning.clients.ShardedClients`) only: any other module would train one independent replica
    per process (there is no DDP wrapper to average its gradients)."""
    if not isinstance(module, ShardedClients):
        raise TypeError(
            f"strategy='federated_ddp' shards the clients of a FederatedLightningModule, got a "
            f"{type(module).__name__}: wrap the model as FederatedLightningModule(client_model, ...), or use "
            "strategy='ddp' for ordinary data-parallel training"
        )


class FederatedDDPStrategy(DDPStrategy):
    """DDP's process launching, rendezvous and collectives, without the ``DistributedDataParallel`` wrapper,
    with the clients sharded over the processes (see the module docstring).

    Args: those of :class:`~lightning.pytorch.strategies.DDPStrategy` that do not configure the DDP wrapper
    (``process_group_backend``: ``gloo`` on CPU, ``nccl`` on GPUs by default; ``timeout`` of the collectives).
    Only the ``popen`` start method is supported (scripts, the CLI, ``torchrun``, SLURM): the spawn/fork
    launchers would copy rank 0's client shard back into the main process as if it were the whole model.
    """

    strategy_name = STRATEGY_NAME

    def __init__(
        self,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen"] = "popen",
        **ddp_kwargs: Any,
    ) -> None:
        if ddp_kwargs:
            raise ValueError(
                f"FederatedDDPStrategy does not wrap the module in DistributedDataParallel, so the DDP options "
                f"{sorted(ddp_kwargs)} have no effect; remove them"
            )
        if start_method != "popen":
            raise ValueError(
                f"FederatedDDPStrategy supports start_method='popen' only (got {start_method!r}): launch a script, "
                "the CLI, torchrun or srun"
            )
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method="popen",
        )

    # ------------------------------------------------------------------ sharding
    def client_shard(self, num_clients: int) -> list[int]:
        """Global ids of the clients this process owns: a contiguous block, see :func:`shard_bounds`."""
        return client_shard(num_clients, self.global_rank, self.world_size)

    def shard_sizes(self, num_clients: int) -> list[int]:
        """Number of clients of every rank, in rank order."""
        return [end - start for start, end in shard_bounds(num_clients, self.world_size)]

    # ------------------------------------------------------------------ set-up
    @override
    def setup_environment(self) -> None:
        module = self.lightning_module
        if module is not None:
            _require_federated_module(module)
        super().setup_environment()  # the process group exists from here on
        if self.world_size > 1 and module is not None:
            self._start_from_rank_zero(module)

    def _start_from_rank_zero(self, module: LightningModule) -> None:
        """Every rank starts from rank 0's global model (as DDP does); a module that allocated all n clients
        before the ranks were known (``num_clients=...``) keeps its own block of them."""
        global_model = getattr(module, "global_model", None)
        if isinstance(global_model, nn.Module):
            self._broadcast_module(global_model)
        clients = getattr(module, "clients", None)
        if clients is None or not isinstance(module, ShardedClients):
            return
        n = module.num_clients
        if module.client_ids.tolist() == self.client_shard(n):
            return  # already this rank's block (a second fit/validate with the same Trainer)
        if len(module.client_ids) != n:
            raise RuntimeError(
                f"the module holds {len(module.client_ids)} of {n} clients, laid out for another number of "
                "processes; load the full state from a checkpoint instead"
            )
        self._broadcast_module(clients)  # all n clients, same shapes on every rank
        module.allocate_clients(n, state_dict={_CLIENTS + k: v for k, v in clients.state_dict().items()})

    def _broadcast_module(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers, in place on every rank. The module has not been moved to its device
        yet, so the tensors travel through ``root_device`` (NCCL cannot broadcast CPU tensors)."""
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                wire = tensor.detach().to(self.root_device)
                if wire.dtype == torch.bool:
                    wire = wire.to(torch.uint8)
                dist.broadcast(wire, src=0)
                tensor.copy_(wire.to(tensor.device, tensor.dtype))

    @override
    def setup(self, trainer: Trainer) -> None:
        """:meth:`Strategy.setup` without the DDP wrapper, and without DDP's broadcast of every parameter from
        rank 0 outside of fitting: the client blocks differ between ranks by design."""
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        if self._layer_sync is not None:
            raise ValueError(
                "Trainer(sync_batchnorm=True) does not apply to federated_ddp: every client keeps its own "
                "normalisation statistics, averaged at communication rounds"
            )
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if self.world_size > 1:
            self._check_agreement(trainer)
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if fitting:
            _optimizers_to_device(self.optimizers, self.root_device)

    @override
    def _setup_model(self, model: nn.Module) -> nn.Module:  # type: ignore[override]
        return model

    @override
    def configure_ddp(self) -> None:
        """Nothing to wrap: the LightningModule is used as it is."""

    def _fingerprint(self, trainer: Trainer) -> dict[str, Any]:
        """What the processes must agree on: a disagreement makes their collectives diverge (a hang)."""
        module = self.lightning_module
        assert module is not None
        fp: dict[str, Any] = {}
        global_model = getattr(module, "global_model", None)
        if isinstance(global_model, nn.Module):
            fp["model"] = [(k, tuple(v.shape), str(v.dtype)) for k, v in global_model.state_dict().items()]
        if getattr(module, "clients", None) is not None:
            n = module.num_clients
            fp["num_clients"] = n
            fp["client_weights"] = [round(float(w), 12) for w in module.client_weights.tolist()]
            ids = module.client_ids.tolist()
            if ids != self.client_shard(n):  # local, but reported through the comparison below
                fp[f"clients of rank {self.global_rank}"] = f"{ids} instead of {self.client_shard(n)}"
        federated = [cb for cb in trainer.callbacks if isinstance(cb, FederatedCallback)]
        fp["federated callbacks"] = [type(cb).__name__ for cb in federated]  # each may add collectives
        for cb in federated:
            if hasattr(cb, "seed"):
                fp[f"seed of {type(cb).__name__}"] = cb.seed
        fp["length of the run"] = (trainer.max_steps, trainer.max_epochs)  # a rank that stops early hangs the rest
        dm = trainer.datamodule
        if dm is not None and hasattr(dm, "seed"):
            fp["seed of the datamodule"] = dm.seed
        schedule = getattr(module, "schedule", None)
        if schedule is not None and hasattr(schedule, "state_dict"):
            fp["schedule state"] = repr(schedule.state_dict())
        return fp

    def _check_agreement(self, trainer: Trainer) -> None:
        """All-gather every rank's :meth:`_fingerprint` and raise, on every rank, if any differs from rank 0's."""
        mine = self._fingerprint(trainer)
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, mine)
        reference = everyone[0]
        problems = []
        for rank, fp in enumerate(everyone[1:], start=1):
            for key in sorted(set(fp) | set(reference)):
                if fp.get(key) != reference.get(key):
                    problems.append(f"{key}: rank 0 has {reference.get(key)!r}, rank {rank} has {fp.get(key)!r}")
        if problems:  # every rank sees the same lists, so every rank raises
            raise RuntimeError(
                "the processes of federated_ddp disagree on the federated set-up ("
                + "; ".join(problems[:5]) + "). Call lightning.seed_everything(<same seed>) on every process "
                "or give the datamodule and the callbacks explicit seeds"
            )

    # ------------------------------------------------------------------ collectives
    @override
    def reduce(self, tensor: Tensor, group: Any | None = None,
               reduce_op: ReduceOp | str | None = "mean") -> Tensor:
        """All-reduce ``tensor`` in place over the processes and return it: ``"sum"``, ``"max"``, ``"min"``,
        ``"product"``, ``"mean"``/``"avg"`` or ``ReduceOp.AVG`` (a sum divided by the world size on every backend:
        older gloo builds have no AVG; integer tensors are divided with truncation, as Lightning does), or
        another ``ReduceOp``.
        ``None`` sums. This is the reduction of the round (``FederatedLightningModule.reduce``: Σ over the
        ranks of the weighted uplink sums Σ_{i on the rank} w_i u_i, the bit counters and the loss) and of
        Lightning's own decisions (``reduce_boolean_decision``).

        As ``DDPStrategy.reduce``, minus the barrier Lightning puts before every all-reduce (an all-reduce
        synchronises by itself; the barrier would double the latency of every round's reductions).
        """
        if not isinstance(tensor, Tensor) or not _distributed_is_initialized():
            return tensor
        group = dist.group.WORLD if group is None else group
        divide = False
        if reduce_op is None:
            op = ReduceOp.SUM
        elif isinstance(reduce_op, str):
            name = reduce_op.lower()
            if name in ("mean", "avg"):
                op, divide = ReduceOp.SUM, True
            elif name in ("sum", "max", "min", "product"):
                op = getattr(ReduceOp, name.upper())
            else:
                raise ValueError(f"unknown reduce_op {reduce_op!r}: use 'sum', 'max', 'min', 'mean' or a ReduceOp")
        elif reduce_op == ReduceOp.AVG:
            op, divide = ReduceOp.SUM, True
        else:
            op = reduce_op
        target = tensor if tensor.is_contiguous() else tensor.contiguous()
        dist.all_reduce(target, op=op, group=group)
        if target is not tensor:
            tensor.copy_(target)
        if divide:
            size = dist.get_world_size(group)
            if tensor.is_floating_point():
                tensor.div_(size)
            else:
                tensor.copy_(tensor / size)
        return tensor

    def _gather_rows(self, local: Tensor, num_clients: int) -> Tensor:
        """This rank's block ``[rows, ...]`` → all n clients ``[n, ...]`` on every rank (collective)."""
        sizes = self.shard_sizes(num_clients)
        rows = sizes[self.global_rank]
        if local.shape[0] != rows:
            raise RuntimeError(f"rank {self.global_rank} holds {local.shape[0]} client rows, expected {rows}")
        send = local.detach()
        if send.dtype == torch.bool:  # not every backend reduces/gathers bool
            send = send.to(torch.uint8)
        if rows < max(sizes):
            send = torch.cat([send, send.new_zeros(max(sizes) - rows, *send.shape[1:])])
        send = send.contiguous()
        out = [torch.empty_like(send) for _ in sizes]
        dist.all_gather(out, send)
        return torch.cat([block[:size] for block, size in zip(out, sizes)]).to(local.dtype)

    def _num_clients(self) -> int | None:
        module = self.lightning_module
        if self.world_size == 1 or not _distributed_is_initialized() or module is None:
            return None
        if getattr(module, "clients", None) is None or not hasattr(module, "client_ids"):
            return None
        return int(module.num_clients)

    # ------------------------------------------------------------------ checkpoints
    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The module's state with the stacked client state of all n clients (a collective: Lightning dumps
        checkpoints on every rank, and rank 0 writes them)."""
        state = super().lightning_module_state_dict()
        n = self._num_clients()
        if n is None:
            return state
        for key in [k for k in state if k.startswith(_CLIENTS)]:
            if state[key].dim() > 0:
                state[key] = self._gather_rows(state[key], n)
        return state

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """The optimizer's state with per-client tensors (e.g. SGD momentum of the stacked x_i) gathered to
        all n clients (a collective, like :meth:`lightning_module_state_dict`)."""
        state = super().optimizer_state(optimizer)
        n = self._num_clients()
        if n is None:
            return state
        opt = optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        params = [p for group in opt.param_groups for p in group["params"]]
        rows = len(self.lightning_module.client_ids)
        per_client = {}  # (param index, key) -> tensor; the keys a rank lacks (no step yet) count as zeros
        for idx, values in state["state"].items():
            for key, value in values.items():
                if isinstance(value, Tensor) and value.dim() > 0 and value.shape == params[idx].shape:
                    per_client[(idx, key)] = value
        listing = {k: (tuple(v.shape[1:]), v.dtype) for k, v in per_client.items()}
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, listing)
        union: dict[tuple[int, str], tuple[tuple[int, ...], torch.dtype]] = {}
        for entry in everyone:
            union.update(entry)
        new_state = {idx: dict(values) for idx, values in state["state"].items()}
        for idx, key in sorted(union):
            shape, dtype = union[(idx, key)]
            local = per_client.get((idx, key))
            if local is None:
                local = torch.zeros(rows, *shape, dtype=dtype, device=params[idx].device)
            new_state.setdefault(idx, {})[key] = self._gather_rows(local, n)
        return {**state, "state": new_state}

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Load optimizer states saved with all n clients (by this strategy or by a single process), keeping
        this process's rows."""
        module = self.lightning_module
        n = self._num_clients()
        ids = module.client_ids.cpu() if n is not None else None
        for optimizer, opt_state in zip(self.optimizers, checkpoint["optimizer_states"]):
            if ids is not None:
                opt = optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
                params = [p for group in opt.param_groups for p in group["params"]]
                state = {}
                for idx, values in opt_state["state"].items():
                    state[idx] = {
                        key: (value[ids.to(value.device)] if isinstance(value, Tensor) and value.dim() > 0
                              and value.shape[0] == n and value.shape[1:] == params[idx].shape[1:]
                              and params[idx].shape[0] != n else value)
                        for key, value in values.items()
                    }
                opt_state = {**opt_state, "state": state}
            optimizer.load_state_dict(opt_state)
            _optimizer_to_device(optimizer, self.root_device)

    # ------------------------------------------------------------------ registry
    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        strategy_registry.register(
            STRATEGY_NAME, cls, description="clients of a FederatedLightningModule sharded over DDP processes"
        )


if STRATEGY_NAME not in StrategyRegistry:
    FederatedDDPStrategy.register_strategies(StrategyRegistry)

__all__ = ["STRATEGY_NAME", "FederatedDDPStrategy", "client_shard", "shard_bounds"]
