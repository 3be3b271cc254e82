"""The cohort's workspace (fl_lightning/workspace.py): a sampled cohort trains on a copy of its rows, and the run is
the one that trains the cohort in place in the [n, ...] stack, bit for bit."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

from fl_lightning import FederatedDataModule, FederatedLightningModule
from fl_lightning.algorithms import dp_fedavg, fedadam, fedavg, fedprox
from fl_lightning.callbacks import ClientSampling, ControlVariates, LocalWork, SkipSchedule
from fl_lightning.workspace import CohortWorkspace
from tests.conftest import make_trainer


def _data(n: int = 10, m: int = 30, seed: int = 0) -> FederatedDataModule:
    g = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(4, 6, generator=g)
    clients = []
    for i in range(n):
        y = torch.randint(0, 4, (m + i,), generator=g)  # unequal sizes
        clients.append((centers[y] + torch.randn(m + i, 6, generator=g), y))
    return FederatedDataModule.from_client_tensors(clients, batch_size=8, seed=0)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))


class _Opened(L.Callback):
    """Counts the local steps that ran on a workspace (the module's ``_workspace`` during ``training_step``)."""

    def __init__(self) -> None:
        self.steps = 0
        self.shapes: list[int] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: Any, optimizer: Any) -> None:
        if pl_module._workspace is not None:
            self.steps += 1
            self.shapes.append(next(iter(pl_module.clients.x.values())).shape[0])


def _fit(callbacks: Callable[[], list[Any]], workspace: bool | str, steps: int = 24,
         **module_args: Any) -> tuple[FederatedLightningModule, list[float], _Opened]:
    module = FederatedLightningModule(_model(), lr=0.1, loss="cross_entropy", cohort_workspace=workspace,
                                      **module_args)
    losses: list[float] = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, *args: Any) -> None:
            losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))

    opened = _Opened()
    make_trainer(steps, [*callbacks(), Losses(), opened]).fit(module, datamodule=_data())
    return module, losses, opened


CASES: dict[str, tuple[Callable[[], list[Any]], dict[str, Any]]] = {
    "fedavg": (lambda: fedavg(local_steps=4, cohort_size=3, seed=1), {}),
    "fedavg_loop": (lambda: fedavg(local_steps=4, cohort_size=3, seed=1), {"vectorize": False}),
    "fedavg_chunks": (lambda: fedavg(local_steps=4, cohort_size=3, seed=1), {"clients_per_chunk": 2}),
    "weight_decay": (lambda: fedavg(local_steps=4, cohort_size=3, seed=1), {"weight_decay": 0.05}),
    "fedprox": (lambda: fedprox(local_steps=4, cohort_size=3, seed=1, mu=0.5), {}),
    "fedadam": (lambda: fedadam(local_steps=4, cohort_size=4, seed=1, server_lr=0.05), {}),
    "local_work": (lambda: [*fedavg(local_steps=4, cohort_size=5, seed=1), LocalWork(low=1, high=4, seed=3)], {}),
    "dp_poisson": (lambda: dp_fedavg(local_steps=4, cohort_size=4, seed=1, clip_norm=0.5, noise_multiplier=0.3,
                                     sampling="poisson"), {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_workspace_gives_the_in_place_run_bit_for_bit(case: str) -> None:
    """Every value the run produces — the losses of every step, the global model, the clients' rows, the bits — is
    identical with the workspace (auto) and without (in place): the workspace only changes which memory is touched."""
    callbacks, module_args = CASES[case]
    ws, ws_losses, opened = _fit(callbacks, "auto", **module_args)
    ref, ref_losses, not_opened = _fit(callbacks, False, **module_args)
    assert opened.steps == 24 and not_opened.steps == 0  # the workspace was used at every step, and only there
    assert max(opened.shapes) < 10  # the step saw the cohort's rows, not the 10 clients
    assert ws_losses == ref_losses
    for (k, a), (_, b) in zip(ws.global_model.state_dict().items(), ref.global_model.state_dict().items()):
        assert torch.equal(a, b), k
    for k in ref.clients.x:
        assert ws.clients.x[k].shape == ref.clients.x[k].shape  # the [n, ...] stack is back after every step
        assert torch.equal(ws.clients.x[k], ref.clients.x[k]), k
    assert ws.comm.bits_up == ref.comm.bits_up and ws.comm.bits_down == ref.comm.bits_down


def test_between_steps_the_stack_holds_every_client_and_the_cohort_trained() -> None:
    """Mid-round (3 of 4 local steps), the cohort's rows have moved and the others still hold the global model."""
    module, _, _ = _fit(lambda: fedavg(local_steps=4, cohort_size=3, seed=1), "auto", steps=7)
    members = list(module.cohort.members)
    for k, x in module.clients.x.items():
        assert x.shape[0] == 10 and x.grad is None
        glob = module.global_model.state_dict()[k]
        moved = [i for i in range(10) if not torch.equal(x[i], glob)]
        assert moved == members, k


@pytest.mark.parametrize(("callbacks", "module_args", "reason"), [
    (lambda: fedavg(local_steps=4, cohort_size=3, seed=1), {"momentum": 0.9}, "momentum keeps per-client state"),
    (lambda: fedavg(local_steps=4, cohort_size=3, seed=1), {"optimizer": "Adam"}, "(Adam)"),
    (lambda: [SkipSchedule(k=4), ControlVariates(allow_partial_participation=True), ClientSampling(3, seed=1)], {},
     "per-client state (cv_h)"),
    (lambda: fedavg(local_steps=4, cohort_size=3, seed=1), {"personal_params": ["2.*"]}, "personal"),
])
def test_auto_trains_in_place_when_the_workspace_would_not_be_exact(callbacks: Callable[[], list[Any]],
                                                                    module_args: dict[str, Any], reason: str) -> None:
    module, _, opened = _fit(callbacks, "auto", steps=8, **module_args)
    assert opened.steps == 0 and reason in module._workspace_blocker
    with pytest.raises(ValueError, match=f"cohort_workspace=True cannot be exact here: .*{re.escape(reason)}"):
        _fit(callbacks, True, steps=8, **module_args)


def test_full_participation_needs_no_workspace() -> None:
    _, _, opened = _fit(lambda: fedavg(local_steps=4), True, steps=8)
    assert opened.steps == 0


def test_invalid_cohort_workspace_is_refused() -> None:
    with pytest.raises(ValueError, match="cohort_workspace must be true, false or 'auto'"):
        FederatedLightningModule(_model(), lr=0.1, loss="cross_entropy", cohort_workspace="yes")


def test_closing_after_a_round_writes_the_broadcast_to_every_row() -> None:
    module = FederatedLightningModule(_model(), lr=0.1, loss="cross_entropy", num_clients=6)
    clients = module.clients
    assert clients is not None
    from fl_lightning.cohort import make_cohort

    cohort = make_cohort(0, list(range(6)), torch.full((6,), 1 / 6, dtype=torch.float64), [1, 4])
    ws = CohortWorkspace(clients, cohort)
    assert ws.cohort.rows is None and ws.cohort.ids.tolist() == [1, 4]
    for x in clients.x.values():
        assert x.shape[0] == 2
        x.data.add_(1.0)
    ws.close()
    glob = dict(module.global_model.named_parameters())
    for k, x in clients.x.items():
        assert torch.equal(x[1], glob[k] + 1) and torch.equal(x[4], glob[k] + 1) and torch.equal(x[0], glob[k])
    ws = CohortWorkspace(clients, cohort)
    ws.close({k: torch.zeros_like(v) for k, v in glob.items()})
    assert all(x.shape[0] == 6 and not x.any() for x in clients.x.values())
