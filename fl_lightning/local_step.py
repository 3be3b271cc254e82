"""One local step's forward and backward for every participating client (DESIGN §2.1), three ways:

- **vectorised**: one ``torch.func.vmap`` call (or the stacked-matmul fast path of :mod:`fl_lightning.batched`)
  over the cohort's rows, one backward of Σ_i f_i;
- **chunked**: the same, ``clients_per_chunk`` clients at a time (bounds activation memory);
- **sequential**: a Python loop over clients (models vmap cannot run, e.g. BatchNorm in training mode).

All three leave ∇f_i(w_i) in row i of ``x.grad`` of the stacked client parameters: clients' parameters are
disjoint slices, so the gradient of Σ_i f_i with respect to client i's slice is ∇f_i. ``w_i`` are the
parameters after the callbacks' ``transform_params`` (e.g. TopK through a straight-through estimator).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from fl_lightning.clients import ClientState, TensorGroup
from fl_lightning.cohort import Cohort
from fl_lightning.objective import ClientBatch, Compiled, LocalObjective
from fl_lightning.round import Tensors

Vectorize = bool | Literal["auto"]
Transform = Callable[[Tensors], Tensors]
Backward = Callable[[Tensor], None]
Logged = dict[str, Tensor]
CompileStep = bool | Mapping[str, Any]
#: the keyword arguments of ``torch.compile`` that ``compile_step`` may set
COMPILE_KEYS = ("backend", "mode", "fullgraph", "dynamic", "options")


def compile_options(value: CompileStep | None) -> dict[str, Any] | None:
    """``compile_step`` as ``torch.compile``'s keyword arguments: ``False``/``None`` → ``None`` (eager), ``True`` →
    ``{}`` (its defaults: the inductor backend), a mapping → those arguments (checked against :data:`COMPILE_KEYS`).

    Raises:
        ValueError: for another value or an unknown key, naming the accepted ones.
    """
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(COMPILE_KEYS))
        if unknown:
            raise ValueError(f"compile_step takes torch.compile's {list(COMPILE_KEYS)}, got unknown {unknown}")
        return dict(value)
    raise ValueError(f"compile_step must be true, false or a dict of torch.compile arguments, got {value!r}")


class LocalStep:
    """Forward + backward of one local step of the cohort, on the path ``vectorize`` chooses.

    Args:
        objective: f_i (:class:`~fl_lightning.objective.LocalObjective`).
        vectorize: ``True``, ``False`` or ``"auto"`` (vectorise when the model allows it; the first step of a
            process proves it, falling back to the loop on failure).
        clients_per_chunk: at most this many clients per forward/backward (``None``: all at once).
        compile_step: ``torch.compile`` the vectorised forward + loss (and so, through AOTAutograd, its backward)
            with these arguments (:func:`compile_options`); the sequential loop and a LightningModule client's
            ``training_step`` (whose ``self.log`` values cannot leave a traced graph) stay eager. The compiled step
            computes the eager numbers to floating-point rounding (fused kernels may round differently).
    """

    def __init__(self, objective: LocalObjective, vectorize: Vectorize = "auto",
                 clients_per_chunk: int | None = None, compile_step: CompileStep | None = None) -> None:
        self.objective = objective
        options = compile_options(compile_step)
        self.compiled = None if options is None else Compiled(options)
        self.vectorize = vectorize
        self.clients_per_chunk = clients_per_chunk
        self.vectorized: bool | None = None  # the chosen path, once known
        self._vmap_proven = False  # "auto": a vectorised step has run in this process

    def choose_path(self, model: nn.Module, padded: bool) -> bool:
        """Whether to vectorise, given the client model and whether batches are padded (full-batch steps on
        clients of unequal sizes); warns (``auto``) or raises (``True``) when the model cannot be vectorised."""
        from fl_lightning.models.inspect import is_vmappable

        if self.vectorize is False:
            self.vectorized = False
            return False
        ok, layer = is_vmappable(model)
        reasons = [] if ok else [f"layer {layer} cannot run under vmap in training"]
        if padded and not self.objective.supports_padding:
            reasons.append("full-batch steps on clients of unequal sizes need a built-in loss to be vectorised")
        if reasons and self.vectorize is True:
            raise ValueError(f"vectorize=True is impossible: {'; '.join(reasons)}. Use vectorize: auto or false")
        if reasons:
            rank_zero_warn(f"using the sequential client loop: {'; '.join(reasons)}")
        self.vectorized = not reasons
        return self.vectorized

    def fuses(self, cohort: Cohort) -> bool:
        """Whether a step of ``cohort`` can run the fused SGD update (:mod:`fl_lightning.fused`) as far as the path
        goes: vectorised on the stacked rows themselves (all rows take part) in one chunk."""
        return (self.vectorized is True and cohort.rows is None and len(cohort) > 0
                and (self.clients_per_chunk is None or self.clients_per_chunk >= len(cohort)))

    def __call__(self, clients: ClientState, cohort: Cohort, batch: ClientBatch, transform: Transform,
                 backward: Backward, fused_lr: Callable[[], float] | None = None) -> tuple[Tensor, Logged]:
        """Losses ``[c]`` (and the client model's logged values, ``[c]`` each) of the cohort's rows; their
        gradients accumulate into ``x.grad`` of ``clients`` (zeros for the rows outside the cohort). With
        ``fused_lr`` (only where :meth:`fuses`), the backward applies SGD to ``x`` instead (no gradients)."""
        if fused_lr is not None:
            assert self.fuses(cohort), "the fused SGD step runs on all stacked rows in one chunk"
            params = transform(dict(clients.x.items()))
            loss, logged = self.objective.vectorized(params, {}, batch, None, fused_lr)
            backward(loss.sum())
            return loss.detach(), logged
        if len(batch) == 0:  # none of this process's clients is in the cohort
            for p in clients.x.values():  # zero gradients, as the idle rows get on one process:
                p.grad = torch.zeros_like(p)  # momentum and weight decay then act the same on any number of ranks
            return batch.inputs.new_zeros(0), {}
        assert self.vectorized is not None, "choose_path first"
        if not self.vectorized:
            return self._sequential(clients, cohort, batch, transform, backward)
        if self.vectorize is True or self._vmap_proven:
            return self._vectorized(clients, cohort, batch, transform, backward)
        try:  # "auto": the first step of this process (also after a resume) proves the model runs under vmap
            result = self._vectorized(clients, cohort, batch, transform, backward)
        except Exception as err:  # any vmap failure means: use the loop
            for p in clients.x.values():
                p.grad = None
            rank_zero_warn(f"vectorised step failed ({type(err).__name__}: {err}); using the sequential loop")
            self.vectorized = False
            return self._sequential(clients, cohort, batch, transform, backward)
        self._vmap_proven = True
        return result

    # ------------------------------------------------------------------ paths
    def _chunks(self, c: int) -> Iterator[tuple[int, int]]:
        size = self.clients_per_chunk or c
        for start in range(0, c, size):
            yield start, min(c, start + size)

    @staticmethod
    def _slice(tensors: TensorGroup, cohort: Cohort, start: int, end: int) -> Tensors:
        if cohort.rows is None:  # the whole stack is not sliced: a slice's backward zero-fills [n, ...]
            return {k: v if start == 0 and end == v.shape[0] else v[start:end] for k, v in tensors.items()}
        idx = cohort.rows[start:end]
        return {k: v[idx] for k, v in tensors.items()}

    @staticmethod
    def _add_leaf_grads(clients: ClientState, leaves: Tensors, rows: Tensor | slice) -> None:
        """x.grad[rows] += the gradients autograd left on ``leaves`` (detached copies or views of those rows).

        Running a client (chunk) on leaves rather than on slices of the stacked parameters keeps the backward
        from building a zero-filled full-size [n, ...] gradient for every client (chunk): O(n·d), not O(n²·d)."""
        for k, x in clients.x.items():
            if x.grad is None:
                x.grad = torch.zeros_like(x)
            g = leaves[k].grad
            if g is None:
                continue
            if isinstance(rows, slice):
                x.grad[rows].add_(g)
            else:
                x.grad.index_add_(0, rows, g)

    def _vectorized(self, clients: ClientState, cohort: Cohort, batch: ClientBatch, transform: Transform,
                    backward: Backward) -> tuple[Tensor, Logged]:
        chunks = list(self._chunks(len(batch)))
        losses, logs = [], []
        for s, e in chunks:
            stacked = self._slice(clients.x, cohort, s, e)
            if len(chunks) > 1:
                stacked = {k: v.detach().requires_grad_() for k, v in stacked.items()}
            params = transform(stacked)
            buffers = self._slice(clients.model_buffers, cohort, s, e)
            sub = ClientBatch(batch.inputs[s:e], batch.targets[s:e], None if batch.mask is None else batch.mask[s:e])
            loss, logged = self.objective.vectorized(params, buffers, sub, self.compiled)
            backward(loss.sum())
            if len(chunks) > 1:
                rows = slice(s, e) if cohort.rows is None else cohort.rows[s:e]
                self._add_leaf_grads(clients, stacked, rows)
            losses.append(loss.detach())
            logs.append(logged)
        return torch.cat(losses), {k: torch.cat([lg[k] for lg in logs]) for k in logs[0]}

    def _sequential(self, clients: ClientState, cohort: Cohort, batch: ClientBatch, transform: Transform,
                    backward: Backward) -> tuple[Tensor, Logged]:
        rows = cohort.rows.tolist() if cohort.rows is not None else range(len(cohort))
        losses, logs = [], []
        for j, cid in enumerate(rows):
            leaves = {k: p[cid : cid + 1].detach().requires_grad_() for k, p in clients.x.items()}
            params = {k: v[0] for k, v in transform(leaves).items()}
            buffers = {k: b[cid] for k, b in clients.model_buffers.items()}  # views: BatchNorm updates in place
            x, y = batch.client(j)
            loss, logged = self.objective.single(params, buffers, x, y)
            backward(loss)
            self._add_leaf_grads(clients, leaves, slice(cid, cid + 1))
            losses.append(loss.detach())
            logs.append(logged)
        return torch.stack(losses), {k: torch.stack([lg[k] for lg in logs]) for k in logs[0]}





class HeldRows:
    """Rows of the stacked client state that sit out a local step (their budget τ_i is spent, DESIGN §1.2 with
    heterogeneous local work): their parameters and per-client optimizer state (momentum, Adam's moments) are
    saved before the optimizer step and written back after the step's callbacks, so they keep x_i until the round
    ends. Shared scalars of the optimizer (Adam's step count) are not per client and advance for everyone."""

    def __init__(self, clients: ClientState, optimizer: torch.optim.Optimizer, rows: Tensor) -> None:
        self.rows = rows
        self.saved: list[tuple[Tensor, Tensor]] = []
        for x in clients.x.values():
            self.saved.append((x, x.detach()[rows].clone()))
            for value in optimizer.state.get(x, {}).values():
                if isinstance(value, Tensor) and value.shape == x.shape:
                    self.saved.append((value, value[rows].clone()))
        self.optimizer, self.clients = optimizer, clients

    def restore(self) -> None:
        """Write the saved rows back (after the step, also into optimizer state created by this step: zeros)."""
        with torch.no_grad():
            for target, value in self.saved:
                target[self.rows] = value
            held = {id(t) for t, _ in self.saved}
            for x in self.clients.x.values():  # state the first step created (e.g. momentum) starts at zero
                for value in self.optimizer.state.get(x, {}).values():
                    if isinstance(value, Tensor) and value.shape == x.shape and id(value) not in held:
                        value[self.rows] = 0
__all__ = ["COMPILE_KEYS", "CompileStep", "HeldRows", "LocalStep", "Vectorize", "compile_options"]
