"""Tests for the pure pruning / compression operators in ``fl_lightning.ops`` (DESIGN §1.1–1.2)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fl_lightning.ops import (
    density,
    prunable,
    quantize,
    quantized_bits,
    soft_threshold,
    topk,
    topk_count,
    topk_mask,
)


# --------------------------------------------------------------------------------------------- helpers
def _rand_state(n: int, shapes: dict[str, tuple[int, ...]], seed: int = 0, ties: bool = False):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if ties:  # small integer values: many exact ties in magnitude
            out[name] = torch.randint(-3, 4, (n, *shape), generator=g).float()
        else:
            out[name] = torch.randn((n, *shape), generator=g)
    return out


def _flat(tensors: dict[str, torch.Tensor], n: int) -> torch.Tensor:
    """Concatenate per client in mapping order, row-major: [n, d]."""
    return torch.cat([t.reshape(n, -1) for t in tensors.values()], dim=1)


def _reference_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Stable descending sort of |x| per row: the specified tie-breaking (lower flat index wins)."""
    idx = torch.sort(x.abs(), dim=1, descending=True, stable=True).indices[:, :k]
    return torch.zeros_like(x, dtype=torch.bool).scatter_(1, idx, True)


SHAPES = {"w1": (5, 7), "b1": (5,), "w2": (3, 2, 2)}  # 35 + 5 + 12 = 52 entries per client


# --------------------------------------------------------------------------------------------- topk_count
def test_topk_count_ceil_semantics():
    assert topk_count(10, 0.1) == 1
    assert topk_count(10, 0.11) == 2  # ⌈1.1⌉
    assert topk_count(10, 1.0) == 10
    assert topk_count(1, 1e-6) == 1  # k ≥ 1
    assert topk_count(7, 0.5) == 4  # ⌈3.5⌉
    # 0.1·3 = 0.30000000000000004 in float64; the slack keeps k = ⌈3⌉ = 3, not 4.
    assert topk_count(10, 0.1 * 3) == 3
    assert topk_count(11_000_000, 0.3) == 3_300_000
    # A genuine fraction just above an integer still rounds up.
    assert topk_count(1000, 0.1005) == 101


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.0000001, 2, float("nan"), True, "0.5", None])
def test_density_validation_names_density(bad):
    x = {"w": torch.randn(2, 3, 3)}
    with pytest.raises(ValueError, match="density"):
        topk_mask(x, bad)
    with pytest.raises(ValueError, match="density"):
        topk(x, bad)
    with pytest.raises(ValueError, match="density"):
        topk_count(10, bad)


def test_topk_mask_other_validation():
    x = {"w": torch.randn(2, 3, 3)}
    with pytest.raises(ValueError, match="scope"):
        topk_mask(x, 0.5, scope="model")
    with pytest.raises(ValueError, match="at least one"):
        topk_mask({}, 0.5)
    with pytest.raises(ValueError, match="client dimension"):
        topk_mask({"a": torch.randn(2, 3), "b": torch.randn(3, 3)}, 0.5)
    with pytest.raises(ValueError, match="client dimension"):
        topk_mask({"a": torch.tensor(1.0)}, 0.5)


# --------------------------------------------------------------------------------------------- exact counts
@pytest.mark.parametrize("dens", [0.01, 0.1, 0.25, 0.5, 0.9, 1.0])
def test_exact_count_global(dens):
    n = 6
    x = _rand_state(n, SHAPES, seed=1)
    m = topk_mask(x, dens, scope="global")
    assert all(m[k].shape == x[k].shape and m[k].dtype == torch.bool for k in x)
    d = 52
    counts = _flat(m, n).sum(dim=1)
    assert counts.tolist() == [math.ceil(dens * d - 1e-9)] * n


@pytest.mark.parametrize("dens", [0.01, 0.1, 0.25, 0.5, 0.9, 1.0])
def test_exact_count_layer(dens):
    n = 6
    x = _rand_state(n, SHAPES, seed=2)
    m = topk_mask(x, dens, scope="layer")
    for t in m.values():
        d = t[0].numel()
        assert t.reshape(n, -1).sum(dim=1).tolist() == [max(1, math.ceil(dens * d - 1e-9))] * n


