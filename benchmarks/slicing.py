"""Slicing as hand ops: milliseconds per call of diag_ggn and hesscale on an attention block whose ``q, k, v``
are the three chunks of one linear layer and whose first token goes to the head (one thread, float32).

Run it from a checkout's root to time that checkout's rules (the ``index`` op of ``fxcurv/rules/slicing.py``, or
the generic rule where it is absent); it prints the number of generic nodes left in each program:

    OMP_NUM_THREADS=1 python benchmarks/slicing.py --batch 32 --tokens 16 --dim 64
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from torch import nn

import fxcurv


class ChunkedQKV(nn.Module):
    """``q, k, v = linear(x).chunk(3, -1)``, ``softmax(q k^T / sqrt(d)) v``, the first token to a classifier."""

    def __init__(self, d: int, classes: int):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        return self.head((attn @ v)[:, 0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = ChunkedQKV(args.dim, 10)
    x, y = torch.randn(args.batch, args.tokens, args.dim), torch.randint(0, 10, (args.batch,))
    for quantity in ("diag_ggn", "hesscale"):
        engine = fxcurv.compile(model, nn.CrossEntropyLoss(), quantities=(quantity,))
        engine(x, y)  # builds the program
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            engine(x, y)
            times.append(time.perf_counter() - start)
        generic = engine.listing().count("generic(")
        print(f"{quantity:9s} {1e3 * statistics.median(times):9.1f} ms per call (median of {args.repeats}), "
              f"{generic} generic nodes")


if __name__ == "__main__":
    main()
