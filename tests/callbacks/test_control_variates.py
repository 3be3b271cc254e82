"""ControlVariates' hooks, one at a time, against the equations of DESIGN §1.2 computed client by client:

    local step   g_i ← g_i − h_i
    uplink       u_i = x̂_i − (γ/p) h_i
    receive      h_i ← h_i + (p/γ)(r − x̂_i),   r = x̄ ("mean") or b ("broadcast")

on a float64 module with 4 clients of unequal weight, arbitrary (non-zero-sum) h_i, and full or partial cohorts
(only the cohort's rows may change). γ = 0.1; p = 0.3 (Bernoulli) or 1/4 (fixed k = 4, where p = 1/k)."""

from __future__ import annotations

import pytest
import torch

from fl_lightning.callbacks import ControlVariates, SkipSchedule
from tests.callbacks.helpers import make_module, make_round, randn_like_all, stand_in_trainer

GAMMA = 0.1
WEIGHTS = [0.1, 0.2, 0.3, 0.4]  # w_i, summing to 1 as the datamodule's do
SCHEDULES = {"bernoulli-p=0.3": (lambda: SkipSchedule(p=0.3, seed=0), 0.3),
             "fixed-k=4": (lambda: SkipSchedule(k=4), 0.25)}
COHORTS = {"full": None, "partial": [1, 3]}


def prepared(schedule: str = "bernoulli-p=0.3", **kwargs):
    """A module whose clients hold random x_i and random h_i, with ControlVariates set up on it."""
    module = make_module(n=4, lr=GAMMA, weights=WEIGHTS)
    make_schedule, p = SCHEDULES[schedule]
    module.schedule = make_schedule()
    cb = ControlVariates(**kwargs)
    cb.setup(stand_in_trainer([module.schedule, cb]), module, "fit")
    h = module.clients.extra[ControlVariates.STATE]
    assert all(bool((v == 0).all()) for v in h.values())  # h_i = 0 at the start (DESIGN §1.1)
    for k, v in randn_like_all(dict(h.items()), seed=1).items():
        h[k].copy_(v)
    return module, cb, p


def h_of(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.clients.extra[ControlVariates.STATE].items()}


@pytest.mark.parametrize("members", COHORTS.values(), ids=COHORTS.keys())
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_uplink_is_the_local_model_minus_gamma_over_p_times_h(schedule: str, members) -> None:
    module, cb, p = prepared(schedule)
    rnd = make_round(module, members)
    local = {k: v.clone() for k, v in rnd.local.items()}
    h = h_of(module)
    cb.on_uplink(stand_in_trainer(), module, rnd)
    ids = rnd.cohort.ids.tolist()
    for k in local:
        expected = torch.stack([local[k][j] - (GAMMA / p) * h[k][i] for j, i in enumerate(ids)])
        # float64, one multiply-add per entry; the hook's factor 1/(p/γ) and γ/p here differ by ≤ 2 ulp:
        # ≤ 1e-15 on entries of size ≤ 5, while a wrong factor (p/γ, or no shift) is off by ≥ 0.1·|h| ≈ 0.1
        torch.testing.assert_close(rnd.uplink[k], expected, rtol=0, atol=1e-14)
        assert torch.equal(rnd.local[k], local[k])  # x̂_i itself is untouched (hooks replace entries)


def test_local_uplink_sends_the_local_models_themselves() -> None:
    module, cb, _ = prepared(uplink="local")
    rnd = make_round(module)
    cb.on_uplink(stand_in_trainer(), module, rnd)
    assert all(rnd.uplink[k] is rnd.local[k] for k in rnd.local)


@pytest.mark.parametrize("members", COHORTS.values(), ids=COHORTS.keys())
@pytest.mark.parametrize("reference", ["mean", "broadcast"])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_receive_moves_h_by_p_over_gamma_times_reference_minus_local(schedule: str, reference: str,
                                                                     members) -> None:
    module, cb, p = prepared(schedule, reference=reference, allow_partial_participation=members is not None)
    rnd = make_round(module, members)
    server_shapes = {k: v[0] for k, v in rnd.local.items()}
    rnd.mean = randn_like_all(server_shapes, seed=2)
    rnd.broadcast = randn_like_all(server_shapes, seed=3)  # differs from the mean, as a compressed b would
    r = rnd.mean if reference == "mean" else rnd.broadcast
    before = h_of(module)
    cb.on_receive(stand_in_trainer(), module, rnd)
    after = h_of(module)
    ids = rnd.cohort.ids.tolist()
    for k in before:
        for i in range(4):
            if i in ids:
                expected = before[k][i] + (p / GAMMA) * (r[k] - rnd.local[k][ids.index(i)])
                # float64; the hook computes h − s·x̂ + s·r (s = p/γ ≤ 3): a few roundings of terms ≤ 30, so
                # ≤ 1e-14, while the other reference is off by s·|x̄ − b| ≈ 1
                torch.testing.assert_close(after[k][i], expected, rtol=0, atol=1e-13)
            else:
                assert torch.equal(after[k][i], before[k][i]), (k, i)  # outside the cohort: untouched


