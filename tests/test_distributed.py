"""Scale-out (issue 8, DESIGN §2.5): ``strategy="federated_ddp"`` spreads the clients over processes.

Two processes (CPU, gloo, launched with ``torchrun`` since Lightning's own launcher re-executes
``sys.argv``, which is pytest here) and one process, with the same seed and config, must give the same global
model; a two-process checkpoint holds all n clients and resumes on two processes to the uninterrupted run,
and on another number of processes too. 5 clients on 2 ranks (3 + 2): n need not divide the world size.

All two-process runs share one ``torchrun`` launch (``tests/distributed/fl_run.py``, which documents the runs);
the one-process references run in this process. The models are float64, so that the different summation
order of the all-reduce (two partial sums instead of one) cannot flip a TopK tie; one float32 run checks the
tolerance with single precision.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed as dist

from fl_lightning.strategy import FederatedDDPStrategy, client_shard, shard_bounds
from tests.distributed import fl_run

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")

SCRIPT = Path(fl_run.__file__)
STEPS, CKPT_STEP = 24, 9  # the schedule (p=0.3, seed 11) ends rounds at steps 7, 11, 13, ...: step 9 is mid-round
RTOL = 1e-5
PROXSKIP = {"preset": "proxskip", "momentum": 0.5}  # momentum: checkpoints carry per-client optimizer state
LAUNCH_TIMEOUT_S = 300


def two_process_runs(single: Path, two: Path) -> list[dict[str, Any]]:
    base = {"steps": STEPS, "out": str(two)}
    return [
        {**base, **PROXSKIP, "name": "proxskip", "ckpt_every": CKPT_STEP, "log": True},
        {**base, **PROXSKIP, "name": "proxskip_resumed",
         "resume": str(two / "proxskip_ckpt" / f"step={CKPT_STEP}.ckpt")},
        {**base, **PROXSKIP, "name": "proxskip_from_one",
         "resume": str(single / "proxskip_ckpt" / f"step={CKPT_STEP}.ckpt")},
        {**base, "name": "sparse_proxskip", "preset": "sparse_proxskip"},
        {**base, **PROXSKIP, "name": "proxskip_float32", "dtype": "float32"},
        {**base, **PROXSKIP, "name": "proxskip_num_clients_at_init", "num_clients_at_init": True},
        {**base, "name": "fedavg_cohort", "preset": "fedavg_cohort", "momentum": 0.5},
        {**base, **PROXSKIP, "name": "seed_mismatch", "seed_offset_per_rank": 1},
    ]


def launch(spec_file: Path, nproc: int = 2) -> None:
    """``torchrun --standalone`` (a free rendezvous port) in its own session, killed as a whole on timeout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(SCRIPT), str(spec_file)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=Path(__file__).parents[1])
    try:
        output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish within {LAUNCH_TIMEOUT_S} s:\n{output[-6000:]}")
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed with status {proc.returncode}:\n{output[-6000:]}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scale_out")
    single, two = root / "one", root / "two"
    single.mkdir()
    two.mkdir()
    fl_run.quiet_irrelevant_warnings()
    base = {"steps": STEPS, "out": str(single)}
    for spec in [
        {**base, **PROXSKIP, "name": "proxskip", "ckpt_every": CKPT_STEP, "log": True},
        {**base, "name": "sparse_proxskip", "preset": "sparse_proxskip"},
        {**base, **PROXSKIP, "name": "proxskip_float32", "dtype": "float32"},
        {**base, "name": "fedavg_cohort", "preset": "fedavg_cohort", "momentum": 0.5},
    ]:
        fl_run.run(spec)
    spec_file = root / "spec.json"
    spec_file.write_text(json.dumps(two_process_runs(single, two)))
    launch(spec_file)
    # a two-process checkpoint, resumed on one process (here)
    fl_run.run({**base, **PROXSKIP, "name": "proxskip_from_two",
                "resume": str(two / "proxskip_ckpt" / f"step={CKPT_STEP}.ckpt")})
    return {"one": single, "two": two}


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=False, map_location="cpu")


