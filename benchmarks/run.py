"""fxcurv benchmarks: time and CPU peak memory of curvature methods, side by side, in one run.

    python benchmarks/run.py [--nets mnist_mlp,fcnn128,fcnn500,c3d3] [--repeats 15]
                             [--backends eager,fused,inductor] [--quick]
    python benchmarks/run.py --methods kron          # only the Kronecker factors against BackPACK
    python benchmarks/run.py --methods first_order   # only batch_grad/batch_l2_grad/sum_grad_squared vs BackPACK

See benchmarks/README.md for what is measured and how. Writes benchmarks/results/<name>.json,
benchmarks/results/ratios.png (if matplotlib is installed) and the results section of
benchmarks/README.md (between the marker comments).
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # this checkout's fxcurv, not the installed one

import measure  # noqa: E402
import report  # noqa: E402
import torch  # noqa: E402
from methods import (  # noqa: E402
    BACKPACK_EXT,
    BACKPACK_FIRST_ORDER,
    BACKPACK_KRON,
    COMBINED,
    FIRST_ORDER_QUANTITIES,
    FXCURV_QUANTITIES,
    KRONECKER_QUANTITIES,
    Asdl,
    Autograd,
    Backpack,
    CurvlinopsHutchinson,
    FloorRef,
    Fxcurv,
    FxcurvSeparate,
    TorchFunc,
    kron_factors,
)
from torch import nn  # noqa: E402

import fxcurv  # noqa: E402
from fxcurv.networks import NETWORKS  # noqa: E402

# benchmark config name -> (fxcurv.networks name, batch size)
NET_CONFIGS = {
    "mnist_mlp": ("mnist_mlp", 128),
    "fcnn128": ("fcnn", 128),
    "fcnn500": ("fcnn", 500),
    "c3d3": ("c3d3", 128),
    "resnet18": ("resnet18", 32),
    "vit_small": ("vit_small", 32),
    "text_transformer": ("text_transformer", 32),
    # the modern networks at test size: a smoke test of their methods (not in the default --nets)
    "resnet_tiny": ("resnet_tiny", 8),
    "vit_tiny": ("vit_tiny", 8),
    "text_tiny": ("text_tiny", 8),
}
DEFAULT_NETS = ("mnist_mlp", "fcnn128", "fcnn500", "c3d3", "resnet18", "vit_small", "text_transformer")


@dataclass(frozen=True)
class Modern:
    """How a modern network (issue #9: batch norm, attention, embeddings) is benchmarked: fxcurv's
    ``MODERN_QUANTITIES`` against the plain forward+backward, torch.func and curvlinops; BackPACK and
    ASDL where they cover every parameter (``None``), else the reason they are skipped. No floor (it
    handles ``nn.Sequential`` nets of linear, conv, pooling and activation layers), no Kronecker or
    per-sample family, no diag_hessian (one column per activation unit) or hesscale_gn."""

    backpack: str | None
    asdl: str | None
    backpack_converter: bool = False  # extend(model, use_converter=True): residual additions as modules
    hesscale: str | None = None  # why fxcurv's hesscale is skipped here, if it is


_NO_BACKPACK_ATTENTION = ("not applicable: BackPACK has no extension for nn.TransformerEncoderLayer / "
                          "nn.MultiheadAttention (its hooks fail on the attention's inputs)")
_NO_ASDL_ATTENTION = ("not applicable: ASDL's Fisher covers the modules it knows (Linear, Conv2d, LayerNorm, "
                      "Embedding), not the attention's in_proj parameters or the raw position embedding")
_RESNET = Modern(backpack=None, asdl=None, backpack_converter=True)
# The transformers are hand ops throughout (nn.MultiheadAttention traced through its math path: linear, slices,
# heads, matmul, softmax; LayerNorm, positions, class token, mean over tokens), so hesscale runs on them too.
_TRANSFORMER = Modern(backpack=_NO_BACKPACK_ATTENTION, asdl=_NO_ASDL_ATTENTION)
_TRANSFORMER_TINY = Modern(backpack=_NO_BACKPACK_ATTENTION, asdl=_NO_ASDL_ATTENTION)
MODERN = {"resnet18": _RESNET, "resnet_tiny": _RESNET, "vit_small": _TRANSFORMER, "vit_tiny": _TRANSFORMER_TINY,
          "text_transformer": _TRANSFORMER, "text_tiny": _TRANSFORMER_TINY}
MODERN_QUANTITIES = ("grad", "diag_ggn", "diag_ggn_mc", "hesscale")
FLOOR_SKIP = ("not applicable: the floor reference handles nn.Sequential nets of Linear, Conv2d, pooling, "
              "padding and activation layers")
BACKENDS = ("eager", "fused", "inductor")
# The Kronecker quantities run on these backends only (when requested with --backends): inductor would
# add a multi-second compile per program and shape for a comparison with BackPACK that fused settles.
KRON_BACKENDS = ("eager", "fused")
# --methods shorthand: "kron" selects every Kronecker method (fxcurv's kfac/kflr/kfra, BackPACK's
# KFAC/KFLR/KFRA) and the plain forward+backward, nothing else
KRON_ALIAS = "kron"
# "first_order" selects the per-sample comparison (fxcurv's batch_grad, batch_l2_grad, sum_grad_squared on the
# eager and fused backends, BackPACK's BatchGrad, BatchL2Grad, SumGradSquared) and the plain forward+backward
FIRST_ORDER_ALIAS = "first_order"
FIRST_ORDER_BACKENDS = ("eager", "fused")
CHECK_TOL = 1e-4  # relative (Frobenius) difference per parameter, float32
NOISE_FACTOR = 10.0  # ... or this times the float32 reference's own difference from float64, if larger


# ------------------------------------------------------------------------------------------------
# environment


def _git(*args) -> str:
    try:
        return subprocess.run(["git", "-C", str(HERE.parent), *args], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        return ""


def _meminfo(key: str) -> int:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _version(mod: str) -> str:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:  # noqa: BLE001
        return "not installed"


def machine_info(threads: int) -> dict:
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "mem_total_gb": round(_meminfo("MemTotal") / 2**30, 2),
        "mem_available_gb_at_start": round(_meminfo("MemAvailable") / 2**30, 2),
        "loadavg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "threads_requested": threads,
        "fxcurv": fxcurv.__version__,
        "fxcurv_git_commit": _git("rev-parse", "--short", "HEAD"),
        "fxcurv_git_dirty": bool(_git("status", "--porcelain", "--", "fxcurv")),
        "backpack": _version("backpack-for-pytorch"),
        "asdl": _version("asdfghjkl"),
    }


def set_memory_limit(gb: float) -> None:
    """Cap the address space so that a method that needs too much memory fails with an allocation error
    (recorded) instead of the kernel's OOM killer ending the whole run."""
    if gb <= 0:
        return
    limit = int(gb * 2**30)
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ValueError, OSError) as e:
        print(f"could not set the memory limit: {e}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------
# methods of one network


def _largest_activation(model: nn.Module, x: torch.Tensor) -> int:
    """Units per sample of the largest elementwise-activation input (for the DiagHessian estimate)."""
    sizes = []
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(o[0].numel()))
             for m in model.modules() if isinstance(m, (nn.Sigmoid, nn.Tanh, nn.ReLU))]
    with torch.no_grad():
        model(x[:1])
    for h in hooks:
        h.remove()
    return max(sizes, default=0)


