"""The baselines of issue 11: SCAFFOLD, FedProx, FedAvgM/FedAdam/FedYogi/FedAdagrad and FedNova, each against the
equation it implements (independent float64 references), and each through every execution path and a resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from fl_lightning import FederatedDataModule, FederatedLightningModule
from fl_lightning.algorithms import (
    SCAFFOLD,
    FedAdagrad,
    FedAdam,
    FedAvgM,
    FedNova,
    FedProx,
    FedYogi,
    fedavg,
    fednova,
    fedprox,
    scaffold,
)
from fl_lightning.callbacks import LocalWork
from tests.conftest import LeastSquares, least_squares, make_trainer

D = 8


@pytest.fixture(scope="module")
def problem() -> LeastSquares:
    return least_squares(n=5, d=D, m=16, kappa=10.0)


def _fit(problem: LeastSquares, callbacks=None, steps: int = 30, lr: float = 0.5, algorithm=None,
         vectorize: bool | str = "auto", batch_size: int | None = None, ckpt_path=None, encoding: str = "auto",
         **kwargs):
    model = nn.Linear(D, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    dm = FederatedDataModule.from_client_tensors(problem.clients, batch_size=batch_size, seed=0)
    module = FederatedLightningModule(model, lr=lr, loss="mse", algorithm=algorithm, vectorize=vectorize,
                                      encoding=encoding)
    make_trainer(steps, callbacks, **kwargs).fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module


def _error(module: FederatedLightningModule, problem: LeastSquares) -> float:
    return float((module.global_model.weight[0] - problem.x_star).norm() / problem.x_star.norm())


# ---------------------------------------------------------------------------------------------- SCAFFOLD
def test_scaffold_reaches_the_exact_minimiser_where_fedavg_stalls(problem: LeastSquares) -> None:
    # full-batch gradients, 5 local steps per round: SCAFFOLD's fixed point is x* (c_i = ∇f_i(x*)); FedAvg's drifts
    assert _error(_fit(problem, scaffold(local_steps=5), 600), problem) < 1e-4
    assert _error(_fit(problem, fedavg(local_steps=5), 600), problem) > 1e-2


def test_scaffold_control_variates_track_the_clients_and_count_both_messages(problem: LeastSquares) -> None:
    module = _fit(problem, scaffold(local_steps=5), 600, encoding="dense")  # Δc_i → 0: "auto" would send it sparse
    ci, c = module.clients.extra["scaffold_ci"]["weight"][:, 0], module.server_state["scaffold_c"]["weight"][0]
    x = problem.x_star
    for i in range(5):  # at the fixed point c_i = ∇f_i(x*) (option II: the average gradient along the round)
        torch.testing.assert_close(ci[i], problem.grad(i, x), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(c, ci.mean(0), atol=1e-12, rtol=0)  # c = Σ_i w_i c_i, w_i = 1/5
    rounds = int(module.comm.rounds)
    dense = 32 * D
    assert float(module.comm.bits_up) == rounds * 5 * 2 * dense  # y_i and Δc_i
    assert float(module.comm.bits_down) == rounds * 5 * 2 * dense  # x and c


def test_scaffold_server_lr_and_a_cohort(problem: LeastSquares) -> None:
    module = _fit(problem, scaffold(local_steps=5, server_lr=0.5, cohort_size=3, seed=1), 1500)
    assert _error(module, problem) < 1e-4  # still exact with client sampling and η_g < 1
    ci, c = module.clients.extra["scaffold_ci"]["weight"][:, 0], module.server_state["scaffold_c"]["weight"][0]
    torch.testing.assert_close(c, ci.mean(0), atol=1e-10, rtol=0)  # the invariant survives partial participation


# ---------------------------------------------------------------------------------------------- FedProx
def test_fedprox_with_mu_zero_is_fedavg_bit_for_bit(problem: LeastSquares) -> None:
    a = _fit(problem, fedprox(local_steps=3, mu=0.0), 30, batch_size=4)
    b = _fit(problem, fedavg(local_steps=3), 30, batch_size=4)
    assert torch.equal(a.global_model.weight, b.global_model.weight)


def test_fedprox_fixed_point_moves_towards_the_minimiser_as_mu_grows(problem: LeastSquares) -> None:
    # γ(L + μ) ≤ 0.5·(1.25 + 2) < 2: stable; 400 full-batch steps converge to the fixed point (contraction ≤ 0.94/step)
    errors = [_error(_fit(problem, fedprox(local_steps=5, mu=mu), 400), problem) for mu in (0.0, 0.5, 2.0)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.7 * errors[0]


# ---------------------------------------------------------------------------------------------- FedOpt
def _numpy_fedopt(problem: LeastSquares, rule: str, rounds: int, k: int, lr: float, eta: float, beta1: float,
                  beta2: float, tau: float, momentum: float = 0.9) -> np.ndarray:
    """Reddi et al. 2021, Algorithm 2 (and FedAvgM) with full-batch local GD, written from the paper in NumPy."""
    A = [a.numpy() for a, _ in problem.clients]
    b = [y.numpy() for _, y in problem.clients]
    x = np.zeros(D)
    m = np.zeros(D)
    v = np.zeros(D) if rule == "avgm" else np.full(D, tau**2)
    for _ in range(rounds):
        ys = []
        for Ai, bi in zip(A, b):
            y = x.copy()
            for _ in range(k):
                y = y - lr * 2.0 / len(bi) * Ai.T @ (Ai @ y - bi)
            ys.append(y)
        delta = np.mean(ys, axis=0) - x
        if rule == "avgm":
            v = momentum * v + delta
            x = x + eta * v
            continue
        m = beta1 * m + (1 - beta1) * delta
        if rule == "adam":
            v = beta2 * v + (1 - beta2) * delta**2
        elif rule == "yogi":
            v = v - (1 - beta2) * delta**2 * np.sign(v - delta**2)
        else:
            v = v + delta**2
        x = x + eta * m / (np.sqrt(v) + tau)
    return x


@pytest.mark.parametrize("preset", [FedAdam, FedYogi, FedAdagrad])
def test_each_fedopt_preset_matches_its_numpy_update(problem: LeastSquares, preset) -> None:
    algo = preset(local_steps=3, server_lr=0.05, beta1=0.8, beta2=0.95, tau=1e-2)
    module = _fit(problem, steps=3 * 12, lr=0.1, algorithm=algo)
    expected = _numpy_fedopt(problem, preset.rule, 12, 3, 0.1, 0.05, 0.8, 0.95, 1e-2)
    np.testing.assert_allclose(module.global_model.weight[0].numpy(), expected, rtol=1e-6, atol=1e-12)


def test_fedavgm_matches_its_numpy_update(problem: LeastSquares) -> None:
    module = _fit(problem, steps=3 * 12, lr=0.1, algorithm=FedAvgM(local_steps=3, server_lr=0.7, server_momentum=0.6))
    expected = _numpy_fedopt(problem, "avgm", 12, 3, 0.1, 0.7, 0, 0, 0, momentum=0.6)
    np.testing.assert_allclose(module.global_model.weight[0].numpy(), expected, rtol=1e-6, atol=1e-12)


# ---------------------------------------------------------------------------------------------- FedNova
def _closed_form_fednova(problem: LeastSquares, taus: list[int], rounds: int, lr: float) -> torch.Tensor:
    """x⁺ = x − τ_eff Σ_i w_i (x − y_i)/τ_i with y_i = x_i + (I − γH_i)^{τ_i}(x − x_i) (GD on a quadratic)."""
    x = torch.zeros(D, dtype=torch.float64)
    w = problem.weights
    tau_eff = float(sum(wi * t for wi, t in zip(w, taus)))
    H = [2.0 / len(b) * A.T @ A for A, b in problem.clients]
    x_i = [torch.linalg.lstsq(A, b.unsqueeze(1)).solution[:, 0] for A, b in problem.clients]
    for _ in range(rounds):
        ys = [xi + torch.linalg.matrix_power(torch.eye(D, dtype=torch.float64) - lr * h, t) @ (x - xi)
              for h, xi, t in zip(H, x_i, taus)]
        x = x - tau_eff * sum(wi * (x - y) / t for wi, y, t in zip(w, ys, taus))
    return x


def test_fednova_with_unequal_local_steps_matches_its_closed_form(problem: LeastSquares) -> None:
    taus = [1, 3, 5, 2, 4]
    module = _fit(problem, [*fednova(local_steps=5), LocalWork(steps=taus)], 5 * 8, lr=0.2)
    expected = _closed_form_fednova(problem, taus, 8, 0.2)
    torch.testing.assert_close(module.global_model.weight[0], expected, atol=1e-10, rtol=1e-10)
    assert float(module.comm.bits_up) == 8 * 5 * (32 * D + 32)  # the normalised model and τ_i


def test_fednova_with_equal_steps_is_fedavg(problem: LeastSquares) -> None:
    a = _fit(problem, fednova(local_steps=4), 20, lr=0.2)
    b = _fit(problem, fedavg(local_steps=4), 20, lr=0.2)
    torch.testing.assert_close(a.global_model.weight, b.global_model.weight, atol=1e-13, rtol=1e-13)


@pytest.mark.parametrize("local", [{"momentum": 0.9}, {"optimizer": "Adam"}])
def test_fednova_refuses_a_local_optimizer_other_than_plain_sgd(problem: LeastSquares, local: dict) -> None:
    model = nn.Linear(D, 1, bias=False).double()
    dm = FederatedDataModule.from_client_tensors(problem.clients, batch_size=None, seed=0)
    module = FederatedLightningModule(model, lr=0.1, loss="mse", algorithm=FedNova(), **local)
    with pytest.raises(ValueError, match="momentum 0"):
        make_trainer(2).fit(module, datamodule=dm)
    assert module.global_step == 0  # refused before the first step


# ---------------------------------------------------------------------------------------------- every preset
PRESETS = [
    FedProx(local_steps=3, mu=0.3, cohort_size=3, seed=2),
    SCAFFOLD(local_steps=3, server_lr=0.8, cohort_size=3, seed=2),
    FedAdam(local_steps=3, cohort_size=3, seed=2),
    FedYogi(local_steps=3, seed=2),
    FedAdagrad(local_steps=3, seed=2),
    FedAvgM(local_steps=3, cohort_size=4, seed=2),
    FedNova(local_steps=4, min_local_steps=1, cohort_size=4, seed=2),
]


@pytest.mark.parametrize("algorithm", PRESETS, ids=lambda a: a.name)
def test_every_new_preset_is_vectorised_and_equals_the_sequential_loop(problem: LeastSquares, algorithm) -> None:
    vec = _fit(problem, steps=14, lr=0.1, algorithm=algorithm, vectorize=True, batch_size=4)
    seq = _fit(problem, steps=14, lr=0.1, algorithm=algorithm, vectorize=False, batch_size=4)
    assert vec.vectorized is True and seq.vectorized is False
    # float64: the paths differ in reduction order only
    torch.testing.assert_close(vec.global_model.weight, seq.global_model.weight, atol=1e-12, rtol=1e-12)
    assert torch.equal(vec.comm.bits_up, seq.comm.bits_up)


@pytest.mark.parametrize("algorithm", PRESETS, ids=lambda a: a.name)
def test_every_new_preset_resumes_exactly_mid_round(problem: LeastSquares, algorithm, tmp_path) -> None:
    whole = _fit(problem, steps=14, lr=0.1, algorithm=algorithm, batch_size=4)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=7, save_top_k=-1)  # step 7: inside a round
    _fit(problem, [ckpt], steps=7, lr=0.1, algorithm=algorithm, batch_size=4, enable_checkpointing=True)
    resumed = _fit(problem, steps=14, lr=0.1, algorithm=algorithm, batch_size=4,
                   ckpt_path=str(next(tmp_path.glob("*.ckpt"))))
    assert torch.equal(resumed.global_model.weight, whole.global_model.weight)
    assert torch.equal(resumed.comm.bits_up, whole.comm.bits_up) and torch.equal(resumed.comm.bits_down,
                                                                                  whole.comm.bits_down)
    for (name, a), (_, b) in zip(resumed.server_state.named_buffers(), whole.server_state.named_buffers()):
        assert torch.equal(a, b), name
