"""The zoo networks under ``capture="aten"``: export time, first-call time, what became generic nodes and
regions, and agreement with ``capture="fx"``.

    python benchmarks/capture_aten_zoo.py [--nets resnet_tiny,vit_tiny,text_tiny] [--threads 1]

For each network of ``fxcurv.networks`` (float64, eval mode, its own loss; batch 3): the time of
``torch.export.export`` inside the first call, the whole first call (export, canonicalization, program
build and run), the number of generic nodes of the program's forward and how many of them are regions
(:mod:`fxcurv.capture_aten`), and the largest relative difference of grad, diag_ggn and diag_hessian
(``--quantities``) from ``capture="fx"`` (which the test suite checks against torch.func).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import fxcurv  # noqa: E402
from fxcurv.networks import NETWORKS  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = float(b.abs().max())
    err = float((a - b).abs().max())
    return err / scale if scale > 0 else err


def measure(name: str, quantities: tuple[str, ...], batch: int) -> str:
    net = NETWORKS[name]
    torch.manual_seed(0)
    model = net.build().to(torch.float64).eval()
    x, y = net.example_input(batch, torch.float64), net.example_target(batch, torch.float64)
    loss = net.loss.module()
    export_times: list[float] = []
    export = torch.export.export

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return export(*args, **kwargs)
        finally:
            export_times.append(time.perf_counter() - start)

    with mock.patch("torch.export.export", timed):
        start = time.perf_counter()
        engine = fxcurv.compile(model, loss, quantities=quantities, capture="aten")
        out = engine(x, y)
        first = time.perf_counter() - start
    forward = str(engine.graph).split("# backward")[0].splitlines()
    generic = [line for line in forward if "= generic(" in line]
    regions = [line for line in generic if "region_" in line]
    want = fxcurv.compile(model, loss, quantities=quantities)(x, y)
    err = max(_rel(out[q][p], want[q][p]) for q in ("grad",) + quantities for p in want[q])
    return (f"{name:18s} export {export_times[0]:5.1f} s  first call {first:6.1f} s  generic nodes {len(generic):3d} "
            f"(regions {len(regions):2d})  max rel. difference to capture='fx' {err:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nets", default="resnet_tiny,vit_tiny,text_tiny,resnet18,vit_small,text_transformer")
    parser.add_argument("--quantities", default="diag_ggn,diag_hessian")
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.nets.split(","):
        print(measure(name, tuple(args.quantities.split(",")), args.batch), flush=True)


if __name__ == "__main__":
    main()