def build_methods(cfg: str, model, net, x, y, args, engines: dict) -> list:
    net_name = NET_CONFIGS[cfg][0]
    if net_name in MODERN:
        return _select(modern_methods(MODERN[net_name], model, net, x, y, args, engines), args)
    loss_fn = nn.CrossEntropyLoss()
    N = x.shape[0]
    has_conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
    n_params = sum(p.numel() for p in model.parameters())
    hess_skip = None
    bp_hess_skip = None
    if has_conv and not args.no_skip:
        V = _largest_activation(model, x)
        hess_skip = (
            "infeasible: the exact Hessian diagonal backpropagates one residual column per activation unit "
            f"(V = {V} units per sample in the largest sigmoid of this net) through every layer below it; "
            "measured when this benchmark was written (fxcurv eager, N=1, 2 CPU threads): 6.5 GB peak and 11 s "
            f"per call, i.e. hundreds of GB at N={N} (an attempt at N=128 was OOM-killed on a 23 GB machine). "
            "Run with --no-skip to try anyway."
        )
        bp_hess_skip = (
            "infeasible: BackPACK's DiagHessian embeds each activation's residual as a dense N x V x V tensor "
            f"(diag_embed, V = {V}): {N * V * V * 4 / 2**30:.0f} GiB at N={N} "
            f"({V * V * 4 / 2**30:.1f} GiB already at N=1, which fails here). Run with --no-skip to try anyway."
        )
    methods = [Autograd(model, loss_fn, x, y)]
    for b in args.backends:
        for q in FXCURV_QUANTITIES:
            methods.append(Fxcurv(engines, model, loss_fn, x, y, (q,), b,
                                  skip=hess_skip if q == "diag_hessian" else None))
        methods.append(Fxcurv(engines, model, loss_fn, x, y, COMBINED, b))
        methods.append(FxcurvSeparate(engines, model, loss_fn, x, y, COMBINED, b))
    if not args.no_backpack:
        holder: dict = {}
        for q in BACKPACK_EXT:
            methods.append(Backpack(model, x, y, q, skip=bp_hess_skip if q == "diag_hessian" else None,
                                    bp_model=holder))
    if not args.no_asdl:
        holder = {}
        methods.append(Asdl(model, x, y, "diag_ggn", holder))
        methods.append(Asdl(model, x, y, "diag_ggn_mc", holder))
    if not args.no_func:
        methods.append(TorchFunc(model, x, y, net.classes, "diag_ggn", args.func_budget_mb))
        methods.append(TorchFunc(model, x, y, net.classes, "diag_ggn_mc", args.func_budget_mb))
        methods.append(TorchFunc(
            model, x, y, net.classes, "diag_hessian", args.func_budget_mb,
            skip=f"infeasible: torch.func gives the Hessian diagonal only through one Hessian-vector product "
                 f"per parameter ({n_params} HVPs) or the full per-layer Hessian; no structured diagonal"))
    methods.append(FloorRef(model, x, y))
    if not args.no_curvlinops:
        methods.append(CurvlinopsHutchinson(model, loss_fn, x, y, args.curvlinops_matvecs))
    if not args.no_kron:
        methods += kron_methods(model, x, y, args, engines, has_conv)
    if not args.no_first_order:
        methods += first_order_methods(model, x, y, args, engines)
    return _select(methods, args)


