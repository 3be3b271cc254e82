"""The peers benchmark's FedAvg workload in pfl-research (``pip install pfl``; see ``workload.py``).

    .peer-venvs/pfl/bin/python benchmarks/peers/pfl_fedavg.py --workload lr100 --rounds 5 --threads 1

Written as pfl's own examples do: a ``torch.nn.Module`` with ``loss`` and ``metrics``, wrapped in
``pfl.model.pytorch.PyTorchModel`` (local SGD, a central SGD optimizer of learning rate 1: plain FedAvg),
``pfl.data.federated_dataset.FederatedDataset`` of one ``pfl.data.dataset.Dataset`` per user with the
``minimize_reuse`` user sampler, ``pfl.aggregate.simulate.SimulatedBackend`` (one process; pfl's distributed
simulation needs Horovod or a ``torchrun`` launch per worker, which this benchmark does not do), and
``pfl.algorithm.FederatedAveraging().run(...)`` with ``NNAlgorithmParams`` / ``NNTrainHyperParams``.

pfl's ``local_num_steps`` stops early when a user's data runs out (226 samples are 8 batches of 32), so each
user's dataset for a round is 10 × 32 rows drawn from its own samples (shuffled, cycled), and training takes one
epoch of it: exactly 10 local steps of batch 32, as in the other implementations. Prints one ``RESULT {json}``
line.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from workload import Workload, client_slice, eval_loss, init_model, make_data, parse_args, peak_rss_mb, report  # noqa: E402


def run(w: Workload, rounds: int) -> dict[str, Any]:
    """Train ``rounds`` FedAvg rounds of workload ``w`` with pfl; print and return the result line."""
    import numpy as np
    import pfl
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.metrics import Metrics, Weighted
    from pfl.model.pytorch import PyTorchModel

    np.random.seed(0)  # pfl's samplers draw from numpy's global state
    x, y, x_eval, y_eval = make_data(w)
    gen = torch.Generator().manual_seed(0)
    need = w.local_steps * w.batch_size

    def make_dataset(user_id: int) -> Dataset:
        rows = torch.arange(client_slice(w, user_id).start, client_slice(w, user_id).stop)
        order = torch.cat([rows[torch.randperm(len(rows), generator=gen)]
                           for _ in range(-(-need // len(rows)))])[:need]
        return Dataset(raw_data=[x[order], y[order]], user_id=str(user_id))

    users = list(range(w.clients))
    data = FederatedDataset(make_dataset, get_user_sampler("minimize_reuse", users))

    class LogReg(torch.nn.Module):
        """Logistic regression with the ``loss`` / ``metrics`` methods pfl's ``PyTorchModel`` calls."""

        def __init__(self) -> None:
            super().__init__()
            self.linear = init_model(w)

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return self.linear(inputs)

        def loss(self, inputs: torch.Tensor, targets: torch.Tensor, eval: bool = False) -> torch.Tensor:
            self.eval() if eval else self.train()
            return torch.nn.functional.cross_entropy(self(inputs), targets)

        def metrics(self, inputs: torch.Tensor, targets: torch.Tensor, eval: bool = False) -> dict[str, Any]:
            loss = torch.nn.functional.cross_entropy(self(inputs), targets, reduction="sum").item()
            return {"loss": Weighted(loss, len(inputs))}

    net = LogReg()
    loss_first = eval_loss(net, x_eval, y_eval)
    model = PyTorchModel(model=net, local_optimizer_create=torch.optim.SGD,
                         central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0))

    class Count(TrainingProcessCallback):
        """Counts the central iterations and takes the time of the first one's start and the last one's end."""

        def __init__(self) -> None:
            self.rounds, self.start, self.end = 0, 0.0, 0.0

        def on_train_begin(self, *, model: Any) -> Metrics:
            self.start = time.perf_counter()
            return Metrics()

        def after_central_iteration(self, aggregate_metrics: Metrics, model: Any, *,
                                    central_iteration: int) -> tuple[bool, Metrics]:
            self.rounds += 1
            self.end = time.perf_counter()
            return False, Metrics()

    count = Count()
    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(central_num_iterations=rounds, evaluation_frequency=10**9,
                                           train_cohort_size=w.clients_per_round, val_cohort_size=None),
        backend=SimulatedBackend(training_data=data, val_data=None),
        model=model,
        model_train_params=NNTrainHyperParams(local_num_epochs=1, local_learning_rate=w.lr,
                                              local_batch_size=w.batch_size),
        model_eval_params=NNEvalHyperParams(local_batch_size=w.batch_size),
        callbacks=[count],
    )
    loss_last = eval_loss(net, x_eval, y_eval)
    return report(w, rounds=count.rounds, seconds=count.end - count.start, startup_s=count.start - T0,
                  loss_first=loss_first, loss_last=loss_last, peak_rss_mb=peak_rss_mb(), framework="pfl",
                  version=pfl.__version__ if hasattr(pfl, "__version__") else _version("pfl"),
                  torch=torch.__version__)


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


if __name__ == "__main__":
    workload, n_rounds, _ = parse_args()
    run(workload, n_rounds)
