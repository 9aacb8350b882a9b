"""Time and CPU peak memory of fxcurv.linops products against a plain forward+backward and curvlinops.

    python benchmarks/linops.py [--nets mnist_mlp,c3d3] [--repeats 15] [--threads 2] [--columns 16]

For each network (the papers' nets of ``fxcurv.networks``, batch 128, float32, cross-entropy): one
GGN-vector product and one Hessian-vector product of ``fxcurv.linops`` (one batch, one vector ``[P]``), the
same products of curvlinops' ``GGNLinearOperator`` / ``HessianLinearOperator``, and a plain
``loss.backward()``-style forward+backward (``torch.autograd.grad``). Every repeat runs every method once, in
a freshly shuffled order (interleaved: drift and load affect all alike); reported: medians (and quartiles)
over the repeats, the ratio to the plain forward+backward, and the peak of CPU memory allocated during one
call (torch's profiler, ``benchmarks/measure.py``). The fxcurv and curvlinops products are checked to agree
before timing.
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import measure  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import fxcurv  # noqa: E402
from fxcurv import linops  # noqa: E402
from fxcurv.networks import NETWORKS  # noqa: E402

NETS = {"mnist_mlp": 128, "fcnn": 128, "c3d3": 128}


def methods(net: str, n: int, with_curvlinops: bool,
            columns: int) -> tuple[dict[str, Callable[[], object]], dict[str, float]]:
    spec = NETWORKS[net]
    torch.manual_seed(0)
    model = spec.build()
    loss_fn = nn.CrossEntropyLoss()
    x = torch.randn((n,) + spec.input_shape)
    y = torch.randint(0, spec.classes, (n,))
    params = [p for p in model.parameters() if p.requires_grad]
    P = sum(p.numel() for p in params)
    v = torch.randn(P)
    engine = fxcurv.compile(model, loss_fn)
    ggn = linops.GGN(engine, [(x, y)])
    hessian = linops.Hessian(engine, [(x, y)])

    def forward_backward():
        return torch.autograd.grad(loss_fn(model(x), y), params)

    out: dict[str, Callable[[], object]] = {
        "forward+backward": forward_backward,
        "fxcurv GGN @ v": lambda: ggn @ v,
        "fxcurv Hessian @ v": lambda: hessian @ v,
    }
    errors: dict[str, float] = {}
    if columns:  # a matrix [P, K]: vectorized over columns (vmap, one pass) or one column at a time
        V = torch.randn(P, columns)
        vectorized = linops.GGN(engine, [(x, y)], chunk=columns)
        looped = linops.GGN(engine, [(x, y)], chunk=1)
        out[f"fxcurv GGN @ V[:,{columns}] vmap"] = lambda: vectorized @ V
        out[f"fxcurv GGN @ V[:,{columns}] loop"] = lambda: looped @ V
    if with_curvlinops:
        import curvlinops

        c_ggn = curvlinops.GGNLinearOperator(model, loss_fn, params, [(x, y)], check_deterministic=False)
        c_hess = curvlinops.HessianLinearOperator(model, loss_fn, params, [(x, y)], check_deterministic=False)
        out["curvlinops GGN @ v"] = lambda: c_ggn @ v
        out["curvlinops Hessian @ v"] = lambda: c_hess @ v
        for ours, theirs, name in ((ggn, c_ggn, "GGN"), (hessian, c_hess, "Hessian")):
            a, b = ours @ v, theirs @ v
            errors[name] = float((a - b).norm() / b.norm())
    return out, errors


def bench(net: str, n: int, repeats: int, with_curvlinops: bool, columns: int) -> None:
    fns, errors = methods(net, n, with_curvlinops, columns)
    for name, rel in errors.items():
        print(f"  check: fxcurv {name} @ v vs curvlinops: relative difference {rel:.1e} (float32)")
    for fn in fns.values():  # warm-up: tracing, program build, first-call allocations
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    rng = random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            t, _ = measure.timed(fns[name])
            times[name].append(t)
    peaks = {name: measure.peak_memory(fn)[0] for name, fn in fns.items()}
    base = statistics.median(times["forward+backward"])
    print(f"\n{net} (N={n}), medians of {repeats} interleaved repeats:")
    print(f"  {'method':<30} {'median':>10} {'q1-q3':>17} {'/ fwd+bwd':>10} {'peak MB':>9}")
    for name in fns:
        ts = sorted(times[name])
        q = statistics.quantiles(ts, n=4)
        med = statistics.median(ts)
        print(f"  {name:<30} {med * 1e3:8.2f}ms {q[0] * 1e3:7.2f}-{q[2] * 1e3:7.2f}ms {med / base:9.2f}x "
              f"{peaks[name] / 2**20:9.1f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nets", default="mnist_mlp,c3d3")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-curvlinops", action="store_true")
    ap.add_argument("--columns", type=int, default=0, help="also a GGN matrix product with this many columns, "
                    "vectorized (vmap) and column by column")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("command: python " + " ".join(shlex.quote(a) for a in sys.argv))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}")
    for net in args.nets.split(","):
        if net not in NETS:
            raise SystemExit(f"unknown net {net!r}; choose from {', '.join(NETS)}")
        bench(net, NETS[net], args.repeats, not args.no_curvlinops, args.columns)
    print(f"\nload average at the end {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