def modern_methods(modern: Modern, model, net, x, y, args, engines: dict) -> list:
    """A modern network's methods (see :class:`Modern`): fxcurv's ``MODERN_QUANTITIES`` on every
    backend, BackPACK's and ASDL's GGN diagonals (exact and Monte Carlo) where they apply, torch.func's
    per-sample vmap references, curvlinops' Hutchinson diagonal."""
    loss_fn = nn.CrossEntropyLoss()
    methods: list = [Autograd(model, loss_fn, x, y)]
    for b in args.backends:
        methods += [Fxcurv(engines, model, loss_fn, x, y, (q,), b, skip=modern.hesscale if q == "hesscale" else None)
                    for q in MODERN_QUANTITIES]
    if not args.no_backpack:
        holder: dict = {}
        methods += [Backpack(model, x, y, q, skip=modern.backpack, bp_model=holder,
                             converter=modern.backpack_converter) for q in ("diag_ggn", "diag_ggn_mc")]
    if not args.no_asdl:
        holder = {}
        methods += [Asdl(model, x, y, q, holder, skip=modern.asdl) for q in ("diag_ggn", "diag_ggn_mc")]
    if not args.no_func:
        methods += [TorchFunc(model, x, y, net.classes, q, args.func_budget_mb) for q in ("diag_ggn", "diag_ggn_mc")]
    methods.append(FloorRef(model, x, y, skip=FLOOR_SKIP))
    if not args.no_curvlinops:
        methods.append(CurvlinopsHutchinson(model, loss_fn, x, y, args.curvlinops_matvecs))
    return methods


def _select(methods: list, args) -> list:
    """The methods ``--methods`` selects (all without it; autograd always)."""
    if args.methods:
        keep = [s.strip() for s in args.methods.split(",") if s.strip()]
        kron, first = KRON_ALIAS in keep, FIRST_ORDER_ALIAS in keep
        methods = [m for m in methods if m.family == "autograd" or any(k in m.id for k in keep)
                   or (kron and m.quantity in KRONECKER_QUANTITIES)
                   or (first and m.quantity in FIRST_ORDER_QUANTITIES)]
    return methods


def first_order_methods(model, x, y, args, engines: dict) -> list:
    """fxcurv's batch_grad, batch_l2_grad and sum_grad_squared with the eager and fused backends, and
    BackPACK's BatchGrad, BatchL2Grad and SumGradSquared on an extended copy of its own."""
    loss_fn = nn.CrossEntropyLoss()
    methods = [Fxcurv(engines, model, loss_fn, x, y, (q,), b) for b in args.backends if b in FIRST_ORDER_BACKENDS
               for q in FIRST_ORDER_QUANTITIES]
    if not args.no_backpack:
        holder: dict = {}
        methods += [Backpack(model, x, y, q, bp_model=holder) for q in BACKPACK_FIRST_ORDER]
    return methods


def kron_methods(model, x, y, args, engines: dict, has_conv: bool) -> list:
    """fxcurv's kfac (1 sample), kflr, kfra with the eager and fused backends, and BackPACK's KFAC
    (mc_samples=1), KFLR, KFRA on an extended copy of its own. On a convolutional net kfra is skipped:
    KFRA's batch-averaged matrix at a conv output is dense over all its units."""
    loss_fn = nn.CrossEntropyLoss()
    kfra_skip = bp_kfra_skip = None
    if has_conv and not args.no_skip:
        V = _largest_activation(model, x)
        kfra_skip = (
            "infeasible: KFRA backpropagates a dense batch-averaged [V, V] matrix to every layer output "
            f"(V = {V} units per sample at the first conv's output: {V * V * 4 / 2**30:.1f} GiB in float32), "
            "which fxcurv refuses above 1 GiB. Run with --no-skip to see the refusal.")
        bp_kfra_skip = (
            f"infeasible: BackPACK's KFRA forms the same dense [V, V] matrix (V = {V}) at the conv outputs, "
            f"{V * V * 4 / 2**30:.1f} GiB and more in its intermediates. Run with --no-skip to try anyway.")
    methods = []
    for b in args.backends:
        if b not in KRON_BACKENDS:
            continue
        for q in KRONECKER_QUANTITIES:
            methods.append(Fxcurv(engines, model, loss_fn, x, y, (q,), b,
                                  skip=kfra_skip if q == "kfra" else None))
    if not args.no_backpack:
        holder: dict = {}  # its own extended copy: BackPACK's diagonal methods may be filtered out
        for q in BACKPACK_KRON:
            methods.append(Backpack(model, x, y, q, skip=bp_kfra_skip if q == "kfra" else None, bp_model=holder))
    return methods


