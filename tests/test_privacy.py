"""Client-level differential privacy (``DifferentialPrivacy``, ``dp_fedavg``): the issue's acceptance items.

- σ = 0 and a clip norm above every update: a DP run is the non-DP run bit for bit (FedAvg, a fixed cohort, ProxSkip,
  Sparse-ProxSkip);
- ε after R rounds is dp-accounting's own ε for the same (q, σ, R, δ), computed here from the library directly, for
  both accountants and every sampling; a run's logged ε too; ``target_epsilon`` stops training before it is exceeded;
- DP runs resume exactly from the middle of a round, and give the same model on one and two processes;
- ``train.py fit`` with ``configs/algorithms/dp_fedavg.yaml``, then ``validate`` from its checkpoint.

(The clip bound on the stacked tensors and the noise std: ``tests/callbacks/test_differential_privacy.py``.)
"""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from fl_lightning import FederatedDataModule, FederatedLightningModule
from fl_lightning import metric_keys as keys
from fl_lightning.algorithms import DPFedAvg, dp_fedavg, fedavg, proxskip, sparse_proxskip
from fl_lightning.callbacks import ClientSampling, DifferentialPrivacy
from fl_lightning.extras import MissingExtraError
from fl_lightning.privacy import PrivacyAccountant
from tests.conftest import LeastSquares, least_squares, make_trainer

dp = pytest.importorskip("dp_accounting")

D = 6
N = 8
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def problem() -> LeastSquares:
    return least_squares(n=N, d=D, m=12, kappa=10.0)


def _fit(problem: LeastSquares, callbacks=None, steps: int = 24, ckpt_path=None, weighting: str = "uniform",
         **kwargs) -> FederatedLightningModule:
    model = nn.Linear(D, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    dm = FederatedDataModule.from_client_tensors(problem.clients, batch_size=4, seed=0, client_weighting=weighting)
    module = FederatedLightningModule(model, lr=0.1, loss="mse")
    make_trainer(steps, callbacks, **kwargs).fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module


def _state(module: FederatedLightningModule) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if k.startswith(("global_model.", "clients."))}


def _assert_same(a: FederatedLightningModule, b: FederatedLightningModule) -> None:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert torch.equal(a.comm.bits_up, b.comm.bits_up) and torch.equal(a.comm.bits_down, b.comm.bits_down)


# ---------------------------------------------------------------------------------------------- σ = 0 is the run
NO_NOISE = {"clip_norm": 1e6, "noise_multiplier": 0.0}


@pytest.mark.filterwarnings("ignore:DifferentialPrivacy with ControlVariates")
@pytest.mark.parametrize(
    ("plain", "private"),
    [
        (lambda: fedavg(local_steps=3), lambda: dp_fedavg(local_steps=3, **NO_NOISE)),
        (lambda: fedavg(local_steps=3, cohort_size=3, seed=1),
         lambda: dp_fedavg(local_steps=3, cohort_size=3, sampling="fixed", seed=1, **NO_NOISE)),
        (lambda: proxskip(p=0.3, seed=2), lambda: [*proxskip(p=0.3, seed=2), DifferentialPrivacy(**NO_NOISE)]),
        (lambda: sparse_proxskip(p=0.3, density=0.5, seed=2),
         lambda: [*sparse_proxskip(p=0.3, density=0.5, seed=2), DifferentialPrivacy(**NO_NOISE)]),
    ],
    ids=["fedavg", "fedavg_fixed_cohort", "proxskip", "sparse_proxskip"],
)
def test_with_no_noise_and_a_clip_norm_above_every_update_dp_is_the_plain_run_bit_for_bit(problem, plain,
                                                                                       private) -> None:
    a, b = _fit(problem, plain()), _fit(problem, private())
    _assert_same(a, b)
    assert b.final_metrics[keys.EPSILON] == float("inf") and b.final_metrics[keys.CLIPPED_FRACTION] == 0.0


