"""Stacked client state: every client's model x_i, and any per-client state callbacks add (h_i, masks).

Each tensor carries a leading client dimension ``[n, *shape]`` and is registered on the module tree, so
it moves with Lightning's accelerator and lands in checkpoints (DESIGN §2.1).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

_SEP = "__"


def _mangle(name: str) -> str:
    return name.replace(".", _SEP)


class TensorGroup(nn.Module):
    """Named tensors, registered as parameters (``trainable``) or persistent buffers.

    Parameter names of the client model contain dots, which ``register_*`` forbids; they are stored
    under ``name.replace('.', '__')`` and addressed by their original names.
    """

    def __init__(self, tensors: Mapping[str, Tensor], *, trainable: bool = False) -> None:
        super().__init__()
        self.trainable = trainable
        self._names: list[str] = list(tensors)
        for name, value in tensors.items():
            if trainable:
                self.register_parameter(_mangle(name), nn.Parameter(value))
            else:
                self.register_buffer(_mangle(name), value)

    def __getitem__(self, name: str) -> Tensor:
        return getattr(self, _mangle(name))

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def keys(self) -> list[str]:
        return list(self._names)

    def items(self) -> Iterator[tuple[str, Tensor]]:
        return ((name, self[name]) for name in self._names)

    def values(self) -> Iterator[Tensor]:
        return (self[name] for name in self._names)

    def as_dict(self) -> dict[str, Tensor]:
        return dict(self.items())

    @staticmethod
    def groups_in(state_dict: Mapping[str, Tensor], prefix: str,
                  names: Mapping[str, object]) -> list[tuple[str, TensorGroup]]:
        """Empty groups shaped like those a state dict holds under ``prefix`` (``<prefix><group>.<tensor>``),
        for loading it into a module that has not created them; ``names`` are the tensors' original
        (dotted) names where known (the model's parameter names)."""
        original = {_mangle(k): k for k in names}
        wanted: dict[str, dict[str, Tensor]] = {}
        for key, value in state_dict.items():
            if key.startswith(prefix):
                group, mangled = key[len(prefix):].split(".", 1)
                wanted.setdefault(group, {})[original.get(mangled, mangled)] = torch.empty_like(value)
        return [(group, TensorGroup(tensors)) for group, tensors in wanted.items()]


def stack_copies(tensors: Mapping[str, Tensor], n: int) -> dict[str, Tensor]:
    """``n`` independent copies of each tensor stacked along a new leading client dimension."""
    return {k: v.detach().unsqueeze(0).repeat(n, *([1] * v.dim())) for k, v in tensors.items()}


class ClientState(nn.Module):
    """x_i for every client (``x``, trainable), the client model's buffers (``model_buffers``), and
    named per-client state that callbacks add with :meth:`add` (``extra[name]``)."""

    def __init__(self, template: nn.Module, num_clients: int) -> None:
        super().__init__()
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}")
        self.num_clients = num_clients
        self.x = TensorGroup(stack_copies(dict(template.named_parameters()), num_clients), trainable=True)
        self.model_buffers = TensorGroup(stack_copies(dict(template.named_buffers()), num_clients))
        self.extra = nn.ModuleDict()

    def add(self, name: str, *, dtype: torch.dtype | None = None, fill: float = 0.0) -> TensorGroup:
        """Per-client state shaped like ``x`` (one tensor per parameter), e.g. control variates or masks.

        Idempotent: adding an existing name returns the existing group, so a callback's ``setup``
        can run twice (fit, then validate) without losing state.
        """
        if name in self.extra:
            return self.extra[name]
        group = TensorGroup(
            {k: torch.full_like(v, fill, dtype=dtype or v.dtype).detach() for k, v in self.x.items()}
        )
        self.extra[name] = group
        return group

    def allocate_from_state_dict(self, state_dict: Mapping[str, Tensor], prefix: str) -> None:
        """Create ``extra`` groups that a checkpoint holds but this instance lacks (loading a checkpoint
        outside the Trainer, where the callbacks that created them did not run)."""
        for group, tensors in TensorGroup.groups_in(state_dict, f"{prefix}extra.", dict(self.x.items())):
            if group not in self.extra:
                self.extra[group] = tensors


def select_rows(state_dict: Mapping[str, Tensor], prefix: str, ids: list[int], num_clients: int) -> dict[str, Tensor]:
    """The entries of a state dict holding all n clients (``[n, ...]`` under ``prefix``, as checkpoints do) cut to
    the rows ``ids`` of one process's shard; the state dict itself when ``ids`` are all n clients in order."""
    if ids == list(range(num_clients)):
        return dict(state_dict)
    rows = torch.tensor(ids, dtype=torch.long)
    return {key: (value[rows] if key.startswith(prefix) and value.dim() > 0 and value.shape[0] == num_clients
                  else value) for key, value in state_dict.items()}


@runtime_checkable
class ShardedClients(Protocol):
    """What a strategy that spreads the clients over processes (``federated_ddp``) uses of a module: the global
    model, the stacked client state of its rows, their global ids, and re-allocation from a full state dict (and
    ``num_clients``, n, once ``clients`` is allocated; not part of the ``isinstance`` check, which must not
    allocate)."""

    global_model: nn.Module
    clients: ClientState | None
    client_ids: Tensor

    def allocate_clients(self, n: int, state_dict: Mapping[str, Tensor] | None = None) -> ClientState: ...


__all__ = ["ClientState", "ShardedClients", "TensorGroup", "select_rows", "stack_copies"]
