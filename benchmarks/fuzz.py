"""Long-run property fuzzing of fxcurv over random models (the strategies of tests/strategies.py,
the properties of tests/checks.py).

    python benchmarks/fuzz.py --minutes 10            # run for ten minutes
    python benchmarks/fuzz.py --examples 200 --seed 7 # or a fixed number of examples

Every drawn problem (model, loss, input, target, requested quantities) is checked for every property
that applies: grad/diag_ggn/diag_hessian against torch.func (eager and fused, with keys, order,
shapes, caching), eager vs fused agreement, HesScale against its brute-force reference (chains of
modules) and against the exact diagonal at a last linear layer (any graph), diag_ggn_mc
(reproducible, unbiased), and that the engine follows a change of the model or says why it cannot;
``--inductor K`` adds the inductor backend on every K-th problem (it compiles for seconds).

A failure whose kind (property, quantity, backend, exception type and normalized message) was not
seen before is shrunk by hypothesis to a minimal problem; later problems failing the same way are
counted, not shrunk again; a failure that does not repeat when hypothesis replays it is reported as
nondeterministic, with the smallest problem seen failing. The run reports how many problems it
checked, every distinct failure with a reproducer printed as Python code (also written to ``--out``),
and exits 1 if it found any.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
sys.path[:0] = [ROOT, TESTS]  # this checkout's fxcurv, not an installed one
os.environ.setdefault("TRITON_INTERPRET", "1")

import checks  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import seed as hypothesis_seed  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.errors import Flaky  # noqa: E402
from strategies import Case, cases  # noqa: E402

import fxcurv.passes.pipeline  # noqa: E402

fxcurv.passes.pipeline.CHECK = True  # lint every program after every pass, as the test suite does


@dataclass
class Check:
    name: str
    run: Callable[[], object]
    code: str  # how to call it in a reproducer, after ``model, loss_fn, x, y = make()``


@dataclass
class Failure:
    signature: str
    message: str
    trace: str
    case: Case
    check: Check
    count: int = 1
    shrink_calls: int = 0
    first_example: int = 0
    nondeterministic: bool = False

    def reproducer(self) -> str:
        note = "# NONDETERMINISTIC: fails in some runs only; run it a few times\n" if self.nondeterministic else ""
        return (f"# fxcurv fuzz reproducer\n# failure: {self.signature}\n{note}# message: "
                + self.message.splitlines()[0][:300] + "\n"
                + f"import sys\nsys.path[:0] = [{ROOT!r}, {TESTS!r}]\n\n"
                + self.case.source
                + "\n\nif __name__ == '__main__':\n    import checks\n    import fxcurv\n"
                + "    model, loss_fn, x, y = make()\n    " + self.check.code + "\n")


def signature(check: str, err: BaseException) -> str:
    """A failure's identity across problems: the check, and what broke with numbers and names
    normalized away."""
    if isinstance(err, checks.PropertyFailure):
        what = err.kind
    else:
        first = (str(err).strip().splitlines() or [""])[0]
        first = re.sub(r"'[^']*'|\"[^\"]*\"|`[^`]*`", "'…'", first)
        first = re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "#", first)
        what = f"{type(err).__name__}: {first[:140]}"
    return f"{check}: {what}"


def problem_checks(case: Case, mutation: tuple, inductor: bool) -> list[Check]:
    """The checks that apply to ``case``, each on a fresh ``make()`` (checks may change the model)."""
    q = case.quantities
    cache: dict = {}

    def refs():
        if "refs" not in cache:
            model, loss_fn, x, y = case.make()
            cache["refs"] = checks.references(model, loss_fn, x, y, q + ("diag_ggn",) * case.has_mc)
        return cache["refs"]

    def call(fn, *args, **kw):
        def run():
            model, loss_fn, x, y = case.make()
            return fn(model, loss_fn, x, y, *args, **kw)
        return run

    out = []
    for backend in ("eager", "fused"):
        out.append(Check(f"exact[{backend}]", lambda b=backend: call(checks.check_exact, q, b, refs())(),
                         f"checks.check_exact(model, loss_fn, x, y, {q!r}, {backend!r})"))
    out.append(Check("agree", call(checks.check_backends_agree, q),
                     f"checks.check_backends_agree(model, loss_fn, x, y, {q!r})"))
    if case.head and ("hesscale" in q or "hesscale_gn" in q):
        def last_layer(model, loss_fn, x, y):
            out = fxcurv.compile(model, loss_fn, quantities=q, backend="fused", seed=0)(x, y)
            checks.check_hesscale_last_layer(out, model, loss_fn, x, y, case.head, "fused")
        out.append(Check("hesscale_last_layer", call(last_layer), (
            f"out = fxcurv.compile(model, loss_fn, quantities={q!r}, backend='fused', seed=0)(x, y)\n"
            f"    checks.check_hesscale_last_layer(out, model, loss_fn, x, y, {case.head!r}, 'fused')")))
    if case.chain is not None:
        hq = tuple(sorted(set(q) | {"hesscale", "hesscale_gn"}))
        for backend in ("eager", "fused"):
            out.append(Check(f"hesscale[{backend}]", call(checks.check_hesscale, case.chain, hq, backend),
                             f"checks.check_hesscale(model, loss_fn, x, y, {case.chain!r}, {hq!r}, {backend!r})"))
    if case.has_mc:
        out.append(Check("mc[fused]", lambda: call(checks.check_mc, "fused", refs()["diag_ggn"])(),
                         "checks.check_mc(model, loss_fn, x, y, 'fused')"))
    kind, pick, backend = mutation
    out.append(Check(f"follows_model[{kind}]", call(checks.check_follows_model, kind, pick, backend),
                     f"checks.check_follows_model(model, loss_fn, x, y, {kind!r}, {pick}, {backend!r})"))
    if inductor:
        out.append(Check("exact[inductor]", lambda: call(checks.check_exact, q, "inductor", refs())(),
                         f"checks.check_exact(model, loss_fn, x, y, {q!r}, 'inductor')"))
        out.append(Check("agree[inductor]", call(checks.check_backends_agree, q, ("eager", "inductor")),
                         f"checks.check_backends_agree(model, loss_fn, x, y, {q!r}, ('eager', 'inductor'))"))
    return out


class _Found(Exception):
    pass


class Fuzzer:
    def __init__(self, deadline: float, max_examples: int | None, inductor_every: int, verbose: bool):
        self.deadline = deadline
        self.max_examples = max_examples
        self.inductor_every = inductor_every
        self.verbose = verbose
        self.examples = 0
        self.checks_run = 0
        self.shrink_calls = 0
        self.failures: dict[str, Failure] = {}
        self.per_check: dict[str, int] = {}

    def done(self) -> bool:
        return time.time() > self.deadline or (self.max_examples is not None and self.examples >= self.max_examples)

    def chunk(self, seed: int, size: int) -> None:
        """One hypothesis run of up to ``size`` problems; stops at the first new failure, shrinks it
        and records the minimal problem."""
        target: list[str | None] = [None]
        state: dict = {}

        @settings(max_examples=size, deadline=None, database=None, derandomize=False, print_blob=False,
                  report_multiple_bugs=False, phases=[Phase.generate, Phase.shrink],
                  suppress_health_check=list(HealthCheck))
        @hypothesis_seed(seed)
        @given(case=cases(), mutation=st.tuples(st.sampled_from(checks.MUTATIONS), st.integers(0, 7),
                                                st.sampled_from(["eager", "fused"])))
        def explore(case, mutation):
            failed = None  # (check, error): raised from one place, so that hypothesis sees one bug
            if target[0] is None:  # generating
                if self.done():
                    return
                self.examples += 1
                inductor = bool(self.inductor_every) and self.examples % self.inductor_every == 0
                for check in problem_checks(case, mutation, inductor):
                    self.checks_run += 1
                    self.per_check[check.name] = self.per_check.get(check.name, 0) + 1
                    try:
                        check.run()
                    except Exception as err:  # noqa: BLE001 - every failure is a finding
                        sig = signature(check.name, err)
                        if sig in self.failures:
                            self.failures[sig].count += 1
                            continue
                        target[0] = sig
                        state.update(first=self.examples, check=check.name, shrink_start=self.shrink_calls)
                        failed = (check, err)
                        break
                if failed is None and self.verbose:
                    print(f"  problem {self.examples}: ok", flush=True)
            else:  # shrinking (and hypothesis's final replay): only the target failure counts
                self.shrink_calls += 1
                for check in problem_checks(case, mutation, state["check"].endswith("[inductor]")):
                    if check.name != state["check"]:
                        continue
                    try:
                        check.run()
                    except Exception as err:  # noqa: BLE001
                        if signature(check.name, err) == target[0]:
                            failed = (check, err)
            if failed is not None:
                state["found"] = self._failure(case, failed[0], failed[1], target[0])
                raise _Found(target[0])

        try:
            explore()
        except _Found:
            # hypothesis replays the minimal failing problem last: state["found"] holds it
            self._record(state, nondeterministic=False)
        except Flaky:
            # the failure did not repeat when hypothesis replayed it: a nondeterministic bug. The
            # smallest problem seen failing is kept (it fails in some runs, not all).
            if "found" not in state:
                raise
            self._record(state, nondeterministic=True)

    def _record(self, state: dict, nondeterministic: bool) -> None:
        found = state["found"]
        found.first_example = state["first"]
        found.shrink_calls = self.shrink_calls - state["shrink_start"]
        found.nondeterministic = nondeterministic
        self.failures[found.signature] = found
        print(f"\n[{self.examples} problems] NEW FAILURE {found.signature}"
              f"{' (NONDETERMINISTIC: did not repeat on replay)' if nondeterministic else ''}\n"
              f"{found.message[:500]}\nminimal reproducer ({found.shrink_calls} shrinking calls):\n"
              f"{found.reproducer()}", flush=True)

    @staticmethod
    def _failure(case, check, err, sig) -> Failure:
        return Failure(sig, str(err), "".join(traceback.format_exception(err))[-4000:], case, check)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=None, help="run for this long (default 10 unless --examples)")
    parser.add_argument("--examples", type=int, default=None, help="stop after this many problems")
    parser.add_argument("--seed", type=int, default=None, help="first hypothesis seed (default: time)")
    parser.add_argument("--chunk", type=int, default=20, help="problems per hypothesis run")
    parser.add_argument("--inductor", type=int, default=0, metavar="K",
                        help="also check the inductor backend on every K-th problem (0: never)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="/tmp/fxcurv_fuzz", help="folder for the reproducers")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    minutes = args.minutes if args.minutes is not None else (10.0 if args.examples is None else 1e9)
    start = time.time()
    seed = args.seed if args.seed is not None else int(start)
    fuzz = Fuzzer(start + 60 * minutes, args.examples, args.inductor, args.verbose)
    limits = ([f"{minutes:g} minutes"] if minutes < 1e9 else []) + (
        [f"{args.examples} examples"] if args.examples else [])
    print(f"fxcurv fuzz: seed {seed}, {' or '.join(limits)}, fxcurv from {ROOT}", flush=True)
    i = 0
    while not fuzz.done():
        fuzz.chunk(seed + i, args.chunk)
        i += 1
    elapsed = time.time() - start
    os.makedirs(args.out, exist_ok=True)
    print("\n" + "=" * 100)
    print(f"examples run: {fuzz.examples} problems, {fuzz.checks_run} checks, in {elapsed / 60:.1f} min "
          f"(+{fuzz.shrink_calls} shrinking calls); hypothesis seeds {seed}..{seed + i - 1}")
    print("checks per kind: " + ", ".join(f"{k} {v}" for k, v in sorted(fuzz.per_check.items())))
    print(f"distinct failures: {len(fuzz.failures)}")
    for n, (sig, f) in enumerate(sorted(fuzz.failures.items()), 1):
        path = os.path.join(args.out, f"failure_{n:02d}.py")
        with open(path, "w") as fh:
            fh.write(f.reproducer())
        print(f"\n--- failure {n}: {sig}{' (nondeterministic)' if f.nondeterministic else ''}\n"
              f"    seen in {f.count} problem(s), first at problem "
              f"{f.first_example}; reproducer {path}\n    {f.message.splitlines()[0][:300] if f.message else ''}")
        print(f.reproducer())
    return 1 if fuzz.failures else 0


if __name__ == "__main__":
    sys.exit(main())
