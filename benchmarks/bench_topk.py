"""The per-step TopK of Sparse-ProxSkip alone: ``torch.topk`` (``reference``) against the fast path, on real models.

    python benchmarks/bench_topk.py --model mlp784 --clients 100
    python benchmarks/bench_topk.py --model logreg --clients 1000 --rows 200 --threads 1,2

Trains ``sparse_proxskip`` (δ = 0.1, k = 5 local steps per round, the synthetic data of ``bench_clients.py``) for
``--steps`` local steps and keeps the clients' weights as they are just before each local TopK (the first
``--rows`` clients: the logistic regression's 1000 × 48,608 weights would take 3 GB over 15 steps). Then it
replays those TopKs with ``topk_prune_``: for every step from ``--first`` on, each method in turn, best of
``--repeats``, the fast path starting from the cache it would hold in the run; it prints the mean milliseconds
per step. The two methods return the same masks and weights (checked here too).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def capture(model: str, clients: int, steps: int, rows: int) -> list[dict[str, Any]]:
    """The pruned tensors of the first ``rows`` clients before each of the first ``steps`` local TopKs."""
    import lightning as L

    from fl_lightning import FederatedDataModule, FederatedLightningModule
    from fl_lightning.algorithms import sparse_proxskip
    from fl_lightning.callbacks import TopKPruning
    from fl_lightning.cli import quiet_irrelevant_warnings

    sys.path.insert(0, str(HERE))
    from bench_clients import SPECS, Config, _synthetic_clients, build_model

    quiet_irrelevant_warnings()
    cfg = Config(model, clients, "vectorized", algorithm="sparse_proxskip")
    snaps: list[dict[str, Any]] = []
    callbacks = sparse_proxskip(p=1.0 / cfg.k, mode="fixed", density=cfg.density, seed=0)
    pruning = next(cb for cb in callbacks if isinstance(cb, TopKPruning))
    inner = pruning.on_local_step_end

    def on_local_step_end(trainer: Any, module: Any) -> None:
        snaps.append({k: module.clients.x[k].detach()[:rows].clone() for k in pruning.names})
        inner(trainer, module)

    pruning.on_local_step_end = on_local_step_end  # type: ignore[method-assign]
    dm = FederatedDataModule.from_client_tensors(_synthetic_clients(cfg), batch_size=cfg.batch_size,
                                                 num_classes=SPECS[model].num_classes, steps_per_epoch=10**9, seed=123)
    module = FederatedLightningModule(build_model(model), lr=cfg.lr, loss="cross_entropy", vectorize=True)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=callbacks)
    trainer.fit(module, dm)
    return snaps


def replay(snaps: list[dict[str, Any]], first: int, repeats: int, density: float) -> dict[str, float]:
    """Mean milliseconds per step of ``topk_prune_`` from step ``first`` on, per method (best of ``repeats``)."""
    import torch

    from fl_lightning.ops import TopKWarmStart, topk_prune_

    warm = TopKWarmStart()
    total = {"reference": 0.0, "fast": 0.0}
    for step, x in enumerate(snaps):
        if step >= first:
            best = dict.fromkeys(total, float("inf"))
            out: dict[str, Any] = {}
            for _ in range(repeats):
                for method in total:
                    cache = copy.deepcopy(warm)
                    y = {k: v.clone() for k, v in x.items()}
                    start = time.perf_counter()
                    masks = topk_prune_(y, density, method=method, warm_start=cache)
                    best[method] = min(best[method], time.perf_counter() - start)
                    out[method] = (masks, y)
            for k in x:
                assert torch.equal(out["reference"][0][k], out["fast"][0][k]), (step, k)
                assert torch.equal(out["reference"][1][k].view(torch.int32), out["fast"][1][k].view(torch.int32))
            for method in total:
                total[method] += 1e3 * best[method]
        topk_prune_({k: v.clone() for k, v in x.items()}, density, method="fast", warm_start=warm)
    return {method: t / max(1, len(snaps) - first) for method, t in total.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mlp784", choices=("logreg", "mlp", "mlp784"))
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rows", type=int, default=None, help="clients kept for the replay (default: all)")
    parser.add_argument("--steps", type=int, default=15, help="local steps trained (k = 5 per round)")
    parser.add_argument("--first", type=int, default=5, help="first replayed step (after the warm-up round)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", default="1", help="comma list of torch.set_num_threads values")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    snaps = capture(args.model, args.clients, args.steps, args.rows or args.clients)
    rows = next(iter(snaps[0].values())).shape[0]
    d = sum(v[0].numel() for v in snaps[0].values())
    for threads in (int(t) for t in args.threads.split(",") if t):
        torch.set_num_threads(threads)
        res = replay(snaps, args.first, args.repeats, 0.1)
        print(f"{args.model}, {rows} of {args.clients} clients × {d:,} weights, steps {args.first}–{len(snaps) - 1}, "
              f"{threads} thread(s): reference {res['reference']:.1f} ms, fast {res['fast']:.1f} ms per TopK "
              f"({res['reference'] / res['fast']:.1f}×)")


if __name__ == "__main__":
    main()