def test_exact_count_unstacked():
    x = _rand_state(1, SHAPES, seed=3)
    x = {k: v[0] for k, v in x.items()}
    m = topk_mask(x, 0.3, stacked=False)
    assert sum(int(t.sum()) for t in m.values()) == math.ceil(0.3 * 52)
    ml = topk_mask(x, 0.3, scope="layer", stacked=False)
    assert [int(t.sum()) for t in ml.values()] == [math.ceil(0.3 * d) for d in (35, 5, 12)]


def test_global_and_layer_scope_differ():
    # Layer "big" holds every large entry: global TopK spends its whole budget there, per-layer
    # TopK must keep ⌈δ·d⌉ entries of "small" as well.
    n = 2
    big = torch.full((n, 10), 100.0) + torch.arange(10.0)
    small = torch.full((n, 10), 0.01) + 0.001 * torch.arange(10.0)
    x = {"small": small, "big": big}
    g = topk_mask(x, 0.5, scope="global")
    lay = topk_mask(x, 0.5, scope="layer")
    assert g["big"].all() and not g["small"].any()
    assert lay["big"].sum(dim=1).tolist() == [5, 5] and lay["small"].sum(dim=1).tolist() == [5, 5]
    assert lay["small"][:, 5:].all()  # the 5 largest of the small layer


def test_clients_get_their_own_masks():
    x = {"w": torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])}
    m = topk_mask(x, 0.34)  # k = ⌈1.02⌉ = 2
    assert m["w"].tolist() == [[True, True, False], [False, True, True]]


# --------------------------------------------------------------------------------------------- ties
@pytest.mark.parametrize("fill", [0.0, 1.0, -2.5])
def test_ties_all_equal_pick_lowest_indices(fill):
    n = 3
    x = {"a": torch.full((n, 4, 3), fill), "b": torch.full((n, 6), fill)}  # d = 18
    m = topk_mask(x, 0.5, scope="global")  # k = 9: all 12 of "a" would be too many; first 9 of "a"
    flat = _flat(m, n)
    expected = torch.zeros(n, 18, dtype=torch.bool)
    expected[:, :9] = True
    assert torch.equal(flat, expected)
    m = topk_mask(x, 0.8, scope="global")  # k = ⌈14.4⌉ = 15: all of "a" then the first 3 of "b"
    assert m["a"].all() and m["b"][:, :3].all() and not m["b"][:, 3:].any()
    ml = topk_mask(x, 0.5, scope="layer")  # per tensor: first 6 of "a" (row-major), first 3 of "b"
    assert torch.equal(ml["a"].reshape(n, -1), torch.arange(12).expand(n, 12) < 6)
    assert torch.equal(ml["b"], torch.arange(6).expand(n, 6) < 3)


def test_signed_zero_and_sign_are_ties():
    # |−1| = |1| and |−0| = |0|: ties decided by position only.
    x = {"w": torch.tensor([[-0.0, 0.0, -1.0, 1.0, -1.0]])}
    assert topk_mask(x, 0.4)["w"].tolist() == [[False, False, True, True, False]]
    assert topk_mask(x, 0.8)["w"].tolist() == [[True, False, True, True, True]]


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("dens", [0.05, 0.3, 0.5, 0.77, 0.99])
def test_matches_stable_sort_with_heavy_ties(scope, dens):
    n = 5
    x = _rand_state(n, SHAPES, seed=4, ties=True)
    m = topk_mask(x, dens, scope=scope)
    if scope == "global":
        flat = _flat(x, n)
        assert torch.equal(_flat(m, n), _reference_mask(flat, topk_count(flat.shape[1], dens)))
    else:
        for name, t in x.items():
            rows = t.reshape(n, -1)
            ref = _reference_mask(rows, topk_count(rows.shape[1], dens))
            assert torch.equal(m[name].reshape(n, -1), ref)
    again = topk_mask(x, dens, scope=scope)
    assert all(torch.equal(m[k], again[k]) for k in m)


def test_nan_counts_as_largest():
    x = {"w": torch.tensor([[1.0, float("nan"), 3.0, 2.0]])}
    assert topk_mask(x, 0.5)["w"].tolist() == [[False, True, True, False]]


