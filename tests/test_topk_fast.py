"""The fast exact TopK (``fl_lightning.ops._fast_masks``, ``TopKWarmStart``) against the reference (DESIGN §1.1).

The fast path must return the *same* masks as the reference ``torch.topk`` + tie rule (lower flat index wins
among equal magnitudes), wherever its search starts: a good warm start, a stale one, a wrong one.
Equality is exact (a selection has no rounding).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_lightning.ops import (
    TopKWarmStart,
    _fast_masks,
    _Hint,
    _magnitudes,
    _topk_rows,
    topk_count,
    topk_mask,
    topk_prune_,
)

SHAPES = {"w1": (6, 9), "b": (4,), "w2": (3, 5)}  # 54 + 4 + 15 = 73 entries per client


def _state(n: int, kind: str, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in SHAPES.items():
        if kind == "ties":  # a small integer set: exact ties in magnitude, and signed pairs
            out[name] = torch.randint(-2, 3, (n, *shape), generator=g).float()
        elif kind == "zeros":  # mostly zeros (a pruned model after a tiny step)
            x = torch.randn((n, *shape), generator=g)
            out[name] = torch.where(torch.rand((n, *shape), generator=g) < 0.8, torch.zeros_like(x), x)
        else:
            out[name] = torch.randn((n, *shape), generator=g)
    return out


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal as bit patterns (tells +0.0 from −0.0)."""
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def _perturb(x: dict[str, torch.Tensor], scale: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in x.items()}


DENSITIES = st.sampled_from([1e-6, 0.01, 0.05, 0.1, 0.3, 0.5, 0.9, 0.99, 1.0])  # 1e-6: k = 1; 1.0: k = n


# --------------------------------------------------------------------------------------------- the core
def _inputs(kind: str, n: int, d: int, g: torch.Generator) -> torch.Tensor:
    if kind == "ties":  # a small integer set: exact ties in magnitude, and signed pairs
        return torch.randint(-3, 4, (n, d), generator=g).float()
    if kind == "zeros":  # mostly zeros
        return torch.randn(n, d, generator=g) * (torch.rand(n, d, generator=g) < 0.3)
    if kind == "dup":  # every value appears several times
        return torch.randn(n, -(-d // 4), generator=g).repeat(1, 4)[:, :d]
    if kind == "pruned":  # a TopK-pruned model after one small step: k large entries, d − k tiny ones
        x = torch.randn(n, d, generator=g)
        x = x.masked_fill(~_topk_rows(x.abs(), max(1, d // 10)), 0)
        return x + 1e-3 * torch.randn(n, d, generator=g)
    return torch.randn(n, d, generator=g)


KINDS = st.sampled_from(["randn", "ties", "zeros", "dup", "pruned"])


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 7), d=st.integers(2, 700), k_frac=st.floats(0.0, 1.0), kind=KINDS,
       guess=st.sampled_from(["exact", "near", "far", "zero", "inf", "nan", "random"]),
       drift=st.floats(-2.0, 2.0), margin=st.floats(0.0, 0.6), dens=st.floats(1.0, 1e4), seed=st.integers(0, 10**6))
def test_property_fast_masks_equal_the_reference_for_any_start(n, d, k_frac, kind, guess, drift, margin, dens, seed):
    """Whatever threshold the search starts from, the masks (and θ where computed) are the reference's."""
    g = torch.Generator().manual_seed(seed)
    x = _inputs(kind, n, d, g)
    k = min(d - 1, max(1, round(k_frac * d)))
    a = x.abs()
    ref = _topk_rows(_magnitudes(x), k)
    theta = a.masked_fill(~ref, math.inf).amin(1).double()  # the smallest kept magnitude
    start = {"exact": theta, "near": theta * (1 + 0.05 * torch.randn(n, generator=g, dtype=torch.float64)),
             "far": theta * 100, "zero": torch.zeros(n, dtype=torch.float64),
             "inf": torch.full((n,), math.inf, dtype=torch.float64),
             "nan": torch.full((n,), math.nan, dtype=torch.float64),
             "random": torch.rand(n, generator=g, dtype=torch.float64) * 3}[guess]
    parts = [x[:, : d // 2], x[:, d // 2 :]]
    masks, th = _fast_masks(parts, k, _Hint(start, drift, margin, dens), prune=False)
    assert torch.equal(torch.cat(masks, dim=1), ref)
    assert th.shape == (n,) and th.dtype == torch.float64


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 5), d=st.integers(64, 3000), kind=KINDS, seed=st.integers(0, 10**6),
       spread=st.floats(0.0, 0.3))
def test_property_extraction_equals_the_reference(n, d, kind, seed, spread):
    """Start just below θ, so that most rows take the extraction (k < kept ≤ k + 256): same masks, exact θ."""
    g = torch.Generator().manual_seed(seed)
    x = _inputs(kind, n, d, g)
    k = max(1, d // 10)
    ref = _topk_rows(_magnitudes(x), k)
    theta = x.abs().masked_fill(~ref, math.inf).amin(1).double()
    start = theta * torch.exp(-spread * torch.rand(n, generator=g, dtype=torch.float64))
    y = [x.clone()]
    masks, th = _fast_masks(y, k, _Hint(start, 0.0, 0.0, 100.0), prune=True)
    assert torch.equal(masks[0], ref)
    assert _bitwise(y[0], x.masked_fill(~ref, 0))
    solved = th != start  # rows whose θ was computed (not left at the prediction) hold the exact θ
    assert torch.equal(th[solved], theta[solved])


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 5), dens=DENSITIES, scope=st.sampled_from(["global", "layer"]),
       kind=st.sampled_from(["randn", "ties", "zeros"]), seed=st.integers(0, 10**6))
def test_property_warm_start_sequence_equals_the_reference(n, dens, scope, kind, seed):
    """A sequence of slightly perturbed inputs (local steps): every call, warm or cold, equals the reference."""
    warm = TopKWarmStart()
    x = _state(n, kind, seed)
    for step in range(4):
        ref = topk_mask(x, dens, scope=scope, method="reference")
        fast = topk_mask(x, dens, scope=scope, method="fast", warm_start=warm)
        assert _equal(fast, ref), f"step {step}"
        x = _perturb(x, 10.0 ** -(step + 1), seed + step)
        if kind == "ties":
            x = {k: v.round() for k, v in x.items()}


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 5), dens=DENSITIES, scope=st.sampled_from(["global", "layer"]),
       kind=st.sampled_from(["randn", "ties", "zeros"]), seed=st.integers(0, 10**6))
