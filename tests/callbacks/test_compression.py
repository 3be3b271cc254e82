"""Compression's hooks, one direction at a time (DESIGN §1.2, FedComLoc):

- ``topk``: TopK_δ of the whole message per client (uplink) or of the one broadcast (downlink), biases included,
  against a pure-Python stable sort; its bits are left to the round's encoding (``*_bits`` stay None).
- ``quantize`` on the wire: QSGD with stochastic rounding, documented unbiased, E[Q(v)] = v with
  Var[Q(v)_j] ≤ ‖v‖²/(4s²), s = 2^bits − 1: every value lies on one of the two levels around s|v_j|/‖v‖, the mean
  over many rounds' independent draws converges to v, and a message costs 32 + d·(bits + 1) bits per tensor.
- ``quantize`` in the forward pass: nearest-level rounding (documented biased, deterministic), STE gradient.

Module: Linear(5, 3) (weight 15 entries, bias 3), 4 clients, float64."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fl_lightning.callbacks import Compression
from tests.callbacks.helpers import make_module, make_round, randn_like_all, stand_in_trainer

N = 4
NAMES = ["weight", "bias"]


def prepared(members=None, index: int = 0, **kwargs):
    module = make_module(n=N, model=nn.Linear(5, 3))
    cb = Compression(**kwargs)
    cb.setup(stand_in_trainer([cb]), module, "fit")
    return module, cb, make_round(module, members, index)


def reference_topk(message: dict[str, torch.Tensor], density: float, scope: str) -> dict[str, torch.Tensor]:
    """TopK of one message (unstacked) by a stable sort in pure Python over every tensor (biases too)."""
    groups = [[k] for k in message] if scope == "layer" else [list(message)]
    out = {}
    for group in groups:
        flat = [v for k in group for v in message[k].flatten().tolist()]
        k_keep = math.ceil(round(density * len(flat), 9))  # ⌈δ·d⌉; round() strips float noise
        keep = set(sorted(range(len(flat)), key=lambda j: (-abs(flat[j]), j))[:k_keep])
        offset = 0
        for k in group:
            size = message[k].numel()
            out[k] = torch.tensor([flat[offset + j] if offset + j in keep else 0.0 for j in range(size)],
                                  dtype=message[k].dtype).reshape(message[k].shape)
            offset += size
    return out


def tie_laden(tensors: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randint(-3, 4, v.shape, generator=g).to(v.dtype) for k, v in tensors.items()}


def message_bits(bits: int) -> float:
    """32 + d·(bits + 1) per tensor: (32 + 15(b+1)) + (32 + 3(b+1))."""
    return float((32 + 15 * (bits + 1)) + (32 + 3 * (bits + 1)))


# --------------------------------------------------------------------------------------------------- TopK
@pytest.mark.parametrize("members", [None, [0, 3]], ids=["full", "partial"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_topk_uplink_keeps_ceil_density_d_of_each_clients_whole_message(scope: str, members) -> None:
    module, cb, rnd = prepared(members, direction="uplink", method="topk", density=0.3, scope=scope)
    rnd.uplink = tie_laden(rnd.uplink, seed=1)
    sent = {k: v.clone() for k, v in rnd.uplink.items()}
    cb.on_compress_uplink(stand_in_trainer(), module, rnd)
    assert rnd.uplink_bits is None  # sparse: the round measures the encoding of what is sent
    for j in range(len(rnd.cohort)):
        expected = reference_topk({k: sent[k][j] for k in NAMES}, 0.3, scope)
        for k in NAMES:
            assert torch.equal(rnd.uplink[k][j], expected[k]), (j, k)


def test_topk_downlink_prunes_the_one_broadcast() -> None:
    module, cb, rnd = prepared(direction="downlink", method="topk", density=0.3)
    rnd.server = tie_laden({k: v[0] for k, v in rnd.local.items()}, seed=2)
    rnd.broadcast = dict(rnd.server)
    cb.on_broadcast(stand_in_trainer(), module, rnd)
    expected = reference_topk(rnd.server, 0.3, "global")
    assert all(torch.equal(rnd.broadcast[k], expected[k]) for k in NAMES)
    assert rnd.downlink_bits is None
    assert not all(torch.equal(rnd.server[k], expected[k]) for k in NAMES)  # x⁺ itself is not pruned in place


@pytest.mark.parametrize(("direction", "hook"), [("uplink", "on_broadcast"), ("downlink", "on_compress_uplink"),
                                                 ("forward", "on_compress_uplink"), ("forward", "on_broadcast")])
def test_a_compressor_leaves_the_other_directions_alone(direction: str, hook: str) -> None:
    method = {"forward": "quantize"}.get(direction, "topk")
    module, cb, rnd = prepared(direction=direction, method=method, density=0.3 if method == "topk" else None)
    rnd.broadcast = {k: v[0] for k, v in rnd.local.items()}
    uplink, broadcast = rnd.uplink, rnd.broadcast
    getattr(cb, hook)(stand_in_trainer(), module, rnd)
    assert rnd.uplink is uplink and rnd.broadcast is broadcast
    assert rnd.uplink_bits is None and rnd.downlink_bits is None
    if direction != "forward":
        params = {k: v.detach() for k, v in module.clients.x.items()}
        assert cb.transform_params(stand_in_trainer(), module, params) is params


# --------------------------------------------------------------------------------------------------- QSGD
def levels(q: torch.Tensor, v: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the level |q|·s/‖v‖ of each entry, r = s|v|/‖v‖) of one vector."""
    norm = float(v.norm())
    return q.abs() * s / norm, v.abs() * s / norm


