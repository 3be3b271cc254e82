"""Dedicated seeds for the federated RNG streams (coin flips, cohorts, data sampling)."""

from __future__ import annotations

import zlib

import torch


def derive_seed(stream: str) -> int:
    """A seed for the RNG stream ``stream``, derived from torch's initial seed (set by
    ``seed_everything``) without consuming the global RNG. Different streams get unrelated seeds."""
    return (torch.initial_seed() * 0x9E3779B97F4A7C15 + zlib.crc32(stream.encode())) % (2**63 - 1)