# ------------------------------------------------------------------------------------------------
# checks


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    nb = b.norm().item()
    d = (a - b).norm().item()
    return d / nb if nb > 0 else d


def float32_noise(model, x, y, values: dict, ref_backend: str | None, res: dict, max_s: float) -> dict:
    """How far the float32 references are from float64 (``{quantity: {param: rel. difference}}``): the
    conditioning of the problem, which sets the tolerance of the checks. In float32 the gradient of the
    first conv of c3d3, a sum of many cancelling terms, is only good to ~1e-2 (eager and inductor differ
    by that much and both are equally right); a fixed tolerance would flag that as an error.

    float64 values: autograd (gradient), the floor (diag_ggn), fxcurv eager on a float64 copy (hesscale,
    hesscale_gn, and diag_hessian unless its float32 call took longer than ``max_s``). diag_ggn_mc (other
    random draws in float64) uses diag_ggn's; a quantity without float64 value uses the larger of the
    gradient's and diag_ggn's.
    """
    from floor import Floor

    m64 = copy.deepcopy(model).double()
    x64 = x.double() if x.is_floating_point() else x  # token ids stay integers
    noise: dict = {}

    def rel_all(a: dict, b: dict) -> dict:
        return {k: _rel(a[k], b[k]) for k in b if k in a}

    if "autograd/fwd+bwd" in values:
        loss = nn.functional.cross_entropy(m64(x64), y)
        names = [n for n, _ in m64.named_parameters()]
        g = torch.autograd.grad(loss, [p for _, p in m64.named_parameters()])
        noise["grad"] = rel_all(values["autograd/fwd+bwd"]["grad"], dict(zip(names, g)))
    ref = lambda q: values.get(f"fxcurv/{ref_backend}/{q}", {}).get(q)  # noqa: E731
    if ref("diag_ggn") is not None:
        try:
            noise["diag_ggn"] = rel_all(ref("diag_ggn"), Floor(m64)(x64, y)[2])
        except Exception:  # noqa: BLE001
            pass
    for q in ("hesscale", "hesscale_gn", "diag_hessian"):
        r32 = ref(q)
        if r32 is None:
            continue
        if q == "diag_hessian" and res.get(f"fxcurv/{ref_backend}/{q}", {}).get("first_call_s", 0) > max_s:
            continue
        try:
            out = fxcurv.compile(m64, nn.CrossEntropyLoss(), quantities=(q,), backend="eager")(x64, y)
            noise[q] = rel_all(r32, out[q])
            del out
        except Exception:  # noqa: BLE001
            pass
    # Kronecker factors: fxcurv eager on the float64 copy, per factor; kfac (other random draws in
    # float64) uses kflr's, whose A is the same and whose G has the same conditioning
    for q in ("kflr", "kfra"):
        r32 = ref(q)
        if r32 is None or res.get(f"fxcurv/{ref_backend}/{q}", {}).get("first_call_s", 0) > max_s:
            continue
        try:
            out = fxcurv.compile(m64, nn.CrossEntropyLoss(), quantities=(q,), backend="eager")(x64, y)
            noise[q] = rel_all(r32, {k: v for n, op in out[q].items() for k, v in kron_factors(n, op.factors).items()})
            del out
        except Exception:  # noqa: BLE001
            pass
    if "kflr" in noise:
        noise.setdefault("kfac", noise["kflr"])
    # per-sample gradients: the gradient's (a sum of them, with more cancellation than each)
    for q in FIRST_ORDER_QUANTITIES:
        noise.setdefault(q, noise.get("grad", {}))
    if "diag_ggn" in noise:
        noise.setdefault("diag_ggn_mc", noise["diag_ggn"])
    fallback = {k: max(noise.get("grad", {}).get(k, 0.0), noise.get("diag_ggn", {}).get(k, 0.0))
                for k in set(noise.get("grad", {})) | set(noise.get("diag_ggn", {}))}
    for q in FXCURV_QUANTITIES:
        noise.setdefault(q, fallback)
    gc.collect()
    return noise


