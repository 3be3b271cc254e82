"""``Scaffold``: SCAFFOLD's control variates (Karimireddy et al., ICML 2020, Algorithm 1 with option II).

    local step      g_i ← g_i − c_i + c                                   (y_i ← y_i − η_l (g_i(y_i) − c_i + c))
    after K_i steps c_i⁺ = c_i − c + (x − y_i) / (K_i η_l),   Δy_i = y_i − x,   Δc_i = c_i⁺ − c_i
    server          x ← x + η_g Σ_{i∈S} w_i Δy_i,              c ← c + Σ_{i∈S} (w_i / Σ_j w_j) Δc_i

(w_i normalised over the cohort S for the model, over all n clients for c, so that c = Σ_i w_i c_i stays the
weighted mean of the clients' c_i; with equal weights these are the paper's 1/|S| and 1/N.) K_i is the number of
local steps client i took this round (``rnd.local_steps``: unequal under :class:`LocalWork`), η_l the local step
size. Clients upload y_i (the model message) and Δc_i (a second message, counted); the server broadcasts x and c
(counted too). c_i are client state, c server state: both in checkpoints.

With full-batch gradients the fixed point is the minimiser of f = Σ_i w_i f_i (c_i = ∇f_i(x*), c = ∇f(x*) = 0),
where FedAvg with the same local steps stalls at a drifted point.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch.optim import Optimizer
from typing_extensions import override

from fl_lightning.callbacks.base import FederatedCallback
from fl_lightning.round import Round


class Scaffold(FederatedCallback):
    """SCAFFOLD control variates c_i (client state ``scaffold_ci``) and c (server state ``scaffold_c``).

    Args:
        server_lr: η_g > 0, the server step size (1: the server model is the clients' average).
    """

    CLIENT, SERVER = "scaffold_ci", "scaffold_c"

    def __init__(self, server_lr: float = 1.0) -> None:
        if isinstance(server_lr, bool) or not isinstance(server_lr, (int, float)) or not math.isfinite(server_lr) \
                or server_lr <= 0:
            raise ValueError(f"Scaffold server_lr (η_g) must be > 0, got {server_lr!r}")
        self.server_lr = float(server_lr)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        pl_module.add_client_state(self.CLIENT)
        pl_module.add_server_state(self.SERVER)

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        cohort = pl_module.cohort
        ci, c = pl_module.clients.extra[self.CLIENT], pl_module.server_state[self.SERVER]
        for k, x in pl_module.clients.x.items():
            if x.grad is not None:  # g_i − c_i + c on the participants' rows
                cohort.add_(x.grad, c[k].unsqueeze(0) - cohort.take(ci[k]))

    @override
    def on_uplink(self, trainer: Trainer, module: LightningModule, rnd: Round) -> None:
        """Δc_i = (x − y_i)/(K_i η_l) − c, sent as a second message; c_i ← c_i + Δc_i, c ← c + Σ w_i Δc_i."""
        assert rnd.cohort is not None and rnd.local_steps is not None
        x = dict(module.global_model.named_parameters())
        ci, c = module.clients.extra[self.CLIENT], module.server_state[self.SERVER]
        scale = 1.0 / (rnd.local_steps.to(torch.float64) * module.current_lr())  # 1/(K_i η_l), [c]
        delta = {}
        for k, y in rnd.local.items():
            s = scale.to(y.dtype).view(-1, *([1] * (y.dim() - 1)))
            delta[k] = (x[k].unsqueeze(0) - y) * s - c[k].unsqueeze(0)
        mean = rnd.send_up(self.CLIENT, delta, weights=rnd.weights * rnd.cohort.share)
        for k in delta:  # the shared parameters (personal ones keep c_i = c = 0)
            rnd.cohort.add_(ci[k], delta[k])
            c[k].add_(mean[k])

    @override
    def on_aggregate(self, trainer: Trainer, module: LightningModule, rnd: Round) -> None:
        if self.server_lr == 1.0:
            return  # x + 1·(x̄ − x) = x̄
        x = dict(module.global_model.named_parameters())
        for k in rnd.server:
            rnd.server[k] = torch.lerp(x[k], rnd.server[k], self.server_lr)  # x + η_g (x̄ − x)

    @override
    def on_broadcast(self, trainer: Trainer, module: LightningModule, rnd: Round) -> None:
        rnd.send_down(self.SERVER, module.server_state[self.SERVER].as_dict())

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"server_lr": self.server_lr}
