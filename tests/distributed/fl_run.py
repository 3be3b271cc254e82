"""Federated runs for the scale-out tests (``tests/test_distributed.py``), on one process or under ``torchrun``.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed/fl_run.py SPEC.json

``SPEC.json`` lists runs ``{"name", "preset", "steps", "out", ...options}``; each run starts from
``seed_everything(SEED)`` and writes ``<out>/<name>.pt`` (rank 0): the module's state with all n clients
(``strategy.lightning_module_state_dict()``, gathered over the ranks), the optimizer state (also gathered),
the step and round counters and the world size. Options: ``ckpt_every`` (a ModelCheckpoint every k steps),
``resume`` (a checkpoint path), ``log`` (CSV logs, validation every epoch and ``trainer.validate`` at the
end), ``momentum``, ``dtype``
(``float64`` by default), ``num_clients_at_init`` (allocate the clients in the module's constructor, before
the ranks are known), ``seed_offset_per_rank`` (give every rank another schedule seed; the run must fail,
and rank 0 writes the error to ``<out>/<name>.err``).

The test imports :func:`run` to make the one-process references in its own process. Standalone on purpose
(no ``tests`` imports): torchrun runs it as a script.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

torch.set_num_threads(1)  # two ranks on a small machine: intra-op threads only oversubscribe it

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from torch import nn  # noqa: E402

from fl_lightning import FederatedDataModule, FederatedLightningModule  # noqa: E402
from fl_lightning.algorithms import fedavg, proxskip, sparse_proxskip  # noqa: E402
from fl_lightning.cli import quiet_irrelevant_warnings  # noqa: E402

SEED = 7
SIZES = (7, 9, 11, 8, 10)  # 5 clients of unequal sizes: 3 + 2 on two ranks
DIM = 6
BATCH = 4  # stochastic minibatches (with replacement)


def presets(seed: int) -> dict[str, Any]:
    return {
        "proxskip": lambda: proxskip(p=0.3, seed=seed),
        "sparse_proxskip": lambda: sparse_proxskip(p=0.3, mode="bernoulli", density=0.5, seed=seed),
        # one client per round: in every round one of the two ranks has no participating client
        "fedavg_cohort": lambda: fedavg(local_steps=3, cohort_size=1, seed=seed),
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


def build(spec: dict[str, Any]) -> tuple[FederatedLightningModule, FederatedDataModule, list[Callback]]:
    L.seed_everything(SEED, verbose=False)
    dtype = getattr(torch, spec.get("dtype", "float64"))
    model = nn.Sequential(nn.Linear(DIM, 5), nn.Tanh(), nn.Linear(5, 1)).to(dtype)
    clients, test = problem()
    module = FederatedLightningModule(model, lr=0.05, loss="mse", momentum=spec.get("momentum", 0.0),
                                      num_clients=len(clients) if spec.get("num_clients_at_init") else None)
    dm = FederatedDataModule.from_client_tensors(clients, test=test, batch_size=BATCH, seed=SEED)
    seed = 11 + spec.get("seed_offset_per_rank", 0) * int(os.environ.get("RANK", "0"))
    return module, dm, presets(seed)[spec["preset"]]()


# Lightning's advice that does not apply to these runs: the state after the optimizer step is what the
# checkpoint should hold, the resumed Trainers need no ModelCheckpoint, and the data are sampled per step.
_EXPECTED_WARNINGS = (
    ".*ModelCheckpoint with manual optimization.*",
    ".*callbacks used to create the checkpoint.*",
    ".*dataloader is not resumable.*",
)


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
    if spec.get("ckpt_every"):
        callbacks.append(ModelCheckpoint(dirpath=out / f"{spec['name']}_ckpt", filename="{step}",
                                         every_n_train_steps=spec["ckpt_every"], save_top_k=-1))
    logger = CSVLogger(out, name=spec["name"], version=0) if spec.get("log") else False
    trainer = L.Trainer(
        max_steps=spec["steps"], accelerator="cpu", callbacks=callbacks, logger=logger,
        log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=bool(spec.get("ckpt_every")), num_sanity_val_steps=0,
        limit_val_batches=1.0 if spec.get("log") else 0,
        **({"strategy": "federated_ddp", "devices": int(os.environ["LOCAL_WORLD_SIZE"])} if world > 1 else {}),
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
    }
    if spec.get("log"):  # the evaluation loop on its own (no fitting: the client blocks are not re-broadcast)
        metrics = trainer.validate(module, datamodule=dm, verbose=False)[0]
        result["validate"] = {k: float(v) for k, v in metrics.items()}
    if trainer.is_global_zero:
        torch.save(result, out / f"{spec['name']}.pt")
    return result


def main(spec_file: str) -> None:
    quiet_irrelevant_warnings()
    try:
        for spec in json.loads(Path(spec_file).read_text()):
            run(spec)
    finally:
        # Lightning keeps the process group for later fits; tearing it down before the interpreter exits keeps
        # gloo's threads from being destroyed while still running ("terminate called without an active exception")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
