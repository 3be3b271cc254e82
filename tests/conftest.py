"""Shared helpers: quiet Trainers and heterogeneous least-squares problems with known solutions."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import lightning as L
import pytest
import torch
from torch import Tensor

from fl_lightning.cli import quiet_irrelevant_warnings

os.environ.setdefault("WANDB_MODE", "offline")
quiet_irrelevant_warnings()
# Tiny tensors gain nothing from intra-op threads, and on a shared 2-core machine OpenMP barriers
# under oversubscription slow every op down by orders of magnitude.
torch.set_num_threads(1)


def make_trainer(max_steps: int, callbacks: list[Any] | None = None, **kwargs: Any) -> L.Trainer:
    """A CPU Trainer with no logging, checkpointing or validation unless asked for."""
    defaults: dict[str, Any] = {
        "max_steps": max_steps,
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
    }
    defaults.update(kwargs)
    return L.Trainer(callbacks=callbacks or [], **defaults)


@dataclass
class LeastSquares:
    """f_i(x) = (1/m_i) ‖A_i x − b_i‖²  (the ``mse`` loss of a bias-free linear model), f = Σ_i w_i f_i."""

    clients: list[tuple[Tensor, Tensor]]
    weights: Tensor
    x_star: Tensor
    L: float  # max_i smoothness constant
    mu: float  # min_i strong-convexity constant

    @property
    def kappa(self) -> float:
        return self.L / self.mu

    def grad(self, i: int, x: Tensor) -> Tensor:
        A, b = self.clients[i]
        return 2.0 / len(b) * A.T @ (A @ x - b)

    def loss(self, x: Tensor) -> Tensor:
        return sum(w * ((A @ x - b) ** 2).mean() for w, (A, b) in zip(self.weights, self.clients))


def least_squares(n: int = 10, d: int = 20, m: int = 40, kappa: float = 50.0, seed: int = 0,
                  sizes: list[int] | None = None, shared_basis: bool = False) -> LeastSquares:
    """Heterogeneous clients: each has its own minimiser and a Hessian with condition number κ.

    With ``shared_basis`` all Hessians are equal, so f = Σ w_i f_i is as ill-conditioned as each f_i;
    otherwise each client's eigenbasis is rotated at random: Hessians differ (FedAvg drifts), and their
    average is better conditioned than κ."""
    g = torch.Generator().manual_seed(seed)
    clients = []
    Ls, mus = [], []
    shared, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    for i in range(n):
        mi = sizes[i] if sizes else m
        q_left, _ = torch.linalg.qr(torch.randn(mi, d, generator=g, dtype=torch.float64))
        q_right = shared if shared_basis else torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
        # singular values s with s² spanning [1, κ]: H_i = (2/m) Aᵀ A has eigenvalues 2 s² / m
        s = torch.linspace(1.0, kappa, d, dtype=torch.float64).sqrt()
        A = q_left @ torch.diag(s) @ q_right
        x_i = 3.0 * torch.randn(d, generator=g, dtype=torch.float64)  # far-apart local optima
        b = A @ x_i + 0.1 * torch.randn(mi, generator=g, dtype=torch.float64)
        clients.append((A, b))
        Ls.append(2 * kappa / mi)
        mus.append(2 * 1.0 / mi)
    w = torch.full((n,), 1.0 / n, dtype=torch.float64)
    H = sum(wi * 2.0 / len(b) * A.T @ A for wi, (A, b) in zip(w, clients))
    r = sum(wi * 2.0 / len(b) * A.T @ b for wi, (A, b) in zip(w, clients))
    return LeastSquares(clients, w, torch.linalg.solve(H, r), max(Ls), min(mus))


@pytest.fixture
def quadratic() -> LeastSquares:
    return least_squares()
