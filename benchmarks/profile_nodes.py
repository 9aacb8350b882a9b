"""Where the time of one fxcurv program goes, node by node.

    python benchmarks/profile_nodes.py --net mnist_mlp --quantity kflr --backend eager
    python benchmarks/profile_nodes.py --net c3d3 --quantity kflr --backend fused --repeats 5 --top 15

Builds the engine's program for the network's batch (as in ``run.py``: float32, CPU, 2 threads, the
same random batch), then runs its ``torch.fx.GraphModule`` ``--repeats`` times under an
``fx.Interpreter`` that times every node, and prints the most expensive nodes: the minimum over the
repeats (the least disturbed by other processes), its share of the sum of all nodes' minima, the
median, the node's target and its output shape. Whole calls of the engine are timed between the
repeats for comparison (the interpreter adds a few microseconds per node).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # this checkout's fxcurv, not the installed one

import torch  # noqa: E402
import torch.fx as fx  # noqa: E402
from run import NET_CONFIGS  # noqa: E402

import fxcurv  # noqa: E402
from fxcurv.api import GENERATOR, INPUT, TARGET  # noqa: E402
from fxcurv.networks import NETWORKS  # noqa: E402


class _Timed(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.times: dict[str, list[float]] = {}
        self.shapes: dict[str, str] = {}

    def run_node(self, n: fx.Node):
        t0 = time.perf_counter()
        out = super().run_node(n)
        self.times.setdefault(n.name, []).append(time.perf_counter() - t0)
        if isinstance(out, torch.Tensor):
            self.shapes[n.name] = str(list(out.shape))
        return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--net", default="mnist_mlp", help=f"one of {', '.join(NET_CONFIGS)} (default mnist_mlp)")
    p.add_argument("--quantity", default="kflr", help="an fxcurv quantity (default kflr)")
    p.add_argument("--backend", default="fused", choices=("eager", "fused"))
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    net_name, N = NET_CONFIGS[args.net]
    net = NETWORKS[net_name]
    torch.manual_seed(0)
    model = net.build()
    gen = torch.Generator().manual_seed(1000 + N)  # run.py's batch
    x = torch.randn(N, *net.input_shape, generator=gen)
    y = torch.randint(0, net.classes, (N,), generator=gen)
    engine = fxcurv.compile(model, torch.nn.CrossEntropyLoss(), quantities=(args.quantity,), backend=args.backend,
                            mc_samples=1, seed=0)
    engine(x, y)  # builds the program
    prog = engine.program(x, y)
    params = {n: p.detach() for n, p in model.named_parameters()}
    fixed = {INPUT: x, TARGET: y, GENERATOR: torch.Generator().manual_seed(0)}
    call_args = [fixed[n] if n in fixed else params[prog.param_of[n]] for n in prog.placeholders]

    timed = _Timed(prog.gm)
    whole = []
    for _ in range(args.repeats):
        with torch.no_grad():
            timed.run(*call_args)
        t0 = time.perf_counter()
        engine(x, y)
        whole.append(time.perf_counter() - t0)
    nodes = {n.name: n for n in prog.gm.graph.nodes}
    mins = {k: min(v) for k, v in timed.times.items()}
    total = sum(mins.values())
    print(f"{args.net} (N={N}) {args.quantity}, backend {args.backend}, {args.repeats} repeats, load average "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print(f"whole call: min {min(whole) * 1e3:.1f} ms, median {statistics.median(whole) * 1e3:.1f} ms; "
          f"sum of the nodes' minima {total * 1e3:.1f} ms over {len(mins)} nodes")
    print(f"{'min':>10} {'share':>6} {'median':>10}  {'node':<28} {'target':<34} shape")
    for k, v in sorted(mins.items(), key=lambda kv: -kv[1])[: args.top]:
        target = getattr(nodes[k].target, "__name__", str(nodes[k].target))
        print(f"{v * 1e3:7.2f} ms {v / total:6.1%} {statistics.median(timed.times[k]) * 1e3:7.2f} ms  {k:<28} "
              f"{target[:34]:<34} {timed.shapes.get(k, '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
