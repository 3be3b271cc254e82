"""Federated runs for the scale-out tests (``tests/test_distributed.py``), on one process or under ``torchrun``.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed/fl_run.py SPEC.json

``SPEC.json`` lists runs ``{"name", "preset", "steps", "out", ...options}``; each run starts from
``seed_everything(SEED)`` and writes ``<out>/<name>.pt`` (rank 0): the module's state with all n clients
(``strategy.lightning_module_state_dict()``, gathered over the ranks), the optimizer state (also gathered),
the step and round counters, the world size, and what :class:`Record` saw (the steps this fit ran, the steps
that ended a round, the collectives of every step). Every rank also writes ``<out>/<name>.rank<r>.pt``: what
every rank must hold identically (global model, counters, round steps, logged and validation metrics) and its
own client ids. Options: ``ckpt_every`` (a ModelCheckpoint every k steps), ``resume`` (a checkpoint path),
``log`` (CSV logs, validation every epoch and ``trainer.validate`` at the end), ``momentum``, ``dtype``
(``float64`` by default), ``num_clients_at_init`` (allocate the clients in the module's constructor, before
the ranks are known), ``client: "lightning"`` (a LightningModule client model that logs ``mse``),
``personal`` (a personal head, ``personalize_steps``, client test splits), ``seed_offset_per_rank`` (give every rank
another schedule seed; the run must fail,
and rank 0 writes the error to ``<out>/<name>.err``). Under torchrun the collectives time out after
``COLLECTIVE_TIMEOUT_S``, so ranks that wait in different collectives fail instead of hanging.

A spec ``{"name", "out", "cli": [args]}`` runs the command line instead (``FederatedCLI(args)``, what
``train.py fit ...`` runs) and writes the same per-rank record, with the module's ``final_metrics``;
``{"name", "out", "reduce": true}`` records ``FederatedDDPStrategy.reduce`` of rank-dependent values.

The test imports :func:`run` to make the one-process references in its own process. Standalone on purpose
(no ``tests`` imports): torchrun runs it as a script.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

torch.set_num_threads(1)  # two ranks on a small machine: intra-op threads only oversubscribe it

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from torch import nn  # noqa: E402

from fl_lightning import FederatedDataModule, FederatedLightningModule  # noqa: E402
from fl_lightning.algorithms import (  # noqa: E402
    dp_fedavg,
    fedadam,
    fedavg,
    fednova,
    proxskip,
    scaffold,
    sparse_proxskip,
)
from fl_lightning.callbacks import DifferentialPrivacy, TopKPruning  # noqa: E402
from fl_lightning.cli import FederatedCLI, quiet_irrelevant_warnings  # noqa: E402
from fl_lightning.strategy import FederatedDDPStrategy  # noqa: E402

SEED = 7
SIZES = (7, 9, 11, 8, 10)  # 5 clients of unequal sizes: 3 + 2 on two ranks
DIM = 6
BATCH = 4  # stochastic minibatches (with replacement)
COLLECTIVE_TIMEOUT_S = 90


def presets(seed: int) -> dict[str, Any]:
    return {
        "proxskip": lambda: proxskip(p=0.3, seed=seed),
        "sparse_proxskip": lambda: sparse_proxskip(p=0.3, mode="bernoulli", density=0.5, seed=seed),
        # one client per round: in every round one of the two ranks has no participating client
        "fedavg_cohort": lambda: fedavg(local_steps=3, cohort_size=1, seed=seed),
        # the same with TopK at the clients: the idle rank prunes, counts and averages an empty block
        "fedavg_cohort_topk": lambda: [*fedavg(local_steps=3, cohort_size=1, seed=seed), TopKPruning(density=0.5)],
        # the round engine's server state, extra messages (Δc_i reduced over ranks) and unequal local work
        "scaffold_cohort": lambda: scaffold(local_steps=3, cohort_size=3, server_lr=0.8, seed=seed),
        "fedadam": lambda: fedadam(local_steps=3, server_lr=0.05, seed=seed),
        "fednova_work": lambda: fednova(local_steps=3, min_local_steps=1, seed=seed),
        # client-level DP (tests/test_privacy.py): a Poisson cohort (q = 2/5, some rounds empty or on one rank only)
        # with central noise after the all-reduce; ProxSkip with adaptive clipping; local noise per client
        "dp_fedavg": lambda: dp_fedavg(local_steps=3, cohort_size=2, clip_norm=0.3, noise_multiplier=0.7, seed=seed),
        "dp_proxskip": lambda: [*proxskip(p=0.3, seed=seed),
                                DifferentialPrivacy(0.3, 0.7, target_quantile=0.5, count_noise=1.0, seed=seed)],
        "dp_local": lambda: dp_fedavg(local_steps=3, clip_norm=0.3, noise_multiplier=0.7, noise="local", seed=seed),
    }


def problem() -> tuple[list[tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]:
    """Heterogeneous regression clients (each its own teacher) and a held-out split."""
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(DIM, 1, generator=g, dtype=torch.float64)
    clients = []
    for m in SIZES:
        x = torch.randn(m, DIM, generator=g, dtype=torch.float64)
        w = teacher + 0.5 * torch.randn(DIM, 1, generator=g, dtype=torch.float64)
        clients.append((x, x @ w + 0.1 * torch.randn(m, 1, generator=g, dtype=torch.float64)))
    x = torch.randn(40, DIM, generator=g, dtype=torch.float64)
    return clients, (x, x @ teacher)


class LoggingClient(L.LightningModule):
    """A user's LightningModule as the client model: its ``training_step`` returns the loss and ``self.log``s it
    (the module logs Σ_i w_i of the values as ``train/mse``)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(DIM, 5), nn.Tanh(), nn.Linear(5, 1)).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = ((self(x) - y) ** 2).mean()
        self.log("mse", loss)
        return loss


