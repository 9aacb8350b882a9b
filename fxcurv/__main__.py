"""``python -m fxcurv``: compile a network -- one of the zoo's or your own -- and show its curvature program.

    python -m fxcurv inspect mnist_mlp                       # program listing + per-layer numbers
    python -m fxcurv inspect c3d3 -q diag_ggn,hesscale -n 32 --dot c3d3.dot
    python -m fxcurv inspect my_model.py:make_model --input-shape 8,3,32,32
    python -m fxcurv inspect mypkg.nets:TextNet --input-shape 4,16 --input-dtype long --vocab 100 --json
    python -m fxcurv list                                    # the zoo's networks

A model of your own is ``FILE.py:ATTR`` or ``package.module:ATTR``; ``ATTR`` (dots allowed) is a
module instance, a module class or a function of no arguments returning a module. It needs
``--input-shape`` (batch first); the target is drawn for the loss from the model's output (class
indices in ``[0, C)`` for cross-entropy, ``C`` the output's dim 1; values shaped like the output
otherwise). Models are put in eval mode. ``--json`` prints one JSON object for scripts: the program
(per-node listing), its memory estimate, per-parameter numbers, or the nodes fxcurv cannot compile.
Errors are one line on stderr: exit code 2 for a model or option that cannot be used (file or
attribute not found, wrong input shape), 1 for a model fxcurv cannot compile.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import QUANTITIES, __version__, compile
from .api import BACKENDS, Engine
from .errors import FxcurvError, UnsupportedOpError
from .listing import node_line
from .networks import NETWORKS, InputKind, LossKind
from .node_info import info
from .passes.canonicalize import unsupported_nodes
from .trace import Capture, trace

_DEFAULT_QUANTITIES = "diag_ggn,diag_ggn_mc,diag_hessian,hesscale,hesscale_gn"
# Exact Hessian diagonals push one column per activation entry; on convolutional nets that is
# tens of thousands of columns, so the default there leaves them out.
_CONV_DEFAULT_QUANTITIES = "diag_ggn,diag_ggn_mc,hesscale,hesscale_gn"
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_LOSS_NAMES = {"ce": LossKind.CROSS_ENTROPY, **{k.value: k for k in LossKind}}

EXIT_UNUSABLE = 2  # the model or an option cannot be used (not found, wrong shape)
EXIT_UNSUPPORTED = 1  # fxcurv cannot compile the model


class CommandError(Exception):
    """An error of the command line, reported as one line on stderr with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = EXIT_UNUSABLE, unsupported: tuple[str, ...] = ()):
        super().__init__(message)
        self.exit_code = exit_code
        self.unsupported = unsupported


@dataclass(frozen=True)
class Problem:
    """What ``inspect`` compiles: a model in eval mode, a batch, its target and the loss."""

    name: str
    description: str
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    loss: LossKind


def _one_line(err: BaseException) -> str:
    first = str(err).strip().splitlines()
    return f"{type(err).__name__}: {first[0] if first else ''}".rstrip(": ")