# ------------------------------------------------------------------------------------ ordering / values
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_kept_entries_are_the_largest(scope):
    n = 4
    x = _rand_state(n, SHAPES, seed=5)
    m = topk_mask(x, 0.2, scope=scope)
    groups = [(x, m)] if scope == "global" else [({k: x[k]}, {k: m[k]}) for k in x]
    for xs, ms in groups:
        a, keep = _flat(xs, n).abs(), _flat(ms, n)
        kept_min = torch.where(keep, a, torch.inf).amin(dim=1)
        dropped_max = torch.where(~keep, a, -torch.inf).amax(dim=1)
        assert (kept_min >= dropped_max).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_topk_values_dtype_and_grad(dtype):
    x = _rand_state(3, SHAPES, seed=6)
    x = {k: v.to(dtype).requires_grad_(True) for k, v in x.items()}
    m = topk_mask(x, 0.25)
    y = topk(x, 0.25)
    for k in x:
        assert y[k].dtype == dtype
        assert torch.equal(y[k], torch.where(m[k], x[k], torch.zeros((), dtype=dtype)))
    sum(v.float().sum() for v in y.values()).backward()
    for k in x:  # gradient flows only through the kept entries
        assert torch.equal(x[k].grad, m[k].to(dtype))


def test_topk_mixed_dtypes_global():
    x = {"a": torch.tensor([[1.0, 5.0]], dtype=torch.float16), "b": torch.tensor([[3.0, 4.0]])}
    m = topk_mask(x, 0.5)
    assert m["a"].tolist() == [[False, True]] and m["b"].tolist() == [[False, True]]


def test_topk_zero_fills_dropped_inf():
    # masked_fill, not multiplication: a dropped inf becomes 0, not NaN (inf·0).
    x = {"w": torch.tensor([[math.inf, math.inf, 1.0]])}
    assert topk(x, 0.3)["w"].tolist() == [[math.inf, 0.0, 0.0]]


# --------------------------------------------------------------------------------------------- soft threshold
def test_soft_threshold_closed_form():
    x = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0])
    assert soft_threshold(x, 1.0).tolist() == [-2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0]
    assert torch.equal(soft_threshold(x, 0.0), x)
    y = torch.randn(4, 10, dtype=torch.float64)
    t = 0.3
    assert torch.equal(soft_threshold(y, t), torch.sign(y) * torch.clamp(y.abs() - t, min=0))
    assert soft_threshold(y.half(), t).dtype == torch.float16


def test_soft_threshold_is_the_prox_grid_search():
    # argmin_z ½(z−x)² + t|z| over a grid of step h = 1e-4 on [−5, 5] in float64: the grid minimiser is
    # within one grid step of the true (unique, 1-strongly convex objective) minimiser, so tolerance h.
    h = 1e-4
    z = torch.arange(-50_000, 50_001, dtype=torch.float64) * h
    for x, t in [(2.0, 0.5), (-1.3, 0.7), (0.4, 0.6), (-0.2, 0.2), (3.7, 0.0), (0.0, 1.0)]:
        obj = 0.5 * (z - x) ** 2 + t * z.abs()
        z_star = z[obj.argmin()].item()
        got = soft_threshold(torch.tensor(x, dtype=torch.float64), t).item()
        assert abs(got - z_star) <= h, (x, t, got, z_star)


def test_soft_threshold_tensor_threshold_and_validation():
    x = torch.tensor([[1.0, -2.0], [1.0, -2.0]])
    t = torch.tensor([[0.5], [1.5]], dtype=torch.float64)  # per-client threshold, cast to x's dtype
    out = soft_threshold(x, t)
    assert out.dtype == torch.float32 and out.tolist() == [[0.5, -1.5], [0.0, -0.5]]
    for bad in [-0.1, float("nan")]:
        with pytest.raises(ValueError, match="threshold"):
            soft_threshold(x, bad)
    with pytest.raises(ValueError, match="threshold"):
        soft_threshold(x, torch.tensor([[0.5], [-1.0]]))
    with pytest.raises(ValueError, match="threshold"):
        soft_threshold(x, "1")


