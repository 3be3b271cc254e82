"""The communication round (DESIGN §1.2, the ``θ_t = 1`` branch): what it passes through the federated hooks
(:class:`Round`) and the function that runs its stages and its accounting (:func:`communicate`).

Stages, each followed by the hooks of :class:`~fl_lightning.callbacks.FederatedCallback` of the same name::

    x̂_i (the cohort's models)  ─ on_before_uplink ─►  u_i = x̂_i ─ on_uplink, on_compress_uplink ─►
    x̄ = Σ_i w_i u_i ─ on_mean ─► x̄ ─ on_aggregate ─► x⁺ ─ on_broadcast ─► b ─ on_receive ─► x_i ← received;
    the global model ← received ─ on_round_end

``on_mean`` is the server's first look at the sum (e.g. DP noise, :class:`~fl_lightning.callbacks.DifferentialPrivacy`):
whatever reads ``rnd.mean`` later — the server model, the control variates' reference — sees its result.

Hooks *replace* dict entries (``rnd.server[k] = topk(...)``) rather than modifying tensors in place: ``mean``,
``server``, ``broadcast`` and ``received`` start as shallow copies of each other. A hook may send further
messages with :meth:`Round.send_up` / :meth:`Round.send_down`; their bits are counted with the round's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fl_lightning.comm import Encoding, encoded_bits, message_bits
from fl_lightning.ops import nonzeros
from fl_lightning.personal import shared

if TYPE_CHECKING:
    from fl_lightning.cohort import Cohort
    from fl_lightning.module import FederatedLightningModule

Tensors = dict[str, Tensor]
Reduce = Callable[..., Tensor]


def _identity(tensor: Tensor, op: str = "sum") -> Tensor:
    return tensor


@dataclass
class Round:
    """One round. Stacked tensors are ``[c, ...]`` over this process's participants (``cohort``); unstacked ones
    are the single server-side model.

    - ``cohort``: the round's :class:`~fl_lightning.cohort.Cohort` (``clients`` = its rows, ``weights`` = its
      normalised weights, kept under their v0.1 names).
    - ``local_steps``: the local steps each participant took this round ``[c]`` (unequal with
      :class:`~fl_lightning.callbacks.LocalWork`).
    - ``local``: x̂_i, the clients' models after their last local step (stacked). Only
      ``on_before_uplink`` may replace its entries; valid until ``on_receive`` returns.
    - ``uplink``: u_i, what each client sends; starts as a copy of x̂_i (stacked).
    - ``uplink_bits``: bits per client [c]; a compressor that knows its exact cost sets it,
      otherwise the round measures the sparse/dense encoding of ``uplink``.
    - ``mean``: x̄ = Σ_i w_i u_i with the round's normalised weights ``weights`` [c] (reduced over processes);
      ``on_mean`` may replace its entries, before anything else reads them.
    - ``server``: x⁺, the server's model (x̄, or TopK(x̄) when the server prunes).
    - ``broadcast``: b = C_down(x⁺), what the server sends; ``downlink_bits`` as for the uplink.
    - ``receivers``: how many clients the broadcast goes to (the cohort over all processes).
    - ``received``: what clients set x_i to (b, or TopK(b) when clients prune the broadcast).
      This is also the new global model.
    - ``messages_up`` / ``messages_down``: the extra messages sent with :meth:`send_up` / :meth:`send_down`.
    - ``client_density``: Σ_i w_i nnz(x̂_i)/d, set when the clients have received.
    """

    index: int
    step: int
    clients: Tensor | None
    weights: Tensor
    local: Tensors
    uplink: Tensors
    uplink_bits: Tensor | None = None
    mean: Tensors = field(default_factory=dict)
    server: Tensors = field(default_factory=dict)
    broadcast: Tensors = field(default_factory=dict)
    downlink_bits: Tensor | None = None
    receivers: int = 0
    received: Tensors = field(default_factory=dict)
    cohort: Cohort | None = None
    local_steps: Tensor | None = None
    messages_up: dict[str, Tensors] = field(default_factory=dict)
    messages_down: dict[str, Tensors] = field(default_factory=dict)
    encoding: Encoding = "auto"
    extra_bits_up: Tensor | None = None
    extra_bits_down: Tensor | None = None
    client_density: Tensor | None = None
    reduce: Reduce = field(default=_identity, repr=False)

    def send_up(self, name: str, messages: Mapping[str, Tensor], *, weights: Tensor | None = None,
                bits: Tensor | None = None) -> Tensors:
        """Each participant sends a further message m_i (stacked ``[c, ...]``, e.g. SCAFFOLD's Δc_i); returns
        Σ_i w_i m_i over the cohort on every process (``weights`` default: the round's, normalised over the
        cohort). Its bits (``bits`` per client ``[c]``, default: the round's encoding of ``messages``) are added
        to the round's uplink."""
        stacked = dict(messages)
        self.messages_up[name] = stacked
        w = self.weights if weights is None else weights
        if bits is None:
            bits = (torch.zeros(0, dtype=torch.float64, device=w.device) if len(w) == 0
                    else message_bits(stacked, self.encoding, stacked=True))
        total = bits.sum()
        self.extra_bits_up = total if self.extra_bits_up is None else self.extra_bits_up + total
        return {k: self.reduce(torch.tensordot(w.to(m.dtype), m, dims=1)) for k, m in stacked.items()}

    def send_down(self, name: str, message: Mapping[str, Tensor], *, bits: Tensor | None = None) -> None:
        """The server sends a further message (one model-like dict, e.g. SCAFFOLD's c) to the ``receivers``;
        ``bits`` is the cost of one copy (default: the round's encoding)."""
        self.messages_down[name] = dict(message)
        one = bits if bits is not None else message_bits(message, self.encoding, stacked=False)
        total = one * self.receivers
        self.extra_bits_down = total if self.extra_bits_down is None else self.extra_bits_down + total


def communicate(module: FederatedLightningModule, cohort: Cohort, round_length: int) -> Round:
    """Run one round over ``cohort`` after ``round_length`` local steps: the stages and hooks of the module
    docstring, then x_i ← received for every client, the global model ← received, buffers averaged, and the
    bits recorded in ``module.comm``. Returns the round (before ``on_round_end``)."""
    clients = module.ensure_clients()
    callbacks = module.federated_callbacks
    trainer = module.trainer

    def call(hook: str, rnd: Round) -> None:
        for cb in callbacks:
            getattr(cb, hook)(trainer, module, rnd)

    weights = cohort.weights
    # personal parameters (module.personal_names) stay on the clients: the round carries the shared ones only
    local = {k: cohort.take(x).detach() for k, x in shared(clients.x.as_dict(), module.personal_names).items()}
    rnd = Round(module.round_index, module.global_step, cohort.rows, weights, local, {}, cohort=cohort,
                local_steps=cohort.steps_taken(round_length), encoding=module.encoding, reduce=module.reduce,
                receivers=cohort.size)
    call("on_before_uplink", rnd)
    rnd.uplink = dict(rnd.local)  # hooks replace entries (see Round), so no copy of every x̂_i is needed
    call("on_uplink", rnd)
    call("on_compress_uplink", rnd)
    # non-zeros of every x̂_i (one pass over the stacked models), for the clients' density and, when no hook
    # changed the uplink (u_i = x̂_i, as when clients prune), for its bits too
    idle = len(weights) == 0  # none of this process's clients is in the cohort
    local_nnz, d = (weights.new_zeros(0), 1) if idle else nonzeros(rnd.local, stacked=True)
    if rnd.uplink_bits is not None:
        up_bits = rnd.uplink_bits
    elif idle:
        up_bits = torch.zeros(0, dtype=torch.float64, device=weights.device)
    elif all(rnd.uplink[k] is v for k, v in rnd.local.items()):
        up_bits = encoded_bits(local_nnz, d, module.encoding)
    else:
        up_bits = message_bits(rnd.uplink, module.encoding, stacked=True)
    global_params = dict(module.global_model.named_parameters())
    if cohort.size == 0:  # every client dropped out: the server keeps its model
        rnd.mean = {k: global_params[k].detach().clone() for k in rnd.uplink}
    else:
        rnd.mean = {k: module.reduce(torch.tensordot(weights.to(u.dtype), u, dims=1)) for k, u in rnd.uplink.items()}
    call("on_mean", rnd)
    rnd.server = dict(rnd.mean)
    call("on_aggregate", rnd)
    rnd.broadcast = dict(rnd.server)
    call("on_broadcast", rnd)
    down_bits = rnd.downlink_bits if rnd.downlink_bits is not None else message_bits(
        rnd.broadcast, module.encoding, stacked=False) * rnd.receivers
    rnd.received = dict(rnd.broadcast)
    call("on_receive", rnd)
    local_density = module.reduce(  # Σ_i w_i nnz(x̂_i) / d, the clients' density
        torch.zeros((), device=weights.device) if idle else torch.dot(weights.float(), local_nnz.float() / d))

    for k in local:
        x = clients.x[k]
        x.copy_(rnd.received[k].unsqueeze(0).expand_as(x))
        global_params[k].copy_(rnd.received[k])
    average_buffers(module, cohort)
    up = module.reduce(up_bits.sum() if rnd.extra_bits_up is None else up_bits.sum() + rnd.extra_bits_up)
    module.comm.record(up, down_bits if rnd.extra_bits_down is None else down_bits + rnd.extra_bits_down)
    rnd.client_density = local_density
    return rnd


def average_buffers(module: FederatedLightningModule, cohort: Cohort) -> None:
    """Client model buffers (e.g. BatchNorm statistics) are averaged like the parameters (integer counters:
    the maximum), and written to every client and to the global model; personal buffers stay as they are."""
    if cohort.size == 0:
        return
    clients = module.ensure_clients()
    global_buffers = dict(module.global_model.named_buffers())
    for k, b in shared(clients.model_buffers.as_dict(), module.personal_names).items():
        part = cohort.take(b)
        if b.is_floating_point():
            value = module.reduce(torch.tensordot(cohort.weights.to(b.dtype), part, dims=1))
        else:
            value = module.reduce(part.max(dim=0).values, op="max")
        b.copy_(value.unsqueeze(0).expand_as(b))
        global_buffers[k].copy_(value)


__all__ = ["Round", "Tensors", "average_buffers", "communicate"]