def parse_shape(text: str) -> tuple[int, ...]:
    """``"8,3,32,32"`` -> ``(8, 3, 32, 32)``: positive integers, batch first."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise CommandError(f"--input-shape {text!r}: expected positive integers separated by commas, "
                           "batch first (e.g. 8,3,32,32)")
    return tuple(int(p) for p in parts)


def _import_source(source: str) -> Any:
    """The module ``source`` names: a ``.py`` file path, or a dotted module importable from here."""
    if source.endswith(".py") or "/" in source or "\\" in source:
        path = Path(source)
        if not path.is_file():
            raise CommandError(f"model file not found: {source}")
        name = f"_fxcurv_user_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise CommandError(f"cannot load {source} as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickling look their module up here
        try:
            spec.loader.exec_module(module)
        except Exception as err:  # noqa: BLE001 - the user's file may raise anything; report it in one line
            del sys.modules[name]
            raise CommandError(f"running {source} failed: {_one_line(err)}") from err
        return module
    if source in sys.modules:
        return sys.modules[source]
    if importlib.util.find_spec(source.split(".")[0]) is None:
        raise CommandError(f"module not found: {source} (neither a .py file nor an importable module)")
    try:
        return importlib.import_module(source)
    except ModuleNotFoundError as err:
        raise CommandError(f"module not found: {source} ({err})") from err
    except Exception as err:  # noqa: BLE001 - the user's module may raise anything on import
        raise CommandError(f"importing {source} failed: {_one_line(err)}") from err


def load_model(spec: str) -> nn.Module:
    """The module ``FILE.py:ATTR`` or ``package.module:ATTR`` names. ``ATTR`` (dotted for nested
    attributes) is an ``nn.Module`` instance, an ``nn.Module`` subclass (instantiated without
    arguments) or a callable of no arguments returning an ``nn.Module``."""
    source, sep, attr = spec.rpartition(":")
    if not sep or not source or not attr:
        raise CommandError(f"{spec!r}: a model is a zoo name ({', '.join(NETWORKS)}) "
                           "or FILE.py:ATTR / package.module:ATTR")
    obj: Any = _import_source(source)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CommandError(f"{source} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise CommandError(f"{spec}: a {type(obj).__name__}, not a torch.nn.Module, a Module class or a factory")
    try:
        made = obj()
    except Exception as err:  # noqa: BLE001 - the user's factory may raise anything
        raise CommandError(f"{spec}(): {_one_line(err)} (a model class or factory is called without arguments)") \
            from err
    if not isinstance(made, nn.Module):
        raise CommandError(f"{spec}() returned a {type(made).__name__}, not a torch.nn.Module")
    return made


def build_problem(args: argparse.Namespace) -> Problem:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    dtype = _DTYPES[args.dtype]
    loss_kind: LossKind | None = _LOSS_NAMES[args.loss] if args.loss else None
    if ":" not in args.model:
        if args.model not in NETWORKS:
            raise CommandError(f"unknown network {args.model!r}: the zoo has {', '.join(NETWORKS)}; "
                               "a model of your own is FILE.py:ATTR or package.module:ATTR")
        net = NETWORKS[args.model]
        model = net.build().to(dtype).eval()
        if args.input_shape:
            shape = parse_shape(args.input_shape)
            x = (torch.randint(0, net.vocab or 1, shape, generator=gen) if net.input_kind is InputKind.TOKENS
                 else torch.randn(shape, generator=gen, dtype=dtype))
        else:
            x = net.example_input(args.batch, dtype, gen)
        loss_kind = loss_kind or net.loss
        description = net.source
    else:
        if not args.input_shape:
            raise CommandError(f"{args.model}: a model of your own needs --input-shape (batch first, e.g. 8,3,32,32)")
        shape = parse_shape(args.input_shape)
        model = load_model(args.model).to(dtype).eval()
        if args.input_dtype == "long":
            if args.vocab is None or args.vocab < 1:
                raise CommandError("--input-dtype long draws token ids in [0, V): give --vocab V (V >= 1)")
            x = torch.randint(0, args.vocab, shape, generator=gen)
        else:
            x = torch.randn(shape, generator=gen, dtype=dtype)
        loss_kind = loss_kind or LossKind.CROSS_ENTROPY
        description = f"{type(model).__name__} from {args.model}"
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as err:  # noqa: BLE001 - the model's own forward may raise anything
        raise CommandError(f"the model fails on an input of shape {tuple(x.shape)} ({x.dtype}): {_one_line(err)}") \
            from err
    if not isinstance(out, torch.Tensor):
        raise CommandError(f"the model returns a {type(out).__name__}; fxcurv needs one tensor")
    if not out.is_floating_point():
        raise CommandError(f"the model returns {str(out.dtype).replace('torch.', '')} values; fxcurv needs real ones")
    try:
        y = loss_kind.target(tuple(out.shape), out.dtype, gen)
    except ValueError as err:
        raise CommandError(f"--loss {loss_kind.value}: {err}") from err
    return Problem(args.model, description, model, x, y, loss_kind)


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def _short(problem: str) -> str:
    """An unsupported-node description without the module's repr (which can span a whole model)."""
    return problem.split(" (source: ")[0]


