"""ProxSkip / FedAvg as implemented by the module + callbacks, held to DESIGN §1.2's equations."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from fl_lightning import FederatedDataModule, FederatedLightningModule
from fl_lightning.algorithms import fedavg, proxskip
from fl_lightning.callbacks import ControlVariates, FederatedCallback, SkipSchedule
from tests.conftest import LeastSquares, least_squares, make_trainer


def linear(d: int) -> nn.Module:
    model = nn.Linear(d, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    return model


class StepRecorder(L.Callback):
    """x_i, h_i and the round counter after every local step."""

    def __init__(self) -> None:
        self.x: list[torch.Tensor] = []
        self.h: list[torch.Tensor | None] = []
        self.rounds: list[int] = []
        self.global_x: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.x.append(pl_module.clients.x["weight"][:, 0, :].detach().clone())
        extra = pl_module.clients.extra
        self.h.append(extra["cv_h"]["weight"][:, 0, :].clone() if "cv_h" in extra else None)
        self.rounds.append(pl_module.round_index)
        self.global_x.append(pl_module.global_model.weight[0].detach().clone())


def run(problem: LeastSquares, callbacks, steps: int, lr: float, batch_size: int | None = None,
        recorder: L.Callback | None = None, **dm_kwargs) -> FederatedLightningModule:
    d = problem.clients[0][0].shape[1]
    dm = FederatedDataModule.from_client_tensors(problem.clients, batch_size=batch_size, seed=0, **dm_kwargs)
    module = FederatedLightningModule(linear(d), lr=lr, loss="mse")
    cbs = list(callbacks) + ([recorder] if recorder else [])
    make_trainer(steps, cbs).fit(module, datamodule=dm)
    return module


@pytest.mark.parametrize("mode", ["bernoulli", "fixed"])
def test_proxskip_steps_match_hand_computation_on_two_client_quadratic(mode: str) -> None:
    problem = least_squares(n=2, d=3, m=6, kappa=4.0, seed=1)
    gamma, p, steps = 0.05, 0.5, 12
    rec = StepRecorder()
    run(problem, proxskip(p=p, mode=mode, seed=7), steps, gamma, recorder=rec)

    communicated = [rec.rounds[t] > (rec.rounds[t - 1] if t else 0) for t in range(steps)]
    assert any(communicated) and not all(communicated), "the test needs steps with and without a round"
    x = torch.zeros(2, 3, dtype=torch.float64)
    h = torch.zeros_like(x)
    w = torch.tensor([0.5, 0.5], dtype=torch.float64)
    for t in range(steps):
        g = torch.stack([problem.grad(i, x[i]) for i in range(2)])
        x_hat = x - gamma * (g - h)
        if communicated[t]:
            u = x_hat - gamma / p * h
            x_bar = w @ u
            h = h + p / gamma * (x_bar - x_hat)
            x = x_bar.expand(2, 3).clone()
        else:
            x = x_hat
        # float64 throughout: agreement to 1e-10 leaves room only for summation-order rounding
        torch.testing.assert_close(rec.x[t], x, atol=1e-10, rtol=0)
        torch.testing.assert_close(rec.h[t], h, atol=1e-10, rtol=0)
    if communicated[-1]:
        torch.testing.assert_close(rec.global_x[-1], x[0], atol=1e-10, rtol=0)


@pytest.mark.parametrize("weighting", ["uniform", "num_samples"])
def test_control_variates_sum_to_zero_after_every_round(weighting: str) -> None:
    problem = least_squares(n=5, d=4, sizes=[8, 12, 20, 30, 9], seed=2)
    rec = StepRecorder()
    module = run(problem, proxskip(p=0.3, seed=3), 40, 0.05, recorder=rec, client_weighting=weighting)
    w = module.client_weights.double()
    after_round = [t for t in range(40) if rec.rounds[t] > (rec.rounds[t - 1] if t else 0)]
    assert len(after_round) >= 5
    for t in after_round:
        h = rec.h[t]
        assert h.norm() > 1e-2  # non-trivial control variates
        # float64: the weighted sum cancels to rounding error, ~1e-16 relative to ‖h‖
        assert (w @ h).norm() <= 1e-12 * h.norm()
    assert float(module.round_metrics["cv/sum_norm"]) < 1e-10


def test_fedavg_with_one_client_and_k_local_steps_is_plain_sgd() -> None:
    problem = least_squares(n=1, d=5, m=50, seed=4)
    gamma, steps = 0.02, 20
    module = run(problem, fedavg(local_steps=5), steps, gamma, batch_size=8)
    dm = FederatedDataModule.from_client_tensors(problem.clients, batch_size=8, seed=0)
    dm.setup()
    x = torch.zeros(5, dtype=torch.float64)
    for t in range(steps):
        batch = dm.sample(t, None, torch.device("cpu"), dtype=torch.float64)
        A, b = batch.inputs[0], batch.targets[0]
        x = x - gamma * 2.0 / len(b) * A.T @ (A @ x - b)
    assert module.round_index == 4
    torch.testing.assert_close(module.global_model.weight[0], x, atol=1e-12, rtol=0)


def _mlp_problem(n: int = 6) -> FederatedDataModule:
    g = torch.Generator().manual_seed(0)
    clients = [(torch.randn(30 + 5 * i, 8, generator=g), torch.randint(0, 3, (30 + 5 * i,), generator=g))
               for i in range(n)]
    return FederatedDataModule.from_client_tensors(clients, batch_size=4, seed=11)


def _train_mlp(vectorize, clients_per_chunk=None, steps: int = 25) -> FederatedLightningModule:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    module = FederatedLightningModule(model, lr=0.1, loss="cross_entropy", vectorize=vectorize,
                                      clients_per_chunk=clients_per_chunk)
    make_trainer(steps, proxskip(p=0.3, seed=5)).fit(module, datamodule=_mlp_problem())
    return module


def test_vectorised_and_sequential_paths_agree() -> None:
    vec = _train_mlp(True)
    seq = _train_mlp(False)
    assert vec.vectorized is True and seq.vectorized is False
    assert vec.round_index == seq.round_index > 0
    for (k, a), (_, b) in zip(vec.clients.x.items(), seq.clients.x.items()):
        # float32 with different reduction orders (batched vs per-client matmuls): 1e-5 is ~100 ulps
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=k)
    for (k, a), (_, b) in zip(vec.clients.extra["cv_h"].items(), seq.clients.extra["cv_h"].items()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=k)  # h = (p/γ)·Δx amplifies by 3


def test_clients_per_chunk_does_not_change_the_result() -> None:
    whole, chunked = _train_mlp(True), _train_mlp(True, clients_per_chunk=4)
    for a, b in zip(whole.clients.x.values(), chunked.clients.x.values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_global_step_counts_local_steps_and_rounds_follow_the_fixed_schedule() -> None:
    problem = least_squares(n=3, d=4, seed=5)
    trainer_steps = 37
    module = run(problem, fedavg(local_steps=5), trainer_steps, 0.01, batch_size=4)
    assert module.trainer.global_step == trainer_steps
    assert module.round_index == trainer_steps // 5
    assert int(module.comm.rounds) == trainer_steps // 5


def _seeded_run(seed: int) -> FederatedLightningModule:
    L.seed_everything(seed, verbose=False)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    module = FederatedLightningModule(model, lr=0.1, loss="cross_entropy")
    g = torch.Generator().manual_seed(0)
    clients = [(torch.randn(40, 8, generator=g), torch.randint(0, 3, (40,), generator=g)) for _ in range(4)]
    dm = FederatedDataModule.from_client_tensors(clients, batch_size=5)
    make_trainer(30, [SkipSchedule(p=0.25), ControlVariates()]).fit(module, datamodule=dm)
    return module


def test_same_seed_gives_identical_runs_and_another_seed_does_not() -> None:
    a, b, c = _seeded_run(1), _seeded_run(1), _seeded_run(2)
    assert a.round_index == b.round_index
    assert all(torch.equal(x, y) for x, y in zip(a.clients.x.values(), b.clients.x.values()))
    assert torch.equal(a.comm.bits_up, b.comm.bits_up)
    assert not all(torch.equal(x, y) for x, y in zip(a.clients.x.values(), c.clients.x.values()))


class GlobalError(FederatedCallback):
    """‖x_global − x*‖ / ‖x*‖ after every round."""

    def __init__(self, x_star: torch.Tensor) -> None:
        self.x_star, self.errors = x_star, []

    def on_round_end(self, trainer, module, rnd) -> None:
        err = (module.global_model.weight[0] - self.x_star).norm() / self.x_star.norm()
        self.errors.append(float(err))


def test_proxskip_converges_exactly_where_fedavg_drifts() -> None:
    problem = least_squares(n=10, d=20, kappa=20.0, seed=6)
    gamma = 1.0 / problem.L
    prox, avg = GlobalError(problem.x_star), GlobalError(problem.x_star)
    run(problem, [*proxskip(p=0.2, mode="fixed"), prox], 1500, gamma)
    run(problem, [*fedavg(local_steps=5), avg], 1500, gamma)
    assert prox.errors[-1] < 1e-4
    assert min(avg.errors[-50:]) > 1e-2  # client drift: FedAvg's fixed point is biased
    assert abs(avg.errors[-1] - avg.errors[-50]) < 1e-3 * avg.errors[-1]  # ...and it has stalled there


def _rounds_to(errors: list[float], eps: float) -> int:
    return next(i + 1 for i, e in enumerate(errors) if e < eps)


def test_proxskip_with_p_one_over_sqrt_kappa_needs_several_times_fewer_rounds_than_gd() -> None:
    problem = least_squares(n=5, d=10, kappa=100.0, seed=8, shared_basis=True)
    gamma, eps = 1.0 / problem.L, 1e-4
    p = 1.0 / problem.kappa**0.5
    gd, skip = GlobalError(problem.x_star), GlobalError(problem.x_star)
    run(problem, [*fedavg(local_steps=1), gd], 2500, gamma)  # p = 1: a round after every step = GD
    run(problem, [*proxskip(p=p, seed=0), skip], 2500, gamma)
    gd_rounds, skip_rounds = _rounds_to(gd.errors, eps), _rounds_to(skip.errors, eps)
    assert skip_rounds * 3 < gd_rounds, (skip_rounds, gd_rounds)
