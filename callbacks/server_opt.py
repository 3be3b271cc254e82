"""``ServerOptimizer``: adaptive server steps on the pseudo-gradient (FedOpt, Reddi et al., ICLR 2021, Algorithm 2;
FedAvgM, Hsu et al. 2019).

With x the global model before the round and x̄ = Σ_i w_i x̂_i the clients' average, Δ = x̄ − x and

- ``avgm``:    v ← β v + Δ,                                   x ← x + η v
- ``adam``:    m ← β₁ m + (1 − β₁) Δ,  v ← β₂ v + (1 − β₂) Δ²,    x ← x + η m / (√v + τ)
- ``yogi``:    m as Adam,  v ← v − (1 − β₂) Δ² sign(v − Δ²),     x ← x + η m / (√v + τ)
- ``adagrad``: m as Adam,  v ← v + Δ²,                         x ← x + η m / (√v + τ)

with m₀ = 0, v₀ = τ² (``avgm``: v₀ = 0) and no bias correction, as in the paper. m and v are server state
(:meth:`~fl_lightning.FederatedLightningModule.add_server_state`): saved in checkpoints, the same on every process.
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

import torch
from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from fl_lightning.callbacks.base import FederatedCallback
from fl_lightning.round import Round

ServerRule = Literal["avgm", "adam", "yogi", "adagrad"]
RULES: tuple[str, ...] = get_args(ServerRule)


def _check(name: str, value: float, low: float, high: float | None = None, *, open_low: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low) and (high is None or value < high)
    if not ok:
        bound = f"{'>' if open_low else '>='} {low}" + ("" if high is None else f" and < {high}")
        raise ValueError(f"ServerOptimizer {name} must be {bound}, got {value!r}")
    return float(value)


class ServerOptimizer(FederatedCallback):
    """Replace the round's server model x̄ by a server optimizer step from x along Δ = x̄ − x.

    Args:
        rule: ``avgm`` (FedAvgM), ``adam`` (FedAdam), ``yogi`` (FedYogi), ``adagrad`` (FedAdagrad).
        server_lr: η > 0.
        momentum: β ∈ [0, 1) of ``avgm``.
        beta1, beta2: β₁, β₂ ∈ [0, 1) of the adaptive rules.
        tau: τ > 0, the adaptivity (v₀ = τ² and the denominator's √v + τ).
    """

    M, V = "server_opt_m", "server_opt_v"

    def __init__(self, rule: ServerRule = "adam", server_lr: float = 1e-2, momentum: float = 0.9, beta1: float = 0.9,
                 beta2: float = 0.99, tau: float = 1e-3) -> None:
        if rule not in RULES:
            raise ValueError(f"ServerOptimizer rule must be one of {RULES}, got {rule!r}")
        self.rule: ServerRule = rule
        self.server_lr = _check("server_lr", server_lr, 0.0, open_low=True)
        self.momentum = _check("momentum", momentum, 0.0, 1.0)
        self.beta1 = _check("beta1", beta1, 0.0, 1.0)
        self.beta2 = _check("beta2", beta2, 0.0, 1.0)
        self.tau = _check("tau", tau, 0.0, open_low=True)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        pl_module.add_server_state(self.V, fill=0.0 if self.rule == "avgm" else self.tau**2)
        if self.rule != "avgm":
            pl_module.add_server_state(self.M)

    @override
    def on_aggregate(self, trainer: Trainer, module: LightningModule, rnd: Round) -> None:
        x = dict(module.global_model.named_parameters())
        v = module.server_state[self.V]
        m = module.server_state[self.M] if self.rule != "avgm" else None
        for k in rnd.server:
            delta = rnd.server[k] - x[k]
            if m is None:
                v[k].mul_(self.momentum).add_(delta)
                rnd.server[k] = x[k] + self.server_lr * v[k]
                continue
            m[k].mul_(self.beta1).add_(delta, alpha=1 - self.beta1)
            sq = delta * delta
            if self.rule == "adam":
                v[k].mul_(self.beta2).add_(sq, alpha=1 - self.beta2)
            elif self.rule == "yogi":
                v[k].sub_((1 - self.beta2) * sq * torch.sign(v[k] - sq))
            else:
                v[k].add_(sq)
            rnd.server[k] = x[k] + self.server_lr * m[k] / (v[k].sqrt() + self.tau)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "server_lr": self.server_lr}
