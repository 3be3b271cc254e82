"""The roofline of the peers' FedAvg workload, and how close each implementation gets to it.

    python benchmarks/peers/roofline.py                                   # reads benchmarks/peers/results.json
    python benchmarks/peers/roofline.py --merge-into benchmarks/results-cpu.json

One local step of a cohort of c clients, multinomial logistic regression F → O with bias (P = (F + 1)·O weights
per client), batch B, fp32:

- FLOPs: 2·c·B·F·O for the forward (logits) + the same for the weight gradient (the input needs none);
- bytes, at the least (every tensor streamed once, nothing re-read, no gradient tensor): the forward reads W (c·P)
  and the minibatch X (c·B·F); the backward, fused into the update, reads X and W and writes W: 3·c·P + 2·c·B·F
  floats. With the weight gradient materialised (autograd's ``.grad``, then x ← x − γg) it is 5·c·P + 2·c·B·F.

The roofline time is max(FLOPs / matmul peak, bytes / copy bandwidth for the step's working set), both measured
here (``bench_clients.measure_peaks``, one thread); "% of roofline" = roofline time / measured time per step.
Two floors written in plain PyTorch run the same step (the minibatch gathered with ``index_select``, the same
kernels: ``baddbmm`` forward, softmax cross-entropy) to show what this machine's kernels allow:

- ``torch autograd``: forward, ``loss.backward()``, ``W -= γ·W.grad`` — what a framework on autograd can reach;
- ``torch fused``: no autograd; the logits' gradient in closed form (softmax − one-hot)/B and the update as one
  ``W.baddbmm_(δ, X, alpha=−γ)`` — no gradient tensor, the least memory traffic.

The frameworks' rates (client-steps/s) come from ``run.py``'s JSON; the step time is cohort / rate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from workload import WORKLOADS, Workload  # noqa: E402


def step_cost(w: Workload) -> dict[str, float]:
    """FLOPs and bytes of one local step of the cohort (module docstring)."""
    c, f, o, b = w.clients_per_round, w.features, w.classes, w.batch_size
    weights = c * (f + 1) * o
    batch = c * b * f
    return {"flops": 2.0 * 2 * c * b * f * o, "bytes_fused": 4.0 * (3 * weights + 2 * batch),
            "bytes_unfused": 4.0 * (5 * weights + 2 * batch), "working_set": 4.0 * (weights + batch)}


def roofline_s(cost: dict[str, float], peaks: dict[str, Any], key: str = "bytes_fused") -> tuple[float, str]:
    """The roofline time of one step and its bound (``compute`` or ``memory``)."""
    from bench_clients import bandwidth_for

    compute = cost["flops"] / peaks["peak_flops"]
    memory = cost[key] / bandwidth_for(peaks, cost["working_set"])
    return (compute, "compute") if compute >= memory else (memory, "memory")


def floor_steps(w: Workload, steps: int = 40, repeats: int = 3, seed: int = 0) -> dict[str, float]:
    """Seconds per local step of the two plain-PyTorch floors (module docstring), best of ``repeats``."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    c, b, f, o, m = w.clients_per_round, w.batch_size, w.features, w.classes, w.samples_per_client
    data = torch.randn(c * m, f, generator=g)
    labels = torch.randint(0, o, (c * m,), generator=g)
    weight = (0.01 * torch.randn(c, o, f, generator=g)).requires_grad_()
    bias = torch.zeros(c, o, 1, requires_grad=True)
    offsets = (torch.arange(c) * m).repeat_interleave(b)
    lr = w.lr

    def batch() -> tuple[Any, Any]:
        i = offsets + torch.randint(0, m, (c * b,), generator=g)
        return data.index_select(0, i).view(c, b, f), labels.index_select(0, i)

    def autograd() -> None:
        x, y = batch()
        z = torch.baddbmm(bias, weight, x.transpose(1, 2))  # [c, O, B]
        loss = F.cross_entropy(z.transpose(1, 2).reshape(c * b, o), y, reduction="none").view(c, b).mean(1).sum()
        weight.grad = bias.grad = None
        loss.backward()
        with torch.no_grad():
            weight.add_(weight.grad, alpha=-lr)
            bias.add_(bias.grad, alpha=-lr)

    def fused() -> None:
        with torch.no_grad():
            x, y = batch()
            delta = torch.softmax(torch.baddbmm(bias, weight, x.transpose(1, 2)), dim=1)  # ∂f_i/∂z = (p − e_y)/B
            delta.scatter_add_(1, y.view(c, 1, b), torch.full((c, 1, b), -1.0))
            delta.div_(b)
            weight.baddbmm_(delta, x, alpha=-lr)
            bias.add_(delta.sum(2, keepdim=True), alpha=-lr)

    best: dict[str, float] = {}
    for _ in range(repeats):
        for name, fn in (("torch_autograd", autograd), ("torch_fused", fused)):
            for _ in range(3):
                fn()
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            best[name] = min(best.get(name, float("inf")), (time.perf_counter() - t0) / steps)
    return best