def compile_problem(problem: Problem, quantities: tuple[str, ...], args: argparse.Namespace) -> Engine:
    """The engine, or a :class:`CommandError` (exit 1) naming what fxcurv cannot compile."""
    loss_fn = problem.loss.module()
    try:
        return compile(problem.model, loss_fn, quantities=quantities, mc_samples=args.mc_samples, seed=args.seed,
                       backend=args.backend, capture=args.capture)
    except UnsupportedOpError as err:
        problems = tuple(unsupported_nodes(trace(problem.model, loss_fn)))
        if not problems:
            raise CommandError(f"fxcurv cannot compile the model: {_one_line(err)}", EXIT_UNSUPPORTED) from err
        raise CommandError(f"fxcurv cannot compile the model: {len(problems)} node(s) outside its vocabulary: "
                           + "; ".join(_short(p) for p in problems), EXIT_UNSUPPORTED,
                           tuple(_short(p) for p in problems)) from err
    except FxcurvError as err:
        raise CommandError(f"fxcurv cannot compile the model: {_one_line(err)}", EXIT_UNSUPPORTED) from err


def _summary(value: Any, q: str) -> float | str:
    """One number per parameter: the L2 norm of the gradient, the mean of a tensor quantity; the type of
    a structured one (a Kronecker block)."""
    if not isinstance(value, torch.Tensor):
        return type(value).__name__
    return value.norm().item() if q == "grad" else value.mean().item()


def _node_record(node: Any) -> dict[str, Any]:
    record = info(node)
    return {"name": node.name, "op": node.op, "kind": record.kind.value, "value": record.describe_value(),
            "line": node_line(node)}


