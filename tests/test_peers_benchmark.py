"""The peers benchmark (``benchmarks/peers/``): the fl-lightning implementation reports the fields the runner reads
and passes its own work check, and the runner skips a peer whose installation fails, saying why. No peer is
installed and nothing is timed here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PEERS_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "peers"
FIELDS = {"steps", "rounds", "seconds", "startup_s", "peak_rss_mb", "loss_first", "loss_last"}


@pytest.fixture(scope="module")
def runner():
    sys.path.insert(0, str(PEERS_DIR))
    import run

    yield run
    sys.path.remove(str(PEERS_DIR))


def test_fl_lightning_implementation_prints_one_result_line_that_passes_the_work_check(runner) -> None:
    res = runner.measure(Path(sys.executable), "fl_lightning", "flute1000", rounds=2, threads=1, timeout=300)
    assert res["ok"], res.get("error")
    assert set(res) >= FIELDS
    assert res["rounds"] == 2 and res["steps"] == 2 * 10 * 10  # 2 rounds × 10 clients × 10 local steps
    assert res["wall_s"] > 0 and res["peak_rss_mb"] > 0
    assert runner.work_check(res) is None


def test_work_check_names_what_was_not_done(runner) -> None:
    res = {"workload": {"name": "lr100"}, "rounds": 2, "rounds_asked": 3, "steps": 2000, "loss_first": 4.0,
           "loss_last": 3.0}
    assert "2 rounds counted, 3 asked" in runner.work_check(res)
    res.update(rounds=3, steps=3000, loss_last=4.5)
    assert "loss did not fall" in runner.work_check(res)


def test_steady_state_rate_cancels_the_start_up(runner) -> None:
    # 10 s of start-up, then 1,000 client-steps per second: the pair recovers both
    run = {"workload": {"name": "lr100"}, "loss_first": 4.0, "loss_last": 3.0, "peak_rss_mb": 1.0,
           "load_average": (1.0, 1.0, 1.0)}
    short = {**run, "steps": 2000, "rounds": 2, "rounds_asked": 2, "wall_s": 12.0, "seconds": 2.5}
    long = {**run, "steps": 6000, "rounds": 6, "rounds_asked": 6, "wall_s": 16.0, "seconds": 6.5}
    got = runner.pair(short, long)
    assert got["rate"] == pytest.approx(1000.0) and got["startup_s"] == pytest.approx(10.0)
    assert got["check"] == "ok"


def test_runner_skips_a_peer_whose_install_fails_and_says_why(runner, tmp_path, monkeypatch, capsys) -> None:
    def failing_install(peer: str, venv_dir: Path) -> tuple[None, str]:
        return None, f"pip install {peer} failed: no matching distribution"

    measured: list[str] = []

    def fake_measure(python, peer, workload, rounds, threads, timeout):
        measured.append(peer)
        return {"ok": False, "error": "not measured in this test", "load_average": (0.0, 0.0, 0.0)}

    monkeypatch.setattr(runner, "measure", fake_measure)
    out = tmp_path / "peers.json"
    result = runner.main(["--workloads", "lr100", "--peers", "flwr,fl_lightning", "--repeats", "1",
                          "--out", str(out)], installer=failing_install)
    flwr = next(r for r in result["rows"] if r["framework"] == "flwr")
    assert flwr["ok"] is False and "no matching distribution" in flwr["skipped"]
    assert measured == ["fl_lightning", "fl_lightning"]  # the skipped peer never runs
    assert "skipped: pip install flwr failed" in capsys.readouterr().out
    assert json.loads(out.read_text())["rows"][0]["skipped"] == flwr["skipped"]


def test_install_peer_reports_a_failing_pip(runner, tmp_path, monkeypatch) -> None:
    def fake_run(cmd, timeout):
        failed = "install" in cmd and "pfl" in cmd
        return subprocess.CompletedProcess(cmd, 1 if failed else 0, "", "ERROR: No matching distribution" if failed
                                           else "")

    monkeypatch.setattr(runner, "_run", fake_run)
    python, reason = runner.install_peer("pfl", tmp_path)
    assert python is None and "pip install pfl failed" in reason and "No matching distribution" in reason


def test_roofline_counts_the_workloads_flops_and_bytes(runner) -> None:
    import roofline

    cost = roofline.step_cost(runner.WORKLOADS["lr100"])
    # 100 clients × (784 + 1) × 62 weights, 100 × 32 × 784 inputs, fp32
    weights, batch = 100 * 785 * 62, 100 * 32 * 784
    assert cost["flops"] == 4 * 100 * 32 * 784 * 62
    assert cost["bytes_fused"] == 4 * (3 * weights + 2 * batch)
    assert cost["bytes_unfused"] == 4 * (5 * weights + 2 * batch)
    peaks = {"peak_flops": 1e11, "bytes_per_s": {str(2**20): 4e10, str(2**26): 1e10}, "peak_bytes_per_s": 1e10}
    seconds, bound = roofline.roofline_s(cost, peaks)
    assert bound == "memory" and seconds == pytest.approx(cost["bytes_fused"] / 1e10)  # the 64 MiB bucket


def test_roofline_fraction_of_a_measured_rate(runner, monkeypatch) -> None:
    import bench_clients
    import roofline

    peaks = {"peak_flops": 1e11, "bytes_per_s": {str(2**26): 1e10}, "peak_bytes_per_s": 1e10}
    monkeypatch.setattr(bench_clients, "measure_peaks", lambda threads, device: peaks)
    results = {"rows": [{"workload": "lr100", "framework": "fl_lightning", "ok": True, "client_steps_per_s": 5000.0},
                        {"workload": "lr100", "framework": "pfl", "ok": False}]}
    out = roofline.analyse(results, floors=False)
    wl = out["workloads"]["lr100"]
    (row,) = wl["rows"]  # the failed peer has no row
    assert row["step_ms"] == pytest.approx(20.0)  # 100 clients at 5,000 client-steps/s
    assert row["roofline_fraction"] == pytest.approx(wl["roofline_ms"] / 20.0)
    assert "| lr100 | fl_lightning | 20.00 | 5,000 |" in roofline.markdown(out)


def test_ab_pairs_interleave_and_report_the_median_speedup(runner, monkeypatch, tmp_path) -> None:
    import ab

    calls: list[tuple[str, str | None]] = []
    rates = {None: iter([300.0, 100.0, 200.0]), "--in-place": iter([50.0, 100.0, 75.0])}

    def fake(workload: str, rounds: int, flag: str | None, threads: int) -> dict:
        calls.append((workload, flag))
        return {"rate": next(rates[flag]), "loss_first": 2.0, "loss_last": 1.5, "peak_rss_mb": 1.0,
                "load_average": 0.0}

    monkeypatch.setattr(ab, "measure", fake)
    out = ab.main(["--repeats", "3", "--workloads", "flute1000", "--out", str(tmp_path / "ab.json")])
    assert [f for _, f in calls] == [None, "--in-place", "--in-place", None, None, "--in-place"]  # interleaved
    (row,) = out["rows"]
    assert row["client_steps_per_s_on"] == 200.0 and row["client_steps_per_s_off"] == 75.0  # medians
    assert row["speedup"] == pytest.approx(200 / 75) and row["same_final_loss_4_digits"]
    assert "| flute1000 | cohort workspace (`--in-place` turns it off) | 200 | 75 | 2.67× | yes |" in out["table"]
    assert json.loads((tmp_path / "ab.json").read_text())["rows"][0]["workload"] == "flute1000"
