"""TopKPruning's hooks, one location at a time, against a pure-Python TopK (DESIGN §1.1): per scope, keep the
k = ⌈δ·d⌉ entries of largest magnitude, the lower flat index winning ties (names in model order, then row-major);
only the weights (≥ 2-D, not biases) are pruned by default. Also: which rows change with a partial cohort, the
masks recorded as client state, the straight-through estimator of ``forward`` and the momentum buffers zeroed
with the weights outside STE mode only (§1.4).

The model is Linear(4, 3) → Linear(3, 2) (weights of 12 and 6 entries, biases of 3 and 2), 3 clients, with
integer-valued weights in [−3, 3] so that magnitudes tie often, at the threshold too."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch
from torch import nn

from fl_lightning.callbacks import SkipSchedule, TopKPruning
from tests.callbacks.helpers import make_module, make_round, randn_like_all, stand_in_trainer

WEIGHTS = ["0.weight", "1.weight"]
BIASES = ["0.bias", "1.bias"]
N = 3


def tie_laden(shapes: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randint(-3, 4, v.shape, generator=g).to(v.dtype) for k, v in shapes.items()}


def prepared(**kwargs):
    """A module with tie-laden client weights, the callback set up on it, an SGD optimizer over the stacked
    parameters whose momentum buffers are all non-zero, and the stand-in Trainer holding both."""
    module = make_module(n=N, model=nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)))
    with torch.no_grad():
        for k, v in tie_laden(dict(module.clients.x.items()), seed=0).items():
            module.clients.x[k].copy_(v)
    others = kwargs.pop("others", [])
    cb = TopKPruning(**kwargs)
    params = list(module.clients.x.values())
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for p, buf in zip(params, randn_like_all(dict(module.clients.x.items()), seed=9).values()):
        opt.state[p]["momentum_buffer"] = buf.abs() + 1.0  # non-zero everywhere
    trainer = stand_in_trainer([SkipSchedule(k=2), cb, *others], [opt])
    for other in others:
        other.setup(trainer, module, "fit")
    cb.setup(trainer, module, "fit")
    return module, cb, trainer, opt


def reference_masks(model: dict[str, torch.Tensor], density: float, scope: str) -> dict[str, torch.Tensor]:
    """TopK masks of one model (unstacked tensors) by a stable sort in pure Python, over the weights only."""
    groups = [[k] for k in WEIGHTS] if scope == "layer" else [WEIGHTS]
    out = {}
    for group in groups:
        flat = [v for k in group for v in model[k].flatten().tolist()]
        d = len(flat)
        k_keep = math.ceil(round(density * d, 9))  # ⌈δ·d⌉; round() strips float noise (e.g. 0.25·12 = 3 exactly)
        kept = set(sorted(range(d), key=lambda j: (-abs(flat[j]), j))[:k_keep])
        offset = 0
        for name in group:
            size = model[name].numel()
            out[name] = torch.tensor([offset + j in kept for j in range(size)]).reshape(model[name].shape)
            offset += size
    return out


def surplus_ties(model: dict[str, torch.Tensor], density: float, scope: str) -> bool:
    """Whether some scope has more entries tied at its threshold magnitude than TopK keeps (so the tie rule
    decides which ones stay)."""
    groups = [[k] for k in WEIGHTS] if scope == "layer" else [WEIGHTS]
    for group in groups:
        mags = sorted((abs(v) for k in group for v in model[k].flatten().tolist()), reverse=True)
        k_keep = math.ceil(round(density * len(mags), 9))
        theta = mags[k_keep - 1]
        if mags.count(theta) > k_keep - sum(m > theta for m in mags):
            return True
    return False


def expected_counts(density: float, scope: str) -> dict[str, int] | int:
    if scope == "layer":
        return {"0.weight": math.ceil(round(density * 12, 9)), "1.weight": math.ceil(round(density * 6, 9))}
    return math.ceil(round(density * 18, 9))


def snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.clients.x.items()}


def momentum(opt, module) -> dict[str, torch.Tensor]:
    return {k: opt.state[x]["momentum_buffer"].clone() for k, x in module.clients.x.items()}


def test_the_reference_keeps_lower_indices_among_tied_magnitudes() -> None:
    model = {"0.weight": torch.tensor([[1.0, -2.0, 2.0, 0.0]]), "1.weight": torch.tensor([[-2.0, 3.0]])}
    # magnitudes 1 2 2 0 | 2 3, k = ⌈0.5·6⌉ = 3: the 3, then the first two of the three 2s
    masks = reference_masks(model, 0.5, "global")
    assert masks["0.weight"].tolist() == [[False, True, True, False]] and masks["1.weight"].tolist() == [[False, True]]


@pytest.mark.parametrize("method", ["reference", "fast"])
@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("density", [0.25, 0.3])
def test_local_keeps_exactly_ceil_density_d_entries_on_the_cohort_rows(density: float, scope: str,
                                                                       method: str) -> None:
    """Three local steps with changing cohorts (the warm-start cache of ``fast`` must not leak across them):
    after each, the cohort's rows are TopK of what they were, the others and the biases untouched, the masks
    recorded for the cohort, and momentum zeroed exactly where the weights were."""
    module, cb, trainer, opt = prepared(density=density, at=("local", "received"), scope=scope, topk_method=method)
    masks_state = module.clients.extra[TopKPruning.STATE]
    decided_by_ties = 0
    for step, members in enumerate([None, [0, 2], [1]]):
        if step:  # new weights between steps, as a local step would give
            with torch.no_grad():
                for k, v in tie_laden(dict(module.clients.x.items()), seed=10 + step).items():
                    module.clients.x[k].copy_(v)
        module.set_active_clients(members)
        before, buf_before, recorded_before = snapshot(module), momentum(opt, module), {
            k: v.clone() for k, v in masks_state.items()}
        cb.on_local_step_end(trainer, module)
        after, buf_after = snapshot(module), momentum(opt, module)
        rows = range(N) if members is None else members
        for i in range(N):
            if i not in rows:
                for k in after:
                    assert torch.equal(after[k][i], before[k][i]) and torch.equal(buf_after[k][i], buf_before[k][i])
                    assert torch.equal(masks_state[k][i], recorded_before[k][i])
                continue
            ref = reference_masks({k: before[k][i] for k in WEIGHTS}, density, scope)
            decided_by_ties += surplus_ties({k: before[k][i] for k in WEIGHTS}, density, scope)
            for k in WEIGHTS:
                assert torch.equal(after[k][i], before[k][i] * ref[k]), (step, i, k)
                assert torch.equal(masks_state[k][i], ref[k])
                assert torch.equal(buf_after[k][i], buf_before[k][i] * ref[k])  # zero exactly where pruned
            counts = {k: int(ref[k].sum()) for k in WEIGHTS}
            assert (counts if scope == "layer" else sum(counts.values())) == expected_counts(density, scope)
            for k in BIASES:
                assert torch.equal(after[k][i], before[k][i]) and torch.equal(buf_after[k][i], buf_before[k][i])
    assert decided_by_ties > 0  # the tie rule was exercised, not just the magnitudes


def test_params_all_prunes_the_biases_too() -> None:
    module, cb, trainer, _ = prepared(density=0.3, at="local", params="all")
    assert cb.names == ["0.weight", "0.bias", "1.weight", "1.bias"]
    before = snapshot(module)
    cb.on_local_step_end(trainer, module)
    after = snapshot(module)
    d = 12 + 3 + 6 + 2
    for i in range(N):
        flat = torch.cat([before[k][i].flatten() for k in cb.names]).tolist()
        kept = set(sorted(range(d), key=lambda j: (-abs(flat[j]), j))[: math.ceil(0.3 * d)])
        expected = torch.tensor([flat[j] if j in kept else 0.0 for j in range(d)], dtype=torch.float64)
        assert torch.equal(torch.cat([after[k][i].flatten() for k in cb.names]), expected)


@pytest.mark.parametrize("members", [None, [2]], ids=["full", "partial"])
def test_round_prunes_each_uplinked_local_model_and_records_the_cohorts_masks(members) -> None:
    module, cb, trainer, opt = prepared(density=0.3, at="round")
    rnd = make_round(module, members)
    local = {k: v.clone() for k, v in rnd.local.items()}
    buf_before = momentum(opt, module)
    cb.on_before_uplink(trainer, module, rnd)
    ids = rnd.cohort.ids.tolist()
    masks_state = module.clients.extra[TopKPruning.STATE]
    for j, i in enumerate(ids):
        ref = reference_masks({k: local[k][j] for k in WEIGHTS}, 0.3, "global")
        for k in WEIGHTS:
            assert torch.equal(rnd.local[k][j], local[k][j] * ref[k])
            assert torch.equal(masks_state[k][i], ref[k])
    for i in set(range(N)) - set(ids):
        assert all(bool(masks_state[k][i].all()) for k in WEIGHTS)  # still the initial all-True
    for k in BIASES:
        assert torch.equal(rnd.local[k], local[k])
    assert all(torch.equal(v, buf_before[k]) for k, v in momentum(opt, module).items())  # x_i themselves unchanged


@pytest.mark.parametrize("location", ["server", "received"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_server_and_received_prune_the_one_model_for_every_client(location: str, scope: str) -> None:
    module, cb, trainer, opt = prepared(density=0.3, at=location, scope=scope)
    rnd = make_round(module, [0, 1])
    model = randn_like_all({k: v[0] for k, v in rnd.local.items()}, seed=5)
    model = {k: torch.round(3 * v) for k, v in model.items()}  # integers again: ties
    rnd.mean, rnd.server, rnd.broadcast, rnd.received = dict(model), dict(model), dict(model), dict(model)
    buf_before = momentum(opt, module)
    if location == "server":
        cb.on_aggregate(trainer, module, rnd)
        out, untouched = rnd.server, rnd.mean
    else:
        cb.on_receive(trainer, module, rnd)
        out, untouched = rnd.received, rnd.broadcast
    ref = reference_masks(model, 0.3, scope)
    masks_state = module.clients.extra[TopKPruning.STATE]
    buf_after = momentum(opt, module)
    for k in WEIGHTS:
        assert torch.equal(out[k], model[k] * ref[k])
        assert torch.equal(untouched[k], model[k])  # replaced, not pruned in place
        for i in range(N):  # every client takes this model (the cohort's members and the others)
            assert torch.equal(masks_state[k][i], ref[k])
            assert torch.equal(buf_after[k][i], buf_before[k][i] * ref[k])
    for k in BIASES:
        assert torch.equal(out[k], model[k]) and torch.equal(buf_after[k], buf_before[k])


def _prune_at(location: str, cb: TopKPruning, trainer, module, rnd) -> None:
    if location == "local":
        cb.on_local_step_end(trainer, module)
    elif location == "server":
        cb.on_aggregate(trainer, module, rnd)
    else:
        cb.on_receive(trainer, module, rnd)


@pytest.mark.parametrize(("location", "at", "others"), [
    ("received", ("forward", "received"), []),
    ("server", ("server",), [TopKPruning(0.5, at="forward")]),  # STE anywhere in the run: dense optimizer state
], ids=["ste-in-the-same-callback", "ste-in-another-callback"])
def test_with_an_ste_forward_momentum_is_left_dense(location: str, at: Sequence[str], others: list) -> None:
    module, cb, trainer, opt = prepared(density=0.3, at=at, others=others)
    rnd = make_round(module)
    model = {k: v[0].clone() for k, v in rnd.local.items()}
    rnd.server, rnd.received = dict(model), dict(model)
    before = momentum(opt, module)
    _prune_at(location, cb, trainer, module, rnd)
    pruned = rnd.server if location == "server" else rnd.received
    assert int((pruned["0.weight"] != model["0.weight"]).sum()) > 0  # it did prune
    assert all(torch.equal(v, before[k]) for k, v in momentum(opt, module).items())


@pytest.mark.parametrize("members", [None, [0, 2]], ids=["full", "partial"])
def test_forward_uses_topk_values_and_passes_the_gradient_straight_through(members) -> None:
    module, cb, trainer, _ = prepared(density=0.3, at="forward")
    module.set_active_clients(members)
    params = {k: module.cohort.take(x).detach().clone().requires_grad_(True) for k, x in module.clients.x.items()}
    out = cb.transform_params(trainer, module, params)
    for j in range(params["0.weight"].shape[0]):
        ref = reference_masks({k: params[k][j].detach() for k in WEIGHTS}, 0.3, "global")
        for k in WEIGHTS:
            assert torch.equal(out[k][j].detach(), params[k][j].detach() * ref[k])
    assert all(out[k] is params[k] for k in BIASES)
    upstream = randn_like_all({k: out[k] for k in WEIGHTS}, seed=6)
    sum((out[k] * upstream[k]).sum() for k in WEIGHTS).backward()
    for k in WEIGHTS:  # d out / d x = identity, pruned entries included
        assert torch.equal(params[k].grad, upstream[k])
    assert all(torch.equal(x, module.clients.x[k].detach()) for k, x in snapshot(module).items())  # x_i stay dense


@pytest.mark.parametrize("at", ["local", "round", "server", "received", "forward"])
def test_every_hook_other_than_its_locations_leaves_the_round_alone(at: str) -> None:
    module, cb, trainer, opt = prepared(density=0.3, at=at)
    rnd = make_round(module)
    model = {k: v[0].clone() for k, v in rnd.local.items()}
    rnd.mean, rnd.server, rnd.broadcast, rnd.received = dict(model), dict(model), dict(model), dict(model)
    stages = {"round": rnd.local, "server": rnd.server, "received": rnd.received}
    before, buf = snapshot(module), momentum(opt, module)
    params = {k: v.detach().clone() for k, v in module.clients.x.items()}
    if at != "local":
        cb.on_local_step_end(trainer, module)
    if at != "round":
        cb.on_before_uplink(trainer, module, rnd)
    if at != "server":
        cb.on_aggregate(trainer, module, rnd)
    if at != "received":
        cb.on_receive(trainer, module, rnd)
    if at != "forward":
        assert cb.transform_params(trainer, module, params) is params
    for name, stage in stages.items():
        if name != at:
            assert {"round": rnd.local, "server": rnd.server, "received": rnd.received}[name] is stage
    assert all(torch.equal(v, before[k]) for k, v in snapshot(module).items())
    assert all(torch.equal(v, buf[k]) for k, v in momentum(opt, module).items())


def test_state_key_and_state_dict_name_the_locations() -> None:
    server, received = TopKPruning(0.5, at="server"), TopKPruning(0.5, at="received")
    assert server.state_key != received.state_key  # two callbacks keep separate checkpoint entries
    assert TopKPruning(0.2, at=["local", "received"], scope="layer").state_dict() == {
        "density": 0.2, "at": ["local", "received"], "scope": "layer", "params": "weights"}


def test_setup_fails_when_params_select_nothing() -> None:
    module = make_module(n=2, model=nn.LayerNorm(4))  # only 1-D parameters: nothing is a prunable weight
    with pytest.raises(ValueError, match="selects no parameter"):
        TopKPruning(0.5, at="server").setup(stand_in_trainer(), module, "fit")


@pytest.mark.parametrize("at", [("forward",), ("forward", "round"), ("local", "received"), ("server",)])
def test_the_global_model_is_evaluated_as_topk_only_when_clients_compute_with_topk_of_a_dense_model(at) -> None:
    """STE (``forward``): clients compute with TopK(x) of the dense x they start from, so x is evaluated as TopK(x)
    (the same δ, scope and selection; biases untouched). Elsewhere x is what clients use: evaluated as it is."""
    module = make_module(n=2, model=nn.Linear(10, 3))
    cb = TopKPruning(0.2, at=at)
    cb.setup(stand_in_trainer([cb]), module, "fit")
    x = dict(module.global_model.named_parameters())
    with torch.no_grad():
        x["weight"].copy_(torch.randn(3, 10, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    out = cb.transform_evaluated_params(None, module, x)
    assert out["bias"] is x["bias"]
    if "forward" in at:
        kept = x["weight"].abs().flatten().sort(descending=True).values[:6]  # ⌈0.2·30⌉ = 6 largest magnitudes
        assert int((out["weight"] != 0).sum()) == 6
        assert torch.equal(out["weight"].abs().flatten().sort(descending=True).values[:6], kept)
        assert torch.equal(out["weight"][out["weight"] != 0], x["weight"][out["weight"] != 0])
    else:
        assert out["weight"] is x["weight"]
