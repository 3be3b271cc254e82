"""Local steps × clients per second, and peak memory, of the framework's client paths and of hand-written PyTorch.

    python benchmarks/bench_clients.py --out benchmarks/results-cpu.json          # the full table
    python benchmarks/bench_clients.py --quick                                   # a one-minute subset
    python benchmarks/bench_clients.py --models mlp784 --clients 100 --paths vectorized \
        --algorithms proxskip,sparse_proxskip                                    # the cost of per-step TopK
    python benchmarks/bench_clients.py --models mlp784 --clients 100 --paths vectorized \
        --algorithms proxskip,sparse_proxskip --topk-methods reference,fast       # ... per TopK method

For every (model, n clients, path) one fresh Python process runs the configuration, so peak memory
(``ru_maxrss``, or ``torch.cuda.max_memory_allocated`` on a GPU) belongs to that configuration alone.
Paths:

- ``vectorized``: ``Trainer.fit`` of ``FederatedLightningModule(vectorize=True)`` with
  ``algorithms.proxskip(p=1/k, mode="fixed")``; a callback takes the time of every training batch, and
  the figure is the mean over whole rounds after a warm-up round (Trainer start-up excluded).
- ``sequential``: the same with ``vectorize=False`` (stops after ``--seq-budget`` seconds at a round end, or
  after three times that anywhere).
- ``handwritten``: ``benchmarks/handwritten.py``, the same math in plain batched PyTorch.

``--framework DIR`` runs the framework paths against another checkout of the repository (for example
``git archive <commit> | tar -x -C DIR``), to measure a change before and after on the same machine.

The roofline columns relate each figure to this machine: FLOPs and the minimum bytes one step must move
(fp32, streaming), against the peak of a large matmul and of a large copy measured at start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PATHS = ("vectorized", "sequential", "handwritten")
MODELS = ("logreg", "mlp", "mlp784", "cnn", "resnet18")
ALGORITHMS = ("proxskip", "sparse_proxskip")


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: how to build it and the shape of its synthetic data."""

    name: str
    label: str
    sample_shape: tuple[int, ...]
    num_classes: int
    gpu_only: bool = False
    handwritten: bool = True


SPECS: dict[str, ModelSpec] = {
    "logreg": ModelSpec("logreg", "logistic regression 784→62", (784,), 62),
    "mlp": ModelSpec("mlp", "MLP 64→32→10", (64,), 10),
    "mlp784": ModelSpec("mlp784", "MLP 784→64→10 (Fashion-MNIST)", (784,), 10),
    "cnn": ModelSpec("cnn", "FEMNIST CNN (6.6M)", (1, 28, 28), 62),
    "resnet18": ModelSpec("resnet18", "ResNet-18 GroupNorm (11.2M)", (3, 32, 32), 10, gpu_only=True,
                          handwritten=False),
}


def build_model(name: str) -> Any:
    """The client model of benchmark ``name`` (seeded, so every path starts from the same weights)."""
    import torch

    from fl_lightning.models import MLP, FemnistCNN, LogisticRegression, ResNet18

    torch.manual_seed(0)
    return {
        "logreg": lambda: LogisticRegression(784, 62),
        "mlp": lambda: MLP(64, [32], 10),
        "mlp784": lambda: MLP(784, [64], 10),
        "cnn": lambda: FemnistCNN(62),
        "resnet18": lambda: ResNet18(num_classes=10, norm="group"),
    }[name]()


@dataclass
class Config:
    """One measurement: a model, a number of clients, a path, and the run's settings."""

    model: str
    clients: int
    path: str
    batch_size: int = 32
    samples_per_client: int = 100
    k: int = 5
    lr: float = 0.05
    warmup_rounds: int = 1
    rounds: int = 4
    threads: int = 1
    device: str = "cpu"
    seq_budget: float = 20.0
    framework: str | None = None
    algorithm: str = "proxskip"
    topk_method: str | None = None  # sparse_proxskip: TopKPruning(topk_method=...); None = its default
    density: float = 0.1
    compile_step: bool = False  # FederatedLightningModule(compile_step=True): torch.compile of the local step