def relative_differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    assert a.keys() == b.keys()
    out = {}
    for k in a:
        x, y = a[k].double(), b[k].double()
        assert x.shape == y.shape, f"{k}: {tuple(x.shape)} vs {tuple(y.shape)}"
        out[k] = float((x - y).norm() / y.norm()) if y.norm() > 0 else float(x.norm())
    return out


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str = "") -> None:
    a = {k: v for k, v in a.items() if k.startswith(prefix)}
    b = {k: v for k, v in b.items() if k.startswith(prefix)}
    assert a, f"no tensors under {prefix!r}"
    bad = {k: d for k, d in relative_differences(a, b).items() if not d < RTOL}
    assert not bad, f"relative differences >= {RTOL}: {bad}"


# ------------------------------------------------------------------ the strategy itself (no processes)
@pytest.mark.parametrize("n, world", [(5, 2), (4, 2), (7, 3), (3, 3), (10, 1), (11, 4)])
def test_clients_are_sharded_into_contiguous_blocks_differing_by_at_most_one(n: int, world: int) -> None:
    bounds = shard_bounds(n, world)
    ids = [client_shard(n, rank, world) for rank in range(world)]
    assert [i for block in ids for i in block] == list(range(n))  # contiguous, in rank order, every client exactly once
    sizes = [len(block) for block in ids]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert sizes == sorted(sizes, reverse=True)  # the larger blocks come first
    assert [(b[0], b[-1] + 1) for b in ids] == bounds


def test_fewer_clients_than_processes_is_an_error_that_names_the_fix() -> None:
    with pytest.raises(ValueError, match="at most 3 processes"):
        shard_bounds(3, 4)


def test_federated_ddp_is_a_registered_strategy_that_refuses_ddp_wrapper_options() -> None:
    trainer = L.Trainer(strategy="federated_ddp", accelerator="cpu", devices=2, logger=False)
    assert isinstance(trainer.strategy, FederatedDDPStrategy)
    assert trainer.strategy.world_size == 2
    with pytest.raises(ValueError, match="find_unused_parameters"):
        FederatedDDPStrategy(find_unused_parameters=True)
    with pytest.raises(ValueError, match="popen"):
        FederatedDDPStrategy(start_method="spawn")


# ------------------------------------------------------------------ two processes against one
@pytest.mark.slow
@pytest.mark.parametrize("name", ["proxskip", "sparse_proxskip", "proxskip_float32"])
def test_two_processes_give_the_global_model_of_one_process(runs: dict[str, Path], name: str) -> None:
    one, two = load(runs["one"] / f"{name}.pt"), load(runs["two"] / f"{name}.pt")
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["local_clients"] == [0, 1, 2]  # rank 0's block of 5 clients on 2 ranks
    assert two["round_index"] == one["round_index"] >= 4, "the runs need several rounds"
    assert_close(two["state"], one["state"], "global_model.")
    # and every client's model, control variate (and TopK mask), gathered from both ranks
    assert_close(two["state"], one["state"], "clients.")
    assert torch.equal(two["state"]["comm.bits_up"], one["state"]["comm.bits_up"])
    assert torch.equal(two["state"]["comm.rounds"], one["state"]["comm.rounds"])


@pytest.mark.slow
def test_a_rank_without_participating_clients_steps_like_one_process(runs: dict[str, Path]) -> None:
    """FedAvg with one client per round: one rank is idle in every round; with momentum, its clients' optimizer
    state must still evolve as on one process (zero gradients, not a skipped step)."""
    one, two = load(runs["one"] / "fedavg_cohort.pt"), load(runs["two"] / "fedavg_cohort.pt")
    assert_close(two["state"], one["state"], "global_model.")
    assert_close(two["state"], one["state"], "clients.")
    for idx, values in one["optimizer"]["state"].items():
        assert_close(two["optimizer"]["state"][idx], values)


@pytest.mark.slow
def test_clients_allocated_before_the_ranks_are_known_are_resharded(runs: dict[str, Path]) -> None:
    """``FederatedLightningModule(num_clients=5)`` allocates all clients in the constructor."""
    two, one = load(runs["two"] / "proxskip_num_clients_at_init.pt"), load(runs["one"] / "proxskip.pt")
    assert two["local_clients"] == [0, 1, 2]
    assert_close(two["state"], one["state"], "global_model.")


