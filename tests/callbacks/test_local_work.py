"""LocalWork: unequal local budgets τ_i and drop-outs (issue 11 item 4), against a per-client NumPy-free reference:
client i takes min(τ_i, k) plain SGD steps from the global model, the server averages with weights renormalised over
the clients that took part."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from fl_lightning import FederatedDataModule, FederatedLightningModule
from fl_lightning.callbacks import LocalWork, SkipSchedule
from fl_lightning.comm import encoded_bits
from tests.conftest import least_squares, make_trainer

K, LR = 4, 0.01


def _fit(problem, callbacks, steps: int, vectorize: bool | str = "auto", momentum: float = 0.0, **kwargs):
    model = nn.Linear(problem.clients[0][0].shape[1], 1, bias=False).double()
    nn.init.zeros_(model.weight)
    dm = FederatedDataModule.from_client_tensors(problem.clients, batch_size=None, seed=0)
    module = FederatedLightningModule(model, lr=LR, loss="mse", vectorize=vectorize, momentum=momentum)
    make_trainer(steps, callbacks, **kwargs).fit(module, datamodule=dm)
    return module


def _reference(problem, budgets_per_round: list[list[int]]) -> torch.Tensor:
    """FedAvg with full-batch gradients, client i taking min(τ_i, K) steps, dropped clients (τ_i = 0) left out."""
    x = torch.zeros(problem.clients[0][0].shape[1], dtype=torch.float64)
    for budgets in budgets_per_round:
        taking = [i for i, b in enumerate(budgets) if b > 0]
        models = []
        for i in taking:
            y = x.clone()
            for _ in range(min(budgets[i], K)):
                y = y - LR * problem.grad(i, y)
            models.append(y)
        w = problem.weights[taking] / problem.weights[taking].sum()
        x = sum(wi * y for wi, y in zip(w, models)) if taking else x
    return x


def test_fixed_unequal_budgets_match_the_per_client_reference_on_every_path() -> None:
    problem = least_squares(n=5, d=6, m=12)
    budgets = [1, 4, 2, 0, 7]  # 7 > K: capped by the round; client 3 never takes part
    results = [_fit(problem, [SkipSchedule(k=K, mode="fixed"), LocalWork(steps=budgets)], 3 * K, vectorize=v)
               for v in (True, False)]
    expected = _reference(problem, [budgets] * 3)
    for module in results:
        # float64, a dozen steps: both paths and the reference differ by reduction order only (≪ 1e-12)
        torch.testing.assert_close(module.global_model.weight[0], expected, atol=1e-12, rtol=1e-12)
    # bits: 4 senders per round, each a dense 6-entry model (auto encoding of a dense message = 32·d)
    d = 6
    assert float(results[0].comm.bits_up) == 3 * 4 * float(encoded_bits(torch.tensor(float(d)), d))
    assert float(results[0].comm.bits_down) == 3 * 4 * 32 * d  # the broadcast goes to the 4 participants


def test_drawn_budgets_and_dropouts_are_seeded_and_vectorised_equals_sequential() -> None:
    problem = least_squares(n=6, d=5, m=10)

    def run(vectorize: bool):
        work = LocalWork(low=1, high=K, dropout=0.3, seed=7)
        return _fit(problem, [SkipSchedule(k=K, mode="fixed"), work], 5 * K, vectorize=vectorize)

    vec, seq = run(True), run(False)
    draws = LocalWork(low=1, high=K, dropout=0.3, seed=7)
    rounds = [draws.budgets(6) for _ in range(5)]
    assert any(0 in r for r in rounds) and len({b for r in rounds for b in r} - {0}) > 1  # drop-outs, unequal work
    expected = _reference(problem, rounds)
    for module in (vec, seq):
        torch.testing.assert_close(module.global_model.weight[0], expected, atol=1e-12, rtol=1e-12)


def test_a_held_client_keeps_its_model_and_momentum() -> None:
    """With momentum, a client past its budget neither moves nor changes its momentum buffer."""
    problem = least_squares(n=3, d=4, m=8)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    class Spy(SkipSchedule):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            x = pl_module.clients.x["weight"][0].clone()
            buf = trainer.optimizers[0].state[pl_module.clients.x["weight"]]["momentum_buffer"][0].clone()
            seen[trainer.global_step] = (x, buf)

    _fit(problem, [Spy(k=K, mode="fixed"), LocalWork(steps=[1, K, K])], K - 1, momentum=0.9)
    for step in (2, 3):  # after client 0's single step, nothing of it changes before the round ends
        assert torch.equal(seen[step][0], seen[1][0]) and torch.equal(seen[step][1], seen[1][1])
    assert not torch.equal(seen[1][0], torch.zeros_like(seen[1][0]))


def test_every_client_dropping_out_keeps_the_server_model() -> None:
    problem = least_squares(n=3, d=4, m=8)
    module = _fit(problem, [SkipSchedule(k=2, mode="fixed"), LocalWork(steps=[0, 0, 0])], 4)
    assert torch.equal(module.global_model.weight, torch.zeros_like(module.global_model.weight))
    assert float(module.comm.bits_up) == 0 and int(module.comm.rounds) == 2


def test_resume_mid_round_is_exact(tmp_path) -> None:
    problem = least_squares(n=4, d=5, m=10)

    def callbacks() -> list:
        return [SkipSchedule(k=K, mode="fixed"), LocalWork(low=1, high=K, dropout=0.2, seed=3)]

    whole = _fit(problem, callbacks(), 6 * K + 2)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3 * K + 1, save_top_k=-1)
    _fit(problem, [*callbacks(), ckpt], 3 * K + 1, enable_checkpointing=True)
    model = nn.Linear(5, 1, bias=False).double()
    dm = FederatedDataModule.from_client_tensors(problem.clients, batch_size=None, seed=0)
    resumed = FederatedLightningModule(model, lr=LR, loss="mse")
    make_trainer(6 * K + 2, callbacks()).fit(resumed, datamodule=dm, ckpt_path=str(next(tmp_path.glob("*.ckpt"))))
    assert torch.equal(resumed.global_model.weight, whole.global_model.weight)
    assert torch.equal(resumed.comm.bits_up, whole.comm.bits_up)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({}, "needs steps"),
    ({"steps": 3, "low": 1, "high": 2}, "not both"),
    ({"low": 3, "high": 2}, "low <= high"),
    ({"steps": [1, -1]}, ">= 0"),
    ({"steps": 2, "dropout": 1.0}, r"\[0, 1\)"),
])
def test_invalid_local_work_names_the_parameter(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LocalWork(**kwargs)


def test_one_budget_per_client_is_checked_at_setup() -> None:
    problem = least_squares(n=3, d=4, m=8)
    with pytest.raises(ValueError, match="2 budgets for 3 clients"):
        _fit(problem, [SkipSchedule(k=2, mode="fixed"), LocalWork(steps=[1, 2])], 2)


def test_readable_spellings_of_pruning_locations_and_the_uplink_form() -> None:
    from fl_lightning.callbacks import ControlVariates, TopKPruning

    assert TopKPruning(0.1, at=["after_step", "received"]).at == TopKPruning(0.1, at=["local", "received"]).at
    assert TopKPruning(0.1, at="before_uplink").at == ("round",)
    assert ControlVariates(uplink="model").uplink == "local"
    with pytest.raises(ValueError, match="after_step, before_uplink"):
        TopKPruning(0.1, at="later")
