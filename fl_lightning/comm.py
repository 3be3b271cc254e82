"""Communication accounting: the bits a real system would send for a message (DESIGN §2.4).

For a message of d entries with nnz non-zeros:

- ``dense``:   32·d                     (fp32 values)
- ``coo``:     nnz·(32 + ⌈log2 d⌉)      (value and index of every non-zero)
- ``bitmask``: d + 32·nnz               (one presence bit per entry, then the values)
- ``auto``:    the smallest of the three.

Everything stays on the device (no host synchronisation); counts are float64 so that cumulative totals
of large models over many rounds remain exact integers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from fl_lightning.ops import nonzeros

Encoding = Literal["auto", "dense", "coo", "bitmask"]
ENCODINGS: tuple[str, ...] = get_args(Encoding)


def encoded_bits(nnz: Tensor, d: int, encoding: Encoding = "auto") -> Tensor:
    """Bits of a message with ``nnz`` non-zeros out of ``d`` entries (elementwise over ``nnz``)."""
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    nnz = nnz.to(torch.float64)
    dense = torch.full_like(nnz, 32.0 * d)
    coo = nnz * (32 + max(1, math.ceil(math.log2(max(d, 2)))))
    bitmask = d + 32.0 * nnz
    if encoding == "dense":
        return dense
    if encoding == "coo":
        return coo
    if encoding == "bitmask":
        return bitmask
    return torch.minimum(dense, torch.minimum(coo, bitmask))


def message_bits(tensors: Mapping[str, Tensor], encoding: Encoding = "auto", *, stacked: bool) -> Tensor:
    """Bits of each client's message ([c], ``stacked``) or of a single message (scalar)."""
    if encoding == "dense":  # 32·d whatever the non-zeros: no pass over the message
        first = next(iter(tensors.values()))
        d = sum((t.shape[1:].numel() if stacked else t.numel()) for t in tensors.values())
        return encoded_bits(torch.zeros(first.shape[:1] if stacked else (), device=first.device), d, "dense")
    nnz, d = nonzeros(tensors, stacked=stacked)
    return encoded_bits(nnz, d, encoding)


class CommCounter(nn.Module):
    """Cumulative rounds and bits sent up (clients → server) and down (server → clients), as buffers so
    they land in checkpoints."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("bits_up", torch.zeros((), dtype=torch.float64))
        self.register_buffer("bits_down", torch.zeros((), dtype=torch.float64))
        self.register_buffer("rounds", torch.zeros((), dtype=torch.int64))

    def record(self, up: Tensor, down: Tensor) -> None:
        self.bits_up += up.sum()
        self.bits_down += down.sum()
        self.rounds += 1
