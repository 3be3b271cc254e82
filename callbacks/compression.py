"""``Compression``: a compressor C of DESIGN §1.2 on the uplink (C_up), the downlink (C_down) or in the forward
pass (FedComLoc-Com / -Global / -Local, Yi et al. 2024).

- ``method="topk"``: TopK_δ of the whole message, every tensor of it, biases included (sent sparse; bits
  follow the module's encoding).
- ``method="quantize"``: QSGD quantisation to 2^bits − 1 levels, one norm per tensor (and per client); a
  message of d entries costs 32 + d·(bits + 1) bits per tensor (:func:`fl_lightning.ops.quantized_bits`).

Where it acts:

- ``uplink``:   u_i ← C(u_i) per client, after the control variates formed u_i = x̂_i − (γ/p) h_i; the server
                averages the compressed messages, x̄ = Σ_i w_i C(u_i).
- ``downlink``: b ← C(x⁺) once at the server, sent to every receiving client.
- ``forward``:  w_i = Q(x_i) in the forward pass and the gradient with a straight-through estimator (§1.4):
                the gradient at Q(x_i) is applied to the dense x_i; the global model x is evaluated as Q(x),
                what clients compute with. Quantisation only (TopK in the forward
                pass is ``TopKPruning(at="forward")``), and with nearest-level rounding: Q is then a fixed
                function of x_i, like TopK, the same on every execution path (vectorised, sequential, chunked).

Stochastic rounding on the wire draws its random numbers from ``seed`` and the round index only, and on
the uplink separately for every client from its global id as well, so a resumed run and a run spread over
any number of processes draw the same numbers.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from fl_lightning.callbacks.base import FederatedCallback
from fl_lightning.ops import SCOPES, Scope, check_density, quantize, quantized_bits, topk
from fl_lightning.round import Round, Tensors
from fl_lightning.seeding import derive_seed, step_seed

if TYPE_CHECKING:
    from fl_lightning.module import FederatedLightningModule

Direction = Literal["uplink", "downlink", "forward"]
DIRECTIONS: tuple[str, ...] = get_args(Direction)
Method = Literal["topk", "quantize"]


class Compression(FederatedCallback):
    """Compress the uplink, the downlink, or the model in the forward pass.

    Args:
        direction: ``uplink`` (what clients send), ``downlink`` (what the server broadcasts) or ``forward``
            (the weights local training evaluates its gradient at, STE; needs ``method="quantize"``).
        method: ``topk`` (needs ``density``) or ``quantize`` (uses ``bits``).
        density: δ ∈ (0, 1] for TopK.
        bits: quantisation width, 1..24.
        scope: TopK scope, ``global`` or ``layer``.
        seed: seeds stochastic quantisation (default: derived from torch's initial seed at setup).
    """

    def __init__(self, direction: Direction = "uplink", method: Method = "topk", density: float | None = None,
                 bits: int = 8, scope: Scope = "global", seed: int | None = None) -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"Compression direction must be one of {DIRECTIONS}, got {direction!r}")
        if method not in ("topk", "quantize"):
            raise ValueError(f"Compression method must be 'topk' or 'quantize', got {method!r}")
        if direction == "forward" and method != "quantize":
            raise ValueError("Compression(direction='forward') needs method='quantize'; "
                             "TopK in the forward pass is TopKPruning(at='forward')")
        if method == "topk":
            if density is None:
                raise ValueError("Compression(method='topk') needs density in (0, 1]")
            density = check_density(density)
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

    # ------------------------------------------------------------------ helpers
    def _round_seed(self, rnd: Round) -> int:
        assert self.seed is not None
        return step_seed(self.seed, rnd.index)

    def _topk(self, tensors: Tensors, *, stacked: bool) -> Tensors:
        assert self.density is not None
        return topk(tensors, self.density, scope=self.scope, stacked=stacked)

    def _client_noise(self, tensors: Tensors, seeds: list[int]) -> Tensors:
        """Uniform draws for stacked ``tensors`` ([c, ...]), client j's from its own generator ``seeds[j]``."""
        first = next(iter(tensors.values()))
        dtype = torch.promote_types(first.dtype, torch.float32)
        sizes = [math.prod(v.shape[1:]) for v in tensors.values()]
        rows = []
        for s in seeds:
            gen = torch.Generator(device=first.device)
            gen.manual_seed(s)
            rows.append(torch.rand(sum(sizes), generator=gen, dtype=dtype, device=first.device))
        u = torch.stack(rows) if rows else torch.empty(0, sum(sizes), dtype=dtype, device=first.device)
        return {k: part.reshape(v.shape) for (k, v), part in zip(tensors.items(), u.split(sizes, dim=1))}

    def _quantized_bits(self, tensors: Tensors, shape: tuple[int, ...], *, stacked: bool) -> torch.Tensor:
        """Bits of one quantised message (all its tensors), as a float64 tensor of ``shape``."""
        per_message = sum(quantized_bits(math.prod(v.shape[1:] if stacked else v.shape), self.bits)
                          for v in tensors.values())
        first = next(iter(tensors.values()))
        return torch.full(shape, float(per_message), dtype=torch.float64, device=first.device)

    # ------------------------------------------------------------------ hooks
    @override
    def transforms_forward(self) -> bool:
        return self.direction == "forward"

    @override
    def transform_params(self, trainer: Trainer, module: FederatedLightningModule, params: Tensors) -> Tensors:
        if self.direction != "forward":
            return params
        out = {}
        for k, x in params.items():  # value Q(x) (nearest level), gradient straight through to x
            out[k] = x + (quantize(x, bits=self.bits, stochastic=False, stacked=True) - x).detach()
        return out

    @override
    def transform_evaluated_params(self, trainer: Trainer | None, module: FederatedLightningModule,
                                   params: Tensors) -> Tensors:
        """In the forward pass clients compute with Q(x_i), so the global model x is evaluated as Q(x) (nearest
        level, as in :meth:`transform_params`)."""
        if self.direction != "forward":
            return params
        return {k: quantize(x, bits=self.bits, stochastic=False, stacked=False) for k, x in params.items()}

    @override
    def on_compress_uplink(self, trainer: Trainer, module: FederatedLightningModule, rnd: Round) -> None:
        if self.direction != "uplink":
            return
        if self.method == "topk":
            rnd.uplink = self._topk(rnd.uplink, stacked=True)
            return
        rows = rnd.clients if rnd.clients is not None else slice(None)
        ids = rnd.cohort.ids if rnd.cohort is not None else module.client_ids[rows]  # (a Round built by hand)
        seed = self._round_seed(rnd)
        noise = self._client_noise(rnd.uplink, [step_seed(seed, int(i)) for i in ids.tolist()])
        rnd.uplink = {k: quantize(v, bits=self.bits, noise=noise[k], stacked=True) for k, v in rnd.uplink.items()}
        rnd.uplink_bits = self._quantized_bits(rnd.uplink, (len(ids),), stacked=True)

    @override
    def on_broadcast(self, trainer: Trainer, module: FederatedLightningModule, rnd: Round) -> None:
        if self.direction != "downlink":
            return
        if self.method == "topk":
            rnd.broadcast = self._topk(rnd.broadcast, stacked=False)
            return
        first = next(iter(rnd.broadcast.values()))
        gen = torch.Generator(device=first.device)
        gen.manual_seed(self._round_seed(rnd))  # one b for all: every rank draws the same numbers
        rnd.broadcast = {k: quantize(v, bits=self.bits, generator=gen, stacked=False)
                         for k, v in rnd.broadcast.items()}
        # the module counts a broadcast once per receiving client: the cohort, or all n clients
        rnd.downlink_bits = self._quantized_bits(rnd.broadcast, (), stacked=False) * rnd.receivers

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = state_dict["seed"]
