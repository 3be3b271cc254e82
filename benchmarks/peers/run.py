"""Head-to-head FedAvg benchmark: fl-lightning against Flower and pfl-research on the same workload.

    python benchmarks/peers/run.py                                    # all workloads and peers, JSON to results.json
    python benchmarks/peers/run.py --workloads lr100 --peers fl_lightning,pfl --repeats 1
    python benchmarks/peers/run.py --install-only                     # only create the peers' virtualenvs

Workloads (``workload.py``): ``lr100`` (100 clients, logistic regression 784→62, full participation) and
``flute1000`` (FLUTE's LR-MNIST shape: 1,000 clients, 784→10, 10 per round); FedAvg, 10 local SGD steps of
batch 32 per round, synthetic data drawn from one seed by every implementation (no downloads).

Peers are not dependencies of the project. The script installs each into its own virtualenv,
``<--venv-dir>/<peer>`` (default ``.peer-venvs/``, git-ignored): ``python -m venv``, then ``pip install
torch==<this torch>`` (the CPU build when this one is), then the peer with a constraints file pinning torch so
that pip cannot replace it with another build. By hand, the same is::

    echo torch==2.13.0 > /tmp/torch-pin.txt
    python -m venv .peer-venvs/flwr && .peer-venvs/flwr/bin/pip install torch==2.13.0
    .peer-venvs/flwr/bin/pip install -c /tmp/torch-pin.txt "flwr[simulation]"
    python -m venv .peer-venvs/pfl && .peer-venvs/pfl/bin/pip install torch==2.13.0
    .peer-venvs/pfl/bin/pip install -c /tmp/torch-pin.txt pfl

A peer that cannot be installed (no wheels for this Python, no network) is skipped: its rows say why.
fl-lightning runs in this interpreter's environment.

Method: every measurement is a fresh process (``<peer>_fedavg.py``, one ``RESULT {json}`` line). Each
(workload, framework) runs two lengths, R1 and R2 rounds, back to back; with T the process's wall time (spawn to
exit) and S its client-steps, the steady-state rate is (S2 − S1) / (T2 − T1), which cancels the start-up
(interpreter, imports, data, the framework's set-up, Ray's actors, the first round's warm-up), and the start-up is
T1 − S1 / rate. The passes (``--repeats``) are interleaved over the frameworks, so a slow phase of a shared
machine hits all of them; the table shows medians. Every run checks that it did the work: the rounds the framework
counted equal those asked for, the client-steps equal rounds × cohort × 10, and the central loss of the global
model fell. Threads: ``OMP_NUM_THREADS`` and ``torch.set_num_threads`` = ``--threads`` in every process; Flower
gets ``--threads`` Ray CPUs, one per ClientApp actor (one torch thread each).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from workload import WORKLOADS  # noqa: E402

PEERS = ("flwr", "pfl", "fl_lightning")
LABELS = {"flwr": "Flower", "pfl": "pfl-research", "fl_lightning": "fl-lightning"}
#: pip requirement of each installed peer, and the module that proves the install works
REQUIREMENTS = {"flwr": ("flwr[simulation]", "flwr.simulation"), "pfl": ("pfl", "pfl.algorithm")}
#: (R1, R2) rounds per workload and framework: R2 − R1 rounds take ~5–40 s, well above the start-up noise
ROUNDS: dict[str, dict[str, tuple[int, int]]] = {
    "lr100": {"fl_lightning": (4, 24), "pfl": (3, 18), "flwr": (2, 8)},
    "flute1000": {"fl_lightning": (10, 50), "pfl": (10, 210), "flwr": (5, 45)},
}

Installer = Callable[[str, Path], tuple[Path | None, str | None]]


# ----------------------------------------------------------------------------------------- installing peers
def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _tail(proc: subprocess.CompletedProcess[str], lines: int = 3) -> str:
    text = [ln for ln in (proc.stderr or proc.stdout or "").strip().splitlines() if "WARNING: Location" not in ln]
    return " | ".join(text[-lines:]) or f"exit {proc.returncode}"


def install_peer(peer: str, venv_dir: Path, timeout: float = 1800.0) -> tuple[Path | None, str | None]:
    """The Python of ``peer``'s virtualenv, created and installed when missing; ``(None, reason)`` when that fails.

    An existing virtualenv whose Python imports the peer is reused as it is."""
    import torch

    requirement, probe = REQUIREMENTS[peer]
    venv = venv_dir / peer
    python = venv / "bin" / "python"
    try:
        if python.exists() and _run([str(python), "-c", f"import {probe}"], 300).returncode == 0:
            return python, None
        step = _run([sys.executable, "-m", "venv", str(venv)], 300)
        if step.returncode != 0:
            return None, f"python -m venv failed: {_tail(step)}"
        torch_pin = f"torch=={torch.__version__.split('+')[0]}"
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints:
            constraints.write(torch_pin + "\n")
        pip = [str(python), "-m", "pip", "install", "-q"]
        step = _run([*pip, torch_pin], timeout)
        if step.returncode != 0:
            return None, f"pip install {torch_pin} failed: {_tail(step)}"
        step = _run([*pip, "-c", constraints.name, requirement], timeout)
        os.unlink(constraints.name)
        if step.returncode != 0:
            return None, f"pip install {requirement} failed: {_tail(step)}"
        step = _run([str(python), "-c", f"import {probe}"], 300)
        if step.returncode != 0:
            return None, f"installed, but `import {probe}` fails: {_tail(step)}"
    except (OSError, subprocess.TimeoutExpired) as err:
        return None, f"installing {requirement} failed: {type(err).__name__}: {err}"
    return python, None


def interpreters(peers: list[str], venv_dir: Path, installer: Installer = install_peer) -> dict[str, Any]:
    """``peer -> Path`` of the Python to run it with, or ``peer -> str``: why it is skipped."""
    out: dict[str, Any] = {}
    for peer in peers:
        if peer == "fl_lightning":
            out[peer] = Path(sys.executable)
            continue
        print(f"# installing {peer} into {venv_dir / peer} (reused when already there)", file=sys.stderr)
        python, reason = installer(peer, venv_dir)
        out[peer] = python if python is not None else reason
        if python is None:
            print(f"# skipping {peer}: {reason}", file=sys.stderr)
    return out


# ----------------------------------------------------------------------------------------- measuring
def measure(python: Path, peer: str, workload: str, rounds: int, threads: int, timeout: float) -> dict[str, Any]:
    """One fresh process of ``<peer>_fedavg.py``: its RESULT line plus ``wall_s`` (spawn to exit) and the load."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "FLWR_TELEMETRY_ENABLED": "0", "PYTHONWARNINGS": "ignore"}
    cmd = [str(python), str(HERE / f"{peer}_fedavg.py"), "--workload", workload, "--rounds", str(rounds),
           "--threads", str(threads)]
    load = os.getloadavg()
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timeout after {timeout:.0f} s", "load_average": load}
    wall = time.perf_counter() - start
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()][-3:]
        return {"ok": False, "error": f"exit {proc.returncode}: {' | '.join(tail)}", "load_average": load}
    return {"ok": True, **json.loads(lines[-1][len("RESULT "):]), "wall_s": wall, "rounds_asked": rounds,
            "load_average": load}