# ---------------------------------------------------------------------------------------------- accounting
def _library_epsilon(kind: str, sampling: str, n: int, m: int, sigma: float, rounds: int, delta: float,
                     noise: str = "central") -> float:
    """dp-accounting's ε, built from the library's own accountants and events (not through fl_lightning.privacy)."""
    if noise == "local":
        event, relation = dp.GaussianDpEvent(sigma / 2), dp.NeighboringRelation.ADD_OR_REMOVE_ONE
    elif sampling == "full":
        event, relation = dp.GaussianDpEvent(sigma), dp.NeighboringRelation.ADD_OR_REMOVE_ONE
    elif sampling == "poisson":
        event, relation = dp.PoissonSampledDpEvent(m / n, dp.GaussianDpEvent(sigma)), \
            dp.NeighboringRelation.ADD_OR_REMOVE_ONE
    else:  # replace-one: the clipped sum moves by up to 2C, so the library's noise multiplier is σC / 2C
        event = dp.SampledWithoutReplacementDpEvent(n, m, dp.GaussianDpEvent(sigma / 2))
        relation = dp.NeighboringRelation.REPLACE_ONE
    accountant = dp.rdp.RdpAccountant(neighboring_relation=relation) if kind == "rdp" else dp.pld.PLDAccountant(
        neighboring_relation=relation)
    accountant.compose(event, rounds)
    return accountant.get_epsilon(delta)


SETTINGS = [  # accountant, sampling, n, m, σ, R, δ
    ("rdp", "poisson", 100, 10, 1.1, 100, 1e-5),
    ("rdp", "poisson", 1000, 20, 0.8, 1000, 1e-6),
    ("rdp", "poisson", 10, 5, 2.0, 37, 1e-3),
    ("rdp", "full", 50, 50, 3.0, 40, 1e-5),
    ("rdp", "fixed", 100, 20, 1.5, 60, 1e-5),
    ("pld", "poisson", 100, 10, 1.1, 30, 1e-5),
    ("pld", "full", 50, 50, 3.0, 40, 1e-5),
]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(map(str, s)))
def test_epsilon_after_r_rounds_is_dp_accountings_own(setting) -> None:
    kind, sampling, n, m, sigma, rounds, delta = setting
    accountant = PrivacyAccountant(kind, sigma, delta, sampling=sampling, num_clients=n,
                                   cohort_size=None if sampling == "full" else m)
    expected = _library_epsilon(kind, sampling, n, m, sigma, rounds, delta)
    # RDP: the same R·(one round's RDP curve) and the same conversion, so equal to rounding; PLD: the same
    # privacy-loss distributions, composed in another order (the library's self_compose vs ours): ~1e-10 measured
    assert accountant.epsilon(rounds) == pytest.approx(expected, rel=1e-12 if kind == "rdp" else 1e-8)
    if kind == "pld" and sampling == "poisson":  # the round-by-round path too (ε(R − 1), then ε(R))
        fresh = PrivacyAccountant(kind, sigma, delta, sampling=sampling, num_clients=n, cohort_size=m)
        fresh.epsilon(rounds - 1)
        assert fresh.epsilon(rounds) == pytest.approx(expected, rel=1e-8)


def test_local_noise_is_accounted_per_report_without_amplification() -> None:
    accountant = PrivacyAccountant("rdp", 2.0, 1e-5, sampling="poisson", num_clients=100, cohort_size=10,
                                   noise="local")
    assert accountant.epsilon(20) == pytest.approx(_library_epsilon("rdp", "poisson", 100, 10, 2.0, 20, 1e-5,
                                                                    noise="local"), rel=1e-12)


@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_a_run_logs_the_epsilon_of_its_rounds(problem, kind: str) -> None:
    sigma, delta, m = 1.2, 1e-4, 3
    module = _fit(problem, dp_fedavg(local_steps=3, clip_norm=0.5, noise_multiplier=sigma, delta=delta,
                                     cohort_size=m, accountant=kind, seed=4), steps=15)
    rounds = int(module.final_metrics[keys.ROUNDS])
    assert rounds == 5
    assert module.final_metrics[keys.EPSILON] == pytest.approx(
        _library_epsilon(kind, "poisson", N, m, sigma, rounds, delta), rel=1e-12 if kind == "rdp" else 1e-8)


