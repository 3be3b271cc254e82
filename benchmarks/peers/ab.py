"""Paired A/B of fl-lightning's own options on the peers' workloads: the cohort's workspace and the fused SGD update.

    python benchmarks/peers/ab.py                       # both comparisons, 3 interleaved pairs, JSON to ab.json
    python benchmarks/peers/ab.py --repeats 5 --out /tmp/ab.json

Each measurement is a fresh ``fl_lightning_fedavg.py`` process; the figure is its training-only rate (client-steps
over the wall time of the training batches: start-up excluded by the script's clock), the median over the
interleaved repeats. ``flute1000`` (10 of 1,000 clients per round): the default (workspace) vs ``--in-place``;
``lr100`` (all 100 clients): the default (fused SGD update) vs ``--no-fused``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
#: workload -> (rounds, the option compared, its label)
PAIRS = {"flute1000": (60, "--in-place", "cohort workspace"), "lr100": (25, "--no-fused", "fused SGD update")}


def measure(workload: str, rounds: int, flag: str | None, threads: int) -> dict[str, Any]:
    cmd = [sys.executable, str(HERE / "fl_lightning_fedavg.py"), "--workload", workload, "--rounds", str(rounds),
           "--threads", str(threads), *([flag] if flag else [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr[-1500:]}")
    res = json.loads(line[len("RESULT "):])
    return {"rate": res["steps"] / res["seconds"], "loss_first": res["loss_first"], "loss_last": res["loss_last"],
            "peak_rss_mb": res["peak_rss_mb"], "load_average": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workloads", default=",".join(PAIRS))
    parser.add_argument("--out", type=Path, default=HERE / "ab.json")
    args = parser.parse_args(argv)
    rows = []
    for workload in [w for w in args.workloads.split(",") if w]:
        rounds, flag, label = PAIRS[workload]
        runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
        for rep in range(args.repeats):
            for side in (("on", "off") if rep % 2 == 0 else ("off", "on")):
                runs[side].append(measure(workload, rounds, None if side == "on" else flag, args.threads))
                print(f"# {workload} {label} {side}: {runs[side][-1]['rate']:,.0f} client-steps/s", file=sys.stderr)
        on = statistics.median(r["rate"] for r in runs["on"])
        off = statistics.median(r["rate"] for r in runs["off"])
        same_loss = len({round(r["loss_last"], 4) for r in runs["on"] + runs["off"]}) == 1
        rows.append({"workload": workload, "option": label, "flag_off": flag, "rounds": rounds,
                     "client_steps_per_s_on": on, "client_steps_per_s_off": off, "speedup": on / off,
                     "same_final_loss_4_digits": same_loss, "runs": runs})
    lines = ["| workload | option | with (default) | without | speed-up | final loss equal (4 digits) |",
             "|---|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['workload']} | {r['option']} (`{r['flag_off']}` turns it off) | "
                     f"{r['client_steps_per_s_on']:,.0f} | {r['client_steps_per_s_off']:,.0f} | {r['speedup']:.2f}× | "
                     f"{'yes' if r['same_final_loss_4_digits'] else 'no'} |")
    table = "\n".join(lines)
    print(table)
    result = {"meta": {"repeats": args.repeats, "threads": args.threads, "cores": os.cpu_count(),
                       "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, "table": table, "rows": rows}
    args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
