"""``L1Prox``: the proximal step of γλ‖·‖₁ after every local step (RandProx-ℓ1, Condat & Richtárik).

x̂_i ← prox_{γλ‖·‖₁}(x̂_i) = sign(x̂_i) · max(|x̂_i| − γλ, 0)   (soft-thresholding, :func:`fl_lightning.ops.soft_threshold`)

With zero-sum control variates the fixed point of ProxSkip with this local prox is the minimiser of
f + λ‖·‖₁: there, x_i = x*, h_i − ∇f_i(x*) = s ∈ λ ∂‖x*‖₁ for every i, and Σ_i w_i h_i = 0 gives
∇f(x*) + s = 0. The result is sparse because the ℓ1 penalty makes it so, not because of a density target.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from fl_lightning.callbacks.base import FederatedCallback
from fl_lightning.callbacks.pruning import ParamSelection
from fl_lightning.ops import prunable, soft_threshold

if TYPE_CHECKING:
    from fl_lightning.module import FederatedLightningModule


class L1Prox(FederatedCallback):
    """Soft-threshold the selected parameters by γλ after every local step (γ = the current lr).

    Args:
        lam: λ ≥ 0, the weight of the ℓ1 penalty λ‖x‖₁ added to f.
        params: ``weights`` (tensors with ≥ 2 dims, the default) or ``all``.
    """

    def __init__(self, lam: float, params: ParamSelection = "weights") -> None:
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0 or not math.isfinite(lam):
            raise ValueError(f"L1Prox lam (λ, the ℓ1 weight) must be >= 0, got {lam!r}")
        if params not in ("weights", "all"):
            raise ValueError(f"L1Prox params must be 'weights' or 'all', got {params!r}")
        self.lam = float(lam)
        self.params: ParamSelection = params
        self.names: list[str] = []

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.names = [k for k in prunable(pl_module.global_model.named_parameters(), include=self.params, stacked=False)
                      if k not in pl_module.personal_names]  # the prox acts on the round's (shared) parameters
        if not self.names:
            raise ValueError(f"L1Prox params={self.params!r} selects no parameter of the client model")

    @override
    def on_local_step_end(self, trainer: Trainer, module: FederatedLightningModule) -> None:
        threshold = module.current_lr() * self.lam
        cohort = module.cohort
        with torch.no_grad():
            for k in self.names:
                x = module.clients.x[k]
                cohort.put_(x, soft_threshold(cohort.take(x), threshold))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"lam": self.lam, "params": self.params}