# ----------------------------------------------------------------------------------------- cost model
def step_cost(name: str, n: int, batch: int, k: int) -> tuple[float, float]:
    """FLOPs and minimum bytes of one local step of n clients (fp32, every tensor streamed once per use).

    FLOPs: 2·MACs for the forward, the weight gradient and (all layers but the first) the input
    gradient, plus the update. Floats moved per parameter and client: read W (forward, input gradient),
    write g, g ← g − h (read g, h; write g), x ← x − γ g (read x, g; write x) = 9, and a round every k
    steps (read x and h for the means; read h, x and write h; write x) = 6/k; plus the sampled batch
    (gathered, written, read) and the activations (written forward; read with their gradients backward)."""
    import torch
    from torch import nn

    model = build_model(name)
    layers: list[tuple[nn.Module, int, int]] = []  # module, MACs per sample, output numel per sample

    def hook(mod: nn.Module, inp: tuple[Any, ...], out: Any) -> None:
        if isinstance(mod, nn.Linear):
            layers.append((mod, mod.in_features * mod.out_features, out[0].numel()))
        elif isinstance(mod, nn.Conv2d):
            per_out = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
            layers.append((mod, out[0].numel() * per_out, out[0].numel()))
        elif len(list(mod.children())) == 0:
            layers.append((mod, 0, out[0].numel()))

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(2, *SPECS[name].sample_shape))
    for h in handles:
        h.remove()
    d = sum(p.numel() for p in model.parameters())
    macs = [m for _, m, _ in layers if m > 0]
    flops = 2 * batch * (2 * sum(macs) + sum(macs[1:])) + 4 * d + 6 * d / k
    act = sum(o for _, _, o in layers)
    sample = 1
    for s in SPECS[name].sample_shape:
        sample *= s
    bytes_ = 4 * (9 * d + 6 * d / k + batch * (3 * sample + 3 * act))
    return n * flops, n * bytes_


def num_params(name: str) -> int:
    return sum(p.numel() for p in build_model(name).parameters())


def estimated_memory_gb(cfg: Config) -> float:
    """A rough upper bound of the configuration's peak memory (to skip what does not fit)."""
    d = num_params(cfg.model)
    sample = 1
    for s in SPECS[cfg.model].sample_shape:
        sample *= s
    copies = 3 if cfg.path == "sequential" else 8  # x, g, h; the round's stacked temporaries
    data = 2 * cfg.clients * cfg.samples_per_client * sample * 4
    return (copies * cfg.clients * d * 4 + data) / 1e9 + 0.6


# ----------------------------------------------------------------------------------------- machine peaks
def measure_peaks(threads: int, device: str) -> dict[str, Any]:
    """Peak fp32 matmul FLOP/s, and copy bandwidth (bytes read + written per second) for arrays of 1 MiB to
    1 GiB: small working sets stay in the caches, which a step whose stacked tensors fit there enjoys too."""
    import torch

    torch.set_num_threads(threads)
    dev = torch.device(device)

    def best(fn: Any, reps: int = 5) -> float:
        fn()
        times = []
        for _ in range(reps):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return min(times)

    size = 8192 if dev.type == "cuda" else 2048
    a = torch.randn(size, size, device=dev)
    b = torch.randn(size, size, device=dev)
    flops = 2 * size**3 / best(lambda: a @ b)
    bandwidth: dict[str, float] = {}
    for mib in (1, 4, 16, 64, 256, 1024):
        numel = mib * 2**20 // 4
        src = torch.randn(numel, device=dev)
        dst = torch.empty_like(src)
        bandwidth[str(mib * 2**20)] = 2 * 4 * numel / best(lambda src=src, dst=dst: dst.copy_(src))
        del src, dst
    return {"peak_flops": flops, "bytes_per_s": bandwidth, "peak_bytes_per_s": bandwidth[str(2**30)]}


def bandwidth_for(peaks: dict[str, Any], working_set: float) -> float:
    """The copy bandwidth measured for the smallest array at least as large as ``working_set`` bytes."""
    sizes = sorted(int(k) for k in peaks["bytes_per_s"])
    fit = next((s for s in sizes if s >= working_set), sizes[-1])
    return float(peaks["bytes_per_s"][str(fit)])


def roofline_s(row: dict[str, Any], peaks: dict[str, Any]) -> tuple[float, str]:
    """The roofline time of a step, and what bounds it: FLOPs at the matmul peak, or bytes at the copy
    bandwidth for the step's working set (x, g and h of all clients)."""
    compute = row["flops"] / peaks["peak_flops"]
    memory = row["bytes"] / bandwidth_for(peaks, 3 * 4 * row["clients"] * row["params"])
    return (compute, "compute") if compute >= memory else (memory, "memory")


