"""``DifferentialPrivacy`` on hand-built rounds: the clip on the stacked messages, the noise of the aggregate, and the
set-ups it refuses."""

from __future__ import annotations

import math

import pytest
import torch

from fl_lightning.callbacks import ClientSampling, Compression, ControlVariates, DifferentialPrivacy, Scaffold
from fl_lightning.callbacks.fednova import NormalizedAveraging
from fl_lightning.callbacks.privacy import update_norms
from tests.callbacks.helpers import make_module, make_round, stand_in_trainer

pytest.importorskip("dp_accounting")


def _set_up(module, *callbacks, dp: DifferentialPrivacy):
    trainer = stand_in_trainer([*callbacks, dp])
    for cb in trainer.callbacks:
        cb.setup(trainer, module, "fit")
    trainer.should_stop = False
    return trainer


def _global(module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in module.global_model.named_parameters()}


@pytest.mark.parametrize("clip_norm", [0.3, 1.5, 3.0])
def test_after_clipping_no_client_contributes_more_than_clip_norm(clip_norm: float) -> None:
    module = make_module(n=8)  # x_i ~ N(0, 1): ‖x_i − x‖ ≈ 2.5–4 over the 8 entries, so some clip and some not
    dp = DifferentialPrivacy(clip_norm, noise_multiplier=0.0)
    trainer = _set_up(module, dp=dp)
    rnd = make_round(module)
    before = {k: v.clone() for k, v in rnd.uplink.items()}
    x = _global(module)
    norms = update_norms(before, x)
    dp.on_compress_uplink(trainer, module, rnd)
    after = update_norms(rnd.uplink, x)
    # the clipped norm is C up to the rounding of C/‖Δ‖ · Δ and of x + Δ − x (float64: ~1e-16 relative)
    assert bool((after <= clip_norm * (1 + 1e-12)).all()), after
    for i in range(8):
        if norms[i] > clip_norm:  # scaled onto the sphere, direction kept
            assert float(after[i]) == pytest.approx(clip_norm, rel=1e-12)
            for k in before:
                d0, d1 = (before[k][i] - x[k]).flatten(), (rnd.uplink[k][i] - x[k]).flatten()
                torch.testing.assert_close(d1, d0 * (clip_norm / norms[i]), rtol=1e-12, atol=1e-14)
        else:  # untouched, bit for bit
            assert all(torch.equal(rnd.uplink[k][i], before[k][i]) for k in before)
    expected = float((norms > clip_norm).double().mean())
    dp.on_mean(trainer, module, rnd)
    dp.on_round_end(trainer, module, rnd)
    assert float(module.round_metrics["privacy/clipped_fraction"]) == pytest.approx(expected)


def test_clipping_acts_on_the_shifted_proxskip_message_relative_to_the_server_model() -> None:
    module = make_module(n=5)
    cv = ControlVariates()
    dp = DifferentialPrivacy(0.5, noise_multiplier=0.0)
    trainer = _set_up(module, cv, dp=dp)
    module.schedule = type("S", (), {"p": 0.25})()  # what ControlVariates reads: p / γ
    h = module.clients.extra["cv_h"]
    for v in h.values():
        v.normal_(generator=torch.Generator().manual_seed(3))
    rnd = make_round(module)
    cv.on_uplink(trainer, module, rnd)  # u_i = x̂_i − (γ/p) h_i
    dp.on_compress_uplink(trainer, module, rnd)
    assert bool((update_norms(rnd.uplink, _global(module)) <= 0.5 * (1 + 1e-12)).all())


