"""What one communication round passes through the federated hooks (DESIGN §1.2).

The module fills the fields stage by stage and calls the hooks of :class:`FederatedCallback` between
them. Hooks *replace* dict entries (``rnd.server[k] = topk(...)``) rather than modifying tensors in
place: ``mean``, ``server``, ``broadcast`` and ``received`` start as shallow copies of each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

Tensors = dict[str, Tensor]


@dataclass
class Round:
    """One round. Stacked tensors are [c, ...] over the participating clients ``clients``
    (None = all n clients, in order); unstacked ones are the single server-side model.

    - ``local``: x̂_i, the clients' models after their last local step (stacked). Only
      ``on_before_uplink`` may replace its entries; valid until ``on_receive`` returns.
    - ``uplink``: u_i, what each client sends; starts as a copy of x̂_i (stacked).
    - ``uplink_bits``: bits per client [c]; a compressor that knows its exact cost sets it,
      otherwise the module measures the sparse/dense encoding of ``uplink``.
    - ``mean``: x̄ = Σ_i w_i u_i with the round's normalised weights ``weights`` [c].
    - ``server``: x⁺, the server's model (x̄, or TopK(x̄) when the server prunes).
    - ``broadcast``: b = C_down(x⁺), what the server sends; ``downlink_bits`` as for the uplink.
    - ``receivers``: how many clients the broadcast goes to (the cohort over all processes, or n).
    - ``received``: what clients set x_i to (b, or TopK(b) when clients prune the broadcast).
      This is also the new global model.
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
