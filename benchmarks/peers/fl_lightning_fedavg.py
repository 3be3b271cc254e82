"""The peers benchmark's FedAvg workload in fl-lightning (see ``workload.py``), as a user would write it.

    python benchmarks/peers/fl_lightning_fedavg.py --workload lr100 --rounds 5 --threads 1
    python benchmarks/peers/fl_lightning_fedavg.py --workload flute1000 --rounds 20 --in-place   # without the workspace
    python benchmarks/peers/fl_lightning_fedavg.py --workload lr100 --rounds 20 --no-fused       # autograd's gradient

``FederatedLightningModule`` (vectorised clients) + ``algorithms.fedavg(local_steps=10)`` (with
``cohort_size=10`` for the 10-of-1,000 workload) + ``FederatedDataModule.from_client_tensors``, one
``Trainer.fit`` of ``rounds × 10`` local steps. Prints one ``RESULT {json}`` line. ``--in-place`` trains a sampled
cohort in the ``[n, ...]`` stack (``cohort_workspace=False``) instead of on its workspace, the default;
``--no-fused`` takes autograd's weight gradient and then the optimizer's step (``fused_sgd=False``) instead of the
fused update, the default.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from workload import Workload, eval_loss, init_model, make_data, parse_args, peak_rss_mb, report  # noqa: E402

import fl_lightning  # noqa: E402
from fl_lightning import FederatedDataModule, FederatedLightningModule  # noqa: E402
from fl_lightning.algorithms import fedavg  # noqa: E402
from fl_lightning.cli import quiet_irrelevant_warnings  # noqa: E402


class _Clock(L.Callback):
    """The wall time of the training batches: from the first local step's start to the last one's end."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.end = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self.start is None:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.end = time.perf_counter()


def run(w: Workload, rounds: int, cohort_workspace: bool | str = "auto", fused_sgd: bool = True) -> dict[str, Any]:
    """Train ``rounds`` FedAvg rounds of workload ``w``; print and return the result line."""
    quiet_irrelevant_warnings()
    x, y, x_eval, y_eval = make_data(w)
    m = w.samples_per_client
    clients = [(x[i * m:(i + 1) * m], y[i * m:(i + 1) * m]) for i in range(w.clients)]
    dm = FederatedDataModule.from_client_tensors(clients, batch_size=w.batch_size, num_classes=w.classes,
                                                 steps_per_epoch=10**9, seed=0)
    model = init_model(w)
    loss_first = eval_loss(model, x_eval, y_eval)
    module = FederatedLightningModule(model, lr=w.lr, loss="cross_entropy", vectorize=True,
                                      cohort_workspace=cohort_workspace, fused_sgd=fused_sgd)
    cohort = None if w.clients_per_round == w.clients else w.clients_per_round
    clock = _Clock()
    trainer = L.Trainer(max_steps=rounds * w.local_steps, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[*fedavg(local_steps=w.local_steps, cohort_size=cohort, seed=0), clock])
    trainer.fit(module, dm)
    assert clock.start is not None, "no training step ran"
    loss_last = eval_loss(module.global_model, x_eval, y_eval)
    return report(w, rounds=int(module.comm.rounds), seconds=clock.end - clock.start, startup_s=clock.start - T0,
                  loss_first=loss_first, loss_last=loss_last, peak_rss_mb=peak_rss_mb(), framework="fl_lightning",
                  version=fl_lightning.__version__, torch=torch.__version__, local_steps_counted=trainer.global_step,
                  cohort_workspace=cohort_workspace, fused_sgd=fused_sgd)


if __name__ == "__main__":
    flags = {"--in-place", "--no-fused"}
    workload, n_rounds, _ = parse_args([a for a in sys.argv[1:] if a not in flags])
    run(workload, n_rounds, cohort_workspace=False if "--in-place" in sys.argv else "auto",
        fused_sgd="--no-fused" not in sys.argv)
