"""``python -m fxcurv``: compile one of the papers' networks and show its curvature program.

    python -m fxcurv inspect mnist_mlp                       # program listing + per-layer numbers
    python -m fxcurv inspect c3d3 -q diag_ggn,hesscale -n 32 --dot c3d3.dot
    python -m fxcurv list                                    # the networks
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from . import QUANTITIES, __version__, compile
from .api import BACKENDS
from .networks import NETWORKS
from .node_info import info

_DEFAULT_QUANTITIES = "diag_ggn,diag_ggn_mc,diag_hessian,hesscale,hesscale_gn"
# Exact Hessian diagonals push one column per activation entry; on convolutional nets that is
# tens of thousands of columns, so the default there leaves them out.
_CONV_DEFAULT_QUANTITIES = "diag_ggn,diag_ggn_mc,hesscale,hesscale_gn"


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def inspect(args) -> int:
    net = NETWORKS[args.network]
    torch.manual_seed(args.seed)
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    model = net.build().to(dtype).eval()
    x = torch.randn((args.batch,) + net.input_shape, dtype=dtype)
    loss_fn: torch.nn.Module
    if args.loss == "ce":
        loss_fn = torch.nn.CrossEntropyLoss()
        y = torch.randint(0, net.classes, (args.batch,))
    else:
        loss_fn = torch.nn.MSELoss()
        y = torch.randn(args.batch, net.classes, dtype=dtype)
    is_conv = any(isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d,
                                 torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)) for m in model.modules())
    quantities = args.quantities or (_CONV_DEFAULT_QUANTITIES if is_conv else _DEFAULT_QUANTITIES)
    quantities = tuple(q.strip() for q in quantities.split(",") if q.strip())

    engine = compile(model, loss_fn, quantities=quantities, mc_samples=args.mc_samples, seed=args.seed,
                     backend=args.backend)
    t0 = time.perf_counter()
    out = engine(x, y)
    first = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    print(f"fxcurv {__version__} | {args.network}: {net.source} | {n_params:,} parameters")
    print(f"batch {args.batch} x {net.input_shape}, {args.dtype}, {type(loss_fn).__name__}, "
          f"quantities: {', '.join(quantities)}, backend {args.backend}")
    graph = engine.graph
    nodes = list(graph.nodes)
    backward = sum(1 for n in nodes if n.op == "call_function" and info(n).kind.is_backward)
    print(f"\n== curvature program: {len(nodes)} nodes, {backward} of them gradient/curvature ==")
    print(graph)
    if args.code:
        print("\n== generated Python ==")
        print(engine.code)
    if args.dot:
        with open(args.dot, "w") as fh:
            fh.write(engine.to_dot())
        print(f"\n(DOT graph written to {args.dot}; render with `dot -Tsvg {args.dot} -o program.svg`)")

    def plain():
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    call_ms = _median_ms(lambda: engine(x, y), args.repeats)
    plain_ms = _median_ms(plain, args.repeats)
    print(f"\n== results ==\nloss {out.loss.item():.6f} | first call (builds the program) {first:.2f} s | "
          f"call {call_ms:.2f} ms vs plain forward+backward {plain_ms:.2f} ms "
          f"(ratio {call_ms / plain_ms:.2f}, medians of {args.repeats}, {torch.get_num_threads()} threads)")
    cols = ["grad"] + [q for q in quantities if q != "grad"]
    header = f"{'parameter':<12} {'shape':<18}" + "".join(f"{c:>14}" for c in cols)
    print("\nper parameter: mean of the entries (grad: L2 norm)")
    print(header)
    print("-" * len(header))
    for name, p in model.named_parameters():
        cells = []
        for q in cols:
            v = out[q][name]
            cells.append(f"{v.norm().item():14.4e}" if q == "grad" else f"{v.mean().item():14.4e}")
        print(f"{name:<12} {str(tuple(p.shape)):<18}" + "".join(cells))
    if "diag_hessian" in quantities:
        print("\nrelative L1 distance to the exact Hessian diagonal (summed over parameters):")
        exact = out["diag_hessian"]
        denom = sum(exact[n].abs().sum().item() for n in exact)
        for q in quantities:
            if q in ("grad", "diag_hessian"):
                continue
            dist = sum((out[q][n] - exact[n]).abs().sum().item() for n in exact)
            print(f"  {q:<14} {dist / denom:.4f}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fxcurv", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the networks from the papers")
    p = sub.add_parser("inspect", help="compile a network, print its curvature program and numbers")
    p.add_argument("network", choices=sorted(NETWORKS))
    p.add_argument("-q", "--quantities", default=None,
                   help=f"comma-separated, from: {', '.join(QUANTITIES)} "
                        f"(default: {_DEFAULT_QUANTITIES}; without diag_hessian on conv nets)")
    p.add_argument("-n", "--batch", type=int, default=8)
    p.add_argument("--loss", choices=("ce", "mse"), default="ce")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--mc-samples", type=int, default=1)
    p.add_argument("--backend", choices=BACKENDS, default="fused")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dot", help="also write the program as a graphviz DOT file")
    p.add_argument("--code", action="store_true", help="also print the generated Python")
    args = parser.parse_args(argv)
    if args.command == "list":
        for name, net in NETWORKS.items():
            print(f"{name:<14} input {net.input_shape}  {net.source}")
        return 0
    return inspect(args)


if __name__ == "__main__":
    sys.exit(main())