def work_check(res: dict[str, Any]) -> str | None:
    """None when the run did the work asked for; else what is wrong."""
    w = WORKLOADS[res["workload"]["name"]]
    if res["rounds"] != res["rounds_asked"]:
        return f"{res['rounds']} rounds counted, {res['rounds_asked']} asked"
    if res["steps"] != res["rounds"] * w.steps_per_round:
        return f"{res['steps']} client-steps, {res['rounds'] * w.steps_per_round} expected"
    if not res["loss_last"] < res["loss_first"]:
        return f"loss did not fall ({res['loss_first']:.4f} → {res['loss_last']:.4f})"
    return None


def pair(short: dict[str, Any], long: dict[str, Any]) -> dict[str, Any]:
    """Steady-state rate and start-up from one (R1, R2) pair of runs."""
    d_steps = long["steps"] - short["steps"]
    rate = d_steps / (long["wall_s"] - short["wall_s"])
    in_process = d_steps / (long["seconds"] - short["seconds"])
    checks = [c for c in (work_check(short), work_check(long)) if c]
    return {"rate": rate, "startup_s": short["wall_s"] - short["steps"] / rate, "rate_in_process": in_process,
            "peak_rss_mb": max(short["peak_rss_mb"], long["peak_rss_mb"]), "check": "; ".join(checks) or "ok",
            "loss_first": long["loss_first"], "loss_last": long["loss_last"], "load_average": [
                short["load_average"], long["load_average"]]}


