"""A minimal hand-written batched ProxSkip in plain PyTorch: the practical speed limit for the framework.

What a careful engineer would write for one experiment, without the framework: every client's weights
stacked in one tensor ``[n, ...]``, all clients' forward passes as batched matmuls (``torch.baddbmm``;
convolutions as one grouped convolution with ``groups=n``), one autograd backward over the summed
losses, and ProxSkip's update with a fixed number k of local steps per round (DESIGN §1.2)::

    g_i ← ∇f_i(x_i; minibatch);  g_i ← g_i − h_i;  x_i ← x_i − γ g_i            every step
    x̄ = Σ_i w_i x_i − (γ/p) Σ_i w_i h_i;  h_i ← h_i + (p/γ)(x̄ − x_i);  x_i ← x̄    every k-th step (p = 1/k)

The minibatches are drawn on the device exactly as :meth:`FederatedDataModule.sample` draws them (same
seeds, same law), so for equal initial weights this reproduces the framework's trajectory up to
floating-point rounding (:func:`check_against_framework`). Linear layers keep the activations
feature-major (``[n, features, B]``) so that the weight gradients come out contiguous (see
``fl_lightning/batched.py`` for why that matters). No communication accounting, no logging, no hooks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fl_lightning.models import MLP, FemnistCNN, LogisticRegression
from fl_lightning.seeding import step_seed


@dataclass
class ClientData:
    """All clients' training samples on the device, and per-client row indices into them."""

    x: Tensor  # [N, *sample_shape]
    y: Tensor  # [N]
    table: Tensor  # [n, max_size] row indices of each client's samples (padded)
    counts: Tensor  # [n] samples per client
    seed: int

    @classmethod
    def from_clients(cls, clients: Sequence[tuple[Tensor, Tensor]], seed: int, device: torch.device) -> ClientData:
        counts = torch.tensor([len(y) for _, y in clients])
        table = torch.zeros(len(clients), int(counts.max()), dtype=torch.long)
        start = 0
        for i, c in enumerate(counts.tolist()):
            table[i, :c] = torch.arange(start, start + c)
            start += c
        x = torch.cat([x for x, _ in clients]).to(device)
        y = torch.cat([y for _, y in clients]).to(device)
        return cls(x, y, table.to(device), counts.to(device), seed)

    def sample(self, step: int, batch_size: int) -> tuple[Tensor, Tensor]:
        """[n, B, ...] inputs and [n, B] labels of local step ``step``, uniformly with replacement."""
        gen = torch.Generator(device=self.x.device)
        gen.manual_seed(step_seed(self.seed, step))
        u = torch.rand(len(self.counts), batch_size, generator=gen, device=self.x.device)
        pos = torch.minimum((u * self.counts.unsqueeze(1)).long(), (self.counts - 1).unsqueeze(1))
        idx = self.table.gather(1, pos).reshape(-1)  # index_select: about 2x faster than x[idx] on the CPU
        x = self.x.index_select(0, idx).view(*pos.shape, *self.x.shape[1:])
        return x, self.y.index_select(0, idx).view(pos.shape)


def _stack(module: nn.Module, n: int) -> list[Tensor]:
    return [p.detach().unsqueeze(0).repeat(n, *([1] * p.dim())).requires_grad_() for p in module.parameters()]


def _fully_connected(params: Sequence[Tensor], z: Tensor) -> Tensor:
    """Linear layers (weight, bias pairs) with ReLU between them; z is [n, B, F] → logits [n, B, C]."""
    z = z.transpose(1, 2)  # feature-major [n, F, B]: weight gradients come out contiguous
    layers = len(params) // 2
    for i in range(layers):
        z = torch.baddbmm(params[2 * i + 1].unsqueeze(-1), params[2 * i], z)
        if i < layers - 1:
            z = torch.relu(z)
    return z.transpose(1, 2)


class StackedMLP:
    """n copies of ``in → hidden… → classes`` (ReLU), or logistic regression with no hidden layer."""

    def __init__(self, template: nn.Module, n: int) -> None:
        if not isinstance(template, (LogisticRegression, MLP)):
            raise TypeError(f"StackedMLP copies a LogisticRegression or an MLP, got {type(template).__name__}")
        self.params = _stack(template, n)

    def __call__(self, x: Tensor) -> Tensor:
        return _fully_connected(self.params, x.flatten(2))