def run_checks(methods, values: dict, ref_backend: str | None, noise: dict | None = None) -> dict:
    """Compare every method's quantities with a reference: the gradient with autograd's, every other
    quantity with fxcurv's single-quantity program on ``ref_backend`` (eager when run). A parameter
    passes if its relative difference is below ``max(CHECK_TOL, NOISE_FACTOR * noise)``, ``noise`` being
    the float32 reference's own difference from float64 (see ``float32_noise``)."""
    noise = noise or {}
    refs: dict[str, tuple[str, dict]] = {}
    if "autograd/fwd+bwd" in values:
        refs["grad"] = ("autograd/fwd+bwd", values["autograd/fwd+bwd"]["grad"])
    if ref_backend is not None:
        for q in FXCURV_QUANTITIES + KRONECKER_QUANTITIES + FIRST_ORDER_QUANTITIES:
            mid = f"fxcurv/{ref_backend}/{q}"
            if mid in values and q in values[mid]:
                refs.setdefault(q, (mid, values[mid][q]))
    # where fxcurv did not run (a modern net before #9's generic rule), torch.func's exact GGN diagonal
    if "torch.func/diag_ggn" in values:
        refs.setdefault("diag_ggn", ("torch.func/diag_ggn", values["torch.func/diag_ggn"]["diag_ggn"]))
    checks = {}
    for m in methods:
        if m.id not in values:
            continue
        for q, vals in values[m.id].items():
            if q not in refs or refs[q][0] == m.id:
                continue
            ref_id, ref = refs[q]
            if q == "diag_ggn_mc" and m.family != "fxcurv":
                checks[f"{m.id}:{q}"] = {"method": m.id, "quantity": q, "vs": ref_id,
                                         "note": "not compared: different random draws"}
                continue
            per, tol = {}, {}
            missing = sorted(set(ref) - set(vals))
            for name, r in ref.items():
                if name in vals:
                    per[name] = _rel(vals[name], r) if vals[name].shape == r.shape else float("inf")
                    tol[name] = max(CHECK_TOL, NOISE_FACTOR * noise.get(q, {}).get(name, 0.0))
            worst = max(per.values(), default=float("nan"))
            failing = sorted(k for k in per if not per[k] <= tol[k])
            c = {"method": m.id, "quantity": q, "vs": ref_id, "max_rel_diff": worst,
                 "per_param": per, "tolerance": tol, "failing": failing,
                 "missing": missing, "ok": bool(not failing and not missing)}
            if q in KRONECKER_QUANTITIES:
                c.update(kron_structure(vals, ref))
                c["ok"] = c["ok"] and c["structure_ok"]
                if q == "kfac":
                    c["note"] = ("same draws: fxcurv's generator and BackPACK's global RNG seeded alike "
                                 "(torch.multinomial on the same probabilities), so G is compared as well as A")
            checks[f"{m.id}:{q}"] = c
    return checks


def kron_structure(vals: dict, ref: dict) -> dict:
    """Structure of Kronecker factors (``{"<param>:G" / ":A": tensor}``) beside their values: the same
    factor names and shapes as the reference's, every factor square and symmetric (relative
    ``|F - F^T|`` within ``CHECK_TOL``). For kfac this alone is what a comparison of independent draws
    could check."""
    shapes = {k: list(v.shape) for k, v in vals.items()}
    asym = {k: _rel(v, v.T) if v.dim() == 2 and v.shape[0] == v.shape[1] else float("inf")
            for k, v in vals.items()}
    same = set(vals) == set(ref) and all(vals[k].shape == ref[k].shape for k in ref)
    worst = max(asym.values(), default=0.0)
    return {"factor_shapes": shapes, "shapes_match_reference": same, "max_asymmetry": worst,
            "structure_ok": bool(same and worst <= CHECK_TOL)}


# ------------------------------------------------------------------------------------------------
# one network


def error_record(e: BaseException) -> dict:
    """The failure ``e`` (being handled) for the results JSON: its type and message, and the traceback."""
    return {"error": f"{type(e).__name__}: {str(e)[:600]}", "traceback": traceback.format_exc()[-4000:]}


def problem(net_name: str, N: int, device: str, models: dict):
    """``(model, x, y)``: the network's weights (seed 0, built once per ``models``) and a batch of ``N``
    random inputs and class targets (seed ``1000 + N``), on ``device``; the GPU check uses the same."""
    net = NETWORKS[net_name]
    if net_name not in models:
        torch.manual_seed(0)
        models[net_name] = net.build().to(device)
    gen = torch.Generator().manual_seed(1000 + N)
    x = net.example_input(N, generator=gen).to(device)  # float32 N(0, 1), or token ids
    y = net.example_target(N, generator=gen).to(device)
    return models[net_name], x, y