@pytest.mark.parametrize("members", [None, [0, 2]], ids=["full", "partial"])
def test_local_step_shifts_the_gradient_by_minus_h_on_the_cohort_rows_only(members) -> None:
    module, cb, _ = prepared(allow_partial_participation=members is not None)
    module.set_active_clients(members)
    x = module.clients.x
    grads = randn_like_all({"weight": x["weight"]}, seed=4)
    x["weight"].grad = grads["weight"].clone()
    assert x["bias"].grad is None  # a parameter without a gradient is skipped
    h = h_of(module)
    cb.on_before_optimizer_step(stand_in_trainer(), module, None)
    rows = range(4) if members is None else members
    for i in range(4):
        # g + (−1)·h is the correctly rounded g − h in IEEE arithmetic: equal to the last bit
        expected = grads["weight"][i] - h["weight"][i] if i in rows else grads["weight"][i]
        assert torch.equal(x["weight"].grad[i], expected), i
    assert x["bias"].grad is None


def test_one_round_from_any_h_makes_the_weighted_sum_of_h_zero() -> None:
    """Σ_i w_i h_i⁺ = Σ_i w_i h_i + (p/γ)(x̄ − Σ_i w_i x̂_i) and x̄ = Σ_i w_i x̂_i − (γ/p) Σ_i w_i h_i, so
    one round with the shifted uplink and r = x̄ zeroes the sum whatever it was before; ``weighted_sum_norm``
    (what ``cv/sum_norm`` logs) reports it."""
    module, cb, _ = prepared()
    h = h_of(module)
    w = torch.tensor(WEIGHTS, dtype=torch.float64)
    by_hand = sum((torch.tensordot(w, v, dims=1) ** 2).sum() for v in h.values()).sqrt()
    assert by_hand > 0.5  # random h: far from zero-sum
    torch.testing.assert_close(cb.weighted_sum_norm(module), by_hand, rtol=1e-14, atol=0)  # same sums, reordered
    rnd = make_round(module)
    cb.on_uplink(stand_in_trainer(), module, rnd)
    rnd.mean = {k: torch.tensordot(rnd.weights, u, dims=1) for k, u in rnd.uplink.items()}  # as communicate does
    rnd.broadcast = dict(rnd.mean)
    cb.on_receive(stand_in_trainer(), module, rnd)
    cb.on_round_end(stand_in_trainer(), module, rnd)
    # float64: Σ of 4 terms of size ≤ (p/γ)·|x| ≈ 10, each rounded, cancels to ≲ 4·10·2.2e-16 ≈ 1e-14
    assert float(module.round_metrics["cv/sum_norm"]) < 1e-13


def test_state_dict_holds_the_configuration() -> None:
    cb = ControlVariates(reference="broadcast")
    assert cb.state_dict() == {"reference": "broadcast", "uplink": "shifted"}


@pytest.mark.parametrize("members", COHORTS.values(), ids=COHORTS.keys())
def test_local_uplink_round_recentres_the_participants_so_the_weighted_sum_over_all_clients_is_zero(members) -> None:
    """uplink="local": after h_i ← h_i + (p/γ)(x̄ − x̂_i) the participants subtract s / W_S (s = Σ_j w_j h_j over all
    n clients, W_S the cohort's weight), so Σ_j w_j h_j = 0 whatever it was; clients outside the cohort keep their
    h_i. From random (far from zero-sum) h the correction is large, so a wrong s, W_S or set of rows shows."""
    module, cb, p = prepared(uplink="local")
    rnd = make_round(module, members)
    rnd.mean = {k: torch.tensordot(rnd.weights, u, dims=1) for k, u in rnd.local.items()}  # x̄ = Σ w̃_i x̂_i
    rnd.broadcast = dict(rnd.mean)
    before = h_of(module)
    w = torch.tensor(WEIGHTS, dtype=torch.float64)
    ids = rnd.cohort.ids.tolist()
    share = float(w[ids].sum())
    cb.on_receive(stand_in_trainer(), module, rnd)
    after = h_of(module)
    for k in before:
        updated = before[k].clone()
        for j, i in enumerate(ids):
            updated[i] += (p / GAMMA) * (rnd.mean[k] - rnd.local[k][j])
        s = torch.tensordot(w, updated, dims=1)
        assert s.norm() > 0.1  # the random h_i are far from zero-sum: the correction is not negligible
        for i in range(4):
            # float64, entries ≤ ~30: a few roundings, ≤ 1e-13; a wrong divisor W_S is off by ≥ 0.1·|s|
            expected = updated[i] - s / share if i in ids else before[k][i]
            torch.testing.assert_close(after[k][i], expected, rtol=0, atol=1e-13)
        assert torch.tensordot(w, after[k], dims=1).norm() < 1e-13  # zero-sum over all clients again


def test_local_uplink_recentring_changes_nothing_when_the_control_variates_are_zero_sum() -> None:
    """In exact arithmetic Σ_j w_j h_j = 0 before a round, and the round keeps it: the re-centring subtracts s = 0.
    In float64 it moves h by the rounding of s only (≤ 1e-15 here), far below what the tests against the
    references (1e-12 and tighter on x) can see."""
    module, cb, p = prepared(uplink="local")
    h = module.clients.extra[ControlVariates.STATE]
    w = torch.tensor(WEIGHTS, dtype=torch.float64)
    for v in h.values():  # make the random h zero-sum: h_i ← h_i − Σ_j w_j h_j
        v.sub_(torch.tensordot(w, v, dims=1))
    rnd = make_round(module)
    rnd.mean = {k: torch.tensordot(rnd.weights, u, dims=1) for k, u in rnd.local.items()}
    rnd.broadcast = dict(rnd.mean)
    before = h_of(module)
    cb.on_receive(stand_in_trainer(), module, rnd)
    for k, v in h.items():
        plain = before[k] + (p / GAMMA) * (rnd.mean[k].unsqueeze(0) - rnd.local[k])
        torch.testing.assert_close(v, plain, rtol=0, atol=1e-14)
