"""``TopKPruning``: TopK_δ where DESIGN §1.2 places it — at the clients, at the server, or in the forward pass.

Locations (``at``), in the order they act within a round:

- ``forward``:  w_i = TopK(x_i) in the forward pass and the gradient, with a straight-through estimator
                (STE, §1.4): the gradient of w_i is applied to the dense x_i, so pruned weights can grow back.
                The global model x stays dense (clients start from it); it is evaluated as TopK(x), the model
                clients compute with (``transform_evaluated_params``).
- ``local``:    x̂_i ← TopK(x̂_i) after every local step ("step 7"); also spelled ``after_step``.
- ``round``:    x̂_i ← TopK(x̂_i) once, at the end of the round, before the uplink (Sparse-ProxSkip-Local); also
                spelled ``before_uplink``.
- ``server``:   x⁺ = TopK(x̄) at the server.
- ``received``: x_i ← TopK(b) on the received broadcast ("step 9").

TopK keeps exactly k = ⌈δ·d⌉ entries of largest magnitude per scope (all pruned tensors together for
``scope="global"``, each tensor for ``"layer"``), ties going to the lower index
(:func:`fl_lightning.ops.topk_mask`). Which tensors are pruned: ``params="weights"`` (every parameter with
≥ 2 dimensions: Linear/Conv weights, not biases or normalisation parameters) or ``"all"``.

Masks are client state ``topk_mask`` (module buffers, saved in checkpoints): the support each client keeps
after the latest pruning (informational: every TopK recomputes its mask from the current magnitudes, §1.4).

Optimizer state (DESIGN §1.4): outside STE mode (``forward`` not in ``at``), whenever TopK zeroes the clients'
weights (``local``, ``server``, ``received``) the same entries of the SGD momentum buffer are zeroed, so momentum
never carries a pruned weight back. Weight decay adds wd·x = 0 at a pruned entry, so it cannot revive one.
With ``forward`` (STE) the update is dense by design and neither is masked: pruned weights may grow back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from fl_lightning.callbacks.base import FederatedCallback
from fl_lightning.ops import (
    METHODS,
    SCOPES,
    Method,
    Scope,
    TopKWarmStart,
    check_density,
    prunable,
    topk_mask,
    topk_prune_,
)
from fl_lightning.round import Round, Tensors

if TYPE_CHECKING:
    from fl_lightning.module import FederatedLightningModule

Location = Literal["forward", "local", "round", "server", "received"]
LOCATIONS: tuple[str, ...] = get_args(Location)
ParamSelection = Literal["weights", "all"]


#: Readable names of two locations, accepted everywhere ``at`` is (the v0.1 names stay the stored ones, so checkpoints
#: and callback state keys do not change): TopK after every local step, and once before the uplink.
ALIASES: dict[str, str] = {"after_step": "local", "before_uplink": "round"}


def _locations(at: str | Sequence[str]) -> tuple[str, ...]:
    locations = tuple(ALIASES.get(a, a) for a in ((at,) if isinstance(at, str) else tuple(at)))
    if not locations:
        raise ValueError(f"TopKPruning at must name at least one of {LOCATIONS}")
    unknown = [a for a in locations if a not in LOCATIONS]
    if unknown:
        raise ValueError(f"TopKPruning at: unknown location(s) {unknown}; choose from {LOCATIONS} "
                         f"(or {', '.join(ALIASES)})")
    if "forward" in locations and "local" in locations:
        raise ValueError(
            "TopKPruning at: 'forward' (STE, dense x_i) conflicts with 'local' (x_i pruned after every step); "
            "keep one of them"
        )
    return locations


class TopKPruning(FederatedCallback):
    """TopK_δ pruning (DESIGN §1.1–1.4).

    Args:
        density: δ ∈ (0, 1], the fraction of entries kept (sparsity = 1 − δ).
        at: one location or a list, see the module docstring. Default: Sparse-ProxSkip's
            ``["local", "received"]``.
        scope: ``global`` (one TopK over all pruned tensors) or ``layer`` (per tensor).
        params: ``weights`` (default) or ``all``.
        topk_method: how the per-step TopKs (``local``, ``forward``) are computed, :func:`fl_lightning.ops.topk_mask`'s
            ``method``; every choice gives the same masks. Default ``"auto"``: the warm-started fast path on large
            CPU scopes (Sparse-ProxSkip local steps 2.7–3.1× faster than with ``"reference"`` in the benchmark's
            runs, docs/performance.md), the reference elsewhere.
    """

    STATE = "topk_mask"

    def __init__(self, density: float, at: str | Sequence[str] = ("local", "received"), scope: Scope = "global",
                 params: ParamSelection = "weights", topk_method: Method = "auto") -> None:
        self.density = check_density(density)
        self.at = _locations(at)
        if scope not in SCOPES:
            raise ValueError(f"TopKPruning scope must be one of {SCOPES}, got {scope!r}")
        if params not in ("weights", "all"):
            raise ValueError(f"TopKPruning params must be 'weights' or 'all', got {params!r}")
        self.scope: Scope = scope
        self.params: ParamSelection = params
        if topk_method not in METHODS:
            raise ValueError(f"TopKPruning topk_method must be one of {METHODS}, got {topk_method!r}")
        self.topk_method: Method = topk_method
        self.names: list[str] = []
        self._ste = "forward" in self.at  # STE somewhere in the run: optimizer state is left dense
        # Previous thresholds of the per-step TopKs (``local``, ``forward``): speed only, results identical
        # without them, so they are not part of the state (see ops.TopKWarmStart).
        self._warm: dict[str, tuple[torch.Tensor | None, TopKWarmStart]] = {}

    def _warm_start(self, at: str, clients: torch.Tensor | None) -> TopKWarmStart:
        """The threshold cache of location ``at``, emptied when the participating clients change."""
        rows, warm = self._warm.get(at, (None, TopKWarmStart()))
        same = (rows is None and clients is None) or (
            rows is not None and clients is not None and rows.shape == clients.shape and bool((rows == clients).all())
        )
        if not same:
            warm.clear()
        self._warm[at] = (None if clients is None else clients.clone(), warm)
        return warm

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(at=self.at)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        others = [cb for cb in trainer.callbacks if isinstance(cb, TopKPruning) and cb is not self]
        clash = [a for cb in others for a in cb.at if a in self.at]
        if clash:
            raise ValueError(f"two TopKPruning callbacks prune at {sorted(set(clash))}; merge them into one")
        everywhere = {a for cb in [self, *others] for a in cb.at}
        if {"forward", "local"} <= everywhere:
            raise ValueError("TopKPruning at: 'forward' (STE, dense x_i) in one callback conflicts with 'local' "
                             "(x_i pruned after every step) in another; keep one of them")
        self._ste = "forward" in everywhere
        self.names = [k for k in prunable(pl_module.global_model.named_parameters(), include=self.params, stacked=False)
                      if k not in pl_module.personal_names]  # personal parameters stay dense (never sent)
        if not self.names:
            raise ValueError(f"TopKPruning params={self.params!r} selects no parameter of the client model")
        pl_module.add_client_state(self.STATE, dtype=torch.bool, fill=1.0)

    # ------------------------------------------------------------------ helpers
    def _prune(self, tensors: Tensors, *, stacked: bool) -> tuple[Tensors, Tensors]:
        """(TopK of the pruned entries, with the other tensors untouched; the masks of the pruned ones)."""
        masks = topk_mask({k: tensors[k] for k in self.names}, self.density, scope=self.scope, stacked=stacked)
        out = dict(tensors)
        for k, m in masks.items():
            out[k] = tensors[k].masked_fill(~m, 0)
        return out, masks

    def _record(self, module: FederatedLightningModule, masks: Tensors, clients: torch.Tensor | None, *,
                stacked: bool) -> None:
        """Store the support each client now keeps: per client ([c, ...], ``stacked``) or one for all."""
        state = module.clients.extra[self.STATE]
        for k, m in masks.items():
            if not stacked:
                state[k].copy_(m.unsqueeze(0).expand_as(state[k]))
            elif clients is None:
                state[k].copy_(m)
            else:
                state[k][clients] = m

    # ------------------------------------------------------------------ hooks
    @override
    def transforms_forward(self) -> bool:
        return "forward" in self.at

    @override
    def transform_params(self, trainer: Trainer, module: FederatedLightningModule, params: Tensors) -> Tensors:
        if "forward" not in self.at:
            return params
        with torch.no_grad():
            masks = topk_mask({k: params[k] for k in self.names}, self.density, scope=self.scope, stacked=True,
                              warm_start=self._warm_start("forward", module.cohort.rows), method=self.topk_method)
        out = dict(params)
        for k, m in masks.items():
            x = params[k]
            out[k] = x + (x.masked_fill(~m, 0) - x).detach()  # value TopK(x), gradient straight through
        return out

    @override
    def transform_evaluated_params(self, trainer: Trainer | None, module: FederatedLightningModule,
                                   params: Tensors) -> Tensors:
        """With ``forward`` (STE) clients compute with TopK(x_i), so the global model x is evaluated as TopK(x) (the
        same TopK: density, scope, params), not as the dense x they update."""
        if "forward" not in self.at:
            return params
        with torch.no_grad():
            return self._prune(params, stacked=False)[0]

    @override
    def on_local_step_end(self, trainer: Trainer, module: FederatedLightningModule) -> None:
        if "local" not in self.at:
            return
        cohort = module.cohort
        x = module.clients.x
        with torch.no_grad():
            rows = {k: cohort.take(x[k]) for k in self.names}
            # In place (masked_fill semantics: a dropped inf becomes 0, not NaN); rows are copies with a cohort.
            masks = topk_prune_(rows, self.density, scope=self.scope, stacked=True,
                                warm_start=self._warm_start("local", cohort.rows), method=self.topk_method)
            if cohort.rows is not None:
                for k in self.names:
                    cohort.put_(x[k], rows[k])
            self._mask_momentum(trainer, module, masks, cohort.rows, stacked=True)
        self._record(module, masks, cohort.rows, stacked=True)

    def _mask_momentum(self, trainer: Trainer, module: FederatedLightningModule, masks: Tensors,
                       idx: torch.Tensor | None, *, stacked: bool) -> None:
        """Zero the SGD momentum of the entries TopK just zeroed (per client ``[c, ...]`` masks of the rows
        ``idx`` when ``stacked``, else one mask for every client); a no-op in STE mode (§1.4)."""
        if self._ste or not trainer.optimizers:
            return
        state = trainer.optimizers[0].state
        for k, m in masks.items():
            buf = state.get(module.clients.x[k], {}).get("momentum_buffer")
            if buf is None:
                continue
            if not stacked:
                buf.masked_fill_(~m.unsqueeze(0), 0)
            elif idx is None:
                buf.masked_fill_(~m, 0)
            else:
                buf[idx] = buf[idx].masked_fill(~m, 0)

    @override
    def on_before_uplink(self, trainer: Trainer, module: FederatedLightningModule, rnd: Round) -> None:
        if "round" in self.at:
            rnd.local, masks = self._prune(rnd.local, stacked=True)
            self._record(module, masks, rnd.clients, stacked=True)

    @override
    def on_aggregate(self, trainer: Trainer, module: FederatedLightningModule, rnd: Round) -> None:
        if "server" in self.at:
            rnd.server, masks = self._prune(rnd.server, stacked=False)
            self._record(module, masks, None, stacked=False)
            self._mask_momentum(trainer, module, masks, None, stacked=False)

    @override
    def on_receive(self, trainer: Trainer, module: FederatedLightningModule, rnd: Round) -> None:
        if "received" in self.at:
            rnd.received, masks = self._prune(rnd.received, stacked=False)
            self._record(module, masks, None, stacked=False)
            self._mask_momentum(trainer, module, masks, None, stacked=False)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"density": self.density, "at": list(self.at), "scope": self.scope, "params": self.params}
