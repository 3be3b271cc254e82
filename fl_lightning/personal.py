"""Personal parameters: parts of the client model that stay on the client (FedPer's heads, FedBN's normalisation).

``FederatedLightningModule(..., personal_params=["head.*"])`` names them by glob patterns
(:func:`fnmatch.fnmatchcase`) over the client model's parameter and buffer names. A personal tensor of client i
is trained by client i's local steps like any other, but it is never sent, averaged or overwritten by a round:
the round (:func:`~fl_lightning.round.communicate`) only carries the shared tensors, so the uplink and downlink
bits leave the personal ones out exactly, and the callbacks' control variates, TopK masks and server state only
see the shared ones. The global model's personal tensors keep their initial values (no client sends them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import TypeVar

from torch import nn

V = TypeVar("V")


def personal_names(model: nn.Module, patterns: Sequence[str] | None) -> frozenset[str]:
    """The parameter and buffer names of ``model`` matching any of ``patterns``; a ValueError for a pattern that
    matches no parameter (a typo would otherwise federate the whole model silently) or for one that makes every
    parameter personal (nothing would be federated)."""
    if not patterns:
        return frozenset()
    if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"personal_params must be a list of glob patterns over parameter names (e.g. "
                         f"['head.*']), got {patterns!r}")
    params = [name for name, _ in model.named_parameters()]
    buffers = [name for name, _ in model.named_buffers()]
    for pattern in patterns:
        if not any(fnmatchcase(name, pattern) for name in params):
            raise ValueError(f"personal_params pattern {pattern!r} matches no parameter of the client model; its "
                             f"parameters are {params}")
    chosen = frozenset(name for name in params + buffers if any(fnmatchcase(name, p) for p in patterns))
    if all(name in chosen for name in params):
        raise ValueError(f"personal_params {list(patterns)} make every parameter personal: nothing would be "
                         "federated (train the clients alone instead, or name fewer parameters)")
    return chosen


def shared(tensors: Mapping[str, V], personal: Iterable[str]) -> dict[str, V]:
    """The entries of ``tensors`` that are not personal."""
    skip = set(personal)
    return {k: v for k, v in tensors.items() if k not in skip}


__all__ = ["personal_names", "shared"]
