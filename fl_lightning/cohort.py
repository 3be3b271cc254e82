"""``Cohort``: the clients that take part in one round, made once per round (DESIGN §2.2.1).

Stacked client state is ``[rows, ...]`` over this process's clients (all n on one process, a contiguous block
under ``federated_ddp``). A round involves the cohort S ⊆ {0..n−1}: everyone (full participation), a sample
(:class:`~fl_lightning.callbacks.ClientSampling`), minus the clients whose local budget is 0 this round
(:class:`~fl_lightning.callbacks.LocalWork`). A :class:`Cohort` holds, for this process:

- ``rows``: the local rows of the participants (``None`` when they are all the process's rows, so that hot loops
  use the whole stacked tensors, not gathered copies);
- ``ids``: their global ids ``[c]``; ``members``: the whole cohort's global ids over all processes (sorted);
- ``weights``: w_i / Σ_{j∈S} w_j ``[c]`` (Σ over all processes = 1), the weights of the round's average
  x̄ = Σ_{i∈S} w_i u_i; ``share``: Σ_{j∈S} w_j / Σ_j w_j, so ``weights * share`` are w_i / Σ_j w_j (the
  weights of quantities kept over all n clients, such as SCAFFOLD's c = Σ_i w_i c_i);
- ``steps``: the local-step budget τ_i of each participant this round (``None``: every step of the round).

Callbacks index stacked state through :meth:`take`, :meth:`put_` and :meth:`add_` instead of branching on
full participation.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class Cohort:
    """The participants of round ``index`` on this process (see the module docstring)."""

    index: int
    rows: Tensor | None
    ids: Tensor
    members: tuple[int, ...]
    weights: Tensor
    share: float
    num_clients: int
    steps: Tensor | None = None
    #: the participants' local rows sorted by budget, and the sorted budgets (host): held rows without a sync
    by_budget: Tensor | None = field(default=None, repr=False)
    sorted_budgets: tuple[int, ...] = field(default=(), repr=False)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def size(self) -> int:
        """|S|, the number of participants over all processes."""
        return len(self.members)

    @property
    def full(self) -> bool:
        """Every client of the federation takes part."""
        return self.size == self.num_clients

    def take(self, stacked: Tensor) -> Tensor:
        """The participants' rows of a stacked ``[rows, ...]`` tensor: the tensor itself when they are all
        the rows (a view, no copy), else a gathered copy."""
        return stacked if self.rows is None else stacked[self.rows]

    def take_all(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """:meth:`take` of every tensor."""
        return {k: self.take(v) for k, v in tensors.items()}

    def put_(self, stacked: Tensor, values: Tensor) -> None:
        """Write ``values`` ``[c, ...]`` into the participants' rows of ``stacked`` (in place)."""
        if self.rows is None:
            stacked.copy_(values)
        else:
            stacked[self.rows] = values.to(stacked.dtype)

    def add_(self, stacked: Tensor, values: Tensor, alpha: float = 1.0) -> None:
        """``stacked[rows] += alpha · values`` for the participants (in place, no ``[rows, ...]`` temporary)."""
        if self.rows is None:
            stacked.add_(values, alpha=alpha)
        else:
            stacked.index_add_(0, self.rows, values.to(stacked.dtype), alpha=alpha)

    def held_rows(self, round_step: int) -> Tensor | None:
        """Local rows of the participants that sit out local step ``round_step`` (0-based within the round):
        those whose budget τ_i ≤ round_step; ``None`` when all of them step. A slice of a tensor sorted once per
        round: no host synchronisation, no loop over clients."""
        spent = bisect_right(self.sorted_budgets, round_step)
        return None if self.by_budget is None or spent == 0 else self.by_budget[:spent]

    def steps_taken(self, round_length: int) -> Tensor:
        """min(τ_i, round length): the local steps each participant took in a round of ``round_length`` steps."""
        full = torch.full((len(self),), round_length, dtype=torch.long, device=self.weights.device)
        return full if self.steps is None else torch.minimum(self.steps.to(full.device), full)


def make_cohort(index: int, local_ids: Sequence[int], client_weights: Tensor, members: Sequence[int] | None,
                budgets: Sequence[int] | None = None) -> Cohort:
    """The cohort of round ``index``: ``members`` (global ids, ``None`` = everyone) minus the clients whose
    budget (``budgets[i]``, one per global id, ``None`` = no limit) is 0.

    Args:
        local_ids: the global ids of this process's rows, in row order.
        client_weights: w_j of all n clients (any positive scale).
    """
    n = int(client_weights.shape[0])
    chosen = list(range(n)) if members is None else sorted(int(i) for i in members)
    if budgets is not None:
        chosen = [i for i in chosen if budgets[i] > 0]
    device = client_weights.device
    local = list(local_ids)
    everyone = members is None and len(chosen) == n  # no sample drawn, nobody dropped out
    if everyone and local == list(range(n)):
        row_list = local
        rows, ids = None, torch.arange(n, device=device)
    else:
        picked = set(chosen)
        row_list = [r for r, i in enumerate(local) if i in picked]
        rows = torch.tensor(row_list, dtype=torch.long, device=device)
        ids = torch.tensor([local[r] for r in row_list], dtype=torch.long, device=device)
    total = client_weights.sum()
    if everyone:
        weights = client_weights / total if rows is None else client_weights[ids] / total
        share = 1.0
    else:
        cohort_total = client_weights[chosen].sum()
        weights = client_weights[ids] / cohort_total
        share = float(cohort_total / total)
    steps, by_budget, sorted_budgets = None, None, ()
    if budgets is not None:
        own = [int(budgets[local[r]]) for r in row_list]
        steps = torch.tensor(own, dtype=torch.long, device=device)
        order = sorted(range(len(own)), key=own.__getitem__)
        by_budget = torch.tensor([row_list[j] for j in order], dtype=torch.long, device=device)
        sorted_budgets = tuple(own[j] for j in order)
    return Cohort(index=index, rows=rows, ids=ids, members=tuple(chosen), weights=weights, share=share,
                  num_clients=n, steps=steps, by_budget=by_budget, sorted_budgets=sorted_budgets)


__all__ = ["Cohort", "make_cohort"]