# --------------------------------------------------------------------------------------------- quantisation
def test_quantize_unbiased():
    # bits = 2 (s = 3) makes the rounding noise large. Each stacked row is an independent draw of the same
    # x (norm per row), N = 20 000 rows. Per coordinate Var[Q_j] ≤ ‖x‖²/(4s²), so the mean of N draws has
    # std σ ≤ ‖x‖/(2s√N) ≈ 1.2e-3·‖x‖; we allow 6σ per coordinate (P(|Z| > 6) ≈ 2e-9 per coordinate,
    # and the generator is seeded, so the test is deterministic anyway).
    N, s = 20_000, 3
    x = torch.tensor([0.9, -0.35, 0.2, -0.05, 0.0, 0.6, -1.2, 0.01], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    q = quantize(x.expand(N, -1).contiguous(), bits=2, generator=g)
    sigma = x.norm().item() / (2 * s * math.sqrt(N))
    assert (q.mean(dim=0) - x).abs().max().item() <= 6 * sigma
    # and the noise is real: not the deterministic rounding
    assert q.std(dim=0).max().item() > 0.1 * x.norm().item() / s


def test_quantize_deterministic_error_bound_and_grid():
    g = torch.Generator().manual_seed(1)
    scale = torch.logspace(-3, 3, 5, dtype=torch.float64)[:, None]  # one client per scale
    x = torch.randn(5, 40, generator=g, dtype=torch.float64) * scale
    for bits in [1, 2, 4, 8]:
        s = 2**bits - 1
        q = quantize(x, bits=bits, stochastic=False)
        norm = x.norm(dim=1, keepdim=True)
        # Nearest-level rounding: |Q_j − x_j| ≤ ‖x‖/(2s) (≤ ‖x‖/s, the bound a stochastic round also meets);
        # slack 1e-12·‖x‖ for float64 rounding of r = s|x|/‖x‖ and of the dequantisation.
        assert ((q - x).abs() <= norm / (2 * s) + 1e-12 * norm).all()
        qs = quantize(x, bits=bits, stochastic=True, generator=g)
        assert ((qs - x).abs() <= norm / s + 1e-12 * norm).all()
        # The norm survives: every value is sign · level · ‖x‖/s with an integer level in [0, s],
        # the per-client ‖x‖ being sent exactly (rows of scale 1e-3 … 1e3 each keep their own grid).
        for out in (q, qs):
            levels = out / norm * s
            assert torch.allclose(levels, levels.round(), atol=1e-9)
            assert (levels.abs() <= s + 1e-9).all()
            assert (torch.sign(out) * torch.sign(x) >= 0).all()


def test_quantize_norm_edge_cases():
    one_hot = torch.tensor([[0.0, -2.5, 0.0], [0.0, 0.0, 0.0]])  # second client all zero
    for stochastic in (True, False):
        q = quantize(one_hot, bits=3, stochastic=stochastic)
        assert torch.equal(q, one_hot)  # |x_j| = ‖x‖ is the top level exactly; zero vector → zeros
    # not stacked: one norm for the whole tensor, so the small row is quantised relative to the big one
    x = torch.tensor([[1000.0, 0.0], [0.001, 0.0]])
    assert quantize(x, bits=4, stochastic=False, stacked=False)[1, 0].item() == 0.0
    assert quantize(x, bits=4, stochastic=False, stacked=True)[1, 0].item() == pytest.approx(0.001)


def test_quantize_dtype_generator_and_validation():
    x = torch.randn(3, 7).half()
    q = quantize(x, bits=4, generator=torch.Generator().manual_seed(0))
    assert q.dtype == torch.float16 and q.shape == x.shape
    q2 = quantize(x, bits=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(q, q2)  # reproducible with a seeded generator
    for bad in [0, 25, 2.0, True]:
        with pytest.raises(ValueError, match="bits"):
            quantize(x, bits=bad)
    with pytest.raises(ValueError, match="floating"):
        quantize(torch.arange(4), bits=4)


def test_quantize_with_given_noise_equals_drawing_it_from_the_generator():
    x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(2))
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(9))
    from_generator = quantize(x, bits=3, generator=torch.Generator().manual_seed(9))
    assert torch.equal(quantize(x, bits=3, noise=u), from_generator)
    assert torch.equal(quantize(x, bits=3, noise=u, stochastic=False), quantize(x, bits=3, stochastic=False))
    with pytest.raises(ValueError, match="noise"):
        quantize(x, bits=3, noise=u[:, :2])


def test_quantized_bits():
    assert quantized_bits(10, 8) == 32 + 10 * 9
    assert quantized_bits(0, 1) == 32
    with pytest.raises(ValueError, match="bits"):
        quantized_bits(10, 0)
    with pytest.raises(ValueError, match="d must"):
        quantized_bits(-1, 8)


