"""Building blocks of the per-callback unit tests: a module with allocated clients (no Trainer, no data), a Round
built by hand the way :func:`fl_lightning.round.communicate` builds it, and a stand-in Trainer."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from fl_lightning import FederatedLightningModule
from fl_lightning.round import Round


def make_module(n: int = 4, model: nn.Module | None = None, lr: float = 0.1, weights: Sequence[float] | None = None,
                seed: int = 0) -> FederatedLightningModule:
    """A float64 module with ``n`` clients allocated (``num_clients=``), every client's x_i drawn from N(0, 1)
    (``seed``), and client weights w_i (default 1/n; any positive scale)."""
    model = (model if model is not None else nn.Linear(3, 2)).double()
    module = FederatedLightningModule(model, lr=lr, loss="mse", num_clients=n)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for x in module.clients.x.values():
            x.copy_(torch.randn(x.shape, generator=g, dtype=x.dtype))
    if weights is not None:
        module.client_weights = torch.tensor(weights, dtype=torch.float64)
    return module


def make_round(module: FederatedLightningModule, members: Sequence[int] | None = None, index: int = 0) -> Round:
    """Round ``index`` over the cohort ``members`` (None = everyone), its stage dicts as ``communicate`` starts them:
    ``local`` = the cohort's x̂_i (detached copies), ``uplink`` a shallow copy of it."""
    module.set_active_clients(members)
    cohort = module.cohort
    local = {k: cohort.take(x).detach().clone() for k, x in module.clients.x.items()}
    return Round(index, 0, cohort.rows, cohort.weights, local, dict(local), cohort=cohort, receivers=cohort.size,
                 local_steps=cohort.steps_taken(1))


def stand_in_trainer(callbacks: Sequence[Any] = (), optimizers: Sequence[Any] = ()) -> Any:
    """What the callbacks read of a Trainer: its callbacks (``setup``) and optimizers (momentum masking)."""
    return SimpleNamespace(callbacks=list(callbacks), optimizers=list(optimizers))


def randn_like_all(tensors: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Independent N(0, 1) tensors shaped like ``tensors``."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in tensors.items()}
