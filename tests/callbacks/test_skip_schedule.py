"""SkipSchedule.step(), the coin θ_t of DESIGN §1.2, alone: the law of each mode, the dedicated generator, and its
state through the serialised forms a checkpoint uses. (The mean round length 1/p, same-seed reproducibility and an
in-memory state round trip at any step are property-tested in test_determinism.py and test_resume.py; this file
checks what those do not: per-step frequency and independence, the law of the round length beyond its mean,
fixed mode drawing nothing, the global RNGs left alone, serialised state, the seed derived at setup.)"""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest
import torch

from fl_lightning.callbacks import SkipSchedule

MODES = ["bernoulli", "fixed", "geometric"]


def coins(schedule: SkipSchedule, steps: int) -> list[bool]:
    return [schedule.step() for _ in range(steps)]


def lengths(flips: list[bool]) -> list[int]:
    """The lengths of the completed rounds of a coin sequence."""
    out, run = [], 0
    for flip in flips:
        run += 1
        if flip:
            out.append(run)
            run = 0
    return out


def test_fixed_mode_communicates_every_kth_step_and_draws_nothing() -> None:
    schedule = SkipSchedule(p=1 / 3, mode="fixed", seed=0)  # k = 1/p = 3 (a float within an ulp of 3)
    state = schedule.state_dict()["rng"]
    assert coins(schedule, 30) == [t % 3 == 2 for t in range(30)]
    assert schedule.k == 3 and schedule.p == 1 / 3
    assert schedule.state_dict()["rng"] == state  # no random number was drawn


@pytest.mark.parametrize("p", [0.4, 0.3, 0.9, 0.333, 0.15])
def test_fixed_mode_refuses_p_whose_inverse_is_not_an_integer(p: float) -> None:
    """k = round(1/p) would run another algorithm silently (p = 0.4 as p = 0.5); the message says which p work."""
    with pytest.raises(ValueError, match=r"SkipSchedule p=.* mode='fixed'.*1/p must be an integer.*"
                                         r"Use p = 1/k .*mode='bernoulli' / 'geometric'"):
        SkipSchedule(p=p, mode="fixed")
    for mode in ("bernoulli", "geometric"):  # the random schedules take any p in (0, 1]
        assert SkipSchedule(p=p, mode=mode).p == p


@pytest.mark.parametrize("k", [1, 2, 3, 7, 10, 20, 50, 100, 1000])
def test_fixed_mode_accepts_p_given_as_a_float_of_one_over_k(k: int) -> None:
    """1/k and its decimal spelling (0.1, 0.05, 0.001) are within a few ulps of 1/k, far inside the relative 1e-9;
    10 significant digits (0.3333333333 for k = 3) are within ~1e-10 of it."""
    for p in (1 / k, float(f"{1 / k:.10g}"), float(repr(1 / k))):
        schedule = SkipSchedule(p=p, mode="fixed")
        assert schedule.k == k and schedule.p == 1 / k
        assert coins(schedule, 3 * k) == [t % k == k - 1 for t in range(3 * k)]


@pytest.mark.parametrize("mode", MODES)
def test_p_one_communicates_after_every_step(mode: str) -> None:
    assert coins(SkipSchedule(p=1.0, mode=mode, seed=3), 50) == [True] * 50


def test_bernoulli_coins_are_the_seeded_generators_uniforms_below_p() -> None:
    """Documented: a dedicated ``random.Random(seed)``, one uniform per step, θ_t = [u_t < p]; the global Python and
    torch RNGs are not consumed."""
    random.seed(1)
    torch.manual_seed(1)
    flips = coins(SkipSchedule(p=0.3, seed=12), 500)
    rng = random.Random(12)
    assert flips == [rng.random() < 0.3 for _ in range(500)]
    assert random.random() == random.Random(1).random()
    assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.7])