def bench_net(cfg: str, args, engines: dict, models: dict, bar, log) -> dict:
    net_name, N = NET_CONFIGS[cfg]
    net = NETWORKS[net_name]
    model, x, y = problem(net_name, N, "cpu", models)
    methods = build_methods(cfg, model, net, x, y, args, engines)
    units = args.repeats + 2
    load0 = os.getloadavg()
    res: dict = {m.id: {"label": m.label, "family": m.family, "quantity": m.quantity, "backend": m.backend,
                        "status": "pending"} for m in methods}
    values: dict = {}

    def fail(m, e, phase):
        res[m.id].update(status="error", phase=phase, **error_record(e))
        log(f"[{cfg}] {m.id} failed during {phase}: {res[m.id]['error'][:300]}")
        try:
            m.reset()
        except Exception:  # noqa: BLE001
            pass
        gc.collect()

    # phase 1: set up, build/compile, warm up, check call
    active = []
    for m in methods:
        bar.set_postfix_str(f"{cfg} setup {m.id}", refresh=True)
        if m.skip:
            res[m.id].update(status="skipped", reason=m.skip)
            bar.update(units)
            continue
        r = res[m.id]
        try:
            m.setup()
            # call 1 builds fxcurv's program (an fx interpreter run), inductor compiles on call 2; the
            # last warm-up call is the checked one (fxcurv: with a freshly seeded generator)
            calls = 1 + args.warmup + (2 if m.backend == "inductor" else 0)
            wt = []
            for i in range(calls):
                m.reset()
                if i == calls - 1:
                    t, out = measure.timed(m.check_call)
                    values[m.id] = m.values(out)
                    del out
                else:
                    t, _ = measure.timed(m.call)
                wt.append(t)
            m.reset()
            r["first_call_s"], r["warmup_s"] = wt[0], wt[1:]
            if m.backend == "inductor":
                r["compile_call_s"] = wt[1]
            t_est = min(wt[-2:]) if len(wt) >= 2 else wt[-1]
            r["n_repeats"] = max(min(args.repeats, int(args.method_budget_s / max(t_est, 1e-9))),
                                 min(args.min_repeats, args.repeats))
            r["times_s"] = []
            active.append(m)
            bar.update(1)
        except Exception as e:  # noqa: BLE001
            fail(m, e, "setup/warmup")
            bar.update(units)

    ref_backend = "eager" if "eager" in args.backends else (args.backends[0] if args.backends else None)
    bar.set_postfix_str(f"{cfg} checks (float64 references)", refresh=True)
    try:
        noise = float32_noise(model, x, y, values, ref_backend, res, max_s=args.ref64_max_s)
    except Exception as e:  # noqa: BLE001
        log(f"[{cfg}] float64 references failed: {e}")
        noise = {}
    checks = run_checks(methods, values, ref_backend, noise)
    del values
    gc.collect()

    # phase 2: timing, round-robin over the methods (rotated each repeat) so drift affects all alike
    for rep in range(args.repeats):
        k = rep % max(1, len(active))
        order = active[k:] + active[:k]
        for m in order:
            if rep >= res[m.id]["n_repeats"] or res[m.id]["status"] == "error":
                continue
            bar.set_postfix_str(f"{cfg} rep {rep + 1}/{args.repeats} {m.id}", refresh=False)
            try:
                m.reset()
                t, out = measure.timed(m.call)
                del out
                res[m.id]["times_s"].append(t)
            except Exception as e:  # noqa: BLE001
                fail(m, e, f"timing repeat {rep}")
            bar.update(1)
    for m in active:
        skipped_units = args.repeats - res[m.id]["n_repeats"]
        if skipped_units > 0:
            bar.update(skipped_units)

    # phase 3: peak memory of one call each (separately: the profiler slows calls down)
    for m in active:
        bar.set_postfix_str(f"{cfg} memory {m.id}", refresh=True)
        r = res[m.id]
        if r["status"] == "error":
            bar.update(1)
            continue
        try:
            m.reset()
            gc.collect()
            peak, retained, out = measure.peak_memory(m.call)
            del out
            m.reset()
            r["peak_mb"] = peak / 2**20
            r["retained_mb"] = retained / 2**20
        except Exception as e:  # noqa: BLE001
            fail(m, e, "memory")
        bar.update(1)
        r.update(measure.summarize(r["times_s"]))
        if r["status"] != "error":
            r["status"] = "ok"
    for m in methods:
        try:
            m.reset()
        except Exception:  # noqa: BLE001
            pass
    gc.collect()

    report.add_ratios(res)
    asdl = {}
    c = checks.get("asdl/fisher_exact:diag_ggn")
    if c and "per_param" in c:
        asdl = c["per_param"]
    return {
        "config": cfg, "network": net_name, "batch": N, "source": net.source, "input_shape": list(net.input_shape),
        "classes": net.classes, "params": sum(p.numel() for p in model.parameters()),
        "methods": res, "checks": checks, "asdl_vs_fxcurv_diag_ggn": asdl,
        "float32_vs_float64": noise, "loadavg_at_start": load0, "loadavg_at_end": os.getloadavg(),
    }


