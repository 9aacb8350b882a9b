"""The cost of the engine's guards (fxcurv.guards) per call, against the call itself.

    python benchmarks/guards.py [--network mnist_mlp] [--batch 128] [--repeats 200]

Every call fingerprints the model and loss (module tree, parameter identities, training flags, plain
hyperparameters) to make sure the program is not stale. This prints the median time of one
fingerprint and of one engine call (diag_ggn, fused), interleaved, and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fxcurv
from fxcurv.guards import fingerprint
from fxcurv.networks import NETWORKS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--network", default="mnist_mlp", choices=sorted(NETWORKS))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--quantity", default="diag_ggn")
    args = parser.parse_args()
    torch.set_num_threads(2)
    net = NETWORKS[args.network]
    torch.manual_seed(0)
    model, loss_fn = net.build().eval(), torch.nn.CrossEntropyLoss()
    x, y = torch.randn((args.batch,) + net.input_shape), torch.randint(0, net.classes, (args.batch,))
    engine = fxcurv.compile(model, loss_fn, quantities=(args.quantity,))
    engine(x, y)
    guard, call = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        fingerprint(model, loss_fn)
        guard.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        engine(x, y)
        call.append(time.perf_counter() - t0)
    g, c = statistics.median(guard), statistics.median(call)
    print(f"{args.network} N={args.batch} {args.quantity}: guard {g * 1e6:.1f} us, call {c * 1e3:.2f} ms "
          f"(guard included), guard / call = {100 * g / c:.2f}%  (medians of {args.repeats})")


if __name__ == "__main__":
    main()