@pytest.mark.parametrize("bits", [1, 2, 5])
@pytest.mark.parametrize("members", [None, [1, 2]], ids=["full", "partial"])
def test_quantised_uplink_sends_one_of_the_two_neighbouring_levels_and_counts_qsgd_bits(members, bits: int) -> None:
    module, cb, rnd = prepared(members, direction="uplink", method="quantize", bits=bits, seed=0)
    sent = {k: v.clone() for k, v in rnd.uplink.items()}
    cb.on_compress_uplink(stand_in_trainer(), module, rnd)
    s = 2**bits - 1
    for j in range(len(rnd.cohort)):
        for k in NAMES:
            q, v = rnd.uplink[k][j], sent[k][j]
            level, r = levels(q, v, s)
            # float64: level = |q|·s/‖v‖ recovers an integer to ~1e-15 relative; 1e-9 leaves room, while a value
            # off the grid is off by a sizeable fraction of a level
            assert (level - level.round()).abs().max() < 1e-9
            assert bool(((level.round() == r.floor()) | (level.round() == r.floor() + 1)).all())
            assert bool(((torch.sign(q) == torch.sign(v)) | (q == 0)).all())
    expected_bits = torch.full((len(rnd.cohort),), message_bits(bits), dtype=torch.float64)
    assert torch.equal(rnd.uplink_bits, expected_bits)


def test_quantised_downlink_costs_one_message_per_receiver() -> None:
    module, cb, rnd = prepared([0, 1, 3], direction="downlink", method="quantize", bits=3, seed=0)
    rnd.broadcast = {k: v[0] for k, v in rnd.local.items()}
    cb.on_broadcast(stand_in_trainer(), module, rnd)
    assert rnd.receivers == 3 and float(rnd.downlink_bits) == 3 * message_bits(3)


ROUNDS = 2000


@pytest.mark.parametrize("direction", ["uplink", "downlink"])
def test_stochastic_quantisation_is_unbiased_over_rounds(direction: str) -> None:
    """The mean of R = 2000 rounds' draws (independent: each round's generator is seeded by (seed, round)) has
    per-entry sd ≤ ‖v‖/(2s√R) (the documented variance bound), so a 5-sd band is left with probability ≲ 6e-7
    per entry (CLT for a two-point variable at R = 2000; 72 entries); the seed is fixed, so the test is
    deterministic. Nearest rounding, biased by up to ‖v‖/(2s), must fall outside the band for most entries,
    which shows the band discriminates."""
    bits, s = 2, 3
    module, cb, rnd = prepared(direction=direction, method="quantize", bits=bits, seed=4)
    v = {k: x.clone() for k, x in rnd.local.items()} if direction == "uplink" else {
        k: x[0].clone() for k, x in rnd.local.items()}
    total = {k: torch.zeros_like(x) for k, x in v.items()}
    for r in range(ROUNDS):
        rnd.index = r
        if direction == "uplink":
            rnd.uplink = dict(v)
            cb.on_compress_uplink(stand_in_trainer(), module, rnd)
            out = rnd.uplink
        else:
            rnd.broadcast = dict(v)
            cb.on_broadcast(stand_in_trainer(), module, rnd)
            out = rnd.broadcast
        for k in total:
            total[k] += out[k]
    discriminating, entries = 0, 0
    for k in v:
        rows = v[k] if direction == "uplink" else v[k].unsqueeze(0)
        means = (total[k] / ROUNDS) if direction == "uplink" else (total[k] / ROUNDS).unsqueeze(0)
        for j in range(rows.shape[0]):
            norm = float(rows[j].norm())
            band = 5 * norm / (2 * s * math.sqrt(ROUNDS))
            assert (means[j] - rows[j]).abs().max() <= band, (k, j)
            nearest = torch.sign(rows[j]) * (rows[j].abs() * s / norm).round() * norm / s
            discriminating += int(((nearest - rows[j]).abs() > band).sum())
            entries += rows[j].numel()
    assert discriminating > entries / 2


