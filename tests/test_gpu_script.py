"""benchmarks/gpu.sh's dry run (the CPU, a tiny net): the GPU check's own plumbing, without a GPU.

It runs every stage of the real script -- environment report, install, a pytest run, the benchmark
with its method list, the JSON and markdown writers, the closing summary -- and writes the same
files. BackPACK runs where its wheels were prepared (benchmarks/wheels, ignored by git) or where it
is installed already (CI installs it), and is reported as unavailable otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU_CONFIGS = {"mnist_mlp128", "fcnn128", "c3d3_128", "mnist_mlp2048", "fcnn2048", "c3d3_512"}
QUANTITIES = ("diag_ggn", "diag_ggn_mc", "hesscale")


def test_dry_run(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "TRITON_INTERPRET")}
    env.update(OUT=str(out), PYTHON=sys.executable)
    t0 = time.perf_counter()
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=240)
    took = time.perf_counter() - t0
    log = f"after {took:.0f} s, exit {res.returncode}\n{res.stdout[-4000:]}\n{res.stderr[-2000:]}"
    assert res.returncode == 0, log

    stages = dict(line.split("\t")[:2] for line in (out / "stages.tsv").read_text().splitlines())
    assert stages == {"env": "ok", "install": "ok", "tests": "ok", "bench": "ok"}, log
    for name in ("env", "install", "tests", "bench", "summary"):
        assert (out / f"{name}.log").stat().st_size > 0, name
    assert "nvidia-smi: not found" in (out / "env.log").read_text()

    suite = ET.parse(out / "tests" / "junit.xml").getroot().iter("testsuite")
    counts = [(int(s.get("tests")), int(s.get("failures")), int(s.get("errors"))) for s in suite]
    assert sum(c[0] for c in counts) >= 1 and sum(c[1] + c[2] for c in counts) == 0, counts

    results = json.loads((out / "bench" / "results.json").read_text())
    meta = results["meta"]
    assert meta["dry_run"] and meta["device"] == "cpu" and meta["prewarm"].startswith("off: a dry run")
    # the GPU run's plan: every network, each with the denominator, 3 quantities x 3 backends, BackPACK
    plan = meta["plan"]
    assert set(plan) == GPU_CONFIGS
    for ids in plan.values():
        assert ids[0] == "autograd/fwd+bwd" and {"backpack/diag_ggn", "backpack/diag_ggn_mc"} <= set(ids)
        assert {f"fxcurv/{b}/{q}" for b in ("fused", "eager", "inductor") for q in QUANTITIES} <= set(ids)
    (cfg,) = results["configs"].values()
    methods = cfg["methods"]
    assert list(methods) == plan["mnist_mlp128"]
    # BackPACK runs where its wheels were prepared or where it is installed already (CI installs it for
    # tests/test_backpack_conventions.py); the dry run uses this Python
    backpack_wheels = any((ROOT / "benchmarks" / "wheels").glob("backpack_for_pytorch-*.whl"))
    backpack_here = subprocess.run([sys.executable, "-c", "import backpack.extensions"],
                                   capture_output=True).returncode == 0
    for mid, m in methods.items():
        if mid.startswith("fxcurv/inductor/"):
            assert m["status"] == "skipped" and "dry run" in m["reason"], (mid, m)
        elif mid.startswith("backpack/") and not (backpack_wheels or backpack_here):
            assert m["status"] == "unavailable" and "BackPACK unavailable" in m["reason"], (mid, m)
        else:
            assert m["status"] == "ok", (mid, m)
            assert m["median_ms"] > 0 and m["peak_mb"] is not None, (mid, m)
            assert all(c["ok"] for c in m.get("checks", {}).values() if "ok" in c), (mid, m["checks"])
    for q in QUANTITIES:
        assert methods[f"fxcurv/fused/{q}"]["checks"][q]["vs"] == f"fxcurv/eager/{q}"
    assert [(c["config"], c["quantity"]) for c in results["criteria"]] == [(cfg["config"], q) for q in QUANTITIES]

    markdown = (out / "bench" / "results.md").read_text()
    assert "## Criteria" in markdown and "| network | quantity | fused ms |" in markdown
    summary = (out / "SUMMARY.md").read_text()
    assert summary.startswith("== fxcurv GPU check: summary ==") and "tests (junit.xml): " in summary
    assert summary in res.stdout and res.stdout.rstrip().splitlines()[-1].startswith("total: ")


def _gpu_bench():
    """benchmarks/gpu.py as a module (it puts benchmarks/ on sys.path for its siblings)."""
    spec = importlib.util.spec_from_file_location("fxcurv_gpu_bench", ROOT / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prewarm_jobs_and_commands(tmp_path):
    """The GPU run's prewarm: one job per (network, backend), the longest first, each a gpu.py process."""
    gpu = _gpu_bench()
    args = gpu.parse_args(["--out", str(tmp_path)])
    jobs = gpu.prewarm_jobs(args, skip={})
    assert len(jobs) == 2 * len(GPU_CONFIGS) and set(jobs) == {(c, b) for c in GPU_CONFIGS
                                                               for b in ("inductor", "fused")}
    assert jobs[0] == ("c3d3_512", "inductor") and {b for _, b in jobs[:len(GPU_CONFIGS)]} == {"inductor"}
    assert gpu.prewarm_jobs(args, skip={"fxcurv/inductor": "no"}) == jobs[len(GPU_CONFIGS):]
    command = gpu.warm_command(args, ("c3d3_128", "inductor"))
    assert command[0] == sys.executable and command[-3:] == ["--warm-one", "c3d3_128", "inductor"]


def test_prewarm_runs_jobs_within_its_budget(tmp_path):
    gpu = _gpu_bench()
    code = {"ok": "print('built')", "fails": "raise SystemExit(3)", "slow": "import time; time.sleep(60)",
            "last": "pass"}
    jobs = [("ok", "a"), ("fails", "b"), ("slow", "c"), ("last", "d")]
    lines = []
    t0 = time.perf_counter()
    got = gpu.prewarm(jobs, lambda job: [sys.executable, "-c", code[job[0]]], 4.0, tmp_path, lines.append)
    assert time.perf_counter() - t0 < 30
    done = got["jobs"]
    assert done["ok-a"]["rc"] == 0 and done["fails-b"]["rc"] == 3
    assert done["slow-c"]["rc"] is None and done["slow-c"]["note"] == "timed out"
    # with one worker (two cores), the last job never starts; with more, it ran
    assert done["last-d"]["rc"] == 0 or done["last-d"]["note"].startswith("not started"), done
    assert (tmp_path / "ok-a.log").read_text().strip() == "built"
    assert "fails-b: exit 3" in lines[-1]


def test_warm_one_builds_every_quantity(tmp_path, capsys):
    """A prewarm job itself (on the CPU: the dry run's tiny net, the fused backend's torch references)."""
    gpu = _gpu_bench()
    assert gpu.main(["--dry-run", "--out", str(tmp_path), "--warm-one", "hesscale_tanh8", "fused"]) == 0
    out = capsys.readouterr().out
    assert all(f"hesscale_tanh8 fused {q}: " in out for q in QUANTITIES) and "FAILED" not in out, out
