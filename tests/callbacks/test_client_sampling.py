"""ClientSampling.on_round_start, alone, on a module with 10 clients: every round a cohort of ``cohort_size``
distinct ids, drawn without replacement by its own ``random.Random(seed)`` (documented), uniform over clients,
reproducible from the seed, and continued exactly after a state_dict round trip through a serialised form.
(Restoring an in-memory state_dict at any round is property-tested in test_resume.py.)"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from fl_lightning.callbacks import ClientSampling
from tests.callbacks.helpers import make_module, stand_in_trainer

N, C = 10, 3


def draw(sampler: ClientSampling, module, rounds: int, start: int = 0) -> list[tuple[int, ...]]:
    """The cohorts of ``rounds`` rounds, as the module sees them (``cohort.members``, sorted global ids)."""
    out = []
    for r in range(start, start + rounds):
        sampler.on_round_start(stand_in_trainer(), module, r)
        out.append(module.cohort.members)
    return out


@pytest.fixture
def module():
    return make_module(n=N, model=torch.nn.Linear(2, 1))


def test_each_round_draws_cohort_size_distinct_clients_and_renormalises_their_weights(module) -> None:
    sampler = ClientSampling(C, seed=0)
    sampler.setup(stand_in_trainer([sampler]), module, "fit")
    for r in range(50):
        sampler.on_round_start(stand_in_trainer(), module, r)
        cohort = module.cohort
        members = cohort.members
        assert len(members) == C and len(set(members)) == C and all(0 <= i < N for i in members)
        assert cohort.ids.tolist() == list(members) and cohort.rows.tolist() == list(members)
        # w_i / Σ_{j∈S} w_j with uniform w: 1/3 each (float64 division, exact to 1 ulp)
        torch.testing.assert_close(cohort.weights, torch.full((C,), 1.0 / C, dtype=torch.float64), rtol=1e-15, atol=0)
        assert math.isclose(cohort.share, C / N, rel_tol=1e-15)


def test_the_draws_are_random_sample_of_its_own_seeded_generator(module) -> None:
    """Reproducible from the seed alone: the same cohorts as ``random.Random(seed).sample(range(n), c)``,
    the same for two samplers with that seed, others for another seed; the global RNGs are not consumed."""
    expected_rng = random.Random(42)
    expected = [tuple(sorted(expected_rng.sample(range(N), C))) for _ in range(20)]
    random.seed(7)
    torch.manual_seed(7)
    assert draw(ClientSampling(C, seed=42), module, 20) == expected
    assert draw(ClientSampling(C, seed=42), module, 20) == expected
    assert random.random() == random.Random(7).random()  # the global Python RNG did not move
    assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(7)))  # nor torch's
    # another seed: 20 rounds of the same C(10, 3) = 120 cohorts by chance has probability 120^-20
    assert draw(ClientSampling(C, seed=43), module, 20) != expected


def test_every_client_is_drawn_with_frequency_cohort_size_over_n(module) -> None:
    """Over R = 3000 rounds client i is in the cohort Binomial(R, c/n) times: mean 900, sd √(R·0.3·0.7) ≈ 25.1.
    A 5-sd band is left with probability ≈ 6e-7 per client (normal approximation, accurate at R·p = 900); the
    seed is fixed, so the test is deterministic. A sampler that favours low ids or repeats a cohort fails it."""
    rounds = 3000
    counts = [0] * N
    for members in draw(ClientSampling(C, seed=1), module, rounds):
        for i in members:
            counts[i] += 1
    sd = math.sqrt(rounds * (C / N) * (1 - C / N))
    assert all(abs(c - rounds * C / N) <= 5 * sd for c in counts), counts


@pytest.mark.parametrize("serialise", ["json", "torch.save"])
def test_state_dict_through_a_checkpoint_format_continues_the_same_cohorts(module, serialise: str, tmp_path) -> None:
    """JSON turns the generator state's tuples into lists, ``torch.save`` pickles it: both restore exactly."""
    original = ClientSampling(C, seed=5)
    draw(original, module, 7)
    state = original.state_dict()
    if serialise == "json":
        state = json.loads(json.dumps(state))
    else:
        torch.save(state, tmp_path / "state.pt")
        state = torch.load(tmp_path / "state.pt", weights_only=False)
    restored = ClientSampling(C, seed=6)
    restored.load_state_dict(state)
    assert restored.seed == 5
    assert draw(restored, module, 15, start=7) == draw(original, module, 15, start=7)


def test_setup_derives_the_seed_from_torchs_initial_seed_and_keeps_a_given_one(module) -> None:
    def derived(torch_seed: int) -> tuple[int, list[tuple[int, ...]]]:
        torch.manual_seed(torch_seed)
        sampler = ClientSampling(C)
        sampler.setup(stand_in_trainer([sampler]), module, "fit")
        return sampler.seed, draw(sampler, module, 10)

    assert derived(3) == derived(3)
    assert derived(3)[0] != derived(4)[0]
    torch.manual_seed(3)
    given = ClientSampling(C, seed=11)
    given.setup(stand_in_trainer([given]), module, "fit")
    assert given.seed == 11 and draw(given, module, 10) == draw(ClientSampling(C, seed=11), module, 10)


def test_setup_rejects_a_cohort_larger_than_the_federation(module) -> None:
    with pytest.raises(ValueError, match=r"cohort_size \(11\) must be <= the number of clients \(10\)"):
        ClientSampling(N + 1, seed=0).setup(stand_in_trainer(), module, "fit")
    ClientSampling(N, seed=0).setup(stand_in_trainer(), module, "fit")  # everyone is a valid cohort