# ------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nets", default=",".join(DEFAULT_NETS),
                   help=f"comma-separated, from {', '.join(NET_CONFIGS)} (default: {', '.join(DEFAULT_NETS)})")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per method, median reported (default 15; --quick: 3)")
    p.add_argument("--backends", default=",".join(BACKENDS), help="fxcurv backends (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 3 repeats, no extra warm-up call, 20 s per-method time budget")
    p.add_argument("--warmup", type=int, default=None,
                   help="calls after the first (building) one and before timing, the last of them checked "
                        "for correctness; inductor gets 2 more (default 2; --quick: 0, the first call is checked)")
    p.add_argument("--method-budget-s", type=float, default=None,
                   help="cap a slow method's repeats at budget / time-per-call, at least --min-repeats "
                        "(default 90 s; --quick: 20 s)")
    p.add_argument("--min-repeats", type=int, default=None, help="default 5; --quick: 1")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--methods", default="",
                   help="only methods whose id contains one of these comma-separated strings "
                        "(autograd always runs), e.g. 'fxcurv/fused,backpack'; 'kron' selects the Kronecker "
                        "comparison (fxcurv kfac/kflr/kfra eager and fused, BackPACK KFAC/KFLR/KFRA); "
                        "'first_order' the per-sample one (fxcurv batch_grad/batch_l2_grad/sum_grad_squared "
                        "eager and fused, BackPACK BatchGrad/BatchL2Grad/SumGradSquared)")
    p.add_argument("--no-kron", action="store_true",
                   help="leave out the Kronecker methods (fxcurv kfac/kflr/kfra, BackPACK KFAC/KFLR/KFRA)")
    p.add_argument("--no-first-order", action="store_true",
                   help="leave out the per-sample methods (fxcurv batch_grad/batch_l2_grad/sum_grad_squared, "
                        "BackPACK BatchGrad/BatchL2Grad/SumGradSquared)")
    p.add_argument("--name", default=None,
                   help="results/<name>.json (default: 'quick' with --quick, else 'full'; a '--methods kron' "
                        "run or one naming only kfac/kflr/kfra: 'kron-quick' / 'kron'; a '--methods first_order' "
                        "run: 'first-order-quick' / 'first-order')")
    p.add_argument("--no-readme", action="store_true", help="do not rewrite the README results section(s)")
    p.add_argument("--main-readme", action="store_true",
                   help="also write the compact Kronecker table into ../README.md (between its kron markers)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-backpack", action="store_true")
    p.add_argument("--no-asdl", action="store_true")
    p.add_argument("--no-func", action="store_true", help="skip the torch.func references")
    p.add_argument("--no-curvlinops", action="store_true", help="skip curvlinops' Hutchinson GGN diagonal")
    p.add_argument("--curvlinops-matvecs", type=int, default=1,
                   help="GGN-vector products of curvlinops' Hutchinson diagonal estimate (default 1: the "
                        "cost of one Monte Carlo column, as diag_ggn_mc)")
    p.add_argument("--no-skip", action="store_true", help="also try the methods skipped as infeasible")
    p.add_argument("--func-budget-mb", type=float, default=1024.0,
                   help="memory budget of one torch.func chunk of samples (default 1024)")
    p.add_argument("--ref64-max-s", type=float, default=5.0,
                   help="compute diag_hessian's float64 reference (for the check tolerance) only if its "
                        "float32 call took less than this (default 5 s)")
    p.add_argument("--mem-limit-gb", type=float, default=None,
                   help="address-space limit, so that an oversized method fails instead of being OOM-killed "
                        "(default: 85%% of physical memory; 0: none)")
    args = p.parse_args(argv)
    args.nets = [s.strip() for s in args.nets.split(",") if s.strip()]
    unknown = [n for n in args.nets if n not in NET_CONFIGS]
    if unknown:
        p.error(f"unknown nets {unknown}; choose from {', '.join(NET_CONFIGS)}")
    args.backends = [s.strip() for s in args.backends.split(",") if s.strip()]
    bad = [b for b in args.backends if b not in BACKENDS]
    if bad:
        p.error(f"unknown backends {bad}; choose from {', '.join(BACKENDS)}")
    args.repeats = args.repeats if args.repeats is not None else (3 if args.quick else 15)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.quick else 2)
    args.method_budget_s = args.method_budget_s if args.method_budget_s is not None else (20.0 if args.quick else 90.0)
    args.min_repeats = args.min_repeats if args.min_repeats is not None else (1 if args.quick else 5)
    # a run of Kronecker methods only (--methods kron, or naming only Kronecker quantities) keeps the
    # full run's JSON, plot and README section
    keys = {s.strip() for s in args.methods.split(",") if s.strip()}
    args.kron_only = bool(keys) and keys <= {KRON_ALIAS, *KRONECKER_QUANTITIES}
    if args.kron_only and args.no_kron:
        p.error("--no-kron leaves out every method a Kronecker-only --methods selects")
    args.first_order_only = bool(keys) and keys <= {FIRST_ORDER_ALIAS, *FIRST_ORDER_QUANTITIES}
    if args.first_order_only and args.no_first_order:
        p.error("--no-first-order leaves out every method a per-sample-only --methods selects")
    if args.name is None:
        prefix = "kron-" if args.kron_only else "first-order-" if args.first_order_only else ""
        args.name = prefix + ("quick" if args.quick else "full")
        args.name = args.name[:-len("-full")] if prefix and args.name.endswith("-full") else args.name
    if args.mem_limit_gb is None:
        args.mem_limit_gb = round(0.85 * _meminfo("MemTotal") / 2**30, 1)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # BackPACK's and ASDL's hooks warn on every call; the warnings say nothing about the numbers.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Using a non-full backward hook")
    command = "python " + " ".join(shlex.quote(a) for a in ([sys.argv[0]] + (sys.argv[1:] if argv is None else argv)))
    torch.set_num_threads(args.threads)
    set_memory_limit(args.mem_limit_gb)
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None

    meta = machine_info(args.threads)
    meta.update(command=command, argv=sys.argv if argv is None else argv,
                timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                repeats=args.repeats, warmup=args.warmup, quick=args.quick, backends=args.backends,
                method_budget_s=args.method_budget_s, min_repeats=args.min_repeats,
                mem_limit_gb=args.mem_limit_gb, dtype="float32", device="cpu",
                loss="CrossEntropyLoss(reduction='mean')", memory_selftest=measure.self_test())
    print(f"fxcurv benchmarks: {', '.join(args.nets)} | backends {', '.join(args.backends)} | "
          f"{args.repeats} repeats | {torch.get_num_threads()} threads | torch {torch.__version__}")
    if not meta["memory_selftest"]["ok"]:
        print(f"warning: the peak-memory self-test failed: {meta['memory_selftest']}", file=sys.stderr)

    # size the progress bar: (network, method) x (warm-up + repeats + memory)
    engines: dict = {}
    models: dict = {}
    totals = 0
    for cfg in args.nets:
        net_name, N = NET_CONFIGS[cfg]
        net = NETWORKS[net_name]
        torch.manual_seed(0)
        m = net.build()
        x = net.example_input(N)
        totals += len(build_methods(cfg, m, net, x, torch.zeros(N, dtype=torch.long), args, {})) * (args.repeats + 2)

    class _NoBar:
        def update(self, n=1): pass
        def set_postfix_str(self, s, refresh=True): pass
        def close(self): pass

    bar = tqdm(total=totals, unit="call", dynamic_ncols=True, smoothing=0.05) if tqdm else _NoBar()
    log = tqdm.write if tqdm else print
    t0 = time.perf_counter()
    results = {"meta": meta, "nets": {}}
    for cfg in args.nets:
        try:
            results["nets"][cfg] = bench_net(cfg, args, engines, models, bar, log)
        except Exception as e:  # noqa: BLE001  (a whole network failing must not lose the others)
            results["nets"][cfg] = {"config": cfg, **error_record(e)}
            log(f"[{cfg}] failed: {e}")
    bar.close()
    meta["wall_s"] = time.perf_counter() - t0
    meta["loadavg_at_end"] = os.getloadavg()

    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    json_path = out_dir / f"{args.name}.json"
    json_path.write_text(json.dumps(report.clean(results), indent=1, default=report.json_default))
    print(f"\nresults: {json_path.relative_to(HERE.parent)}")
    if not args.no_plot:
        # a Kronecker-only run keeps the full run's plot
        png = report.plot(results, out_dir / ("ratios-kron.png" if args.kron_only else
                                              "ratios-first-order.png" if args.first_order_only else "ratios.png"))
        print(f"plot: {png}" if png else "plot: skipped (matplotlib not installed)")
    if not args.no_readme:
        for what in report.update_readme(results, HERE / "README.md", json_path.relative_to(HERE)):
            print(f"README: benchmarks/README.md ({what} regenerated)")
    if args.main_readme:
        if report.update_main_readme(results, HERE.parent / "README.md", json_path.relative_to(HERE.parent)):
            print("README: README.md (Kronecker table regenerated)")
        else:
            print("README: README.md not changed (no Kronecker results, or no kron markers in it)")
    print()
    print(report.summary(results))
    kron = report.kron_compact_markdown(results)
    if kron:
        print("Kronecker factors, fxcurv against BackPACK (for the README's Performance section):\n")
        print(kron)
    first = report.first_order_compact_markdown(results)
    if first:
        print("Per-sample quantities, fxcurv against BackPACK:\n")
        print(first)
    return 0


if __name__ == "__main__":
    sys.exit(main())