# --------------------------------------------------------------------------------------------- density
def test_density_stacked_and_unstacked():
    x = {"a": torch.tensor([[0.0, 1.0], [2.0, 3.0]]), "b": torch.tensor([[[0.0, 0.0]], [[0.0, 5.0]]])}
    dens = density(x, stacked=True)
    assert dens.shape == (2,) and dens.dtype == torch.float32
    assert dens.tolist() == [0.25, 0.75]
    single = density({"a": x["a"][1], "b": x["b"][1]}, stacked=False)
    assert single.shape == () and single.item() == 0.75
    with pytest.raises(ValueError, match="client dimension"):
        density({"a": torch.zeros(2, 2), "b": torch.zeros(3)}, stacked=True)


def test_density_after_topk():
    x = _rand_state(4, SHAPES, seed=7)
    y = topk(x, 0.3)
    assert torch.allclose(density(y, stacked=True), torch.full((4,), math.ceil(0.3 * 52) / 52))


# --------------------------------------------------------------------------------------------- prunable
def test_prunable_selects_weights_only():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 3), nn.LayerNorm(3),
        nn.Embedding(5, 2),
    )
    params = list(model.named_parameters())
    assert prunable(params, stacked=False) == ["0.weight", "3.weight", "5.weight"]
    assert prunable(params, include="all", stacked=False) == [name for name, _ in params]
    stacked = [(name, p.detach().unsqueeze(0).expand(3, *p.shape)) for name, p in params]
    assert prunable(stacked, stacked=True) == ["0.weight", "3.weight", "5.weight"]
    # a stacked norm weight [n, C] is 2-D: without stacked=True it would be taken for a weight
    assert "1.weight" in prunable(stacked, stacked=False)
    with pytest.raises(ValueError, match="include"):
        prunable(params, include="biases", stacked=False)


# --------------------------------------------------------------------------------------------- properties
_shape = st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple)
# n clients of a random model (tensors of random shapes, with or without ties), a density and a TopK scope
_TOPK_CASES = {
    "n": st.integers(1, 4),
    "shapes": st.lists(_shape, min_size=1, max_size=3),
    "dens": st.floats(0.001, 1.0),
    "scope": st.sampled_from(["global", "layer"]),
    "ties": st.booleans(),
    "seed": st.integers(0, 2**31 - 1),
}