# ----------------------------------------------------------------------------------------- one configuration
def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _synthetic_clients(cfg: Config) -> list[tuple[Any, Any]]:
    import torch

    spec = SPECS[cfg.model]
    gen = torch.Generator().manual_seed(1)
    m = cfg.samples_per_client
    x = torch.randn(cfg.clients * m, *spec.sample_shape, generator=gen)
    y = torch.randint(0, spec.num_classes, (cfg.clients * m,), generator=gen)
    return [(x[i * m : (i + 1) * m], y[i * m : (i + 1) * m]) for i in range(cfg.clients)]


def run_config(cfg: Config) -> dict[str, Any]:
    """Measure one configuration in this process; the seconds per local step over whole timed rounds."""
    import torch

    torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    import lightning  # noqa: F401  (import cost is part of the baseline, not of the configuration)

    import fl_lightning.module  # noqa: F401

    base_rss = _rss_mb()
    warmup = cfg.warmup_rounds * cfg.k
    timed = cfg.rounds * cfg.k
    if cfg.path == "handwritten":
        from handwritten import ClientData, HandwrittenProxSkip, stacked_model

        data = ClientData.from_clients(_synthetic_clients(cfg), seed=123, device=device)
        hand = HandwrittenProxSkip(stacked_model(build_model(cfg.model).to(device), cfg.clients), data,
                                   lr=cfg.lr, k=cfg.k, batch_size=cfg.batch_size)
        for t in range(warmup):
            hand.step(t)
        sync()
        start = time.perf_counter()
        for t in range(warmup, warmup + timed):
            hand.step(t)
        sync()
        step_s = (time.perf_counter() - start) / timed
        steps = timed
    else:
        step_s, steps = _run_framework(cfg, warmup, timed, sync)
    out = {"step_s": step_s, "timed_steps": steps, "rss_base_mb": base_rss, "rss_peak_mb": _rss_mb()}
    if cuda:
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _run_framework(cfg: Config, warmup: int, timed: int, sync: Any) -> tuple[float, int]:
    import lightning as L

    from fl_lightning import FederatedDataModule, FederatedLightningModule
    from fl_lightning.algorithms import proxskip, sparse_proxskip
    from fl_lightning.cli import quiet_irrelevant_warnings

    quiet_irrelevant_warnings()
    spec = SPECS[cfg.model]
    dm = FederatedDataModule.from_client_tensors(_synthetic_clients(cfg), batch_size=cfg.batch_size,
                                                 num_classes=spec.num_classes, steps_per_epoch=10**9, seed=123)
    sequential = cfg.path == "sequential"
    if sequential:
        warmup = min(warmup, 1)  # nothing to trace or allocate once: one step warms the loop up

    class StepTimer(L.Callback):
        """Times the training batches after the warm-up; stops the fit at a round end when done."""

        def __init__(self) -> None:
            self.start: float | None = None
            self.count = 0

        def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
            if trainer.global_step == warmup:
                sync()
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            if self.start is None:
                return
            self.count += 1
            sync()
            self.elapsed = time.perf_counter() - self.start
            step = warmup + self.count  # steps done
            round_end = step % cfg.k == 0
            over = sequential and self.elapsed > cfg.seq_budget
            if self.count >= timed or (over and round_end) or (over and self.elapsed > 3 * cfg.seq_budget):
                trainer.should_stop = True

    timer = StepTimer()
    module = FederatedLightningModule(build_model(cfg.model), lr=cfg.lr, loss="cross_entropy",
                                      vectorize=not sequential, compile_step=cfg.compile_step and not sequential)
    trainer = L.Trainer(
        max_steps=warmup + timed, accelerator="gpu" if cfg.device.startswith("cuda") else "cpu", devices=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[*(proxskip(p=1.0 / cfg.k, mode="fixed", seed=0) if cfg.algorithm == "proxskip" else
                     sparse_proxskip(p=1.0 / cfg.k, mode="fixed", density=cfg.density, seed=0)), timer],
    )
    if cfg.topk_method is not None:
        from fl_lightning.callbacks import TopKPruning

        for cb in trainer.callbacks:
            if isinstance(cb, TopKPruning):
                cb.topk_method = cfg.topk_method
    trainer.fit(module, dm)
    return timer.elapsed / timer.count, timer.count