def build(spec: dict[str, Any]) -> tuple[FederatedLightningModule, FederatedDataModule, list[Callback]]:
    L.seed_everything(SEED, verbose=False)
    dtype = getattr(torch, spec.get("dtype", "float64"))
    clients, test = problem()
    if spec.get("client") == "lightning":
        module = FederatedLightningModule(LoggingClient(dtype), lr=0.05)
    else:
        model = nn.Sequential(nn.Linear(DIM, 5), nn.Tanh(), nn.Linear(5, 1)).to(dtype)
        personal = {"personal_params": ["2.*"], "personalize_steps": 2} if spec.get("personal") else {}
        module = FederatedLightningModule(model, lr=0.05, loss="mse", momentum=spec.get("momentum", 0.0),
                                          num_clients=len(clients) if spec.get("num_clients_at_init") else None,
                                          **personal)
    # "personal": a personal head, personalized evaluation, and client test splits (the last client has none)
    client_test = [(x[:3], y[:3]) for x, y in clients[:-1]] + [(clients[-1][0][:0], clients[-1][1][:0])] \
        if spec.get("personal") else None
    dm = FederatedDataModule.from_client_tensors(clients, test=test, batch_size=BATCH, seed=SEED,
                                                 client_test=client_test)
    seed = 11 + spec.get("seed_offset_per_rank", 0) * int(os.environ.get("RANK", "0"))
    return module, dm, presets(seed)[spec["preset"]]()


# Lightning's advice that does not apply to these runs: the state after the optimizer step is what the
# checkpoint should hold, the resumed Trainers need no ModelCheckpoint, and the data are sampled per step.
_EXPECTED_WARNINGS = (
    ".*ModelCheckpoint with manual optimization.*",
    ".*callbacks used to create the checkpoint.*",
    ".*dataloader is not resumable.*",
)


# torch.distributed collectives issued by this process: name -> [calls, tensor entries] (counted under torchrun)
COLLECTIVES: dict[str, list[int]] = {}
_COUNTED = ("all_reduce", "broadcast", "all_gather", "all_gather_object", "barrier")


def count_collectives() -> None:
    """Wrap the collectives of ``torch.distributed`` (looked up at call time by Lightning and the framework)."""
    for name in _COUNTED:
        original = getattr(torch.distributed, name)

        def counted(*args: Any, _original: Any = original, _name: str = name, **kwargs: Any) -> Any:
            entry = COLLECTIVES.setdefault(_name, [0, 0])
            entry[0] += 1
            if args and isinstance(args[0], torch.Tensor):
                entry[1] += args[0].numel()
            return _original(*args, **kwargs)

        setattr(torch.distributed, name, counted)


class Record(Callback):
    """What this process's fit ran: the first step, the number of steps, the steps that ended a round (the
    coin's outcomes), and the collectives of every step (from one step's end to the next, so Lightning's own
    per-step collectives count too). A resumed fit must start at the checkpoint's step, not from scratch."""

    def __init__(self) -> None:
        self.first_step: int | None = None
        self.steps_run = 0
        self.round_steps: list[int] = []
        self.collectives: list[dict[str, tuple[int, int]]] = []
        self._rounds_before = 0
        self._counted_before: dict[str, tuple[int, int]] = {}

    def _count(self) -> dict[str, tuple[int, int]]:
        return {k: (v[0], v[1]) for k, v in COLLECTIVES.items()}

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._counted_before = self._count()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.first_step is None:
            self.first_step = trainer.global_step
        self._rounds_before = pl_module.round_index

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.steps_run += 1
        if pl_module.round_index != self._rounds_before:
            self.round_steps.append(trainer.global_step)
        now = self._count()
        before = self._counted_before
        self.collectives.append({k: (c - before.get(k, (0, 0))[0], e - before.get(k, (0, 0))[1])
                                 for k, (c, e) in now.items() if c != before.get(k, (0, 0))[0]})
        self._counted_before = now

    def as_dict(self) -> dict[str, Any]:
        return {"first_step": self.first_step, "steps_run": self.steps_run, "round_steps": self.round_steps,
                "collectives": self.collectives}


