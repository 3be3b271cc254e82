"""``ProximalTerm``: FedProx's local objective (Li et al., MLSys 2020, eq. (2)).

    h_i(x) = f_i(x) + (μ/2) ‖x − x^t‖²,   so the local step uses g_i + μ (x_i − x^t)

with x^t the global model of the round (what the clients received at its start). μ = 0 is FedAvg exactly: the
added term is μ·(x_i − x^t) = 0 and the gradient is unchanged bit for bit.
"""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from torch.optim import Optimizer
from typing_extensions import override

from fl_lightning.callbacks.base import FederatedCallback


class ProximalTerm(FederatedCallback):
    """Add μ (x_i − x^t) to every participant's gradient before each local optimizer step.

    Args:
        mu: μ ≥ 0, the weight of the proximal term (μ/2)‖x − x^t‖².
    """

    def __init__(self, mu: float) -> None:
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu) or mu < 0:
            raise ValueError(f"ProximalTerm mu (μ, the proximal weight) must be >= 0, got {mu!r}")
        self.mu = float(mu)

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        if self.mu == 0.0:
            return
        cohort = pl_module.cohort
        anchor = dict(pl_module.global_model.named_parameters())  # x^t, the round's global model
        for k, x in pl_module.clients.x.items():
            if x.grad is not None and k not in pl_module.personal_names:  # g_i += μ (x_i − x^t), participants' rows
                cohort.add_(x.grad, cohort.take(x.detach()) - anchor[k].unsqueeze(0), alpha=self.mu)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"mu": self.mu}
