"""``ControlVariates``: the h_i of ProxSkip / Scaffnew (Mishchenko et al. 2022; DESIGN §1.2).

local step      g_i ← g_i − h_i                          (so x̂_i = x_i − γ (g_i − h_i))
uplink          u_i = x̂_i − (γ/p) h_i
after the round h_i ← h_i + (p/γ) (r − x̂_i),  r = x̄ (``reference="mean"``) or r = b (``"broadcast"``)

With r = x̄ = Σ_i w_i u_i and Σ_i w_i = 1: Σ_i w_i h_i⁺ = Σ_i w_i h_i + (p/γ)(x̄ − Σ_i w_i x̂_i) = 0 after
every round ("zero-sum", the condition Sparse-ProxSkip keeps). With r = b = TopK(x̄) (naive server
pruning) the sum becomes (p/γ)(TopK(x̄) − x̄) ≠ 0 (the failure the seed paper explains).

Because Σ_i w_i h_i = 0 holds with r = x̄, the server's x̄ = Σ_i w_i (x̂_i − (γ/p) h_i) equals Σ_i w_i x̂_i:
clients may send x̂_i itself (``uplink="local"``), which is sparse when they prune — the reason pruning
at the clients saves uplink bits. Sending x̂_i keeps Σ_i w_i h_i unchanged, so it stays zero — in exact
arithmetic. In floating point the shifted uplink corrects each round's rounding error in the next (x̄ carries
−(γ/p) Σ_i w_i h_i), the local one does not: the error of every round's update adds up (float32, 2,000 rounds:
‖Σ_i w_i h_i‖/‖h‖ from 3e-6 to 1e-4). So with ``uplink="local"`` the participants re-centre after every round,

    h_i ← h_i − s / W_S  for i in the cohort S,   s = Σ_j w_j h_j over all n clients,  W_S = Σ_{i∈S} w_i

(w_j normalised over all clients), which makes Σ_j w_j h_j = 0 again, to float rounding, and is a no-op in exact
arithmetic (s = 0 there). The sum is over all clients because that is the invariant: with r = x̄ and the local
uplink a round changes Σ_{i∈S} w_i h_i by (p/γ) W_S (x̄ − Σ_{i∈S} w̃_i x̂_i) = 0 (w̃ the cohort's weights), also
when clients drop out (:class:`~fl_lightning.callbacks.LocalWork`), while the cohort's own sum need not be zero;
only participants change, as a real client outside the round could not. Over processes s is a ``module.reduce``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from torch.optim import Optimizer
from typing_extensions import override

from fl_lightning import metric_keys as keys
from fl_lightning.callbacks.base import FederatedCallback
from fl_lightning.callbacks.sampling import ClientSampling
from fl_lightning.round import Round

if TYPE_CHECKING:
    from fl_lightning.cohort import Cohort
    from fl_lightning.module import FederatedLightningModule

Reference = Literal["mean", "broadcast"]
UplinkForm = Literal["shifted", "local", "model"]  # "model": the readable name of "local" (the client's x̂_i)


class ControlVariates(FederatedCallback):
    """Control variates h_i (zero at the start), stored on the module as client state ``cv_h``.

    Args:
        reference: r in the update of h_i: ``mean`` (x̄, zero-sum, the default) or ``broadcast`` (b, naive).
        uplink: ``shifted`` sends u_i = x̂_i − (γ/p) h_i (DESIGN §1.2 as written); ``local`` (also spelled
            ``model``) sends x̂_i, the same x̄ whenever Σ_i w_i h_i = 0, which needs ``reference="mean"`` and full
            participation; the participants then re-centre h after every round (:meth:`recentre`).
        allow_partial_participation: control variates assume every client takes part in every round;
            with :class:`ClientSampling` this raises unless set (then only the cohort's h_i change).
    """

    STATE = "cv_h"

    def __init__(self, reference: Reference = "mean", uplink: UplinkForm = "shifted",
                 allow_partial_participation: bool = False) -> None:
        if reference not in ("mean", "broadcast"):
            raise ValueError(f"ControlVariates reference must be 'mean' or 'broadcast', got {reference!r}")
        uplink = "local" if uplink == "model" else uplink
        if uplink not in ("shifted", "local"):
            raise ValueError(f"ControlVariates uplink must be 'shifted' or 'local', got {uplink!r}")
        if uplink == "local" and reference != "mean":
            raise ValueError("ControlVariates uplink='local' relies on zero-sum control variates: use reference='mean'")
        if uplink == "local" and allow_partial_participation:
            raise ValueError("ControlVariates uplink='local' needs full participation (Σ_i w_i h_i = 0 over all)")
        self.reference = reference
        self.uplink = uplink
        self.allow_partial_participation = allow_partial_participation

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not self.allow_partial_participation and any(isinstance(cb, ClientSampling) for cb in trainer.callbacks):
            raise ValueError(
                "ControlVariates with ClientSampling: control variates assume full participation; "
                "set ControlVariates(allow_partial_participation=True) to run it anyway"
            )
        pl_module.add_client_state(self.STATE)

    def _p_over_gamma(self, module: FederatedLightningModule) -> float:
        assert module.schedule is not None
        return module.schedule.p / module.current_lr()

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        h = pl_module.clients.extra[self.STATE]
        cohort = pl_module.cohort
        for k, x in pl_module.clients.x.items():
            if x.grad is not None:
                cohort.add_(x.grad, cohort.take(h[k]), alpha=-1.0)

    @override
    def on_uplink(self, trainer: Trainer, module: FederatedLightningModule, rnd: Round) -> None:
        if self.uplink == "local":
            return
        h = module.clients.extra[self.STATE]
        scale = 1.0 / self._p_over_gamma(module)
        for k in rnd.uplink:
            rnd.uplink[k] = torch.add(rnd.uplink[k], rnd.cohort.take(h[k]), alpha=-scale)  # one temporary, not two

    @override
    def on_receive(self, trainer: Trainer, module: FederatedLightningModule, rnd: Round) -> None:
        h = module.clients.extra[self.STATE]
        ref = rnd.mean if self.reference == "mean" else rnd.broadcast
        scale = self._p_over_gamma(module)
        for k in rnd.local:  # the shared parameters: a personal one's h_i stays 0 (it is never averaged)
            hk = h[k]
            if rnd.cohort.rows is None:  # in place: no [n, ...] temporaries
                hk.sub_(rnd.local[k], alpha=scale).add_(ref[k].unsqueeze(0), alpha=scale)
            else:
                rnd.cohort.add_(hk, torch.sub(ref[k].unsqueeze(0), rnd.local[k]), alpha=scale)
        if self.uplink == "local":
            self.recentre(module, rnd.cohort)

    def recentre(self, module: FederatedLightningModule, cohort: Cohort) -> None:
        """h_i ← h_i − s / W_S for the participants (module docstring): Σ_j w_j h_j = 0 again, up to one rounding
        of the correction; exactly nothing changes in exact arithmetic. Every process takes part (``reduce``)."""
        if cohort.size == 0:  # nobody took part: no h_i changed, and there is nobody to correct
            return
        h = module.clients.extra[self.STATE]
        w = module.client_weights[module.client_ids] / module.client_weights.sum()  # over all n, this process's rows
        for hk in h.values():
            s = module.reduce(torch.tensordot(w.to(hk.dtype), hk, dims=1))
            cohort.add_(hk, s.unsqueeze(0).expand(len(cohort), *s.shape), alpha=-1.0 / cohort.share)

    @override
    def on_round_end(self, trainer: Trainer, module: FederatedLightningModule, rnd: Round) -> None:
        module.round_metrics[keys.CV_SUM_NORM] = self.weighted_sum_norm(module)

    def weighted_sum_norm(self, module: FederatedLightningModule) -> torch.Tensor:
        """‖Σ_i w_i h_i‖ over all clients (zero with the ``mean`` reference)."""
        h = module.clients.extra[self.STATE]
        w = module.client_weights[module.client_ids]
        sq = sum((module.reduce(torch.tensordot(w.to(v.dtype), v, dims=1)) ** 2).sum() for v in h.values())
        return torch.as_tensor(sq).sqrt()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "uplink": self.uplink}
