"""``NormalizedAveraging``: FedNova (Wang et al., NeurIPS 2020, eq. (6)–(7)) for local SGD without momentum.

Client i takes τ_i local steps (unequal under :class:`LocalWork`) from x to y_i. FedAvg's x̄ = Σ_i w_i y_i then
weights clients by how far they walked, and minimises a surrogate objective Σ_i (w_i τ_i / Σ_j w_j τ_j) f_i
rather than f. FedNova averages the normalised updates d_i = (x − y_i)/τ_i and rescales by τ_eff = Σ_i w_i τ_i:

    x⁺ = x − τ_eff Σ_i w_i (x − y_i) / τ_i

Implemented as the uplink u_i = x − (τ_eff / τ_i)(x − y_i), so the round's average is x⁺; clients send τ_i too
(one 32-bit number each, counted). With equal τ_i it is FedAvg (up to rounding).
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from fl_lightning.callbacks.base import FederatedCallback
from fl_lightning.round import Round


class NormalizedAveraging(FederatedCallback):
    """FedNova's normalised averaging of the clients' updates (vanilla SGD local steps)."""

    STATE = "fednova_tau"

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The local optimizer (however it was chosen: momentum=, optimizer=, --optimizer, the client's own) must
        be plain SGD: FedNova's normalisation by τ_i is that of vanilla local SGD."""
        plain = all(type(opt) is torch.optim.SGD and all(g["momentum"] == 0 for g in opt.param_groups)
                    for opt in trainer.optimizers)
        if not plain:
            raise ValueError(
                "NormalizedAveraging (FedNova) normalises updates of plain local SGD: use momentum 0 and the default "
                "optimizer (the momentum variant's a_i is not implemented)"
            )

    @override
    def on_uplink(self, trainer: Trainer, module: LightningModule, rnd: Round) -> None:
        assert rnd.local_steps is not None
        tau = rnd.local_steps.to(rnd.weights.dtype).unsqueeze(1)  # [c, 1]
        tau_eff = rnd.send_up(self.STATE, {"tau": tau}, bits=32.0 * tau.new_ones(len(tau)))["tau"][0]
        x = dict(module.global_model.named_parameters())
        for k, y in rnd.uplink.items():
            ratio = (tau_eff / tau[:, 0]).to(y.dtype).view(-1, *([1] * (y.dim() - 1)))
            rnd.uplink[k] = x[k].unsqueeze(0) - ratio * (x[k].unsqueeze(0) - y)