def test_bernoulli_frequency_is_p_and_consecutive_coins_are_independent(p: float) -> None:
    """Over T = 40000 steps the number of communications is Binomial(T, p), sd √(T p (1−p)) (≤ 100); after a
    communication the next coin is again Bernoulli(p), over the ≈ pT steps that follow one. 5-sd bands: left with
    probability ≈ 6e-7 each (normal approximation, T·p ≥ 2000); fixed seed, so deterministic. A schedule that
    communicates every 1/p steps passes the first band but fails the second (P(θ | θ_prev = 1) = 0 for p < 1/2)."""
    steps = 40_000
    flips = coins(SkipSchedule(p=p, mode="bernoulli", seed=2), steps)
    hits = sum(flips)
    assert abs(hits - steps * p) <= 5 * math.sqrt(steps * p * (1 - p))
    after = [b for a, b in itertools.pairwise(flips) if a]
    assert abs(sum(after) - len(after) * p) <= 5 * math.sqrt(len(after) * p * (1 - p))


@pytest.mark.parametrize("mode", ["bernoulli", "geometric"])
def test_random_round_lengths_follow_the_geometric_law(mode: str) -> None:
    """P(L = 1) = p and P(L = 2) = p(1 − p): with R = 5000 rounds each frequency is Binomial(R, q) with
    q ∈ {0.25, 0.1875} at p = 1/4, sd ≤ 31; 5-sd bands (≈ 6e-7 each, fixed seed). A law shifted by one
    (lengths from 2) or the fixed k = 4 has P(L = 1) = 0."""
    p, rounds = 0.25, 5000
    schedule = SkipSchedule(p=p, mode=mode, seed=5)
    observed: list[int] = []
    while len(observed) < rounds:
        observed += lengths(coins(schedule, 1000))
    observed = observed[:rounds]
    for length, q in [(1, p), (2, p * (1 - p))]:
        count = sum(length_ == length for length_ in observed)
        assert abs(count - rounds * q) <= 5 * math.sqrt(rounds * q * (1 - q)), (length, count)


@pytest.mark.parametrize("serialise", ["json", "torch.save"])
@pytest.mark.parametrize("mode", MODES)
def test_state_through_a_checkpoint_format_resumes_the_same_coins_mid_round(mode: str, serialise: str,
                                                                           tmp_path) -> None:
    """JSON turns the generator state's tuples into lists; ``torch.save`` pickles it. Cut 2 steps into a round
    (so fixed/geometric must keep their position and the drawn length)."""
    flips = coins(SkipSchedule(p=0.2, mode=mode, seed=7), 200)
    # two steps after a communication (past step 50) that two silent steps follow
    cut = next(j for j in range(50, 197) if flips[j] and not flips[j + 1] and not flips[j + 2]) + 3
    original = SkipSchedule(p=0.2, mode=mode, seed=7)
    coins(original, cut)
    state = original.state_dict()
    assert state["steps_in_round"] == 2
    if serialise == "json":
        state = json.loads(json.dumps(state))
    else:
        torch.save(state, tmp_path / "state.pt")
        state = torch.load(tmp_path / "state.pt", weights_only=False)
    restored = SkipSchedule(p=0.2, mode=mode, seed=8)
    restored.load_state_dict(state)
    assert restored.seed == 7
    assert coins(restored, 300) == coins(original, 300)


def test_setup_derives_the_seed_from_torchs_initial_seed_and_keeps_a_given_one() -> None:
    def derived(torch_seed: int) -> tuple[int | None, list[bool]]:
        torch.manual_seed(torch_seed)
        schedule = SkipSchedule(p=0.3)
        schedule.setup(None, None, "fit")  # type: ignore[arg-type]
        return schedule.seed, coins(schedule, 100)

    assert derived(3) == derived(3)
    assert derived(3) != derived(4)  # another seed_everything: other coins (≈ 2^-88 chance of equal ones)
    torch.manual_seed(3)
    given = SkipSchedule(p=0.3, seed=11)
    given.setup(None, None, "fit")  # type: ignore[arg-type]
    assert given.seed == 11 and coins(given, 100) == coins(SkipSchedule(p=0.3, seed=11), 100)