@settings(max_examples=30, deadline=None)
@given(**_TOPK_CASES)
def test_property_topk_count_and_order(n, shapes, dens, scope, ties, seed):
    x = _rand_state(n, {f"t{i}": s for i, s in enumerate(shapes)}, seed=seed, ties=ties)
    m = topk_mask(x, dens, scope=scope)
    groups = [(x, m)] if scope == "global" else [({k: x[k]}, {k: m[k]}) for k in x]
    for xs, ms in groups:
        a, keep = _flat(xs, n).abs(), _flat(ms, n)
        d = a.shape[1]
        assert keep.sum(dim=1).tolist() == [max(1, math.ceil(dens * d - 1e-9))] * n
        kept_min = torch.where(keep, a, torch.inf).amin(dim=1)
        dropped_max = torch.where(~keep, a, -torch.inf).amax(dim=1)
        assert (kept_min >= dropped_max).all()
        assert torch.equal(keep, _reference_mask(a, keep[0].sum().item()))  # ties: lowest index wins


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple),
    t=st.floats(0.0, 3.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_soft_threshold_shrinks_and_nonexpansive(shape, t, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    y = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    sx, sy = soft_threshold(x, t), soft_threshold(y, t)
    assert (sx.abs() <= x.abs()).all()
    assert (torch.sign(sx) * torch.sign(x) >= 0).all()
    # prox of a convex function is firmly non-expansive, hence elementwise (and in ‖·‖₂) non-expansive;
    # 1e-12 absorbs float64 rounding of |x| − t.
    assert ((sx - sy).abs() <= (x - y).abs() + 1e-12).all()
    assert (sx - sy).norm() <= (x - y).norm() + 1e-12


def _quantize_case(n: int, d: int, exponent: int, zeros: float, seed: int) -> torch.Tensor:
    """[n, d] float64 values of scale 10^exponent, a fraction ``zeros`` of them exactly 0, and the last row
    all zero when n > 1 (a client with nothing to send)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * 10.0**exponent
    x[torch.rand(n, d, generator=g) < zeros] = 0.0
    if n > 1:
        x[-1] = 0.0
    return x


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 4),
    d=st.integers(1, 20),
    exponent=st.integers(-6, 6),
    zeros=st.sampled_from([0.0, 0.5]),
    bits=st.integers(1, 8),
    stochastic=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_quantize_sends_a_level_next_to_each_entry(n, d, exponent, zeros, bits, stochastic, seed):
    """QSGD: every entry becomes sign(x_j)·ξ_j·‖x‖/s with ξ_j ∈ {⌊r_j⌋, ⌈r_j⌉}, r_j = s|x_j|/‖x‖ (the nearest
    level when deterministic), per client; so |Q_j − x_j| ≤ ‖x‖/s (‖x‖/(2s)), zeros stay zero, and the same
    generator seed gives the same message."""
    x = _quantize_case(n, d, exponent, zeros, seed)
    s = 2**bits - 1
    q = quantize(x, bits=bits, stochastic=stochastic, generator=torch.Generator().manual_seed(seed))
    assert q.shape == x.shape and q.dtype == x.dtype
    norm = x.norm(dim=1, keepdim=True)
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    r = (x.abs() / safe * s).clamp(max=s)  # the level as a real number, computed as the operator does
    level = q.abs() / safe * s
    # float64 round trip level -> value -> level: off an integer by a few ulps of s ≤ 255, far below 1e-9
    assert torch.allclose(level, level.round(), rtol=0, atol=1e-9)
    level = level.round()
    if stochastic:
        assert ((level == r.floor()) | (level == r.ceil())).all()
    else:
        assert torch.equal(level, r.round())
    assert (torch.sign(q) * torch.sign(x) >= 0).all() and (q[x == 0] == 0).all()
    bound = norm / s if stochastic else norm / (2 * s)
    assert ((q - x).abs() <= bound * (1 + 1e-12)).all()  # 1e-12: float64 rounding of r and of the dequantisation
    again = quantize(x, bits=bits, stochastic=stochastic, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(q, again)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(d=st.integers(1, 8), exponent=st.integers(-3, 3), bits=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_property_stochastic_quantize_is_unbiased(d, exponent, bits, seed):
    """E[Q(x)] = x. Each draw Q_j lies in an interval of width w = ‖x‖/s around x_j, so by Hoeffding the mean of
    N = 4000 independent draws is off by t = w·√(ln(2/η)/(2N)) or more with probability at most η = 1e-9 per
    coordinate (rigorous, no normal approximation); derandomize fixes the examples, so the test is
    deterministic. A biased rounding (the nearest level) is off by up to w/2 ≫ t = 0.052·w."""
    N, eta = 4000, 1e-9
    x = _quantize_case(1, d, exponent, 0.0, seed)[0]
    s = 2**bits - 1
    q = quantize(x.expand(N, d).contiguous(), bits=bits, generator=torch.Generator().manual_seed(seed))
    t = x.norm().item() / s * math.sqrt(math.log(2 / eta) / (2 * N))
    assert ((q.mean(dim=0) - x).abs() <= t + 1e-12 * x.norm().item()).all()


@settings(max_examples=60, deadline=None)
@given(**_TOPK_CASES)
def test_property_topk_is_a_contractive_idempotent_compressor(n, shapes, dens, scope, ties, seed):
    """TopK_δ as a compressor: ‖x − C(x)‖² ≤ (1 − k/d)‖x‖² per client (per tensor for the layer scope), the
    bound of a contractive compressor (it drops the d − k smallest squares, whose mean is at most the mean
    of all d), and C(C(x)) = C(x). Values in float64; 1e-12 relative slack for the sums of squares."""
    x = {k: v.double() for k, v in _rand_state(n, {f"t{i}": s for i, s in enumerate(shapes)}, seed, ties).items()}
    y = topk(x, dens, scope=scope)
    groups = [list(x)] if scope == "global" else [[k] for k in x]
    for names in groups:
        xs, ys = _flat({k: x[k] for k in names}, n), _flat({k: y[k] for k in names}, n)
        d = xs.shape[1]
        k = topk_count(d, dens)
        error, total = (xs - ys).pow(2).sum(dim=1), xs.pow(2).sum(dim=1)
        assert (error <= (1 - k / d) * total * (1 + 1e-12)).all()
        assert (((ys == xs) | (ys == 0)).all())  # kept entries are sent unchanged
    again = topk(y, dens, scope=scope)
    assert all(torch.equal(again[k], y[k]) for k in y)