@pytest.mark.slow
def test_metrics_are_logged_once_with_the_values_of_one_process(runs: dict[str, Path]) -> None:
    logs = sorted((runs["two"] / "proxskip").iterdir())
    assert [p.name for p in logs] == ["version_0"], "one logger directory: only rank 0 writes"

    def rows(root: Path) -> list[dict[str, str]]:
        with open(root / "proxskip" / "version_0" / "metrics.csv") as f:
            return list(csv.DictReader(f))

    one, two = rows(runs["one"]), rows(runs["two"])
    assert len(one) == len(two) and one[0].keys() == two[0].keys()
    assert any(r["val/loss"] for r in two) and any(r["cv/sum_norm"] for r in two)
    for a, b in zip(one, two):
        for key in a:
            if a[key] != b[key]:
                assert abs(float(a[key]) - float(b[key])) <= RTOL * max(1.0, abs(float(a[key]))), key


@pytest.mark.slow
def test_validate_on_two_processes_reports_the_metrics_of_one_process(runs: dict[str, Path]) -> None:
    one, two = load(runs["one"] / "proxskip.pt")["validate"], load(runs["two"] / "proxskip.pt")["validate"]
    assert one.keys() == two.keys() and "val/loss" in one
    for key in one:
        assert two[key] == pytest.approx(one[key], rel=RTOL), key


@pytest.mark.slow
def test_ranks_that_disagree_on_a_seed_fail_instead_of_hanging(runs: dict[str, Path]) -> None:
    message = (runs["two"] / "seed_mismatch.err").read_text()
    assert "disagree" in message and "seed of SkipSchedule" in message


# ------------------------------------------------------------------ checkpoints
@pytest.mark.slow
def test_a_two_process_checkpoint_holds_all_clients(runs: dict[str, Path]) -> None:
    ckpt = load(runs["two"] / "proxskip_ckpt" / f"step={CKPT_STEP}.ckpt")
    single = load(runs["one"] / "proxskip_ckpt" / f"step={CKPT_STEP}.ckpt")
    assert ckpt["state_dict"].keys() == single["state_dict"].keys()
    clients = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("clients.")}
    assert clients and all(v.shape[0] == len(fl_run.SIZES) for v in clients.values())
    assert_close(ckpt["state_dict"], single["state_dict"], "clients.")
    assert ckpt["global_step"] == single["global_step"] == CKPT_STEP
    assert ckpt["federated"]["round_open"], "a checkpoint in the middle of a round"
    momentum = [s["momentum_buffer"] for s in ckpt["optimizer_states"][0]["state"].values()]
    assert momentum and all(m.shape[0] == len(fl_run.SIZES) for m in momentum)
    for idx, values in single["optimizer_states"][0]["state"].items():
        assert_close(ckpt["optimizer_states"][0]["state"][idx], values)


@pytest.mark.slow
def test_a_two_process_run_resumes_from_its_checkpoint_to_the_uninterrupted_run(runs: dict[str, Path]) -> None:
    full, resumed = load(runs["two"] / "proxskip.pt"), load(runs["two"] / "proxskip_resumed.pt")
    assert resumed["global_step"] == full["global_step"] == STEPS
    assert resumed["round_index"] == full["round_index"]
    for key, value in full["state"].items():  # same ranks, same reduction order: bit-identical
        assert torch.equal(resumed["state"][key], value), key


@pytest.mark.slow
@pytest.mark.parametrize("direction", ["two_to_one", "one_to_two"])
def test_a_checkpoint_resumes_on_another_number_of_processes(runs: dict[str, Path], direction: str) -> None:
    resumed = load(runs["one"] / "proxskip_from_two.pt") if direction == "two_to_one" else (
        load(runs["two"] / "proxskip_from_one.pt"))
    reference = load(runs["one"] / "proxskip.pt")
    assert resumed["global_step"] == STEPS and resumed["round_index"] == reference["round_index"]
    assert_close(resumed["state"], reference["state"], "global_model.")
    assert_close(resumed["state"], reference["state"], "clients.")
    for idx, values in reference["optimizer"]["state"].items():
        assert_close(resumed["optimizer"]["state"][idx], values)