@pytest.mark.parametrize(("sampling", "members"), [("full", None), ("poisson", [0, 2, 3]), ("poisson", [])])
def test_the_noise_of_the_aggregate_has_std_sigma_c_over_the_expected_cohort(sampling, members) -> None:
    """Every client sends x (Δ_i = 0), so x̄ − x is the noise alone: N(0, (σC/D)²) per entry, D = n or q·n."""
    n, sigma, clip = 10, 1.3, 0.7
    module = make_module(n=n)
    with torch.no_grad():
        for k, x in module.clients.x.items():
            x.copy_(dict(module.global_model.named_parameters())[k].unsqueeze(0).expand_as(x))
    sampler = [ClientSampling(4, seed=0, mode="poisson")] if sampling == "poisson" else []
    dp = DifferentialPrivacy(clip, noise_multiplier=sigma, seed=5)
    trainer = _set_up(module, *sampler, dp=dp)
    d = n if sampling == "full" else 4
    x = _global(module)
    samples = []
    rounds = 600
    for index in range(rounds):
        rnd = make_round(module, members, index=index)
        dp.on_compress_uplink(trainer, module, rnd)
        rnd.mean = {k: x[k].clone() for k in rnd.uplink}  # Σ_i w_i u_i with u_i = x (or the empty cohort's x)
        dp.on_mean(trainer, module, rnd)
        samples.append(torch.cat([(rnd.mean[k] - x[k]).flatten() for k in x]))
    noise = torch.stack(samples)  # [rounds, 8]
    count = noise.numel()  # 4,800 independent N(0, s²) draws
    # the sample std of N Gaussian draws has relative standard error 1/sqrt(2N) ≈ 0.010: allow 4 of them
    assert float(noise.std()) == pytest.approx(sigma * clip / d, rel=4 / math.sqrt(2 * count))
    assert abs(float(noise.mean())) < 4 * sigma * clip / d / math.sqrt(count)  # unbiased: 4 standard errors
    assert not torch.equal(noise[0], noise[1]), "a new draw every round"
    again = make_round(module, members, index=0)
    dp.on_compress_uplink(trainer, module, again)
    again.mean = {k: x[k].clone() for k in again.uplink}
    dp.on_mean(trainer, module, again)
    assert torch.equal(torch.cat([(again.mean[k] - x[k]).flatten() for k in x]), noise[0]), "seeded by the round"


def test_local_noise_is_on_each_clipped_update_and_drawn_per_client() -> None:
    n, sigma, clip = 6, 0.9, 0.5
    module = make_module(n=n)
    dp = DifferentialPrivacy(clip, noise_multiplier=sigma, noise="local", seed=2)
    trainer = _set_up(module, dp=dp)
    x = _global(module)
    draws = []
    for index in range(300):
        rnd = make_round(module, index=index)
        clean = make_round(module, index=index)
        DifferentialPrivacy(clip, noise_multiplier=0.0, noise="local", seed=2).on_compress_uplink(trainer, module,
                                                                                                   clean)
        dp.on_compress_uplink(trainer, module, rnd)
        draws.append(torch.cat([(rnd.uplink[k] - clean.uplink[k]).flatten(1) for k in x], dim=1))
    noise = torch.stack(draws)  # [300, n, 8]
    # per-client std σC; 14,400 draws: relative standard error 1/sqrt(2N) ≈ 0.006, allow 4
    assert float(noise.std()) == pytest.approx(sigma * clip, rel=4 / math.sqrt(2 * noise.numel()))
    # client 3's draw does not depend on which other clients take part (its own generator)
    sub = make_round(module, [1, 3], index=7)
    dp.on_compress_uplink(trainer, module, sub)
    clean = make_round(module, [1, 3], index=7)
    DifferentialPrivacy(clip, noise_multiplier=0.0, noise="local", seed=2).on_compress_uplink(trainer, module, clean)
    got = torch.cat([(sub.uplink[k][1] - clean.uplink[k][1]).flatten() for k in x])
    torch.testing.assert_close(got, noise[7, 3], rtol=1e-12, atol=1e-12)


def test_adaptive_clipping_moves_the_clip_norm_towards_the_target_quantile() -> None:
    module = make_module(n=10)  # ‖Δ_i‖ ≈ 3: C = 0.1 clips everyone, C = 100 no one
    for start, direction in [(0.1, 1), (100.0, -1)]:
        dp = DifferentialPrivacy(start, noise_multiplier=0.0, target_quantile=0.5, clip_lr=0.2, count_noise=1.0)
        trainer = _set_up(module, dp=dp)
        for index in range(3):
            rnd = make_round(module, index=index)
            dp.on_compress_uplink(trainer, module, rnd)
            dp.on_mean(trainer, module, rnd)
            dp.on_round_end(trainer, module, rnd)
        # with σ = 0 no noise: b̃ = 0 (all clipped) or 1, so C moves by exp(±0.2 · 0.5) per round
        assert dp.clip_norm == pytest.approx(start * math.exp(direction * 0.1 * 3))
        assert "dp_unclipped" in rnd.messages_up and float(rnd.extra_bits_up) == 10, "one bit per client"


