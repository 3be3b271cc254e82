"""The peers benchmark's FedAvg workload in Flower (``pip install "flwr[simulation]"``; see ``workload.py``).

    .peer-venvs/flwr/bin/python benchmarks/peers/flwr_fedavg.py --workload lr100 --rounds 5 --threads 1

Written as Flower's PyTorch quick-start (Message API, Flower ≥ 1.21) does: a ``ClientApp`` whose ``@app.train()``
function loads the global ``ArrayRecord`` into a ``torch.nn.Module``, trains on the SuperNode's partition
(``context.node_config["partition-id"]``, data built once per actor process and cached, as the quick-start caches
its ``FederatedDataset``) and replies with its weights and ``num-examples``; a ``ServerApp`` whose ``@app.main()``
runs ``flwr.serverapp.strategy.FedAvg(fraction_train=clients_per_round / clients, fraction_evaluate=0)``
``.start(grid, initial_arrays, num_rounds)``; ``flwr.simulation.run_simulation`` with one SuperNode per client on
the Ray backend. ``run_simulation`` is deprecated in favour of ``flwr run`` (which needs a project directory and
a running SuperLink); it is the Python API of the same Simulation Engine.

Cores: Ray is started with ``num_cpus = --threads`` and each ClientApp asks for one CPU, so ``--threads`` actors
run the clients, each with one torch thread. Peak memory: the PSS of the driver and all its descendants (Ray's
GCS, raylet and worker processes) sampled every 0.25 s. Telemetry is switched off
(``FLWR_TELEMETRY_ENABLED=0``). Prints one ``RESULT {json}`` line.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import flwr  # noqa: E402
import torch  # noqa: E402
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402
from workload import (  # noqa: E402
    WORKLOADS,
    TreeMemory,
    Workload,
    cached_data,
    client_slice,
    eval_loss,
    init_model,
    make_data,
    parse_args,
    peak_rss_mb,
    report,
)

# The workload travels to the Ray actors in an environment variable (they import this module afresh).
_WORKLOAD_ENV = "FL_PEERS_WORKLOAD"


def _workload() -> Workload:
    return WORKLOADS[os.environ.get(_WORKLOAD_ENV, "lr100")]


def _client_data(w: Workload, cid: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y, _, _ = cached_data(w)
    rows = client_slice(w, cid)
    return x[rows], y[rows]


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training: 10 steps of batch 32 over the client's shuffled (and cycled) samples, plain SGD."""
    started = time.perf_counter()
    torch.set_num_threads(1)
    w = _workload()
    model = init_model(w)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = _client_data(w, int(context.node_config["partition-id"]))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=w.batch_size,
                                         shuffle=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=w.lr)
    steps, total = 0, 0.0
    while steps < w.local_steps:
        for xb, yb in loader:
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            optimizer.step()
            total += float(loss)
            steps += 1
            if steps == w.local_steps:
                break
    metrics = MetricRecord({"train_loss": total / steps, "num-examples": len(x), "num-steps": steps,
                            "client-s": time.perf_counter() - started})
    return Message(content=RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}),
                   reply_to=msg)


def _sum_steps(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Train metrics of a round: the local steps and the replies summed (the work check), the loss averaged."""
    _OUT.setdefault("round_ends", []).append(time.perf_counter())
    metrics = [next(iter(r.metric_records.values())) for r in records]
    return MetricRecord({"client-s": sum(float(m["client-s"]) for m in metrics),
                         "num-steps": sum(int(m["num-steps"]) for m in metrics), "replies": len(metrics),
                         "train_loss": sum(float(m["train_loss"]) for m in metrics) / max(len(metrics), 1)})


server_app = ServerApp()
_OUT: dict[str, Any] = {}  # what the ServerApp hands back to the script (it runs in this process)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """FedAvg for ``_OUT["rounds_asked"]`` rounds; the result and the rounds' wall time go to ``_OUT``."""
    w = _workload()
    strategy = FedAvg(fraction_train=w.clients_per_round / w.clients, fraction_evaluate=0.0,
                      min_train_nodes=w.clients_per_round, min_available_nodes=w.clients,
                      train_metrics_aggr_fn=_sum_steps)
    _OUT["start"] = time.perf_counter()
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(init_model(w).state_dict()),
                            num_rounds=_OUT["rounds_asked"])
    _OUT["end"] = time.perf_counter()
    _OUT["result"] = result


def run(w: Workload, rounds: int, threads: int) -> dict[str, Any]:
    """Train ``rounds`` FedAvg rounds of workload ``w`` in Flower's simulation; print and return the result line."""
    memory = TreeMemory()
    os.environ[_WORKLOAD_ENV] = w.name
    _OUT["rounds_asked"] = rounds
    _, _, x_eval, y_eval = make_data(w)
    model = init_model(w)
    loss_first = eval_loss(model, x_eval, y_eval)
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=w.clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": threads, "num_gpus": 0, "include_dashboard": False,
                                                 "log_to_driver": False}})
    if "result" not in _OUT:
        raise RuntimeError("the ServerApp did not finish (see Flower's log above)")
    result = _OUT["result"]
    model.load_state_dict(result.arrays.to_torch_state_dict())
    loss_last = eval_loss(model, x_eval, y_eval)
    per_round = result.train_metrics_clientapp
    steps = sum(int(m["num-steps"]) for m in per_round.values())
    tree_mb = memory.stop()
    return report(w, rounds=len(per_round), steps=steps, seconds=_OUT["end"] - _OUT["start"],
                  startup_s=_OUT["start"] - T0, loss_first=loss_first, loss_last=loss_last,
                  peak_rss_mb=max(tree_mb, peak_rss_mb()), driver_rss_mb=peak_rss_mb(), framework="flwr",
                  version=flwr.__version__, torch=torch.__version__, processes=memory.processes,
                  replies=[int(m["replies"]) for m in per_round.values()],
                  round_s=[b - a for a, b in zip([_OUT["start"], *_OUT["round_ends"]], _OUT["round_ends"])],
                  client_s=[float(m["client-s"]) for m in per_round.values()])


if __name__ == "__main__":
    workload, n_rounds, n_threads = parse_args()
    run(workload, n_rounds, n_threads)