class StackedFemnistCNN:
    """n copies of LEAF's FEMNIST CNN: both convolutions of all clients as grouped convolutions."""

    def __init__(self, template: FemnistCNN, n: int) -> None:
        self.n = n
        self.params = _stack(template, n)  # conv1 w, b, conv2 w, b, fc1 w, b, fc2 w, b

    def __call__(self, x: Tensor) -> Tensor:
        n, batch = x.shape[:2]
        w1, b1, w2, b2 = self.params[:4]
        z = x.reshape(n, batch, -1, 28, 28).transpose(0, 1).reshape(batch, -1, 28, 28)  # [B, n·C, 28, 28]
        z = F.max_pool2d(F.relu(F.conv2d(z, w1.flatten(0, 1), b1.flatten(), padding=2, groups=n)), 2)
        z = F.max_pool2d(F.relu(F.conv2d(z, w2.flatten(0, 1), b2.flatten(), padding=2, groups=n)), 2)
        z = z.reshape(batch, n, -1).transpose(0, 1)  # [n, B, 64·7·7]
        return _fully_connected(self.params[4:], z)


StackedModel = StackedMLP | StackedFemnistCNN


def stacked_model(template: nn.Module, n: int) -> StackedModel:
    """The hand-written stacked version of one of the repository's models, initialised from ``template``."""
    if isinstance(template, FemnistCNN):
        return StackedFemnistCNN(template, n)
    return StackedMLP(template, n)


class HandwrittenProxSkip:
    """ProxSkip with k local steps per round (p = 1/k), uniform weights w_i = 1/n, plain SGD."""

    def __init__(self, model: StackedModel, data: ClientData, lr: float, k: int, batch_size: int) -> None:
        self.model, self.data = model, data
        self.lr, self.k, self.p, self.batch_size = lr, k, 1.0 / k, batch_size
        self.params = model.params
        self.h = [torch.zeros_like(p, requires_grad=False) for p in self.params]
        n = len(data.counts)
        self.weights = torch.full((n,), 1.0 / n, device=data.x.device)

    def step(self, t: int) -> Tensor:
        """Local step t of every client (and the round when t + 1 is a multiple of k); the mean loss."""
        x, y = self.data.sample(t, self.batch_size)
        losses, grads = self.losses_and_grads(x, y)
        with torch.no_grad():
            self.update(grads)
            if (t + 1) % self.k == 0:
                self.communicate()
        return losses.detach().mean()

    def losses_and_grads(self, x: Tensor, y: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """f_i of every client on its minibatch [n], and the gradients of Σ_i f_i (one autograd backward)."""
        logits = self.model(x)
        n, batch = y.shape
        losses = F.cross_entropy(logits.reshape(n * batch, -1), y.reshape(-1), reduction="none").view(n, batch)
        losses = losses.mean(1)
        return losses, torch.autograd.grad(losses.sum(), self.params)

    def update(self, grads: Sequence[Tensor]) -> None:
        """x_i ← x_i − γ (g_i − h_i), as two passes: the shift g ← g − h, then the SGD step."""
        for p, g, h in zip(self.params, grads, self.h):
            g.sub_(h)
            p.add_(g, alpha=-self.lr)

    @torch.no_grad()
    def communicate(self) -> None:
        """x̄ = Σ w_i (x_i − (γ/p) h_i);  h_i += (p/γ)(x̄ − x_i);  x_i = x̄ (no [n, ...] temporaries)."""
        scale = self.p / self.lr
        for p, h in zip(self.params, self.h):
            mean = torch.tensordot(self.weights, p, dims=1)
            mean.sub_(torch.tensordot(self.weights, h, dims=1), alpha=1.0 / scale)
            h.sub_(p, alpha=scale).add_(mean.unsqueeze(0), alpha=scale)
            p.copy_(mean.unsqueeze(0).expand_as(p))


def check_against_framework(template: nn.Module, sample_shape: tuple[int, ...], num_classes: int, n: int = 6,
                            steps: int = 10, k: int = 3, batch_size: int = 8, lr: float = 0.05) -> float:
    """Run the framework (vectorised ProxSkip, fixed k) and this file on the same synthetic clients from
    the same initial weights; return the largest absolute difference of the final client weights."""
    import lightning as L

    from fl_lightning import FederatedDataModule, FederatedLightningModule
    from fl_lightning.algorithms import proxskip

    gen = torch.Generator().manual_seed(0)
    clients = [(torch.randn(20 + i, *sample_shape, generator=gen),
                torch.randint(0, num_classes, (20 + i,), generator=gen)) for i in range(n)]
    dm = FederatedDataModule.from_client_tensors(clients, batch_size=batch_size, num_classes=num_classes, seed=123)
    module = FederatedLightningModule(template, lr=lr, loss="cross_entropy", vectorize=True)
    hand = HandwrittenProxSkip(stacked_model(template, n), ClientData.from_clients(clients, 123, torch.device("cpu")),
                               lr=lr, k=k, batch_size=batch_size)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=proxskip(p=1.0 / k, mode="fixed", seed=0))
    trainer.fit(module, dm)
    for t in range(steps):
        hand.step(t)
    assert module.clients is not None
    return max((a - b).abs().max().item() for a, b in zip(module.clients.x.values(), hand.params))
