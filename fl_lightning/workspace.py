"""The cohort's workspace: a local step of a small cohort touches the cohort's rows only (DESIGN §2.2.1).

With client sampling (m of n clients per round) the stacked state keeps all n rows ``[n, ...]``, but only the
cohort's m rows change in a local step. Training on them in place means gathering them for the forward pass and
scattering the gradient back: autograd's backward of the gather zero-fills an ``[n, ...]`` gradient, and the
optimizer then updates all n rows — for FLUTE's shape (10 of 1,000 clients) > 90 % of the step's time goes to
rows that do not train.

A :class:`CohortWorkspace` swaps the storage of every stacked parameter ``x`` for a copy of the cohort's rows
``x[S]`` (``[m, ...]``) for the duration of one local step (the module opens it at the start of
``training_step`` and closes it at its end, or right after the round, before ``on_round_end``), and presents
the cohort with ``rows = None`` ("all rows"), so the forward/backward, the optimizer and the callbacks see an
``[m, ...]`` stack. Closing writes the rows back, x[S] ← x_S, or after a round the broadcast to every row. Each
step moves 2·m rows, not n; the round's broadcast to all n rows is unchanged. Between steps the stacked state is
the ordinary ``[n, ...]`` one (checkpoints, validation, a user's callback see nothing of this).

The result is the same computation: the rows outside the cohort do not take part in the step (their gradient is
zero) and every round ends by writing the broadcast to every row, so it is exact — bit for bit — as long as nothing
makes an idle row's step differ from "no step": :func:`workspace_blocker` lists what does (per-client state of the
callbacks, personal parameters, model buffers, optimizer state such as momentum, Adam's moments).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fl_lightning.clients import ClientState
from fl_lightning.cohort import Cohort

if TYPE_CHECKING:
    from fl_lightning.module import FederatedLightningModule


def workspace_blocker(module: FederatedLightningModule, optimizer: torch.optim.Optimizer) -> str | None:
    """Why the cohort's workspace would not give the same result as training all rows in place (``None``: it
    would). Idle rows are only "not stepped" in place when no state of theirs moves without a gradient."""
    clients = module.ensure_clients()
    if len(clients.extra):
        return f"callbacks keep per-client state ({', '.join(clients.extra.keys())})"
    if module.personal_names:
        return "personal parameters stay on the clients between rounds"
    if len(clients.model_buffers):
        return "the client model has buffers (e.g. BatchNorm statistics)"
    if type(optimizer) is not torch.optim.SGD:
        return f"the local optimizer ({type(optimizer).__name__}) keeps per-client state; plain SGD has none"
    if any(g.get("momentum", 0) for g in optimizer.param_groups):
        return "SGD with momentum keeps per-client state (the momentum buffers)"
    if optimizer.state:
        return "the local optimizer holds state"
    return None


def _positions(rows: Tensor, subset: Tensor | None) -> Tensor | None:
    """Where the local rows ``subset`` (a subset of the sorted ``rows``) sit in the workspace."""
    return None if subset is None else torch.searchsorted(rows, subset)


class CohortWorkspace:
    """The cohort's rows of the stacked parameters, swapped in for one local step (module docstring).

    Args:
        clients: the stacked client state (its parameters' storage is swapped while the workspace is open).
        cohort: the round's participants on this process, with ``rows`` set (a strict subset of the rows).
    """

    def __init__(self, clients: ClientState, cohort: Cohort) -> None:
        assert cohort.rows is not None, "a workspace is for a cohort of some of the rows"
        self.clients, self.rows = clients, cohort.rows
        #: the cohort as the step sees it: every row of the workspace takes part (held rows renumbered)
        self.cohort = dataclasses.replace(cohort, rows=None, by_budget=_positions(cohort.rows, cohort.by_budget))
        self._full: dict[str, Tensor] = {}
        for k, x in clients.x.items():
            self._full[k] = x.data
            x.data = x.data.index_select(0, self.rows)
            x.grad = None

    def close(self, broadcast: dict[str, Tensor] | None = None) -> None:
        """Put the ``[n, ...]`` storage back: x[S] ← the workspace, or every row ← ``broadcast[k]`` (the round's
        received model, for the tensors it holds) after a round."""
        for k, x in self.clients.x.items():
            work, full = x.data, self._full[k]
            x.grad = None  # the gradient of the workspace's rows; the next step makes a new one
            x.data = full
            if broadcast is not None and k in broadcast:
                full.copy_(broadcast[k].unsqueeze(0).expand_as(full))
            else:
                full.index_copy_(0, self.rows, work)
        self._full.clear()


__all__ = ["CohortWorkspace", "workspace_blocker"]