def test_property_prune_in_place_equals_masked_fill(n, dens, scope, kind, seed):
    warm = TopKWarmStart()
    x = _state(n, kind, seed)
    for step in range(3):
        ref = topk_mask(x, dens, scope=scope, method="reference")
        y = {k: v.clone() for k, v in x.items()}
        masks = topk_prune_(y, dens, scope=scope, method="fast", warm_start=warm)
        assert _equal(masks, ref)
        for k in x:
            assert _bitwise(y[k], x[k].masked_fill(~ref[k], 0)), k  # +0.0 where dropped, as masked_fill
        x = _perturb(y, 0.01, seed + step)


# --------------------------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("dens", [1e-9, 0.5, 1.0])  # k = 1, k = d/2, k = d
@pytest.mark.parametrize("fill", [0.0, 1.0, -2.5])
def test_all_equal_rows_pick_the_lowest_indices(scope, dens, fill):
    x = {k: torch.full((3, *s), fill) for k, s in SHAPES.items()}
    warm = TopKWarmStart()
    ref = topk_mask(x, dens, scope=scope, method="reference")
    for _ in range(3):
        assert _equal(topk_mask(x, dens, scope=scope, method="fast", warm_start=warm), ref)


def test_nan_and_inf_rows_match_the_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 400, generator=g)
    x[1, 7] = math.nan
    x[2, :3] = math.inf
    x[3, 5] = -math.inf
    x[4, :] = math.nan
    warm = TopKWarmStart()
    for _ in range(3):
        ref = topk_mask({"w": x}, 0.1, method="reference")
        assert _equal(topk_mask({"w": x}, 0.1, method="fast", warm_start=warm), ref)
        y = {"w": x.clone()}
        topk_prune_(y, 0.1, method="fast", warm_start=warm)
        assert torch.equal(y["w"].isnan(), x.masked_fill(~ref["w"], 0).isnan())
        assert torch.equal(y["w"].nan_to_num(), x.masked_fill(~ref["w"], 0).nan_to_num())


def test_a_wrong_or_stale_warm_start_changes_nothing():
    x = {"w": torch.randn(4, 500, generator=torch.Generator().manual_seed(1))}
    ref = topk_mask(x, 0.2, method="reference")
    for theta in (torch.zeros(4), torch.full((4,), math.inf), torch.full((4,), 1e-30), torch.rand(4) * 3):
        warm = TopKWarmStart()
        warm.theta[""] = theta
        assert _equal(topk_mask(x, 0.2, method="fast", warm_start=warm), ref)
    warm = TopKWarmStart()
    warm.theta[""] = torch.ones(3)  # another number of rows: ignored
    assert _equal(topk_mask(x, 0.2, method="fast", warm_start=warm), ref)


def test_float64_and_unstacked_match_the_reference():
    x = {"w": torch.randn(3, 200, dtype=torch.float64), "v": torch.randn(3, 50, dtype=torch.float64)}
    warm = TopKWarmStart()
    for _ in range(2):
        assert _equal(topk_mask(x, 0.3, method="fast", warm_start=warm), topk_mask(x, 0.3, method="reference"))
    one = {"w": torch.randn(40, 30)}
    warm = TopKWarmStart()
    for _ in range(2):
        assert _equal(topk_mask(one, 0.1, stacked=False, method="fast", warm_start=warm),
                      topk_mask(one, 0.1, stacked=False, method="reference"))


