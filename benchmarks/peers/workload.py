"""The FedAvg workload every implementation in ``benchmarks/peers/`` runs, and the data they all generate.

This file imports only the standard library and ``torch`` (imported inside the functions), so that the Flower and
pfl-research implementations can import it from their own virtualenvs, where fl-lightning is not installed.

Two workloads (:data:`WORKLOADS`), both multinomial logistic regression on synthetic data of MNIST/FEMNIST shape
(784 features), FedAvg with 10 local SGD steps of batch 32 per round, every client weighted equally:

- ``lr100``: 100 clients, 62 classes (FEMNIST's), 226 samples per client (LEAF FEMNIST's mean: 817,851 samples over
  3,597 writers), full participation;
- ``flute1000``: FLUTE's LR-MNIST shape: 1,000 clients, 10 classes (MNIST's), 60 samples per client (MNIST's
  60,000 training images over 1,000 clients), a random cohort of 10 clients per round.

The data: a fixed random linear teacher ``W*`` labels Gaussian inputs (``y = argmax(x W* / 4 + noise)``), so the
task can be learnt and the central loss of the global model falls as FedAvg trains. The evaluation set (2,000
samples from the same distribution) is what ``loss_first`` / ``loss_last`` are measured on, outside the timed part
where the framework allows it.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from dataclasses import asdict, dataclass
from typing import Any

SEED = 20261203  #: every implementation draws the same data from this seed


@dataclass(frozen=True)
class Workload:
    """One FedAvg workload: the model's shape, the clients, the cohort and the local work per round."""

    name: str
    clients: int
    clients_per_round: int
    samples_per_client: int
    features: int = 784
    classes: int = 62
    local_steps: int = 10
    batch_size: int = 32
    lr: float = 0.05
    eval_samples: int = 2000

    @property
    def steps_per_round(self) -> int:
        """Client-steps of one round: local steps × clients in the cohort."""
        return self.local_steps * self.clients_per_round


WORKLOADS: dict[str, Workload] = {
    "lr100": Workload("lr100", clients=100, clients_per_round=100, samples_per_client=226, classes=62),
    "flute1000": Workload("flute1000", clients=1000, clients_per_round=10, samples_per_client=60, classes=10),
}


def make_data(w: Workload) -> tuple[Any, Any, Any, Any]:
    """``(x, y, x_eval, y_eval)``: the clients' samples concatenated (client i owns rows
    ``i·m .. (i+1)·m`` with ``m = samples_per_client``) and the central evaluation set; float32 / int64 tensors."""
    import torch

    gen = torch.Generator().manual_seed(SEED)
    teacher = torch.randn(w.features, w.classes, generator=gen) / w.features**0.5
    n = w.clients * w.samples_per_client + w.eval_samples

    x = torch.randn(n, w.features, generator=gen)
    logits = 4.0 * x @ teacher + torch.randn(n, w.classes, generator=gen)
    y = logits.argmax(1)
    m = w.clients * w.samples_per_client
    return x[:m].contiguous(), y[:m].contiguous(), x[m:].contiguous(), y[m:].contiguous()


_CACHE: dict[str, tuple[Any, Any, Any, Any]] = {}


def cached_data(w: Workload) -> tuple[Any, Any, Any, Any]:
    """:func:`make_data`, built once per process (a module-level cache: Flower's Ray actors import this module
    by name and keep it, as Flower's quick-start keeps its ``FederatedDataset``)."""
    if w.name not in _CACHE:
        _CACHE[w.name] = make_data(w)
    return _CACHE[w.name]


def client_slice(w: Workload, cid: int) -> slice:
    """The rows of client ``cid`` in :func:`make_data`'s ``x`` and ``y``."""
    return slice(cid * w.samples_per_client, (cid + 1) * w.samples_per_client)


def init_model(w: Workload) -> Any:
    """The initial global model, the same in every implementation: ``nn.Linear(features, classes)``, seeded."""
    import torch

    torch.manual_seed(SEED)
    return torch.nn.Linear(w.features, w.classes)


def eval_loss(model: Any, x: Any, y: Any) -> float:
    """Mean cross-entropy of ``model`` on ``(x, y)``."""
    import torch

    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(x), y))


def peak_rss_mb() -> float:
    """Peak resident memory of this process and of its finished, waited-for children (MiB; Linux reports KiB).

    Frameworks that run clients in other processes (Ray actors, which are not children of the driver) have those
    counted by the driver instead (see ``flwr_fedavg.py``)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class TreeMemory:
    """Samples the proportional set size (PSS: shared pages split among the processes that map them) of this
    process and all its descendants every ``interval`` seconds, in a daemon thread; ``peak_mb`` is the largest
    sum seen. For frameworks that run clients in other processes (Flower's Ray actors), whose memory
    ``ru_maxrss`` of the driver does not see. Linux only (``/proc``); 0 elsewhere."""

    def __init__(self, interval: float = 0.25) -> None:
        import threading

        self.peak_kb = 0
        self.processes = 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(interval,), daemon=True)
        self._thread.start()

    def _loop(self, interval: float) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(interval)

    def sample(self) -> None:
        """Sum the PSS of the process tree now and keep the peak."""
        todo, seen = [os.getpid()], []
        while todo:
            pid = todo.pop()
            seen.append(pid)
            todo.extend(_children(pid))
        total = sum(_pss_kb(p) for p in seen)
        if total > self.peak_kb:
            self.peak_kb, self.processes = total, len(seen)

    def stop(self) -> float:
        """Stop sampling; the peak in MiB."""
        self._stop.set()
        self._thread.join()
        return self.peak_kb / 1024


def parse_args(argv: list[str] | None = None) -> tuple[Workload, int, int]:
    """``--workload NAME --rounds R --threads T`` of a standalone implementation; sets the thread count."""
    import argparse

    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", default="lr100", choices=sorted(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    return WORKLOADS[args.workload], args.rounds, args.threads


def report(w: Workload, *, rounds: int, seconds: float, startup_s: float, loss_first: float, loss_last: float,
           peak_rss_mb: float, framework: str, version: str, steps: int | None = None,
           **extra: Any) -> dict[str, Any]:
    """Print the one JSON line a runner reads (prefixed ``RESULT``) and return it.

    ``rounds`` is what the framework counted, not what was asked for; ``steps`` the client-steps it ran (default
    ``rounds × steps_per_round``, for frameworks that do not count them); ``seconds`` the wall time of the rounds
    (training only); ``startup_s`` from the process start to the first round (imports, data, the framework's
    set-up)."""
    steps = rounds * w.steps_per_round if steps is None else steps
    out = {"framework": framework, "version": version, "workload": asdict(w), "steps": steps,
           "rounds": rounds, "seconds": seconds, "startup_s": startup_s, "peak_rss_mb": peak_rss_mb,
           "loss_first": loss_first, "loss_last": loss_last, **extra}
    print("RESULT " + json.dumps(out), flush=True)
    sys.stdout.flush()
    return out