def summarise(peer: str, workload: str, pairs: list[dict[str, Any]], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One table row: medians over the pairs, every pair's figures, and the versions the runs reported."""
    ok = [r for r in runs if r["ok"]]
    row: dict[str, Any] = {"framework": peer, "workload": workload}
    if not pairs:
        row.update(ok=False, error=next((r["error"] for r in runs if not r["ok"]), "not run"))
        return row
    checks = sorted({p["check"] for p in pairs})
    row.update(ok=True, client_steps_per_s=statistics.median(p["rate"] for p in pairs),
               startup_s=statistics.median(p["startup_s"] for p in pairs),
               client_steps_per_s_in_process=statistics.median(p["rate_in_process"] for p in pairs),
               peak_rss_mb=max(p["peak_rss_mb"] for p in pairs),
               check="ok" if checks == ["ok"] else "FAILED: " + "; ".join(c for c in checks if c != "ok"),
               loss_first=pairs[-1]["loss_first"], loss_last=pairs[-1]["loss_last"], pairs=pairs,
               version=ok[0]["version"], torch=ok[0].get("torch"),
               rounds=[r["rounds_asked"] for r in ok[:2]])
    return row


# ----------------------------------------------------------------------------------------- reporting
def _fmt(x: float | None, digits: int = 0) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def _ratio(x: float) -> str:
    return f"{x:.1f}×" if x >= 1 else f"{x:.2f}×"


def markdown_table(rows: list[dict[str, Any]], peers: list[str]) -> str:
    """framework, workload, client-steps/s, start-up, peak memory, the work check and the speed-up of each row
    over every other framework's row of the same workload (> 1: this row is faster)."""
    others = [p for p in peers]
    head = ("| framework | workload | client-steps / s | start-up s | peak MB | check | "
            + " | ".join(f"× {LABELS[p]}" for p in others) + " |")
    lines = [head, "|---|---|---:|---:|---:|---|" + "---:|" * len(others)]
    by = {(r["workload"], r["framework"]): r for r in rows}
    for r in rows:
        label = LABELS[r["framework"]] + (f" {r['version']}" if r.get("version") else "")
        if not r.get("ok"):
            why = r.get("skipped") or r.get("error", "failed")
            lines.append(f"| {label} | {r['workload']} | – | – | – | skipped: {why} |" + " – |" * len(others))
            continue
        ratios = []
        for p in others:
            o = by.get((r["workload"], p))
            ratios.append("–" if p == r["framework"] or not o or not o.get("ok")
                          else _ratio(r["client_steps_per_s"] / o["client_steps_per_s"]))
        lines.append(f"| {label} | {r['workload']} | {_fmt(r['client_steps_per_s'])} | {_fmt(r['startup_s'], 1)} | "
                     f"{_fmt(r['peak_rss_mb'])} | {r['check']} | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None, installer: Installer = install_peer) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="lr100,flute1000", help=f"comma list of {sorted(WORKLOADS)}")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"comma list of {PEERS}")
    parser.add_argument("--out", type=Path, default=HERE / "results.json", help="write the results as JSON here")
    parser.add_argument("--venv-dir", type=Path, default=ROOT / ".peer-venvs", help="the peers' virtualenvs")
    parser.add_argument("--threads", type=int, default=1, help="OMP / torch threads (Flower: Ray CPUs) per run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved (R1, R2) pairs per row (median)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the default run lengths R1 and R2")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    parser.add_argument("--install-only", action="store_true", help="create the virtualenvs and stop")
    args = parser.parse_args(argv)
    workloads = [w for w in args.workloads.split(",") if w]
    peers = [p for p in args.peers.split(",") if p]
    for w in workloads:
        if w not in WORKLOADS:
            parser.error(f"unknown workload {w!r}; choose from {sorted(WORKLOADS)}")
    for p in peers:
        if p not in PEERS:
            parser.error(f"unknown peer {p!r}; choose from {PEERS}")

    pythons = interpreters(peers, args.venv_dir, installer)
    if args.install_only:
        return {"interpreters": {p: str(v) for p, v in pythons.items()}}
    runnable = [p for p in peers if isinstance(pythons[p], Path)]
    lengths = {(w, p): tuple(max(1, round(args.scale * r)) for r in ROUNDS[w][p]) for w in workloads for p in peers}
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {(w, p): [] for w in workloads for p in peers}
    pairs: dict[tuple[str, str], list[dict[str, Any]]] = {(w, p): [] for w in workloads for p in peers}
    load_start = os.getloadavg()
    for rep in range(args.repeats):
        for w in workloads:
            order = runnable[rep % max(len(runnable), 1):] + runnable[:rep % max(len(runnable), 1)]
            for p in order:
                if runs[(w, p)] and not all(r["ok"] for r in runs[(w, p)][-2:]):
                    continue  # it failed: do not spend the time again
                short, long = (measure(pythons[p], p, w, r, args.threads, args.timeout) for r in lengths[(w, p)])
                runs[(w, p)] += [short, long]
                if short["ok"] and long["ok"]:
                    pairs[(w, p)].append(pair(short, long))
                    got = pairs[(w, p)][-1]
                    status = (f"{got['rate']:,.0f} client-steps/s, start-up {got['startup_s']:.1f} s, "
                              f"{got['check']}")
                else:
                    status = short.get("error") or long.get("error")
                print(f"# [{rep + 1}/{args.repeats}] {w} {p} R={lengths[(w, p)]}: {status} "
                      f"(load {short['load_average'][0]:.2f})", file=sys.stderr)

    rows = []
    for w in workloads:
        for p in peers:
            if not isinstance(pythons[p], Path):
                rows.append({"framework": p, "workload": w, "ok": False, "skipped": pythons[p]})
                continue
            rows.append({**summarise(p, w, pairs[(w, p)], runs[(w, p)]), "runs": runs[(w, p)]})
    table = markdown_table(rows, peers)
    loads = [r["load_average"][0] for rr in runs.values() for r in rr]
    print(table)
    if loads:
        print(f"\n1-min load average during the runs: {min(loads):.2f}–{max(loads):.2f} (median "
              f"{statistics.median(loads):.2f}) on {os.cpu_count()} cores; {args.threads} thread(s) per run; "
              f"median of {args.repeats} interleaved (R1, R2) pair(s).")
    import torch

    result = {"meta": {
        "command": " ".join(["python", *([str(Path(sys.argv[0]))] if argv is None else ["run.py"]),
                             *(sys.argv[1:] if argv is None else argv)]),
        "python": platform.python_version(), "torch": torch.__version__, "cores": os.cpu_count(),
        "threads": args.threads, "repeats": args.repeats, "rounds": {f"{w}/{p}": lengths[(w, p)] for w, p in lengths},
        "workloads": {w: vars(WORKLOADS[w]) for w in workloads}, "load_average_start": load_start,
        "load_average_end": os.getloadavg(), "load_average_runs": loads,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }, "table": table, "rows": rows}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
