"""The GPU benchmark of benchmarks/gpu.sh: fxcurv's fused program (Triton kernels) against its eager
and inductor backends, BackPACK and a plain forward+backward, on CUDA.

    python benchmarks/gpu.py --out DIR [--configs mnist_mlp128,c3d3_128] [--backends fused,inductor]
                             [--budget-s 230] [--repeats 15] [--tf32] [--no-prewarm]
    python benchmarks/gpu.py --dry-run --out DIR    # on the CPU, one tiny net: checks the plumbing

Per network and batch size (``CONFIGS``), for ``diag_ggn``, ``diag_ggn_mc`` (1 sample) and
``hesscale``: every fxcurv backend, BackPACK's DiagGGNExact and DiagGGNMC (it has no HesScale), and
autograd's forward+backward. The methods are those of benchmarks/methods.py. Each is built and
warmed up (fxcurv compiles its Triton kernels, inductor its graph: excluded), then timed in rounds,
one call of each per round in an order shuffled every round; the median of the rounds is reported.
Times come from CUDA events around one call (wall time beside them); peak memory is
``torch.cuda.max_memory_allocated`` above what was allocated before the call, after
``reset_peak_memory_stats``. Every method's loss gradient and quantity are compared with autograd's
gradient and fxcurv eager's quantity (the checks of benchmarks/run.py): a fast wrong kernel shows.

``--budget-s`` bounds the run: a network or method that would start too late is skipped with the
reason recorded. ``DIR/bench/results.json`` and ``results.md`` are rewritten after every network, so
a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import measure  # noqa: E402
import report  # noqa: E402
import run as cpu_run  # noqa: E402  (the float64-calibrated checks of the CPU benchmark)
import torch  # noqa: E402
from gpu_report import BACKPACK_OF, QUANTITIES, criteria, criteria_markdown, fmt_mb, fmt_ms, results_markdown  # noqa: E402
from methods import Autograd, Backpack, Fxcurv  # noqa: E402
from torch import nn  # noqa: E402

import fxcurv  # noqa: E402
from fxcurv.kernels import LAUNCHES  # noqa: E402
from fxcurv.networks import NETWORKS  # noqa: E402

# name -> (fxcurv.networks name, batch size): the papers' batch (128) and a large one per network
CONFIGS = {
    "mnist_mlp128": ("mnist_mlp", 128),
    "fcnn128": ("fcnn", 128),
    "c3d3_128": ("c3d3", 128),
    "mnist_mlp2048": ("mnist_mlp", 2048),
    "fcnn2048": ("fcnn", 2048),
    # not 2048: the exact conv diagonals (fxcurv's and BackPACK's) grow with N times the per-sample
    # factors; 512 keeps this network within its share of the budget
    "c3d3_512": ("c3d3", 512),
}
# The dry run: one small MLP of fxcurv.networks, a few samples.
DRY_CONFIGS = {"hesscale_tanh8": ("hesscale_tanh", 8)}
BACKENDS = ("fused", "eager", "inductor")
REFERENCE_BACKEND = "eager"  # the quantities' reference in the checks (the unfused program, op by op)
AUTOGRAD = "autograd/fwd+bwd"

# Budget (seconds): a network starts only with CONFIG_MIN_S left; a method's build and warm-up only
# with SETUP_RESERVE_S left (INDUCTOR_RESERVE_S for inductor, whose compile of one program takes
# seconds), which leaves the timing rounds, memory and checks of the methods already built their time.
CONFIG_MIN_S = 25.0
SETUP_RESERVE_S = 12.0
INDUCTOR_RESERVE_S = 30.0
TIMING_S_PER_CONFIG = 20.0  # the rounds of one network stop after this (at least --min-repeats)
# Compiling is most of a fresh machine's time (Triton's first call of each kernel, inductor's of each
# program, single-threaded steps). Before measuring, one process per (network, backend) builds its
# programs in parallel, filling the shared on-disk caches (Triton's, inductor's, fxcurv's kernel
# modules) that the measuring process then loads from. At most PREWARM_MAX_S, and half the budget.
PREWARM_MAX_S = 120.0
PREWARM_BACKENDS = ("inductor", "fused")  # eager compiles nothing
NOISE_MAX_S = 5.0  # float64 references for the check tolerances (run.float32_noise's max_s)


# ------------------------------------------------------------------------------------------------
# the plan


def plan_ids() -> list[str]:
    """Method ids of one network, in the order they are built: the denominator, fxcurv fused and
    BackPACK (the comparisons that matter most, first), then the other backends (inductor last: it
    compiles for seconds)."""
    ids = [AUTOGRAD] + [f"fxcurv/fused/{q}" for q in QUANTITIES] + sorted({BACKPACK_OF[q] for q in QUANTITIES})
    return ids + [f"fxcurv/{b}/{q}" for b in BACKENDS if b != "fused" for q in QUANTITIES]


def build_methods(model, x, y, engines: dict, skip: dict) -> list:
    """The methods of :func:`plan_ids` (benchmarks/methods.py), ``skip``: ``{id or family: reason}``."""
    loss_fn = nn.CrossEntropyLoss()
    holder: dict = {}
    out = []
    for mid in plan_ids():
        if mid == AUTOGRAD:
            m = Autograd(model, loss_fn, x, y)
        elif mid.startswith("fxcurv/"):
            _, backend, q = mid.split("/")
            m = Fxcurv(engines, model, loss_fn, x, y, (q,), backend)
        else:
            m = Backpack(model, x, y, mid.split("/")[1], bp_model=holder)
        assert m.id == mid, (m.id, mid)
        reason = skip.get(mid) or skip.get(m.family) or (skip.get(f"fxcurv/{m.backend}") if m.backend else None)
        if reason:
            m.skip = reason
        out.append(m)
    return out


# ------------------------------------------------------------------------------------------------
# measuring


class Deadline:
    def __init__(self, budget_s: float | None):
        self.t0 = time.perf_counter()
        self.budget_s = budget_s

    def left(self) -> float:
        return float("inf") if not self.budget_s else self.budget_s - (time.perf_counter() - self.t0)


def timed_ms(fn, cuda: bool):
    """``(event ms or None, wall ms, result)`` of one call; CUDA: events on the current stream."""
    if not cuda:
        t0 = time.perf_counter()
        out = fn()
        return None, (time.perf_counter() - t0) * 1e3, out
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    start.record()
    out = fn()
    end.record()
    end.synchronize()
    wall = (time.perf_counter() - t0) * 1e3
    return start.elapsed_time(end), wall, out


def peak_mb(fn, cuda: bool):
    """``(peak MB above the allocation before the call, MB the call left allocated, result)``."""
    gc.collect()
    if not cuda:
        peak, retained, out = measure.peak_memory(fn)
        return peak / 2**20, retained / 2**20, out
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20, (torch.cuda.memory_allocated() - base) / 2**20, out


def _stats(ms: list[float]) -> dict:
    if not ms:
        return {}
    q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "q1_ms": q[0], "q3_ms": q[2], "n": len(ms)}


def warm_one(args) -> int:
    """``--warm-one CONFIG BACKEND``: build and call the programs of every quantity (a prewarm job)."""
    cfg, backend = args.warm_one
    net_name, N = args.table[cfg]
    model, x, y = cpu_run.problem(net_name, N, args.device, {})
    rc = 0
    for q in QUANTITIES:
        t0 = time.perf_counter()
        try:
            engine = fxcurv.compile(model, nn.CrossEntropyLoss(), quantities=(q,), backend=backend,
                                    mc_samples=1, seed=0)
            for _ in range(2):  # the first call builds, fuses or compiles; the second runs what was built
                engine(x, y)
            if args.device == "cuda":
                torch.cuda.synchronize()
            print(f"{cfg} {backend} {q}: {time.perf_counter() - t0:.1f} s", flush=True)
        except Exception:  # noqa: BLE001 - printed; the measuring process builds it again
            print(f"{cfg} {backend} {q}: FAILED after {time.perf_counter() - t0:.1f} s\n{traceback.format_exc()}",
                  flush=True)
            rc = 1
    return rc


def prewarm_jobs(args, skip: dict) -> list[tuple[str, str]]:
    """``(config, backend)`` pairs, inductor and the large batches first: the longest jobs start first."""
    return [(cfg, b) for b in PREWARM_BACKENDS for cfg in reversed(args.configs) if not skip.get(f"fxcurv/{b}")]


def warm_command(args, job: tuple[str, str]) -> list[str]:
    tf32 = ["--tf32"] if args.tf32 else []
    return [sys.executable, str(Path(__file__).resolve()), "--out", str(args.out), *tf32, "--warm-one", *job]


def prewarm(jobs: list, command, budget_s: float, log_dir: Path, log) -> dict:
    """Run ``command(job)`` for every job in parallel processes, in order, at most ``budget_s`` (then
    the running ones are killed, the others not started); each job's output goes to
    ``log_dir/<job>.log``. Returns what happened to each."""
    log_dir.mkdir(parents=True, exist_ok=True)
    workers = max(1, min(len(jobs), (os.cpu_count() or 2) - 1))
    env = dict(os.environ, TORCHINDUCTOR_COMPILE_THREADS=str(max(1, (os.cpu_count() or 1) // workers)))
    t0 = time.perf_counter()
    pending, running, done = list(jobs), {}, {}
    log(f"prewarm: {len(jobs)} jobs, {workers} at a time, at most {budget_s:.0f} s")
    while pending or running:
        while pending and len(running) < workers:
            job = pending.pop(0)
            name = "-".join(job)
            out = open(log_dir / f"{name}.log", "w")
            running[subprocess.Popen(command(job), stdout=out, stderr=subprocess.STDOUT, env=env)] = (name, out)
        for proc in list(running):
            rc = proc.poll()
            if rc is not None:
                name, out = running.pop(proc)
                out.close()
                done[name] = {"rc": rc, "s": round(time.perf_counter() - t0, 1)}
        if time.perf_counter() - t0 > budget_s:
            for proc, (name, out) in running.items():
                proc.kill()
                proc.wait()
                out.close()
                done[name] = {"rc": None, "s": round(time.perf_counter() - t0, 1), "note": "timed out"}
            for job in pending:
                done["-".join(job)] = {"rc": None, "note": "not started: prewarm budget spent"}
            running, pending = {}, []
        if running:
            time.sleep(0.2)
    summary = {"jobs": done, "wall_s": time.perf_counter() - t0, "workers": workers,
               "ok": sum(1 for d in done.values() if d.get("rc") == 0)}
    log(f"prewarm: {summary['ok']}/{len(jobs)} jobs ok in {summary['wall_s']:.0f} s"
        + "".join(f"\n  {k}: exit {d.get('rc')} {d.get('note', '')} (see {log_dir / k}.log)" for k, d in done.items()
                  if d.get("rc") != 0))
    return summary


def bench_config(name: str, net_name: str, N: int, args, engines: dict, models: dict, deadline: Deadline,
                 skip: dict, log) -> dict:
    cuda = args.device == "cuda"
    net = NETWORKS[net_name]
    model, x, y = cpu_run.problem(net_name, N, args.device, models)
    methods = build_methods(model, x, y, engines, skip)
    res = {m.id: {"label": m.label, "family": m.family, "quantity": m.quantity, "backend": m.backend,
                  "status": "pending"} for m in methods}
    values: dict = {}

    def fail(m, e, phase):
        res[m.id].update(status="error", phase=phase, **cpu_run.error_record(e))
        log(f"[{name}] {m.id} failed during {phase}: {res[m.id]['error'][:300]}")
        try:
            m.reset()
        except Exception as e2:  # noqa: BLE001 - logged: the failure above is the one to report
            log(f"[{name}] {m.id} reset after the failure failed too: {e2!r}")
        gc.collect()

    # build, warm up, check (the last warm-up call, with a seeded generator for fxcurv)
    active, t_est = [], {}
    for m in methods:
        r = res[m.id]
        if m.skip:
            r.update(status="unavailable" if m.family == "backpack" else "skipped", reason=m.skip)
            continue
        need = INDUCTOR_RESERVE_S if m.backend == "inductor" else SETUP_RESERVE_S
        if deadline.left() < need:
            r.update(status="skipped", reason=f"budget: {deadline.left():.0f} s left, a build needs {need:.0f} s")
            continue
        try:
            m.setup()
            calls = 1 + args.warmup + (2 if m.backend == "inductor" else 0)
            walls = []
            for i in range(calls):
                m.reset()
                if i == calls - 1:
                    before = LAUNCHES.copy()
                    _, wall, out = timed_ms(m.check_call, cuda)
                    if m.family == "fxcurv":
                        r["triton_launches_per_call"] = {k: LAUNCHES[k] - before[k] for k in LAUNCHES
                                                         if LAUNCHES[k] != before[k]}
                    values[m.id] = m.values(out)
                    del out
                else:
                    _, wall, _ = timed_ms(m.call, cuda)
                walls.append(wall / 1e3)
            m.reset()
            r["first_call_s"], r["warmup_s"] = walls[0], walls[1:]
            t_est[m.id] = min(walls[-2:]) if len(walls) >= 2 else walls[-1]
            active.append(m)
        except Exception as e:  # noqa: BLE001 - recorded with its traceback; the other methods go on
            fail(m, e, "build/warm-up")

    # checks: autograd's gradient, fxcurv eager's quantities; tolerances from float64 references
    noise: dict = {}
    if deadline.left() > SETUP_RESERVE_S:
        try:
            noise = cpu_run.float32_noise(model, x, y, values, REFERENCE_BACKEND, res, max_s=NOISE_MAX_S)
        except Exception as e:  # noqa: BLE001 - the checks fall back to the fixed tolerance
            log(f"[{name}] float64 references failed ({e!r}): checks use the fixed tolerance {cpu_run.CHECK_TOL}")
    checks = cpu_run.run_checks(methods, values, REFERENCE_BACKEND, noise)
    del values
    gc.collect()

    # timing: rounds of one call per method, in an order shuffled every round
    per_round = sum(t_est[m.id] for m in active) or 1e-9
    budget = max(0.0, min(TIMING_S_PER_CONFIG, deadline.left() - SETUP_RESERVE_S))
    rounds = max(args.min_repeats, min(args.repeats, int(budget / per_round)))
    rng = random.Random(args.seed + N)
    for r in (res[m.id] for m in active):
        r.update(times_ms=[], wall_ms=[])
    for _ in range(rounds):
        order = list(active)
        rng.shuffle(order)
        for m in order:
            if res[m.id]["status"] == "error":
                continue
            try:
                m.reset()
                ev, wall, out = timed_ms(m.call, cuda)
                del out
                res[m.id]["times_ms"].append(ev if ev is not None else wall)
                res[m.id]["wall_ms"].append(wall)
            except Exception as e:  # noqa: BLE001
                fail(m, e, "timing")

    # peak memory, one call each
    for m in active:
        r = res[m.id]
        if r["status"] == "error":
            continue
        try:
            m.reset()
            peak, retained, out = peak_mb(m.call, cuda)
            del out
            m.reset()
            r.update(peak_mb=peak, retained_mb=retained, status="ok", **_stats(r["times_ms"]))
            if r["wall_ms"]:
                r["median_wall_ms"] = statistics.median(r["wall_ms"])
        except Exception as e:  # noqa: BLE001
            fail(m, e, "memory")
    for m in methods:
        try:
            m.reset()
        except Exception as e:  # noqa: BLE001
            log(f"[{name}] {m.id}: reset failed: {e!r}")
    for c in checks.values():
        r = res.get(c["method"])
        if r is not None:
            r.setdefault("checks", {})[c["quantity"]] = {k: c[k] for k in ("vs", "max_rel_diff", "ok", "note")
                                                          if k in c}
    del methods
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    base = res.get(AUTOGRAD, {}).get("median_ms")
    for r in res.values():
        if base and r.get("median_ms") is not None:
            r["x_fwdbwd"] = r["median_ms"] / base
    return {"config": name, "network": net_name, "batch": N, "source": net.source,
            "params": sum(p.numel() for p in model.parameters()), "rounds": rounds, "methods": res,
            "checks": checks, "float32_vs_float64": noise}


def write(results: dict, out_dir: Path) -> None:
    results["criteria"] = criteria(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("results.json", json.dumps(report.clean(results), indent=1, default=report.json_default)),
                       ("results.md", results_markdown(results))):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out_dir / name)


# ------------------------------------------------------------------------------------------------


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="output folder (results go to OUT/bench/; required)")
    p.add_argument("--no-prewarm", action="store_true", help="compile in the measuring process only")
    p.add_argument("--warm-one", nargs=2, metavar=("CONFIG", "BACKEND"), help=argparse.SUPPRESS)
    p.add_argument("--dry-run", action="store_true",
                   help="the CPU, one tiny net, few repeats, no inductor: checks the plumbing without CUDA")
    p.add_argument("--configs", default=None, help=f"comma-separated, from {', '.join(CONFIGS)} (default: all)")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting work after this (default: none)")
    p.add_argument("--repeats", type=int, default=None, help="timing rounds at most (default 15; dry run 2)")
    p.add_argument("--min-repeats", type=int, default=None, help="timing rounds at least (default 5; dry run 1)")
    p.add_argument("--warmup", type=int, default=None,
                   help="calls after the building one, the last checked (default 2; dry run 0)")
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help=f"fxcurv backends to run (default: {','.join(BACKENDS)}); the others are skipped")
    p.add_argument("--tf32", action="store_true", help="allow TF32 in every method's float32 products")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffled orders")
    args = p.parse_args(argv)
    if args.out is None:
        p.error("--out is required")
    table = DRY_CONFIGS if args.dry_run else CONFIGS
    args.configs = list(table) if args.configs is None else [c.strip() for c in args.configs.split(",") if c.strip()]
    if args.warm_one:
        args.configs = [args.warm_one[0]]
    unknown = [c for c in args.configs if c not in table]
    if unknown:
        p.error(f"unknown configs {unknown}; choose from {', '.join(table)}")
    args.table = table
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if set(args.backends) - set(BACKENDS):
        p.error(f"unknown backends {sorted(set(args.backends) - set(BACKENDS))}; choose from {', '.join(BACKENDS)}")
    args.repeats = args.repeats if args.repeats is not None else (2 if args.dry_run else 15)
    args.min_repeats = args.min_repeats if args.min_repeats is not None else (1 if args.dry_run else 5)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.dry_run else 2)
    args.device = "cpu" if args.dry_run else "cuda"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # before a prewarm job builds anything: inductor's cache keys and fxcurv's kernels read these
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    if args.warm_one:
        return warm_one(args)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # BackPACK, every call
    warnings.filterwarnings("ignore", message="Using a non-full backward hook")
    out_dir = args.out / "bench"
    notes, skip = [], {}
    if args.dry_run:
        notes.append("dry run: the CPU, a tiny net (plumbing only); CUDA events, CUDA memory statistics and "
                     "Triton launches are CUDA-only: wall time and the CPU profiler's memory stand in")
        skip["fxcurv/inductor"] = ("dry run: torch.compile builds C++ for seconds per program on the CPU; "
                                   "the GPU run compiles it")
    elif not torch.cuda.is_available():
        print(f"no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda}): "
              "use --dry-run on a machine without a GPU", file=sys.stderr)
        return 2
    for b in BACKENDS:
        if b not in args.backends:
            skip.setdefault(f"fxcurv/{b}", f"not requested (--backends {','.join(args.backends)})")
    try:
        importlib.import_module("backpack.extensions")  # what methods.Backpack imports
    except Exception as e:  # noqa: BLE001 - reported as the reason, and BackPACK's methods are not run
        skip["backpack"] = (f"BackPACK unavailable ({type(e).__name__}: {e}); its wheels travel in "
                            "benchmarks/wheels (bash benchmarks/gpu.sh --prepare-wheels)")
        notes.append(skip["backpack"])
    for reason in sorted(set(skip.values())):
        print(f"skipped: {reason}")
    cuda = args.device == "cuda"
    meta = {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable] + sys.argv), "dry_run": args.dry_run, "device": args.device,
        "device_name": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})",
        "capability": ".".join(map(str, torch.cuda.get_device_capability())) if cuda else None,
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": _version("triton"), "backpack": _version("backpack-for-pytorch"), "fxcurv": fxcurv.__version__,
        "fxcurv_path": str(Path(fxcurv.__file__).parent), "tf32": args.tf32,
        "timer": "CUDA events" if cuda else "perf_counter (dry run)", "repeats": args.repeats,
        "min_repeats": args.min_repeats, "warmup": args.warmup, "budget_s": args.budget_s,
        "triton_interpret": os.environ.get("TRITON_INTERPRET"), "notes": notes, "dtype": "float32",
        "loss": "CrossEntropyLoss(reduction='mean')",
        "plan": {c: plan_ids() for c in CONFIGS},  # what the GPU run does (a dry run: DRY_CONFIGS)
    }
    results = {"meta": meta, "configs": {}}
    print(f"fxcurv GPU benchmark: {meta['device_name']} | {', '.join(args.configs)} | {args.repeats} rounds | "
          f"budget {args.budget_s or 'none'} s", flush=True)
    deadline = Deadline(args.budget_s)
    engines: dict = {}
    models: dict = {}
    t0 = time.perf_counter()

    def log(msg):
        print(msg, flush=True)

    if args.no_prewarm or args.dry_run:
        meta["prewarm"] = ("off (--no-prewarm)" if args.no_prewarm else
                           "off: a dry run compiles nothing (no Triton on the CPU, no inductor); "
                           "tests/test_gpu_script.py checks the prewarm's processes")
        print(f"prewarm {meta['prewarm']}")
    else:
        meta["prewarm"] = prewarm(prewarm_jobs(args, skip), lambda job: warm_command(args, job),
                                  min(PREWARM_MAX_S, deadline.left() / 2), out_dir / "prewarm", log)
    try:
        for cfg in args.configs:
            net_name, N = args.table[cfg]
            if deadline.left() < CONFIG_MIN_S:
                results["configs"][cfg] = {"config": cfg, "status": "skipped",
                                           "reason": f"budget: {deadline.left():.0f} s left"}
                log(f"[{cfg}] skipped: budget")
                continue
            tc = time.perf_counter()
            try:
                results["configs"][cfg] = net = bench_config(cfg, net_name, N, args, engines, models, deadline,
                                                             skip, log)
                for mid, r in net["methods"].items():
                    log(f"[{cfg}] {mid:<28} {r['status']:<11} {fmt_ms(r.get('median_ms')):>8} ms  "
                        f"{fmt_mb(r.get('peak_mb')):>6} MB  {r.get('reason', r.get('error', ''))[:100]}")
            except Exception as e:  # noqa: BLE001 - a whole network failing must not lose the others
                results["configs"][cfg] = {"config": cfg, "status": "failed", **cpu_run.error_record(e)}
                log(f"[{cfg}] failed: {e!r}")
            log(f"[{cfg}] {time.perf_counter() - tc:.1f} s")
            meta["wall_s"] = time.perf_counter() - t0
            write(results, out_dir)
    except KeyboardInterrupt:  # gpu.sh's timeout: keep what was measured
        meta["interrupted"] = True
        log("interrupted: writing what was measured")
    meta["wall_s"] = time.perf_counter() - t0
    write(results, out_dir)
    print()
    print(criteria_markdown(results["criteria"]))
    print(f"\nresults: {out_dir / 'results.json'}, {out_dir / 'results.md'}")
    return 130 if meta.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
