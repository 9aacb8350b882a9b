"""User-written self-attention: seconds per call of diag_ggn, diag_hessian and hesscale, and their ratio to a
plain forward + backward in the same run (one thread, float32).

Run it from a checkout's root to time that checkout's rules (the hand-written softmax and matmul ops of
``fxcurv/rules/softmax.py`` and ``fxcurv/rules/bilinear.py``, or the generic rule where they are absent):

    OMP_NUM_THREADS=1 python benchmarks/attention_ops.py --batch 32 --tokens 16 --dim 64 --heads 4
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from torch import nn

import fxcurv


class SelfAttention(nn.Module):
    """q, k, v and output projections, ``softmax(q k^T / sqrt(d_h)) v`` over ``H`` heads, a residual
    connection, the mean over tokens, a classifier head."""

    def __init__(self, d: int, heads: int, classes: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = (p(x).view(n, t, self.heads, d // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
        h = x + self.out((attn @ v).transpose(1, 2).reshape(n, t, d))
        return self.head(h.mean(1))


def _seconds(fn, repeats: int) -> float:
    fn()  # warm-up (builds the program)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quantities", nargs="+", default=["diag_ggn", "diag_hessian", "hesscale"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = SelfAttention(args.dim, args.heads, args.classes)
    x = torch.randn(args.batch, args.tokens, args.dim)
    y = torch.randint(0, args.classes, (args.batch,))
    loss = nn.CrossEntropyLoss()

    def plain() -> None:
        model.zero_grad()
        loss(model(x), y).backward()

    base = _seconds(plain, args.repeats)
    print(f"fxcurv from {fxcurv.__file__}")
    print(f"N={args.batch} T={args.tokens} d={args.dim} H={args.heads}: forward+backward {base * 1e3:.1f} ms")
    for quantity in args.quantities:
        engine = fxcurv.compile(model, loss, quantities=(quantity,))
        seconds = _seconds(lambda engine=engine: engine(x, y), args.repeats)
        print(f"{quantity:>14}: {seconds * 1e3:10.1f} ms  {seconds / base:8.1f}x forward+backward")


if __name__ == "__main__":
    main()