def test_training_stops_before_target_epsilon_is_exceeded(problem, caplog: pytest.LogCaptureFixture) -> None:
    sigma, delta, m, target = 1.5, 1e-5, 2, 4.0
    lightning_log = logging.getLogger("lightning.pytorch")  # does not propagate to caplog's root handler
    lightning_log.addHandler(caplog.handler)
    try:
        module = _fit(problem, dp_fedavg(local_steps=2, clip_norm=0.5, noise_multiplier=sigma, delta=delta,
                                         cohort_size=m, target_epsilon=target, seed=1), steps=2000)
    finally:
        lightning_log.removeHandler(caplog.handler)
    rounds = module.round_index
    assert rounds > 0 and module.global_step == 2 * rounds < 2000, "stopped early, at the end of a round"
    spent = module.final_metrics[keys.EPSILON]
    assert spent == pytest.approx(_library_epsilon("rdp", "poisson", N, m, sigma, rounds, delta), rel=1e-12)
    assert spent <= target < _library_epsilon("rdp", "poisson", N, m, sigma, rounds + 1, delta)
    [message] = [m for m in caplog.messages if "privacy budget spent" in m]
    assert f"after {rounds} rounds" in message and "training stops" in message


def test_a_budget_too_small_for_one_round_trains_nothing(problem) -> None:
    module = _fit(problem, dp_fedavg(local_steps=2, clip_norm=0.5, noise_multiplier=0.3, target_epsilon=0.01))
    assert module.global_step == 0 and module.round_index == 0


# ---------------------------------------------------------------------------------------------- refusals
def test_weighted_averaging_is_refused(problem) -> None:
    unequal = least_squares(n=4, d=D, m=12, kappa=10.0, sizes=[6, 9, 12, 15])
    with pytest.raises(ValueError, match="uniform client weights"):
        _fit(unequal, dp_fedavg(local_steps=2), weighting="num_samples")


def test_pld_with_a_fixed_cohort_is_refused_when_the_preset_is_made() -> None:
    with pytest.raises(ValueError, match="pld accountant does not analyse fixed-size cohorts"):
        DPFedAvg(cohort_size=3, sampling="fixed", accountant="pld")


