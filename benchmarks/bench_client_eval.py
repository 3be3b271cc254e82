"""What per-client evaluation costs: ``module.evaluate_clients()`` against the local steps it sits between.

    python benchmarks/bench_client_eval.py                      # the quickstart and a 100-client MNIST shape
    python benchmarks/bench_client_eval.py --out eval.json --repeats 7

For each configuration it trains the module for ``--steps`` local steps (ProxSkip, p = 0.2), then times, best
of ``--repeats``: one local step (the mean over a further ``--steps`` steps), the global model's evaluation on
the central test split (``evaluate_global``), the per-client evaluation (``evaluate_clients``) without and with
``personalize_steps = 5``. It prints a Markdown table and, with ``--out``, writes JSON. The cost of the client
metrics per round is ``evaluate_clients / eval_every``; at the end of a run they are computed once.

Configurations: ``quickstart`` (configs/quickstart.yaml: digits, 10 clients, MLP 64-64-10, 20 % client test
splits) and ``mnist100`` (synthetic 784-feature data in MNIST's shape, 100 clients of 600 samples, 20 % test,
MLP 784-64-10).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Callable
from typing import Any


def _best(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def build(name: str) -> tuple[Any, Any]:
    import torch

    from fl_lightning import FederatedDataModule, FederatedLightningModule
    from fl_lightning.algorithms import ProxSkip
    from fl_lightning.models import MLP

    if name == "quickstart":
        dm = FederatedDataModule("digits", num_clients=10, partition="dirichlet", partition_args={"alpha": 0.5},
                                 batch_size=32, client_test_fraction=0.2, seed=0)
        model = MLP(64, [64], 10)
    elif name == "mnist100":
        g = torch.Generator().manual_seed(0)
        clients = []
        for i in range(100):
            y = torch.randint(0, 10, (600,), generator=g)
            x = torch.randn(600, 784, generator=g) + 0.1 * y.unsqueeze(1) + 0.01 * i
            clients.append((x, y))
        dm = FederatedDataModule.from_client_tensors(clients, batch_size=32, seed=0, client_test_fraction=0.2)
        model = MLP(784, [64], 10)
    else:
        raise ValueError(f"unknown configuration {name!r}")
    module = FederatedLightningModule(model, lr=0.1, loss="cross_entropy", algorithm=ProxSkip(p=0.2))
    return module, dm


def measure(name: str, steps: int, repeats: int) -> dict[str, Any]:
    import lightning as L
    import torch

    L.seed_everything(0, verbose=False)
    module, dm = build(name)
    marks: list[float] = []

    class Clock(L.Callback):  # the second half of the steps: warm caches, no start-up
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step in (steps, 2 * steps):
                marks.append(time.perf_counter())

    trainer = L.Trainer(max_steps=2 * steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[Clock()])
    trainer.fit(module, datamodule=dm)
    step = (marks[1] - marks[0]) / steps
    with torch.no_grad():
        central = _best(lambda: module.evaluate_global(dm), repeats)
    clients = _best(lambda: module.evaluate_clients(dm), repeats)
    module.client_evaluation.personalize_steps = 5
    personal = _best(lambda: module.evaluate_clients(dm), repeats)
    return {"config": name, "clients": dm.num_clients, "client_test_samples": int(dm.client_test_sizes.sum()),
            "local_step_ms": 1e3 * step, "evaluate_global_ms": 1e3 * central, "evaluate_clients_ms": 1e3 * clients,
            "evaluate_clients_personalize5_ms": 1e3 * personal,
            "clients_eval_in_local_steps": clients / step}


def main(argv: list[str] | None = None) -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="quickstart,mnist100")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from fl_lightning.cli import quiet_irrelevant_warnings

    quiet_irrelevant_warnings()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = [measure(name, args.steps, args.repeats) for name in args.configs.split(",")]
    print("| config | clients | client test samples | local step (ms) | evaluate_global (ms) | evaluate_clients (ms) "
          "| + personalize 5 (ms) | client eval / local step |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['clients']} | {r['client_test_samples']} | {r['local_step_ms']:.2f} | "
              f"{r['evaluate_global_ms']:.2f} | {r['evaluate_clients_ms']:.2f} | "
              f"{r['evaluate_clients_personalize5_ms']:.2f} | {r['clients_eval_in_local_steps']:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"threads": args.threads, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