def analyse(results: dict[str, Any], threads: int = 1, floors: bool = True) -> dict[str, Any]:
    """The roofline of every workload in ``results`` (``run.py``'s JSON) and each framework's and floor's share."""
    import torch
    from bench_clients import measure_peaks

    torch.set_num_threads(threads)
    peaks = measure_peaks(threads, "cpu")
    out: dict[str, Any] = {"peaks": peaks, "threads": threads, "workloads": {}}
    for name in sorted({r["workload"] for r in results["rows"]}):
        w = WORKLOADS[name]
        cost = step_cost(w)
        bound_s, bound = roofline_s(cost, peaks)
        rows = []
        for r in results["rows"]:
            if r["workload"] == name and r.get("ok"):
                step = w.clients_per_round / r["client_steps_per_s"]
                rows.append({"implementation": r["framework"], "step_ms": 1e3 * step,
                             "client_steps_per_s": r["client_steps_per_s"], "roofline_fraction": bound_s / step})
        if floors:
            for impl, step in floor_steps(w).items():
                rows.append({"implementation": impl, "step_ms": 1e3 * step,
                             "client_steps_per_s": w.clients_per_round / step, "roofline_fraction": bound_s / step})
        out["workloads"][name] = {**cost, "roofline_ms": 1e3 * bound_s, "bound": bound,
                                  "roofline_unfused_ms": 1e3 * roofline_s(cost, peaks, "bytes_unfused")[0],
                                  "rows": rows}
    return out


def markdown(analysis: dict[str, Any]) -> str:
    lines = ["| workload | implementation | ms per step | client-steps / s | % of roofline |",
             "|---|---|---:|---:|---:|"]
    for name, wl in analysis["workloads"].items():
        for r in wl["rows"]:
            lines.append(f"| {name} | {r['implementation']} | {r['step_ms']:.2f} | {r['client_steps_per_s']:,.0f} | "
                         f"{100 * r['roofline_fraction']:.0f} % |")
    notes = [f"- {name}: roofline {wl['roofline_ms']:.2f} ms per step ({wl['bound']}-bound: "
             f"{wl['flops'] / 1e9:.2f} GFLOP, {wl['bytes_fused'] / 1e6:.1f} MB; {wl['roofline_unfused_ms']:.2f} ms "
             f"with the gradient materialised, {wl['bytes_unfused'] / 1e6:.1f} MB)"
             for name, wl in analysis["workloads"].items()]
    peaks = analysis["peaks"]
    notes.append(f"- machine ({analysis['threads']} thread): {peaks['peak_flops'] / 1e9:.0f} GFLOP/s matmul, "
                 f"{peaks['peak_bytes_per_s'] / 1e9:.1f} GB/s large copies")
    return "\n".join(lines) + "\n\n" + "\n".join(notes)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=HERE / "results.json", help="run.py's JSON")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-floors", action="store_true", help="skip the plain-PyTorch floors")
    parser.add_argument("--out", type=Path, default=HERE / "roofline.json")
    parser.add_argument("--merge-into", type=Path, help="also store the analysis under 'peers_roofline' in this JSON")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    analysis = analyse(results, args.threads, floors=not args.no_floors)
    analysis["meta"] = {"results": str(args.results), "results_time_utc": results.get("meta", {}).get("time_utc"),
                        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    analysis["table"] = markdown(analysis)
    print(analysis["table"])
    if args.out is not None:
        args.out.write_text(json.dumps(analysis, indent=1))
    if args.merge_into is not None:
        merged = json.loads(args.merge_into.read_text()) if args.merge_into.exists() else {}
        merged["peers_roofline"] = analysis
        args.merge_into.write_text(json.dumps(merged, indent=1))
    fractions = [r["roofline_fraction"] for wl in analysis["workloads"].values() for r in wl["rows"]]
    if fractions:
        print(f"\nmedian share of the roofline over the rows: {100 * statistics.median(fractions):.0f} %")
    return analysis


if __name__ == "__main__":
    main()