def inspect(args: argparse.Namespace) -> int:
    problem = build_problem(args)
    model, x, y = problem.model, problem.x, problem.y
    is_conv = any(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                                 nn.ConvTranspose3d)) for m in model.modules())
    spec = args.quantities or (_CONV_DEFAULT_QUANTITIES if is_conv else _DEFAULT_QUANTITIES)
    quantities = tuple(q.strip() for q in spec.split(",") if q.strip())
    unknown = [q for q in quantities if q not in QUANTITIES]
    if unknown:
        raise CommandError(f"unknown quantities {unknown}; choose from {', '.join(QUANTITIES)}")

    engine = compile_problem(problem, quantities, args)
    t0 = time.perf_counter()
    try:
        out = engine(x, y)
    except FxcurvError as err:
        raise CommandError(f"fxcurv cannot run the model: {_one_line(err)}", EXIT_UNSUPPORTED) from err
    first = time.perf_counter() - t0
    memory = engine.program(x, y).memory
    n_params = sum(p.numel() for p in model.parameters())
    loss_fn = problem.loss.module()
    graph = engine.graph
    nodes = list(graph.nodes)
    backward = sum(1 for n in nodes if n.op == "call_function" and info(n).kind.is_backward)

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    timing: dict[str, Any] = {}
    if args.repeats > 0:
        call_ms = _median_ms(lambda: engine(x, y), args.repeats)
        plain_ms = _median_ms(plain, args.repeats)
        timing = {"first_call_s": first, "call_ms": call_ms, "plain_forward_backward_ms": plain_ms,
                  "ratio": call_ms / plain_ms, "repeats": args.repeats, "threads": torch.get_num_threads()}
    cols = ["grad"] + [q for q in quantities if q != "grad"]
    per_param: dict[str, dict[str, Any]] = {
        name: {"shape": list(p.shape), **{q: _summary(out[q][name], q) for q in cols}}
                 for name, p in model.named_parameters() if name in out.grad}

    if args.json:
        print(json.dumps({
            "fxcurv": __version__, "model": problem.name, "description": problem.description,
            "parameters": n_params, "input": {"shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", "")},
            "target": {"shape": list(y.shape), "dtype": str(y.dtype).replace("torch.", "")},
            "loss": problem.loss.value, "loss_value": out.loss.item(), "quantities": list(quantities),
            "backend": args.backend, "capture": args.capture,
            "program": {"nodes": len(nodes), "backward_nodes": backward, "listing": str(graph).splitlines(),
                        "node_records": [_node_record(n) for n in nodes]},
            "memory": {"peak_bytes": memory.peak_bytes, "at": memory.at, "at_description": memory.at_description,
                       "input_bytes": memory.input_bytes, "output_bytes": memory.output_bytes},
            "timing": timing, "per_parameter": per_param, "unsupported": [],
        }, indent=1))
        return 0

    print(f"fxcurv {__version__} | {problem.name}: {problem.description} | {n_params:,} parameters")
    print(f"batch {tuple(x.shape)} {str(x.dtype).replace('torch.', '')}, {type(loss_fn).__name__}, "
          f"quantities: {', '.join(quantities)}, backend {args.backend}, capture {args.capture}")
    print(f"\n== curvature program: {len(nodes)} nodes, {backward} of them gradient/curvature ==")
    print(graph)
    print(f"\nestimated peak memory: {memory}")
    if args.code:
        print("\n== generated Python ==")
        print(engine.code)
    if args.dot:
        with open(args.dot, "w") as fh:
            fh.write(engine.to_dot())
        print(f"\n(DOT graph written to {args.dot}; render with `dot -Tsvg {args.dot} -o program.svg`)")
    print(f"\n== results ==\nloss {out.loss.item():.6f} | first call (builds the program) {first:.2f} s")
    if timing:
        print(f"call {timing['call_ms']:.2f} ms vs plain forward+backward {timing['plain_forward_backward_ms']:.2f} ms "
              f"(ratio {timing['ratio']:.2f}, medians of {args.repeats}, {timing['threads']} threads)")
    header = f"{'parameter':<12} {'shape':<18}" + "".join(f"{c:>14}" for c in cols)
    print("\nper parameter: mean of the entries (grad: L2 norm)")
    print(header)
    print("-" * len(header))
    for name, row in per_param.items():
        cells = "".join(f"{v:14.4e}" if isinstance(v, float) else f"{v:>14}" for v in (row[q] for q in cols))
        print(f"{name:<12} {str(tuple(row['shape'])):<18}" + cells)
    if "diag_hessian" in quantities:
        print("\nrelative L1 distance to the exact Hessian diagonal (summed over parameters):")
        exact = out["diag_hessian"]
        denom = sum(exact[n].abs().sum().item() for n in exact)
        for q in quantities:
            if q in ("grad", "diag_hessian") or not all(isinstance(out[q][n], torch.Tensor) for n in exact):
                continue
            dist = sum((out[q][n] - exact[n]).abs().sum().item() for n in exact)
            print(f"  {q:<14} {dist / denom:.4f}")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxcurv", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the zoo's networks")
    p = sub.add_parser("inspect", help="compile a network, print its curvature program and numbers")
    p.add_argument("model", metavar="MODEL",
                   help=f"a zoo network ({', '.join(NETWORKS)}), or FILE.py:ATTR / package.module:ATTR")
    p.add_argument("-q", "--quantities", default=None,
                   help=f"comma-separated, from: {', '.join(QUANTITIES)} "
                        f"(default: {_DEFAULT_QUANTITIES}; without diag_hessian on conv nets)")
    p.add_argument("-n", "--batch", type=int, default=8, help="batch size of a zoo network (default 8)")
    p.add_argument("--input-shape", default=None,
                   help="input shape, batch first, e.g. 8,3,32,32 (required for a model of your own)")
    p.add_argument("--input-dtype", choices=("float", "long"), default="float",
                   help="float: values from N(0, 1) in --dtype; long: token ids in [0, --vocab) (own models)")
    p.add_argument("--vocab", type=int, default=None, help="token ids are drawn from [0, VOCAB) (--input-dtype long)")
    p.add_argument("--loss", choices=sorted(_LOSS_NAMES), default=None,
                   help="default: the zoo network's loss, cross_entropy for a model of your own")
    p.add_argument("--dtype", choices=tuple(_DTYPES), default="float32")
    p.add_argument("--mc-samples", type=int, default=1)
    p.add_argument("--backend", choices=BACKENDS, default="fused")
    p.add_argument("--capture", choices=tuple(c.value for c in Capture), default="fx",
                   help="fx: torch.fx, nn layers kept whole (default); aten: torch.export to ATen ops with a "
                        "symbolic batch (README, 'Operator-level capture')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5, help="timed calls (median reported); 0: no timing")
    p.add_argument("--dot", help="also write the program as a graphviz DOT file")
    p.add_argument("--code", action="store_true", help="also print the generated Python")
    p.add_argument("--json", action="store_true", help="print one JSON object (for scripts) instead of the report")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.command == "list":
        for name, net in NETWORKS.items():
            kind = f" tokens < {net.vocab}" if net.input_kind is InputKind.TOKENS else ""
            print(f"{name:<16} input {net.input_shape}{kind}  {net.source}")
        return 0
    try:
        return inspect(args)
    except CommandError as err:
        if args.json:
            print(json.dumps({"error": str(err), "exit_code": err.exit_code, "unsupported": list(err.unsupported)}))
        print(f"fxcurv inspect: error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
