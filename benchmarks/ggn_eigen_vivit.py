"""fxcurv's ``ggn_eigen`` against the ViViT reference library (``vivit-for-pytorch``), side by side.

(Not named ``vivit.py``: this directory is on ``sys.path`` and the file would shadow the package.)

    python benchmarks/ggn_eigen_vivit.py                                   # MNIST MLP, HBP FCNN, c3d3 at N = 128
    python benchmarks/ggn_eigen_vivit.py --quick                           # smoke test: small batches, 3 repeats
    python benchmarks/ggn_eigen_vivit.py --nets c3d3 --batch 64 --repeats 9 --budget-mib 2048

What is measured, per network (CIFAR-10 / MNIST-shaped random batches, cross-entropy with mean
reduction, float32, CPU, ``--threads`` threads), for each of ViViT's approximations asked for with
``--settings`` (``exact-full``, ``mc-full``, ``exact-frac``, ``mc-frac``; frac = the first 1/8 of the
batch, MC = one Monte Carlo sample, ViViT B.1):

* time to the Gram matrix: fxcurv's call (loss, gradient and the Gram matrix) against a backward pass
  with ViViT's ``ViViTGGNExact``/``ViViTGGNMC`` extension whose hook sums each parameter's Gram matrix
  and frees its buffers (what ``vivit.linalg.eigvalsh.EigvalshComputation`` does before its
  eigendecomposition); and fxcurv's Gram matrix alone (``compile(..., grad=False)``: loss and Gram
  matrix, no gradient), which ViViT cannot give (its extension runs inside ``loss.backward()``, which
  computes the gradient); medians of ``--repeats`` runs, the order of the calls shuffled per repeat;
* time to the eigenvalues (fxcurv ``GGNEigen(vectors=False, keep_gram=False)`` then ``.values``; ViViT's
  ``EigvalshComputation``) and to the eigenpairs (``GGNEigen(top_k=k)`` then ``.values`` and every
  parameter's eigenvectors; ViViT's ``EighComputation`` with the ``k`` largest);
* the CPU allocator's peak during each (torch.profiler's memory events, ``measure.peak_memory``: the
  peak above what was allocated when the call started -- model, batch; neither library holds results of
  an earlier call then: ViViT's gradients are dropped before each call, as fxcurv's results are);
* the largest batch whose eigenvalue computation peaks within ``--budget-mib`` (ViViT's Table S.1a
  idea): peaks measured at three small batches, a quadratic through them (the Gram matrix grows as
  ``N^2``, the messages as ``N``) predicts the critical batch, which is then bracketed and bisected
  with measured runs (to 2%); fxcurv's own estimate before running (``GGNEigen.memory``) is reported
  beside its measured peak.

ViViT 1.0 calls ``Tensor.symeig``, which torch removed (2.0); the script gives ``Tensor`` a
``symeig`` with the old signature on ``torch.linalg.eigh``/``eigvalsh`` (the only shim needed here).
Checks: the exact settings' largest eigenvalues must agree between the libraries (float32, 1e-3
relative). Results: ``benchmarks/results/vivit.json`` (``vivit-quick.json`` with ``--quick``) and a
markdown table on stdout.

Install: ``python -m pip install --no-deps vivit-for-pytorch`` (BackPACK as in ``benchmarks/README.md``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
from measure import peak_memory  # noqa: E402
from torch import nn  # noqa: E402

import fxcurv  # noqa: E402
from fxcurv.networks import NETWORKS  # noqa: E402
from fxcurv.quantities import GGNEigen  # noqa: E402

SETTINGS = ("exact-full", "mc-full", "exact-frac", "mc-frac")
# ViViT B.1: one Monte Carlo sample, and a fraction 1/8 of the batch (after Zhang et al.).
MC_SAMPLES = 1
FRACTION = 1 / 8
CHECK_RTOL = 1e-3  # the exact settings' largest eigenvalues, float32
CRITICAL_RTOL = 0.02  # the critical batch is bisected to this relative precision


# ---- the two libraries ------------------------------------------------------------------------------

def vivit_shims() -> None:
    """ViViT 1.0 calls ``Tensor.symeig(eigenvectors=...)``, removed from torch in 2.0."""

    def symeig(self: torch.Tensor, eigenvectors: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if eigenvectors:
            return torch.linalg.eigh(self)
        return torch.linalg.eigvalsh(self), self.new_empty(0)

    torch.Tensor.symeig = symeig  # type: ignore[attr-defined]


def subset(setting: str, n: int) -> list[int] | None:
    return list(range(max(1, math.ceil(FRACTION * n)))) if setting.endswith("frac") else None


class Vivit:
    """ViViT on a BackPACK-extended copy of the model."""

    def __init__(self, model: nn.Module, setting: str):
        from backpack import extend

        self.model = extend(copy.deepcopy(model))
        self.loss_fn = extend(nn.CrossEntropyLoss())
        self.setting = setting
        self.mc = MC_SAMPLES if setting.startswith("mc") else 0

    def _backward(self, x: torch.Tensor, y: torch.Tensor, extension: Any, hook: Callable[..., None]) -> None:
        from backpack import backpack

        # No gradients held from a previous call: their buffers would be reused, and the peak would not
        # count the gradient that fxcurv's peak counts.
        self.model.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(x), y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # BackPACK's full backward hooks on inputs without grad
            with backpack(extension, extension_hook=hook):
                loss.backward()

    def gram(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from vivit.linalg.utils import get_vivit_extension

        extension = get_vivit_extension(subset(self.setting, x.shape[0]), self.mc)
        total: dict[str, torch.Tensor] = {}

        def hook(module: nn.Module) -> None:
            for p in module.parameters(recurse=False):
                found = getattr(p, extension.savefield, None)
                if found is None:
                    continue
                g = found["gram_mat"]()
                total["g"] = g if "g" not in total else total["g"] + g
                delattr(p, extension.savefield)

        self._backward(x, y, extension, hook)
        g = total["g"]
        m = int(math.isqrt(g.numel()))
        return g.reshape(m, m)

    def _groups(self, criterion: Callable[[torch.Tensor], list[int]]) -> list[dict]:
        return [{"params": [p for p in self.model.parameters() if p.requires_grad], "criterion": criterion}]

    def eigenvalues(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from vivit.linalg.eigvalsh import EigvalshComputation

        comp = EigvalshComputation(subsampling=subset(self.setting, x.shape[0]), mc_samples=self.mc)
        groups = self._groups(lambda evals: list(range(evals.numel())))
        self._backward(x, y, comp.get_extension(), comp.get_extension_hook(groups))
        return comp.get_result(groups[0]).flip(0)

    def eigenpairs(self, x: torch.Tensor, y: torch.Tensor, k: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        from vivit.linalg.eigh import EighComputation

        comp = EighComputation(subsampling=subset(self.setting, x.shape[0]), mc_samples=self.mc,
                               warn_small_eigvals=0.0)
        groups = self._groups(lambda evals: list(range(max(0, evals.numel() - k), evals.numel())))
        self._backward(x, y, comp.get_extension(), comp.get_extension_hook(groups))
        values, vectors = comp.get_result(groups[0])
        return values.flip(0), [v.flip(0) for v in vectors]


class Fxcurv:
    """fxcurv's ``ggn_eigen`` with the same approximation."""

    def __init__(self, model: nn.Module, setting: str, k: int):
        mc, frac = setting.startswith("mc"), setting.endswith("frac")
        options = dict(mc=mc, subsample=FRACTION if frac else None)
        # Eigenvalues alone, as ViViT's EigvalshComputation returns them: computed in the (packed) Gram
        # matrix's own storage (keep_gram=False); .gram is read from results that never ask for .values.
        self.values_only = GGNEigen(vectors=False, keep_gram=False, **options)
        self.pairs = GGNEigen(top_k=k, **options)
        loss_fn = nn.CrossEntropyLoss()
        self.engine = fxcurv.compile(model, loss_fn, quantities=(self.values_only,), mc_samples=MC_SAMPLES, seed=0)
        self.gram_only_engine = fxcurv.compile(model, loss_fn, quantities=(self.values_only,), mc_samples=MC_SAMPLES,
                                               seed=0, grad=False)
        self.pairs_engine = fxcurv.compile(model, loss_fn, quantities=(self.pairs,), mc_samples=MC_SAMPLES, seed=0)

    def prepare(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Build (not run) the programs for this batch size: compile time is not what is measured."""
        self.engine.program(x, y)
        self.gram_only_engine.program(x, y)
        self.pairs_engine.program(x, y)

    def gram(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.engine(x, y)[self.values_only.name].gram

    def gram_only(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The Gram matrix without the gradient (grad=False)."""
        return self.gram_only_engine(x, y)[self.values_only.name].gram

    def eigenvalues(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.engine(x, y)[self.values_only.name].values

    def eigenpairs(self, x: torch.Tensor, y: torch.Tensor, k: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        e = self.pairs_engine(x, y)[self.pairs.name]
        return e.values, [e.vectors[n] for n in e.names]

    def estimate(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return float(self.values_only.memory(self.engine, x, y).peak)


# ---- measuring ------------------------------------------------------------------------------------

def batch(net: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    spec = NETWORKS[net]
    gen = torch.Generator().manual_seed(1000 + n + seed)
    return torch.randn((n,) + spec.input_shape, generator=gen), torch.randint(0, spec.classes, (n,), generator=gen)


def interleaved(calls: dict[str, Callable[[], Any]], repeats: int, seed: int = 0) -> dict[str, list[float]]:
    """Times of ``repeats`` rounds of every call, in a shuffled order per round (a call that runs right
    after another gains from its warm allocator and caches)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls.items())
    rng = random.Random(seed)
    for _ in range(repeats):
        rng.shuffle(order)
        for name, fn in order:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def critical_batch(peak_at: Callable[[int], float], budget: float, start: int, limit: int) -> dict[str, Any]:
    """The largest batch whose measured peak is at most ``budget``: a quadratic through the last three
    measured batches predicts it (at most doubling the largest batch that fits, the quadratic term is
    unreliable while small batches are dominated by the model's own gradient), measured runs bracket
    it and the bracket is bisected."""
    peaks: dict[int, float] = {}

    def peak(n: int) -> float:
        if n not in peaks:
            peaks[n] = peak_at(n)
        return peaks[n]

    points = [start, 2 * start, 4 * start]
    for n in points:
        if peak(n) > budget:
            break
    fits = [n for n in peaks if peaks[n] <= budget]
    if not fits:
        return {"critical": 0, "peaks": peaks, "note": f"the smallest batch ({start}) does not fit"}
    lo = max(fits)
    hi = min((n for n in peaks if peaks[n] > budget), default=None)
    while hi is None and lo < limit:  # bracket: the quadratic's prediction, at most doubling each step
        a, b, c = _quadratic(sorted(peaks.items())[-3:])
        n = int(min(limit, 2 * lo, max(lo + 1, _solve(a, b, c, budget))))
        if peak(n) <= budget:
            lo = n
        else:
            hi = n
    while hi is not None and hi - lo > max(1, int(CRITICAL_RTOL * lo)):
        mid = (lo + hi) // 2
        if peak(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return {"critical": lo, "peaks": {str(k): v for k, v in sorted(peaks.items())},
            "capped": hi is None}


def _quadratic(points: list[tuple[int, float]]) -> tuple[float, float, float]:
    """``a + b n + c n^2`` through up to three points (a line or a constant through fewer)."""
    if len(points) >= 3:
        (n1, p1), (n2, p2), (n3, p3) = points[:3]
        rows = torch.tensor([[1.0, n1, n1**2], [1.0, n2, n2**2], [1.0, n3, n3**2]], dtype=torch.float64)
        a, b, c = torch.linalg.solve(rows, torch.tensor([p1, p2, p3], dtype=torch.float64)).tolist()
        return a, b, max(c, 0.0)
    if len(points) == 2:
        (n1, p1), (n2, p2) = points
        slope = (p2 - p1) / (n2 - n1)
        return p1 - slope * n1, slope, 0.0
    return points[0][1], 0.0, 0.0


def _solve(a: float, b: float, c: float, budget: float) -> float:
    if c > 0:
        return (-b + math.sqrt(max(0.0, b * b - 4 * c * (a - budget)))) / (2 * c)
    return (budget - a) / b if b > 0 else float("inf")


# ---- the run --------------------------------------------------------------------------------------

def run_net(net: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    model = NETWORKS[net].build()
    x, y = batch(net, n)
    out: dict[str, Any] = {"net": net, "batch": n, "settings": {}}
    for setting in args.settings:
        v, f = Vivit(model, setting), Fxcurv(model, setting, args.top_k)
        f.prepare(x, y)
        row: dict[str, Any] = {}
        # Checks (exact settings): the largest eigenvalues agree.
        ev_v, ev_f = v.eigenvalues(x, y), f.eigenvalues(x, y)
        k = min(10, ev_v.numel(), ev_f.numel())
        if setting.startswith("exact"):
            diff = float((ev_v[:k] - ev_f[:k]).abs().max() / ev_v[0])
            row["check_top_eigenvalues_rel_diff"] = diff
            if diff > CHECK_RTOL:
                raise AssertionError(f"{net} {setting}: top eigenvalues differ by {diff:.2e} (relative)")
        calls = {
            "vivit gram": lambda: v.gram(x, y), "fxcurv gram": lambda: f.gram(x, y),
            "fxcurv gram only": lambda: f.gram_only(x, y),
            "vivit eigenvalues": lambda: v.eigenvalues(x, y), "fxcurv eigenvalues": lambda: f.eigenvalues(x, y),
            "vivit eigenpairs": lambda: v.eigenpairs(x, y, args.top_k),
            "fxcurv eigenpairs": lambda: f.eigenpairs(x, y, args.top_k),
        }
        for fn in calls.values():  # warm-up
            fn()
        v.model.zero_grad(set_to_none=True)
        times = interleaved(calls, args.repeats)
        row["median_s"] = {name: statistics.median(ts) for name, ts in times.items()}
        row["times_s"] = times
        row["peak_mib"] = {}
        for name, fn in calls.items():
            v.model.zero_grad(set_to_none=True)
            row["peak_mib"][name] = peak_memory(fn)[0] / 2**20
        row["fxcurv_estimate_mib"] = f.estimate(x, y) / 2**20
        for what in ("gram", "eigenvalues", "eigenpairs"):
            row[f"ratio_{what}"] = row["median_s"][f"fxcurv {what}"] / row["median_s"][f"vivit {what}"]
        row["ratio_gram_only"] = row["median_s"]["fxcurv gram only"] / row["median_s"]["vivit gram"]
        if args.budget_mib and setting in args.critical_settings:
            budget = args.budget_mib * 2**20
            row["critical"] = {}
            for lib in ("vivit", "fxcurv"):
                def peak_at(m: int, lib: str = lib) -> float:
                    xb, yb = batch(net, m)
                    if lib == "fxcurv":
                        f.prepare(xb, yb)
                        return peak_memory(lambda: f.eigenvalues(xb, yb))[0]
                    v.model.zero_grad(set_to_none=True)
                    return peak_memory(lambda: v.eigenvalues(xb, yb))[0]

                found = critical_batch(peak_at, budget, args.critical_start, args.critical_limit)
                if lib == "fxcurv" and found["critical"]:
                    xb, yb = batch(net, found["critical"])
                    found["estimate_mib_at_critical"] = f.estimate(xb, yb) / 2**20
                row["critical"][lib] = found
            row["critical_ratio"] = row["critical"]["fxcurv"]["critical"] / max(1, row["critical"]["vivit"]["critical"])
        out["settings"][setting] = row
        print(_row_text(net, n, setting, row), flush=True)
    return out


def _row_text(net: str, n: int, setting: str, row: dict[str, Any]) -> str:
    med, peak = row["median_s"], row["peak_mib"]
    parts = [f"{net} N={n} {setting}:"]
    for what in ("gram", "eigenvalues", "eigenpairs"):
        parts.append(f"{what} {med[f'fxcurv {what}'] * 1e3:.1f} vs {med[f'vivit {what}'] * 1e3:.1f} ms "
                     f"(x{row[f'ratio_{what}']:.2f}), peak {peak[f'fxcurv {what}']:.1f} vs "
                     f"{peak[f'vivit {what}']:.1f} MiB;")
    parts.append(f"Gram without the gradient {med['fxcurv gram only'] * 1e3:.1f} ms (x{row['ratio_gram_only']:.2f});")
    parts.append(f"fxcurv estimate {row['fxcurv_estimate_mib']:.1f} MiB (eigenvalues)")
    if "critical" in row:
        c = row["critical"]
        parts.append(f"| critical N: fxcurv {c['fxcurv']['critical']} vs vivit {c['vivit']['critical']} "
                     f"(x{row['critical_ratio']:.2f})")
    return " ".join(parts)


def table(results: list[dict[str, Any]], budget: float | None) -> str:
    lines = ["| network (N) | setting | Gram: fxcurv / ViViT | Gram, fxcurv without the gradient | eigenvalues "
             "| eigenpairs (top k) | peak MiB, eigenvalues: fxcurv / ViViT (fxcurv's estimate) | critical N"
             + (f" at {budget:g} MiB" if budget else "") + ": fxcurv / ViViT |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        for setting, row in r["settings"].items():
            med, peak = row["median_s"], row["peak_mib"]
            cells = [f"{med[f'fxcurv {w}'] * 1e3:.0f} / {med[f'vivit {w}'] * 1e3:.0f} ms (x{row[f'ratio_{w}']:.2f})"
                     for w in ("gram", "eigenvalues", "eigenpairs")]
            cells.insert(1, f"{med['fxcurv gram only'] * 1e3:.0f} ms (x{row['ratio_gram_only']:.2f})")
            crit = row.get("critical")
            crit_text = (f"{crit['fxcurv']['critical']} / {crit['vivit']['critical']} (x{row['critical_ratio']:.2f})"
                         if crit else "-")
            lines.append(f"| {r['net']} ({r['batch']}) | {setting} | " + " | ".join(cells)
                         + f" | {peak['fxcurv eigenvalues']:.1f} / {peak['vivit eigenvalues']:.1f} "
                         f"({row['fxcurv_estimate_mib']:.1f}) | {crit_text} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nets", default="mnist_mlp,fcnn,c3d3")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--settings", default="exact-full,mc-full,exact-frac,mc-frac")
    p.add_argument("--top-k", type=int, default=10, help="eigenpairs: the k largest")
    p.add_argument("--budget-mib", type=float, default=1024.0, help="critical batch under this peak (0: skip)")
    p.add_argument("--critical-settings", default="exact-full,mc-full", help="settings whose critical batch is found")
    p.add_argument("--critical-start", type=int, default=32)
    p.add_argument("--critical-limit", type=int, default=1 << 14)
    p.add_argument("--quick", action="store_true", help="smoke test: N=32 (c3d3: 16), 3 repeats, 128 MiB budget")
    p.add_argument("--name", default=None, help="results file name (default vivit / vivit-quick)")
    args = p.parse_args(argv)
    args.settings = [s for s in args.settings.split(",") if s]
    args.critical_settings = [s for s in args.critical_settings.split(",") if s]
    for s in args.settings + args.critical_settings:
        if s not in SETTINGS:
            p.error(f"unknown setting {s!r}; choose from {', '.join(SETTINGS)}")
    if args.quick:
        args.repeats, args.budget_mib, args.critical_start = 3, 128.0, 16
    torch.set_num_threads(args.threads)
    vivit_shims()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}, "
          f"load average {load}", flush=True)
    results = []
    for net in [s for s in args.nets.split(",") if s]:
        n = args.batch if not args.quick else (16 if net == "c3d3" else 32)
        results.append(run_net(net, n, args))
    text = table(results, args.budget_mib or None)
    print("\n" + text)
    name = args.name or ("vivit-quick" if args.quick else "vivit")
    path = HERE / "results" / f"{name}.json"
    path.write_text(json.dumps({"args": vars(args), "load_average": load, "torch": torch.__version__,
                                "results": results, "table": text}, indent=1, default=str))
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