# ----------------------------------------------------------------------------------------- driver
def _use_framework(root: str) -> None:
    """Import ``fl_lightning`` (and ``fl_lightning.callbacks``, which lives in ``callbacks/``) from ``root``."""
    import importlib.util

    sys.path.insert(0, root)
    init = Path(root) / "callbacks" / "__init__.py"
    spec = importlib.util.spec_from_file_location("fl_lightning.callbacks", init,
                                                  submodule_search_locations=[str(init.parent)])
    assert spec is not None and spec.loader is not None
    import fl_lightning

    if not Path(fl_lightning.__file__).resolve().is_relative_to(Path(root).resolve()):
        raise RuntimeError(f"fl_lightning was imported from {fl_lightning.__file__}, not from {root}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fl_lightning.callbacks"] = module
    spec.loader.exec_module(module)


def _worker_main(payload: str) -> None:
    sys.path.insert(0, str(HERE))
    cfg = Config(**json.loads(payload))
    if cfg.framework is not None:
        _use_framework(cfg.framework)
    try:
        result = {"ok": True, **run_config(cfg)}
    except Exception as err:  # report, do not crash the driver
        result = {"ok": False, "error": f"{type(err).__name__}: {err}"}
    print("RESULT " + json.dumps(result), flush=True)


def _peaks_main(payload: str) -> None:
    args = json.loads(payload)
    print("RESULT " + json.dumps(measure_peaks(args["threads"], args["device"])), flush=True)


def _subprocess(flag: str, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), flag, json.dumps(payload)]
    env = {**os.environ, "OMP_NUM_THREADS": str(payload.get("threads", 1))}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timeout after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"ok": False, "error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1][len("RESULT "):])


def _skip_reason(cfg: Config, cuda: bool, mem_limit_gb: float, peaks: dict[str, Any]) -> str | None:
    spec = SPECS[cfg.model]
    if cfg.algorithm != "proxskip" and cfg.path != "vectorized":
        return f"{cfg.algorithm}: vectorized path only"
    if spec.gpu_only and not cuda:
        return "GPU only (no CUDA here)"
    if cfg.path == "handwritten" and not spec.handwritten:
        return "no hand-written version (Linear/MLP/CNN only)"
    if not cuda and cfg.model == "cnn" and cfg.clients > 100:
        return "CNN with more than 100 clients: GPU only"
    if cfg.path == "sequential" and cfg.clients * num_params(cfg.model) > 2e9:
        return "sequential: too slow to be worth measuring"
    est = estimated_memory_gb(cfg)
    if not cuda and est > mem_limit_gb:
        return f"needs ~{est:.0f} GB (> --mem-limit-gb {mem_limit_gb:g})"
    if cuda:
        import torch

        total = torch.cuda.get_device_properties(0).total_memory / 1e9
        if est > 0.9 * total:
            return f"needs ~{est:.0f} GB of GPU memory (> 90% of {total:.0f} GB)"
    return None