def test_adaptive_clipping_splits_the_noise_as_andrew_et_al() -> None:
    dp = DifferentialPrivacy(1.0, noise_multiplier=1.0, target_quantile=0.5, count_noise=2.0)
    _set_up(make_module(n=10), dp=dp)
    # σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−1/2) = (1 − 1/16)^(−1/2)
    assert dp.update_noise == pytest.approx((1 - 1 / 16) ** -0.5)
    with pytest.raises(ValueError, match="count_noise"):
        _set_up(make_module(n=10), dp=DifferentialPrivacy(1.0, 1.0, target_quantile=0.5, count_noise=0.4))


@pytest.mark.parametrize(
    ("others", "match"),
    [
        ([Scaffold()], "Scaffold: its extra uplink messages"),
        ([NormalizedAveraging()], "NormalizedAveraging"),
    ],
)
def test_callbacks_with_unclipped_extra_messages_are_refused(others, match) -> None:
    with pytest.raises(ValueError, match=match):
        _set_up(make_module(), *others, dp=DifferentialPrivacy(1.0, 1.0))


def test_a_compressor_after_the_clip_is_refused_and_one_before_it_is_not() -> None:
    module = make_module()
    dp = DifferentialPrivacy(1.0, 1.0)
    trainer = stand_in_trainer([dp, Compression("uplink", "quantize")])
    with pytest.raises(ValueError, match="Compression changes the uplink after it"):
        dp.setup(trainer, module, "fit")
    DifferentialPrivacy(1.0, 1.0).setup(stand_in_trainer([Compression("uplink", "quantize"), dp]), module, "fit")
    DifferentialPrivacy(1.0, 1.0).setup(stand_in_trainer([dp, Compression("downlink", "quantize")]), module, "fit")
    # local noise: compressing the noisy report is post-processing
    local = DifferentialPrivacy(1.0, 1.0, noise="local")
    local.setup(stand_in_trainer([local, Compression("uplink", "quantize")]), module, "fit")


def test_an_unknown_extra_uplink_message_is_refused_at_the_round() -> None:
    module = make_module()
    dp = DifferentialPrivacy(1.0, 1.0)
    trainer = _set_up(module, dp=dp)
    rnd = make_round(module)
    rnd.send_up("secret", {k: v for k, v in rnd.uplink.items()})
    dp.on_compress_uplink(trainer, module, rnd)
    with pytest.raises(ValueError, match=r"\['secret'\] are neither clipped nor noised"):
        dp.on_mean(trainer, module, rnd)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clip_norm": 0.0, "noise_multiplier": 1.0}, "clip_norm must be > 0"),
        ({"clip_norm": 1.0, "noise_multiplier": -1.0}, "noise_multiplier must be >= 0"),
        ({"clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1.0}, "delta must lie in"),
        ({"clip_norm": 1.0, "noise_multiplier": 1.0, "accountant": "gdp"}, "accountant must be one of"),
        ({"clip_norm": 1.0, "noise_multiplier": 1.0, "noise": "server"}, "noise must be one of"),
        ({"clip_norm": 1.0, "noise_multiplier": 1.0, "target_quantile": 1.5}, "target_quantile must lie in"),
        ({"clip_norm": 1.0, "noise_multiplier": 1.0, "target_quantile": 0.5, "noise": "local"},
         "needs noise='central'"),
    ],
)
def test_invalid_arguments_name_the_parameter(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        DifferentialPrivacy(**kwargs)


def test_pld_with_a_fixed_size_cohort_is_refused() -> None:
    dp = DifferentialPrivacy(1.0, 1.0, accountant="pld")
    with pytest.raises(ValueError, match="pld accountant does not analyse fixed-size cohorts"):
        _set_up(make_module(), ClientSampling(2, seed=0), dp=dp)