def test_draws_are_a_function_of_seed_and_round_and_the_seed_is_restored() -> None:
    def sent(cb: Compression, index: int) -> dict[str, torch.Tensor]:
        module = make_module(n=N, model=nn.Linear(5, 3))
        rnd = make_round(module, None, index)
        cb.on_compress_uplink(stand_in_trainer(), module, rnd)
        return rnd.uplink

    a, b = Compression("uplink", "quantize", bits=2, seed=8), Compression("uplink", "quantize", bits=2, seed=8)
    assert all(torch.equal(sent(a, 3)[k], sent(b, 3)[k]) for k in NAMES)
    assert not all(torch.equal(sent(a, 3)[k], sent(a, 4)[k]) for k in NAMES)  # a new round draws anew
    resumed = Compression("uplink", "quantize", bits=2, seed=99)
    resumed.load_state_dict(a.state_dict())
    assert all(torch.equal(sent(resumed, 3)[k], sent(a, 3)[k]) for k in NAMES)


# --------------------------------------------------------------------------------------------------- forward
def test_forward_quantisation_is_the_nearest_level_with_a_straight_through_gradient() -> None:
    bits, s = 3, 7
    module, cb, _ = prepared(direction="forward", method="quantize", bits=bits)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in module.clients.x.items()}
    out = cb.transform_params(stand_in_trainer(), module, params)
    again = cb.transform_params(stand_in_trainer(), module, params)
    for k in NAMES:
        assert torch.equal(out[k], again[k])  # deterministic
        for i in range(N):
            v = params[k][i].detach()
            norm = float(v.norm())
            expected = torch.sign(v) * (v.abs() * s / norm).round() * (norm / s)
            # float64: the same products in another order, ≤ a few ulp of ‖v‖ ≈ 3 → 1e-14; the neighbouring level
            # is ‖v‖/s ≈ 0.4 away
            torch.testing.assert_close(out[k][i].detach(), expected, rtol=0, atol=1e-14)
            assert (out[k][i].detach() - v).abs().max() <= norm / (2 * s) + 1e-14  # the documented bias bound
    upstream = randn_like_all(params, seed=5)
    sum((out[k] * upstream[k]).sum() for k in NAMES).backward()
    assert all(torch.equal(params[k].grad, upstream[k]) for k in NAMES)


# --------------------------------------------------------------------------------------------------- setup
def test_setup_derives_a_seed_per_direction_and_refuses_two_compressors_on_one() -> None:
    module = make_module(n=N, model=nn.Linear(5, 3))
    torch.manual_seed(0)
    up, down = Compression("uplink", "quantize"), Compression("downlink", "quantize")
    trainer = stand_in_trainer([up, down])
    up.setup(trainer, module, "fit")
    down.setup(trainer, module, "fit")
    assert up.seed is not None and down.seed is not None and up.seed != down.seed
    assert up.state_key != down.state_key  # both fit in one checkpoint
    twice = Compression("uplink", "topk", density=0.5)
    with pytest.raises(ValueError, match="two Compression callbacks on the uplink"):
        twice.setup(stand_in_trainer([up, twice]), module, "fit")


@pytest.mark.parametrize("direction", ["forward", "uplink", "downlink"])
def test_the_global_model_is_evaluated_quantised_only_when_clients_compute_with_the_quantised_model(direction) -> None:
    """``forward``: clients compute with Q(x) (nearest level), so x is evaluated as Q(x), every tensor; on the wire
    clients compute with the x they receive, evaluated as it is."""
    from fl_lightning.ops import quantize

    module = make_module(n=2)
    cb = Compression(direction, "quantize", bits=2)
    x = dict(module.global_model.named_parameters())
    with torch.no_grad():
        for k, v in randn_like_all(x, seed=3).items():
            x[k].copy_(v)
    out = cb.transform_evaluated_params(None, module, x)
    for k in x:
        if direction == "forward":
            assert torch.equal(out[k], quantize(x[k], bits=2, stochastic=False, stacked=False))
            assert not torch.equal(out[k], x[k])  # 3 levels: the quantised tensor differs
        else:
            assert out[k] is x[k]
