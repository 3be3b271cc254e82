"""``Compression``: a compressor C on the uplink (C_up) or the downlink (C_down) of DESIGN §1.2 (FedComLoc).

- ``method="topk"``: TopK_δ of the message (sent sparse; bits follow the module's encoding).
- ``method="quantize"``: QSGD stochastic quantisation to 2^bits − 1 levels (unbiased); a message of d
  entries costs 32 + d·(bits + 1) bits per tensor (:func:`fl_lightning.ops.quantized_bits`).

The uplink compresses u_i per client (stacked); the downlink compresses b once. Quantisation draws its
random numbers from a generator seeded with (seed, round index), so a resumed run draws the same.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from fl_lightning.callbacks.base import FederatedCallback
from fl_lightning.ops import SCOPES, Scope, _check_density, quantize, quantized_bits, topk
from fl_lightning.round import Round, Tensors
from fl_lightning.seeding import derive_seed, step_seed

if TYPE_CHECKING:
    from fl_lightning.module import FederatedLightningModule

Direction = Literal["uplink", "downlink"]
Method = Literal["topk", "quantize"]


class Compression(FederatedCallback):
    """Compress the uplink or the downlink.

    Args:
        direction: ``uplink`` (what clients send) or ``downlink`` (what the server broadcasts).
        method: ``topk`` (needs ``density``) or ``quantize`` (uses ``bits``).
        density: δ ∈ (0, 1] for TopK.
        bits: quantisation width, 1..24.
        scope: TopK scope, ``global`` or ``layer``.
        seed: seeds quantisation (default: derived from torch's initial seed at setup).
    """

    def __init__(self, direction: Direction = "uplink", method: Method = "topk", density: float | None = None,
                 bits: int = 8, scope: Scope = "global", seed: int | None = None) -> None:
        if direction not in ("uplink", "downlink"):
            raise ValueError(f"Compression direction must be 'uplink' or 'downlink', got {direction!r}")
        if method not in ("topk", "quantize"):
            raise ValueError(f"Compression method must be 'topk' or 'quantize', got {method!r}")
        if method == "topk":
            if density is None:
                raise ValueError("Compression(method='topk') needs density in (0, 1]")
            density = _check_density(density)
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 24:
            raise ValueError(f"Compression bits must be an integer in [1, 24], got {bits!r}")
        if scope not in SCOPES:
            raise ValueError(f"Compression scope must be one of {SCOPES}, got {scope!r}")
        self.direction, self.method, self.density, self.bits, self.scope = direction, method, density, bits, scope
        self.seed = seed

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(direction=self.direction)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        others = [cb for cb in trainer.callbacks if isinstance(cb, Compression) and cb is not self
                  and cb.direction == self.direction]
        if others:
            raise ValueError(f"two Compression callbacks on the {self.direction}; keep one")
        if self.seed is None:
            self.seed = derive_seed(f"compression/{self.direction}")

    def _compress(self, tensors: Tensors, rnd: Round, *, stacked: bool) -> tuple[Tensors, torch.Tensor | None]:
        if self.method == "topk":
            assert self.density is not None
            return topk(tensors, self.density, scope=self.scope, stacked=stacked), None
        first = next(iter(tensors.values()))
        gen = torch.Generator(device=first.device)
        assert self.seed is not None
        gen.manual_seed(step_seed(self.seed, rnd.index))
        out = {k: quantize(v, bits=self.bits, generator=gen, stacked=stacked) for k, v in tensors.items()}
        per_message = sum(quantized_bits((v[0] if stacked else v).numel(), self.bits) for v in tensors.values())
        shape = (first.shape[0],) if stacked else ()
        return out, torch.full(shape, float(per_message), dtype=torch.float64, device=first.device)

    @override
    def on_compress_uplink(self, trainer: Trainer, module: FederatedLightningModule, rnd: Round) -> None:
        if self.direction == "uplink":
            rnd.uplink, bits = self._compress(rnd.uplink, rnd, stacked=True)
            if bits is not None:
                rnd.uplink_bits = bits

    @override
    def on_broadcast(self, trainer: Trainer, module: FederatedLightningModule, rnd: Round) -> None:
        if self.direction == "downlink":
            rnd.broadcast, bits = self._compress(rnd.broadcast, rnd, stacked=False)
            if bits is not None:
                rnd.downlink_bits = bits * len(rnd.weights)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = state_dict["seed"]
