"""L1Prox.on_local_step_end, alone: x̂_i ← sign(x̂_i)·max(|x̂_i| − γλ, 0) on the selected parameters (the weights by
default, every parameter with ``params="all"``) of the cohort's rows only, γ = the module's current lr.

The expected values are computed entry by entry in Python floats, with the same IEEE operations as the
callback (|x| − t rounded once, a sign flip exact), so they must match to the last bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fl_lightning.callbacks import L1Prox
from tests.callbacks.helpers import make_module, stand_in_trainer

GAMMA, LAM = 0.1, 2.5  # threshold t = γλ = 0.25: about a fifth of N(0, 1) entries fall inside (−t, t)


def soft(v: float, t: float) -> float:
    return 0.0 if abs(v) <= t else (abs(v) - t) * (1.0 if v > 0 else -1.0)


def prepared(**kwargs):
    module = make_module(n=4, model=nn.Linear(5, 3), lr=GAMMA)
    cb = L1Prox(**kwargs)
    cb.setup(stand_in_trainer([cb]), module, "fit")
    return module, cb


def snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.clients.x.items()}


@pytest.mark.parametrize("members", [None, [1, 2]], ids=["full", "partial"])
@pytest.mark.parametrize(("params", "pruned"), [("weights", ["weight"]), ("all", ["weight", "bias"])])
def test_soft_thresholds_by_gamma_lambda_the_selected_params_of_the_cohort(params: str, pruned: list[str],
                                                                          members) -> None:
    module, cb = prepared(lam=LAM, params=params)
    assert cb.names == pruned
    module.set_active_clients(members)
    before = snapshot(module)
    cb.on_local_step_end(stand_in_trainer(), module)
    after = snapshot(module)
    t = GAMMA * LAM
    rows = range(4) if members is None else members
    zeroed = 0
    for k in before:
        for i in range(4):
            if k in pruned and i in rows:
                expected = torch.tensor([soft(v, t) for v in before[k][i].flatten().tolist()],
                                        dtype=torch.float64).reshape(before[k][i].shape)
                assert torch.equal(after[k][i], expected), (k, i)
                zeroed += int(((before[k][i] != 0) & (after[k][i] == 0)).sum())
            else:
                assert torch.equal(after[k][i], before[k][i]), (k, i)
    assert zeroed > 0  # some entries fell inside the threshold: the prox made them exactly zero


def test_lambda_zero_is_the_identity() -> None:
    module, cb = prepared(lam=0.0)
    before = snapshot(module)
    cb.on_local_step_end(stand_in_trainer(), module)
    assert all(torch.equal(v, before[k]) for k, v in snapshot(module).items())


def test_the_threshold_follows_the_modules_lr() -> None:
    """γ is read from the module at every step (an LR scheduler may change it): doubling lr doubles t."""
    module, cb = prepared(lam=LAM)
    module.lr = 2 * GAMMA  # no Trainer attached: current_lr() is the module's lr
    before = snapshot(module)
    cb.on_local_step_end(stand_in_trainer(), module)
    expected = [soft(v, 2 * GAMMA * LAM) for v in before["weight"].flatten().tolist()]
    assert module.clients.x["weight"].detach().flatten().tolist() == expected


def test_setup_selects_weights_and_fails_when_nothing_is_selected() -> None:
    module = make_module(n=2, model=nn.LayerNorm(4))  # 1-D parameters only
    with pytest.raises(ValueError, match="selects no parameter"):
        L1Prox(lam=1.0).setup(stand_in_trainer(), module, "fit")
    L1Prox(lam=1.0, params="all").setup(stand_in_trainer(), module, "fit")  # "all" takes them


def test_state_dict_holds_the_configuration() -> None:
    assert L1Prox(lam=3, params="all").state_dict() == {"lam": 3.0, "params": "all"}
