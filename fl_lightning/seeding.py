"""Dedicated seeds for the federated RNG streams (coin flips, cohorts, data sampling)."""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from typing import Any

import torch


def derive_seed(stream: str) -> int:
    """A seed for the RNG stream ``stream``, derived from torch's initial seed (set by
    ``seed_everything``) without consuming the global RNG. Different streams get unrelated seeds."""
    return (torch.initial_seed() * _MIX + zlib.crc32(stream.encode())) % (2**63 - 1)


_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: decorrelates consecutive seeds


def step_seed(seed: int, step: int) -> int:
    """A 63-bit seed for step (or round) ``step`` of a stream seeded ``seed``: stateless, so any step's
    random numbers can be drawn again after a resume, on any device or rank."""
    return (seed * _MIX + (step + 1) * 0xBF58476D1CE4E5B9) % (2**63 - 1)


def restore_random(rng: random.Random, state: Sequence[Any]) -> None:
    """Set ``rng`` to a state saved from ``rng.getstate()``, also after a round trip through a checkpoint
    (which may turn its inner tuple into a list)."""
    version, internal, gauss = state
    rng.setstate((version, tuple(internal), gauss))