def _fmt(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def markdown_table(rows: list[dict[str, Any]], peaks: dict[str, Any]) -> str:
    """One line per measured (model, n, path): time per step, client-steps per second, ratios to the
    hand-written and the sequential path, memory, roofline; then what was not measured, and why."""
    head = ("| model | n | path | ms / step | client-steps / s | × hand-written | speed-up vs sequential | "
            "peak MB | roofline ms (bound) | % of roofline |")
    lines = [head, "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    missing: dict[str, dict[str, dict[int, list[str]]]] = {}  # why -> model -> n -> paths
    measured_paths = sorted({r["path"] for r in rows}, key=PATHS.index)
    for r in rows:
        if r.get("skipped") or not r.get("ok"):
            why = r.get("skipped") or r.get("error", "failed")
            by_n = missing.setdefault(why, {}).setdefault(SPECS[r["model"]].label, {})
            by_n.setdefault(r["clients"], []).append(r["path"])
            continue
        ms = 1e3 * r["step_s"]
        bound, which = roofline_s(r, peaks)
        mem = r.get("cuda_peak_mb", r.get("rss_peak_mb"))
        path = f"{r['path']} {r['algorithm']}" if "algorithm" in r else r["path"]
        if r.get("topk_method"):
            path += f" (topk_method={r['topk_method']})"
        if r.get("compile_step"):
            path += " (compile_step)"
        lines.append(
            f"| {SPECS[r['model']].label} | {r['clients']} | {path} | {_fmt(ms, 2)} | "
            f"{_fmt(r['clients'] / r['step_s'], 0)} | {_fmt(r.get('vs_hand'), 2)} | "
            f"{_fmt(r.get('speedup_vs_sequential'), 1)} | {_fmt(mem, 0)} | "
            f"{_fmt(1e3 * bound, 2)} ({which}) | {_fmt(100 * bound / r['step_s'], 0)} |"
        )
    if missing:
        lines += ["", "Not measured:"]
        for why, models in missing.items():
            parts = []
            for label, by_n in models.items():
                cases = [f"n={n} ({'all paths' if paths == measured_paths else ', '.join(paths)})"
                         for n, paths in by_n.items()]
                parts.append(f"{label}: {', '.join(cases)}")
            lines.append(f"- {why}: {'; '.join(parts)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--models", default="logreg,mlp,cnn,resnet18", help=f"comma list of {MODELS}")
    parser.add_argument("--clients", default="10,100,1000", help="comma list of n")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma list of {PATHS}")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--samples-per-client", type=int, default=100)
    parser.add_argument("--k", type=int, default=5, help="local steps per round (p = 1/k)")
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds per measurement (after one warm-up)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per configuration (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in every process")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--seq-budget", type=float, default=20.0, help="seconds of timed sequential steps")
    parser.add_argument("--mem-limit-gb", type=float, default=6.0, help="skip CPU configs estimated above this")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per measurement process")
    parser.add_argument("--algorithms", default="proxskip",
                        help=f"comma list of {ALGORITHMS}; sparse_proxskip rows get their ratio to proxskip")
    parser.add_argument("--density", type=float, default=0.1, help="TopK density of sparse_proxskip")
    parser.add_argument("--compile", default="off", help="comma list of off,on: the vectorised path with "
                        "compile_step=True too (torch.compile; the first round, not timed, compiles)")
    parser.add_argument("--topk-methods", default=None,
                        help="comma list of TopKPruning topk_method values (reference, auto, fast) for the "
                             "sparse_proxskip rows, one row each; default: the callback's default")
    parser.add_argument("--framework", default=None,
                        help="measure the fl_lightning of this checkout instead of the installed one")
    parser.add_argument("--quick", action="store_true",
                        help="logreg and mlp, n ∈ {10, 100}, one repeat of two rounds")
    args = parser.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    if args.quick:
        args.models, args.clients, args.repeats, args.rounds = "logreg,mlp", "10,100", 1, 2
    models = [m for m in args.models.split(",") if m]
    clients = [int(c) for c in args.clients.split(",") if c]
    paths = [p for p in args.paths.split(",") if p]
    for m in models:
        if m not in SPECS:
            parser.error(f"unknown model {m!r}; choose from {MODELS}")
    for p in paths:
        if p not in PATHS:
            parser.error(f"unknown path {p!r}; choose from {PATHS}")

    load_at_start = os.getloadavg()
    print(f"# measuring machine peaks ({args.threads} thread(s), {device})", file=sys.stderr)
    peaks = _subprocess("--peaks", {"threads": args.threads, "device": device}, args.timeout)
    framework = None if args.framework is None else str(Path(args.framework).resolve())
    algorithms = [a for a in args.algorithms.split(",") if a]
    for a in algorithms:
        if a not in ALGORITHMS:
            parser.error(f"unknown algorithm {a!r}; choose from {ALGORITHMS}")
    methods: list[str | None] = [None] if args.topk_methods is None else [
        t for t in args.topk_methods.split(",") if t]
    for t in methods:
        if t not in (None, "reference", "auto", "fast"):
            parser.error(f"unknown topk method {t!r}; choose from reference, auto, fast")
    if set(args.compile.split(",")) - {"off", "on"}:
        parser.error(f"--compile takes a comma list of off, on; got {args.compile!r}")
    compiles = [c == "on" for c in args.compile.split(",") if c]
    configs = [Config(m, n, p, batch_size=args.batch_size, samples_per_client=args.samples_per_client, k=args.k,
                      rounds=args.rounds, threads=args.threads, device=device, seq_budget=args.seq_budget,
                      framework=framework, algorithm=a, density=args.density,
                      topk_method=t if a == "sparse_proxskip" else None, compile_step=comp)
               for m in models for n in clients for a in algorithms
               for t in (methods if a == "sparse_proxskip" else [None]) for p in paths
               for comp in compiles if not (comp and p != "vectorized")]
    samples: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(configs))}
    skipped = {i: _skip_reason(c, cuda, args.mem_limit_gb, peaks) for i, c in enumerate(configs)}
    for rep in range(args.repeats):  # interleaved, so slow phases of a shared machine hit every config
        for i, cfg in enumerate(configs):
            if skipped[i] or (samples[i] and not samples[i][-1]["ok"]):
                continue
            res = _subprocess("--worker", asdict(cfg), args.timeout)
            samples[i].append(res)
            status = f"{1e3 * res['step_s']:.2f} ms/step" if res["ok"] else res["error"]
            what = cfg.path if cfg.algorithm == "proxskip" else f"{cfg.path} {cfg.algorithm}"
            what += f" topk_method={cfg.topk_method}" if cfg.topk_method else ""
            what += " compile_step" if cfg.compile_step else ""
            print(f"# [{rep + 1}/{args.repeats}] {cfg.model} n={cfg.clients} {what}: {status}", file=sys.stderr)

    rows = []
    for i, cfg in enumerate(configs):
        row: dict[str, Any] = {"model": cfg.model, "clients": cfg.clients, "path": cfg.path}
        if cfg.algorithm != "proxskip":
            row.update(algorithm=cfg.algorithm, density=cfg.density)
            if cfg.topk_method is not None:
                row["topk_method"] = cfg.topk_method
        if cfg.compile_step:
            row["compile_step"] = True
        if skipped[i]:
            rows.append({**row, "skipped": skipped[i]})
            continue
        ok = [s for s in samples[i] if s["ok"]]
        if not ok:
            rows.append({**row, "ok": False, "error": samples[i][-1]["error"] if samples[i] else "not run"})
            continue
        flops, bytes_ = step_cost(cfg.model, cfg.clients, cfg.batch_size, cfg.k)
        row.update(ok=True, step_s=statistics.median(s["step_s"] for s in ok),
                   step_s_all=[s["step_s"] for s in ok], timed_steps=ok[0]["timed_steps"],
                   rss_peak_mb=max(s["rss_peak_mb"] for s in ok), rss_base_mb=min(s["rss_base_mb"] for s in ok),
                   flops=flops, bytes=bytes_, params=num_params(cfg.model))
        if cuda:
            row["cuda_peak_mb"] = max(s["cuda_peak_mb"] for s in ok)
        rows.append(row)
    by_key = {(r["model"], r["clients"], r["path"]): r for r in rows if "algorithm" not in r}
    for r in rows:
        hand = by_key.get((r["model"], r["clients"], "handwritten"))
        if r.get("ok") and hand and hand.get("ok"):
            r["vs_hand"] = r["step_s"] / hand["step_s"]
    for r in rows:
        seq = by_key.get((r["model"], r["clients"], "sequential"))
        if r.get("ok") and r["path"] == "vectorized" and seq and seq.get("ok"):
            r["speedup_vs_sequential"] = seq["step_s"] / r["step_s"]
    ratios = []
    for r in rows:
        dense = by_key.get((r["model"], r["clients"], "vectorized"))
        if r.get("ok") and "algorithm" in r and dense and dense.get("ok"):
            r["vs_proxskip"] = r["step_s"] / dense["step_s"]
            method = f" (topk_method={r['topk_method']})" if r.get("topk_method") else ""
            ratios.append(f"{r['algorithm']}{method} / proxskip, {SPECS[r['model']].label}, n = {r['clients']}, "
                          f"δ = {r['density']:g}: {1e3 * r['step_s']:.2f} / {1e3 * dense['step_s']:.2f} ms per "
                          f"local step = {r['vs_proxskip']:.2f}×")

    table = markdown_table(rows, peaks)
    print(table)
    if ratios:
        print("\n" + "\n".join(ratios))
    bw = ", ".join(f"{int(k) / 2**20:g} MiB {v / 1e9:.0f}" for k, v in peaks["bytes_per_s"].items())
    print(f"\nPeaks: {peaks['peak_flops'] / 1e9:.0f} GFLOP/s (fp32 matmul); copy GB/s by array size: {bw}; "
          f"{args.threads} thread(s); batch {args.batch_size}; k = {args.k}.")
    if args.out is not None:
        meta = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "device": device, "torch": torch.__version__, "python": platform.python_version(),
            "cpu": _cpu_name(), "cores": os.cpu_count(), "threads": args.threads,
            "load_average_start": load_at_start, "load_average_end": os.getloadavg(), "peaks": peaks,
            "framework": framework, "settings": {
                k: v for k, v in vars(args).items() if k not in ("out",)},
            "cuda_device": torch.cuda.get_device_name() if cuda else None,
        }
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
        print(f"wrote {args.out}", file=sys.stderr)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker_main(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "--peaks":
        _peaks_main(sys.argv[2])
    else:
        main()