def test_auto_uses_the_fast_path_on_large_inputs_and_keeps_exactly_k():
    n, d = 20, 5000  # 10⁵ entries ≥ 2¹⁶: "auto" takes the fast path once warm
    x = {"w": torch.randn(n, d, generator=torch.Generator().manual_seed(2))}
    warm = TopKWarmStart()
    k = topk_count(d, 0.1)
    for step in range(3):
        m = topk_mask(x, 0.1, warm_start=warm)
        assert _equal(m, topk_mask(x, 0.1, method="reference"))
        assert (m["w"].sum(1) == k).all()
        x = _perturb(x, 1e-3, step)
    assert "" in warm.theta and warm.theta[""].shape == (n,)


def test_method_is_validated():
    with pytest.raises(ValueError, match="method"):
        topk_mask({"w": torch.randn(2, 3)}, 0.5, method="quick")


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_training_like_sequence_equals_the_reference(scope):
    """Local steps of Sparse-ProxSkip: x ← TopK(x − γ·noise), with jumps of θ (round ends) — in lockstep with the
    reference, one row per block (d > 2¹⁶) and a partial last block, masks and pruned values bit for bit."""
    g = torch.Generator().manual_seed(5)
    x = {"w": torch.randn(3, 70_000, generator=g), "v": torch.randn(3, 300, generator=g)}
    warm = TopKWarmStart()
    for step in range(12):
        y = {k: v.clone() for k, v in x.items()}
        ref = topk_prune_(x, 0.1, scope=scope, method="reference")
        fast = topk_prune_(y, 0.1, scope=scope, method="fast", warm_start=warm)
        assert _equal(fast, ref), step
        for k in x:
            assert _bitwise(y[k], x[k]), (step, k)
        scale = 2.5 if step % 4 == 3 else 1.0  # a round end: every θ jumps
        x = {k: v * scale - 0.01 * torch.randn(v.shape, generator=g) for k, v in x.items()}


def test_many_rows_per_block_and_infinite_values_when_pruning():
    """Small rows (many per block) with ±inf among the kept entries, NaN rows, and ties across the boundary."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(300, 5000, generator=g)
    x[3, 10] = math.inf
    x[4, :20] = -math.inf
    x[5, 7] = math.nan
    x[6] = 1.0  # all tied
    x[7, :600] = 2.0  # a tie straddling k = 500
    warm = TopKWarmStart()
    for _ in range(3):
        ref = topk_mask({"w": x}, 0.1, method="reference")
        y = {"w": x.clone()}
        fast = topk_prune_(y, 0.1, method="fast", warm_start=warm)
        assert _equal(fast, ref)
        expect = x.masked_fill(~ref["w"], 0)
        assert torch.equal(y["w"].isnan(), expect.isnan())
        assert _bitwise(y["w"].nan_to_num(), expect.nan_to_num())
        x = x * 0.97


def test_float64_rows_of_one_block_each():
    g = torch.Generator().manual_seed(3)
    x = {"w": torch.randn(2, 40_000, generator=g, dtype=torch.float64)}
    warm = TopKWarmStart()
    for _ in range(4):
        y = {k: v.clone() for k, v in x.items()}
        ref = topk_prune_({k: v.clone() for k, v in x.items()}, 0.05, method="reference")
        assert _equal(topk_prune_(y, 0.05, method="fast", warm_start=warm), ref)
        x = {k: v + 1e-3 * torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in x.items()}


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_sparse_proxskip_trains_bit_for_bit_the_same_with_the_fast_topk(scope, monkeypatch):
    """Whole runs (local TopK after every step, the received broadcast, momentum masked): the client and global
    models and the recorded masks are identical with ``topk_method="fast"`` and ``"reference"``."""
    import fl_lightning.ops as ops
    from fl_lightning.algorithms import sparse_proxskip
    from fl_lightning.callbacks import TopKPruning
    from tests.test_sparse import fit_linear, sparse_regression

    clients = sparse_regression(n=6, d=300, m=40, seed=1)
    calls = []
    inner = ops._fast_masks
    monkeypatch.setattr(ops, "_fast_masks", lambda *a, **k: calls.append(1) or inner(*a, **k))
    out = {}
    for method in ("reference", "fast"):
        cbs = sparse_proxskip(p=0.25, density=0.1, scope=scope, seed=0)
        for cb in cbs:
            if isinstance(cb, TopKPruning):
                cb.topk_method = method
        module = fit_linear(clients, cbs, steps=24, lr=0.002, momentum=0.9)
        out[method] = (module.clients.x["weight"].detach().clone(), module.global_model.weight.detach().clone(),
                       module.clients.extra["topk_mask"]["weight"].clone())
    assert len(calls) >= 20  # every local step after the first took the fast path
    for ref, fast in zip(out["reference"], out["fast"]):
        assert torch.equal(ref.view(torch.int64) if ref.is_floating_point() else ref,
                           fast.view(torch.int64) if fast.is_floating_point() else fast)
