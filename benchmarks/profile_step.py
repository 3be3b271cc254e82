"""Where a local step's time goes: the framework's phases against the hand-written step's.

    python benchmarks/profile_step.py --model logreg --clients 100        # framework and hand-written
    python benchmarks/profile_step.py --model mlp --clients 1000 --steps 500

Wall-clock milliseconds per local step (one thread, ProxSkip, k = 5, batch 32, the synthetic data of
``bench_clients.py``), averaged over ``--steps`` steps after 10 warm-up steps, split into the phases both
implementations share: drawing the minibatch (``sample``), forward + loss + backward, the control-variate
shift and the SGD update, and the communication round (amortised over the k steps of a round). The rest of
the framework's step is the module's bookkeeping (``training_step`` less its phases) and Lightning's loop
(``total`` less ``training_step``). Timers wrap whole functions, so a
phase includes the Python around its tensor operations; each configuration runs in its own process.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


class PhaseTimer:
    """Wall-clock time of wrapped functions, accumulated per phase while ``on`` is set."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.on = False

    def wrap(self, owner: Any, name: str, phase: str) -> None:
        inner: Callable[..., Any] = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.on:
                return inner(*args, **kwargs)
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - start

        setattr(owner, name, timed)


def profile(path: str, model: str, clients: int, steps: int, k: int) -> dict[str, float]:
    """Milliseconds per step of each phase (and ``total``) for ``path`` in {framework, handwritten}."""
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE))
    from bench_clients import SPECS, Config, _synthetic_clients, build_model

    cfg = Config(model, clients, path, k=k)
    timer = PhaseTimer()
    warmup = 10
    if path == "handwritten":
        from handwritten import ClientData, HandwrittenProxSkip, stacked_model

        data = ClientData.from_clients(_synthetic_clients(cfg), seed=123, device=torch.device("cpu"))
        hand = HandwrittenProxSkip(stacked_model(build_model(model), clients), data, lr=cfg.lr, k=k,
                                   batch_size=cfg.batch_size)
        timer.wrap(data, "sample", "sample")
        timer.wrap(hand, "losses_and_grads", "forward + loss + backward")
        timer.wrap(hand, "update", "shift + SGD update")
        timer.wrap(hand, "communicate", "round")
        for t in range(warmup):
            hand.step(t)
        timer.on = True
        start = time.perf_counter()
        for t in range(warmup, warmup + steps):
            hand.step(t)
        total = time.perf_counter() - start
    else:
        import lightning as L

        from fl_lightning import FederatedDataModule, FederatedLightningModule
        from fl_lightning.algorithms import proxskip
        from fl_lightning.cli import quiet_irrelevant_warnings

        quiet_irrelevant_warnings()
        dm = FederatedDataModule.from_client_tensors(_synthetic_clients(cfg), batch_size=cfg.batch_size,
                                                     num_classes=SPECS[model].num_classes, steps_per_epoch=10**9,
                                                     seed=123)
        module = FederatedLightningModule(build_model(model), lr=cfg.lr, loss="cross_entropy", vectorize=True)
        timer.wrap(dm, "sample", "sample")
        timer.wrap(module, "_forward_backward", "forward + loss + backward")
        timer.wrap(torch.optim.SGD, "step", "shift + SGD update")  # Lightning calls the shift inside the step
        timer.wrap(module, "_communicate", "round")
        timer.wrap(module, "training_step", "training_step (all of the above)")

        class Window(L.Callback):
            def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
                if trainer.global_step == warmup:
                    timer.on = True
                    self.start = time.perf_counter()

            def on_train_end(self, trainer: L.Trainer, *args: Any) -> None:
                self.total = time.perf_counter() - self.start

        window = Window()
        L.Trainer(max_steps=warmup + steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                  callbacks=[*proxskip(p=1.0 / k, mode="fixed", seed=0), window]).fit(module, dm)
        total = window.total
    out = {phase: 1e3 * s / steps for phase, s in timer.seconds.items()}
    out["total"] = 1e3 * total / steps
    return out


def isolated_objective(path: str, model: str, clients: int, steps: int) -> float:
    """Milliseconds per (sample + forward + loss + backward) alone, in a tight loop without updates or rounds:
    the framework's ``LocalObjective`` on stacked parameters, or the hand-written ``losses_and_grads``."""
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE))
    from bench_clients import Config, _synthetic_clients, build_model
    from handwritten import ClientData, HandwrittenProxSkip, stacked_model

    from fl_lightning.clients import ClientState
    from fl_lightning.losses import resolve_loss
    from fl_lightning.objective import ClientBatch, LocalObjective

    cfg = Config(model, clients, path)
    data = ClientData.from_clients(_synthetic_clients(cfg), seed=123, device=torch.device("cpu"))
    template = build_model(model)
    if path == "handwritten":
        hand = HandwrittenProxSkip(stacked_model(template, clients), data, lr=cfg.lr, k=cfg.k,
                                   batch_size=cfg.batch_size)

        def once(t: int) -> None:
            hand.losses_and_grads(*data.sample(t, cfg.batch_size))
    else:
        objective = LocalObjective(template, resolve_loss("cross_entropy"))
        params = dict(ClientState(template, clients).x.items())

        def once(t: int) -> None:
            x, y = data.sample(t, cfg.batch_size)
            for p in params.values():
                p.grad = None
            losses, _ = objective.vectorized(params, {}, ClientBatch(x, y))
            losses.sum().backward()
    for t in range(10):
        once(t)
    start = time.perf_counter()
    for t in range(10, 10 + steps):
        once(t)
    return 1e3 * (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="logreg", choices=("logreg", "mlp", "cnn"))
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per path, interleaved")
    parser.add_argument("--path", choices=("framework", "handwritten"), help=argparse.SUPPRESS)  # one child run
    args = parser.parse_args()
    if args.path:
        out = profile(args.path, args.model, args.clients, args.steps, args.k)
        out["sample + forward + backward, alone"] = isolated_objective(args.path, args.model, args.clients, args.steps)
        print(json.dumps(out))
        return
    runs: dict[str, list[dict[str, float]]] = {"framework": [], "handwritten": []}
    for _ in range(args.repeats):
        for path in runs:
            cmd = [sys.executable, __file__, "--path", path, "--model", args.model, "--clients", str(args.clients),
                   "--steps", str(args.steps), "--k", str(args.k)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs[path].append(json.loads(out.strip().splitlines()[-1]))
    print(f"| {args.model}, n = {args.clients}, ms per local step | framework | hand-written |\n|---|---:|---:|")
    phases = list(dict.fromkeys(p for path in runs.values() for r in path for p in r))
    for phase in phases:
        cells = []
        for path in runs:
            values = [r[phase] for r in runs[path] if phase in r]
            cells.append(f"{min(values):.2f}" if values else "–")
        print(f"| {phase} | {cells[0]} | {cells[1]} |")
    print(f"\n(best of {args.repeats} fresh processes per path, {args.steps} steps each)")


if __name__ == "__main__":
    main()
