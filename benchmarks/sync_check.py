"""Host synchronisations in the steady-state local step on CUDA (issue 17, item 4).

    python benchmarks/sync_check.py                        # MLP 784-64-10, 100 clients, ProxSkip k = 5
    python benchmarks/sync_check.py --algorithm fedavg --cohort 10 --clients 1000 --compile

Trains on the GPU through Lightning's accelerator (``Trainer(accelerator="cuda")``), and from step ``--warmup`` on
runs every training step under ``torch.cuda.set_sync_debug_mode("warn")``, which makes every CUDA call that waits
for the device warn. Steps are told apart: *local* steps (no round, no logging: the steady state, which should
never synchronise), *round* steps (the coin came up; the round's non-zero counts and the finite-loss check may
synchronise once) and *logging* steps. Prints one JSON line: the synchronising calls per kind of step and the
first few messages. Without a CUDA device it prints ``{"skipped": ...}`` and exits 0 (nothing to check on a CPU,
where there is no device to wait for).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--cohort", type=int, default=None, help="clients per round (FedAvg's sampling)")
    parser.add_argument("--algorithm", choices=("proxskip", "sparse_proxskip", "fedavg"), default="proxskip")
    parser.add_argument("--k", type=int, default=5, help="local steps per round")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="compile_step=True")
    args = parser.parse_args(argv)

    import lightning as L
    import torch
    from torch import nn

    if not torch.cuda.is_available():
        result: dict[str, Any] = {"skipped": "no CUDA device: host synchronisation is a GPU question"}
        print(json.dumps(result))
        return result

    from fl_lightning import FederatedDataModule, FederatedLightningModule
    from fl_lightning.algorithms import fedavg, proxskip, sparse_proxskip
    from fl_lightning.cli import quiet_irrelevant_warnings

    quiet_irrelevant_warnings()
    g = torch.Generator().manual_seed(0)
    clients = [(torch.randn(100, 784, generator=g), torch.randint(0, 10, (100,), generator=g))
               for _ in range(args.clients)]
    dm = FederatedDataModule.from_client_tensors(clients, batch_size=32, num_classes=10, seed=0)
    model = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    module = FederatedLightningModule(model, lr=0.05, loss="cross_entropy", compile_step=args.compile)
    callbacks = {"proxskip": lambda: proxskip(p=1 / args.k, mode="fixed"),
                 "sparse_proxskip": lambda: sparse_proxskip(p=1 / args.k, mode="fixed", density=0.1),
                 "fedavg": lambda: fedavg(local_steps=args.k, cohort_size=args.cohort, seed=0)}[args.algorithm]()
    counts: Counter[str] = Counter()
    messages: list[str] = []

    class Watch(L.Callback):
        def __init__(self) -> None:
            self._catch: Any = None
            self._rounds = 0

        def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, *rest: Any) -> None:
            if trainer.global_step >= args.warmup:
                self._rounds = int(pl_module.round_index)
                self._catch = warnings.catch_warnings(record=True)
                self._seen = self._catch.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")

        def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *rest: Any) -> None:
            if self._catch is None:
                return
            torch.cuda.set_sync_debug_mode("default")
            self._catch.__exit__(None, None, None)
            synced = [str(w.message) for w in self._seen if "synchroniz" in str(w.message)]
            logging = (trainer.global_step % trainer.log_every_n_steps) == 0
            kind = "round" if pl_module.round_index != self._rounds else "logging" if logging else "local"
            counts[f"{kind}_steps"] += 1
            counts[f"{kind}_syncs"] += len(synced)
            messages.extend(m.splitlines()[0] for m in synced[:2] if len(messages) < 6)
            self._catch = None

    trainer = L.Trainer(max_steps=args.steps, accelerator="cuda", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, log_every_n_steps=50, callbacks=[*callbacks, Watch()])
    trainer.fit(module, dm)
    result = {"device": torch.cuda.get_device_name(), "settings": vars(args), **counts, "first_messages": messages}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