def test_a_missing_privacy_extra_says_how_to_install_it(problem, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    real = importlib.import_module

    def fake(name: str, *args, **kwargs):
        if name == "dp_accounting":
            raise ImportError("No module named 'dp_accounting'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(MissingExtraError, match=r'\[privacy\].*pip install "fl-lightning\[privacy\]"'):
        _fit(problem, dp_fedavg(local_steps=2))


def test_the_core_does_not_import_dp_accounting() -> None:
    code = ("import sys, fl_lightning, fl_lightning.algorithms, fl_lightning.callbacks; "
            "fl_lightning.algorithms.dp_fedavg(); assert 'dp_accounting' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---------------------------------------------------------------------------------------------- resume
RESUMED = {
    "dp_fedavg_poisson": lambda: dp_fedavg(local_steps=3, cohort_size=3, clip_norm=0.3, noise_multiplier=0.9,
                                           seed=5),
    "proxskip_adaptive": lambda: [*proxskip(p=1 / 3, mode="fixed", seed=5),
                                  DifferentialPrivacy(0.3, 0.9, target_quantile=0.5, count_noise=1.0, seed=6)],
    "dp_fedavg_local": lambda: dp_fedavg(local_steps=3, clip_norm=0.3, noise_multiplier=0.9, noise="local", seed=5),
}


@pytest.mark.filterwarnings("ignore:.*ModelCheckpoint with manual optimization")
@pytest.mark.parametrize("name", RESUMED)
def test_a_dp_run_resumes_exactly_from_the_middle_of_a_round(problem, name: str, tmp_path: Path) -> None:
    whole = _fit(problem, RESUMED[name](), steps=14)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=7, save_top_k=-1)  # step 7: inside round 3
    _fit(problem, [*RESUMED[name](), ckpt], steps=7, enable_checkpointing=True)
    [path] = tmp_path.glob("*.ckpt")
    assert torch.load(path, weights_only=False)["federated"]["round_open"]
    resumed = _fit(problem, RESUMED[name](), steps=14, ckpt_path=str(path))
    _assert_same(resumed, whole)
    for key in (keys.EPSILON, keys.CLIP_NORM, keys.CLIPPED_FRACTION):
        assert resumed.final_metrics[key] == whole.final_metrics[key], key


# ---------------------------------------------------------------------------------------------- one process = two
@pytest.mark.slow
def test_dp_runs_give_the_same_model_on_one_and_two_processes(tmp_path: Path) -> None:
    from tests import test_distributed as scale_out
    from tests.distributed import fl_run

    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    fl_run.quiet_irrelevant_warnings()
    steps, ckpt_step = 24, 7  # 3 local steps per round: step 7 is inside a round
    runs = [{"steps": steps, "name": name, "preset": name} for name in ("dp_fedavg", "dp_proxskip", "dp_local")]
    for spec in runs:
        fl_run.run({**spec, "out": str(one)})
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps([
        *[{**spec, "out": str(two)} for spec in runs],
        {"steps": steps, "name": "dp_fedavg_ckpt", "preset": "dp_fedavg", "out": str(two), "ckpt_every": ckpt_step},
        {"steps": steps, "name": "dp_fedavg_resumed", "preset": "dp_fedavg", "out": str(two),
         "resume": str(two / "dp_fedavg_ckpt_ckpt" / f"step={ckpt_step}.ckpt")},
    ]))
    scale_out.launch(spec_file)
    for spec in runs:
        a, b = scale_out.load(one / f"{spec['name']}.pt"), scale_out.load(two / f"{spec['name']}.pt")
        assert b["world_size"] == 2 and a["world_size"] == 1
        scale_out.assert_same_run(b, a)  # float64: 1e-12 relative (summation order), the same rounds and bits
        ranks = scale_out.per_rank(two, spec["name"])
        assert ranks[0]["callback_metrics"] == ranks[1]["callback_metrics"], "the same ε and noise on every rank"
    full, resumed = scale_out.load(two / "dp_fedavg_ckpt.pt"), scale_out.load(two / "dp_fedavg_resumed.pt")
    assert (resumed["first_step"], resumed["steps_run"]) == (ckpt_step, steps - ckpt_step), "a resumed fit"
    for key, value in full["state"].items():  # same ranks, same order: bit for bit
        assert torch.equal(resumed["state"][key], value), key


# ---------------------------------------------------------------------------------------------- the command line
def test_train_py_fits_with_the_dp_config_then_validates_from_its_checkpoint(tmp_path: Path) -> None:
    from fl_lightning.dashboard import privacy_panels

    configs = ["--config", str(ROOT / "configs" / "quickstart.yaml"),
               "--config", str(ROOT / "configs" / "algorithms" / "dp_fedavg.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def train(*args: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    fit = train("fit", *configs, "--trainer.max_steps", "40", "--data.steps_per_epoch", "20",
                "--trainer.enable_progress_bar", "false")
    assert "privacy/epsilon" in fit.stdout + fit.stderr, "the run summary reports ε"
    [log] = (tmp_path / "logs" / "quickstart").glob("version_*/metrics.csv")
    with log.open() as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    assert {k for p in privacy_panels() for k in (p.x, *p.y)} <= columns, "the dashboard's privacy panels"
    last = [r for r in rows if r.get(keys.EPSILON)][-1]
    rounds = int(float(last[keys.ROUNDS]))
    assert rounds == 8  # 40 steps / 5 local steps
    assert float(last[keys.EPSILON]) == pytest.approx(
        _library_epsilon("rdp", "poisson", 10, 5, 1.0, rounds, 1e-5), rel=1e-6)  # CSV: 6 significant digits
    validate = train("validate", *configs, "--ckpt_path", "last")
    assert "val/acc" in validate.stdout + validate.stderr


def test_poisson_sampling_draws_each_client_with_probability_q() -> None:
    sampler = ClientSampling(3, seed=0, mode="poisson")
    n, rounds = 12, 4000
    counts = torch.zeros(n)
    sizes = []
    for _ in range(rounds):
        drawn = sampler.draw(n)
        counts[drawn] += 1
        sizes.append(len(drawn))
    q = 3 / n
    # each count is Binomial(4000, 0.25): std sqrt(4000·0.25·0.75) ≈ 27, allow 4 of them
    assert bool(((counts - rounds * q).abs() < 4 * (rounds * q * (1 - q)) ** 0.5).all()), counts
    assert 0 in sizes, "a Poisson cohort can be empty"