def _shared(trainer: L.Trainer, module: FederatedLightningModule) -> dict[str, Any]:
    """What every rank holds for itself and must agree on, and the rank's own client ids."""
    return {
        "rank": trainer.global_rank,
        "local_clients": module.client_ids.tolist(),
        "global_model": {k: v.detach().cpu().clone() for k, v in module.global_model.state_dict().items()},
        "comm": {k: v.detach().cpu().clone() for k, v in module.comm.state_dict().items()},
        "round_index": module.round_index,
        "callback_metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
    }


def _save_per_rank(out: Path, name: str, rank: int, record: dict[str, Any]) -> None:
    torch.save(record, out / f"{name}.rank{rank}.pt")


def run_cli(spec: dict[str, Any]) -> dict[str, Any]:
    """The command line (``train.py fit ...``) on this process, or on every rank under torchrun."""
    cli = FederatedCLI(args=spec["cli"])
    trainer, module = cli.trainer, cli.model
    record = {**_shared(trainer, module), "final_metrics": dict(module.final_metrics),
              "global_step": trainer.global_step, "world_size": trainer.world_size}
    _save_per_rank(Path(spec["out"]), spec["name"], trainer.global_rank, record)
    return record


def run_reduce(spec: dict[str, Any]) -> dict[str, Any]:
    """``FederatedDDPStrategy.reduce`` on this process group: every rank contributes rank + 1."""
    strategy = FederatedDDPStrategy()
    rank = torch.distributed.get_rank()
    ops: dict[str, Any] = {"sum": "sum", "mean": "mean", "avg_op": torch.distributed.ReduceOp.AVG,
                           "max": "max", "min": "min", "none": None}
    record: dict[str, Any] = {k: strategy.reduce(torch.tensor([rank + 1.0]), reduce_op=op).tolist()
                              for k, op in ops.items()}
    record["int_mean"] = strategy.reduce(torch.tensor([rank + 1]), reduce_op="mean").tolist()
    _save_per_rank(Path(spec["out"]), spec["name"], rank, record)
    return record


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """One run; the world size comes from the environment (torchrun's ``WORLD_SIZE``, else 1)."""
    with warnings.catch_warnings():
        for message in _EXPECTED_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        return _run(spec)


def _run(spec: dict[str, Any]) -> dict[str, Any]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    out = Path(spec["out"])
    module, dm, callbacks = build(spec)
    recorder = Record()
    callbacks.append(recorder)
    if spec.get("ckpt_every"):
        callbacks.append(ModelCheckpoint(dirpath=out / f"{spec['name']}_ckpt", filename="{step}",
                                         every_n_train_steps=spec["ckpt_every"], save_top_k=-1))
    logger = CSVLogger(out, name=spec["name"], version=0) if spec.get("log") else False
    trainer = L.Trainer(
        max_steps=spec["steps"], accelerator="cpu", callbacks=callbacks, logger=logger,
        log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=bool(spec.get("ckpt_every")), num_sanity_val_steps=0,
        limit_val_batches=1.0 if spec.get("log") else 0,
        # a short collective timeout: ranks that wait in different collectives fail with gloo's message (which
        # names the collective) well before the test's launch timeout
        **({"strategy": FederatedDDPStrategy(timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S)),
            "devices": int(os.environ["LOCAL_WORLD_SIZE"])} if world > 1 else {}),
    )
    if spec.get("seed_offset_per_rank"):
        try:
            trainer.fit(module, datamodule=dm)
        except RuntimeError as err:
            if trainer.is_global_zero:
                (out / f"{spec['name']}.err").write_text(str(err))
            return {}
        raise AssertionError("ranks with different schedule seeds must not train")
    trainer.fit(module, datamodule=dm, ckpt_path=spec.get("resume"))
    state = trainer.strategy.lightning_module_state_dict()  # all n clients (a collective on every rank)
    optimizer = trainer.strategy.optimizer_state(trainer.optimizers[0])
    result = {
        "state": {k: v.clone() for k, v in state.items()},
        "optimizer": optimizer,
        "global_step": trainer.global_step,
        "round_index": module.round_index,
        "world_size": trainer.world_size,
        "local_clients": module.client_ids.tolist(),
        "final_metrics": dict(module.final_metrics),
        "client_metrics": dict(module.client_metrics),
        **recorder.as_dict(),
    }
    shared = {**_shared(trainer, module), **recorder.as_dict()}
    if spec.get("log"):  # the evaluation loop on its own (no fitting: the client blocks are not re-broadcast)
        metrics = trainer.validate(module, datamodule=dm, verbose=False)[0]
        result["validate"] = shared["validate"] = {k: float(v) for k, v in metrics.items()}
    _save_per_rank(out, spec["name"], trainer.global_rank, shared)
    if trainer.is_global_zero:
        torch.save(result, out / f"{spec['name']}.pt")
    return result


def main(spec_file: str) -> None:
    quiet_irrelevant_warnings()
    count_collectives()
    try:
        for spec in json.loads(Path(spec_file).read_text()):
            if "cli" in spec:
                run_cli(spec)
            elif "reduce" in spec:
                run_reduce(spec)
            else:
                run(spec)
    finally:
        # Lightning keeps the process group for later fits; tearing it down before the interpreter exits keeps
        # gloo's threads from being destroyed while still running ("terminate called without an active exception")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
