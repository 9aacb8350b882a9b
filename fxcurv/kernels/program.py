"""Pointwise programs: what a fused elementwise node computes, held as a small fx graph.

The per-op rules of an activation are tiny pointwise functions (``phi'(out) = 1 - out*out``,
``J^T v = v * d1``, ``d * (d1*d1)``, ``g * d2``, ...). A chain of them is held as one
:class:`PointwiseProgram` -- an fx graph of pointwise torch calls, named by a stable :meth:`key
<PointwiseProgram.key>` -- from which the torch path (:mod:`.torch_path`) and the Triton code
generator (:mod:`.codegen`) both work, so the two always mean the same thing.

Build programs with :func:`trace_pointwise` (one function, attributes bound as constants),
:class:`ProgramBuilder` or :func:`compose` (several rule functions chained, several outputs), or
:func:`program_from_nodes` (rule calls of the curvature program, as the fusion pass finds them).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from .codegen import to_triton_source
from .runtime import NotFusible
from .vocabulary import op_kind, target_name

__all__ = [
    "Input", "InputSignature", "NodeMeta", "PointwiseProgram", "ProgramBuilder", "StepResult", "Step",
    "check_fusible", "compose", "input_signature", "program_from_nodes", "trace_pointwise",
]

_T = TypeVar("_T")

# Shape and dtype of each node's value for some inputs (``None``: not a tensor).
NodeMeta = dict[fx.Node, tuple[tuple[int, ...], torch.dtype] | None]
# What a cached derivation of a program depends on in its inputs: shapes and dtypes of tensors,
# types of the rest.
InputSignature = tuple[Any, ...]

# Entries a program keeps per kind of cached derivation (meta runs, torch runners): a program that
# meets ever new input shapes starts its cache over instead of growing it.
_MAX_CACHED = 256


def input_signature(inputs: Sequence[Any]) -> InputSignature:
    """What a program's behaviour on ``inputs`` depends on: tensors' shapes and dtypes, other
    values' types."""
    return tuple((a.shape, a.dtype) if isinstance(a, torch.Tensor) else type(a) for a in inputs)


class PointwiseProgram:
    """An fx graph of pointwise torch calls: placeholders are the inputs (in order), the output node
    returns a tuple of one or more values.

    Immutable: the graph is copied on construction and must not be changed through :attr:`graph`.
    Two programs with the same :meth:`key` compute the same thing and share compiled kernels.
    Calling a program runs :func:`~fxcurv.kernels.pointwise.pointwise` on it.
    """

    def __init__(self, graph: fx.Graph) -> None:
        g = _copy_checked(graph)
        self._graph = g
        self._inputs = tuple(n for n in g.nodes if n.op == "placeholder")
        self._outputs = _output_nodes(g)
        self._key = _canonical_key(g)
        self._module: fx.GraphModule | None = None
        self._cache: dict[str, dict[Hashable, Any]] = {}

    # ---- description ---------------------------------------------------------------------------
    @property
    def graph(self) -> fx.Graph:
        return self._graph

    @property
    def input_nodes(self) -> tuple[fx.Node, ...]:
        """The placeholders, in input order."""
        return self._inputs

    @property
    def output_nodes(self) -> tuple[fx.Node, ...]:
        """The returned nodes, in output order (a node may be returned twice, an input returned)."""
        return self._outputs

    @property
    def n_inputs(self) -> int:
        return len(self._inputs)

    @property
    def n_outputs(self) -> int:
        return len(self._outputs)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(n.name for n in self._inputs)

    @property
    def code(self) -> str:
        """The graph as Python (readable)."""
        return self.module.code

    @property
    def module(self) -> fx.GraphModule:
        """The graph as a module: calling it runs the ops one by one (the plain reference)."""
        if self._module is None:
            self._module = fx.GraphModule(torch.nn.Module(), self._graph, "PointwiseProgram")
        return self._module

    def key(self) -> str:
        """A stable string naming what the program computes (independent of node names)."""
        return self._key

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PointwiseProgram) and other._key == self._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        return f"PointwiseProgram({self.n_inputs} -> {self.n_outputs})\n{self.code}"

    def __call__(self, *inputs: Any, force: str | None = None) -> tuple[Any, ...]:
        # imported here: the launcher builds on programs, not the other way round
        from .pointwise import pointwise

        return pointwise(self, list(inputs), force=force)

    # ---- what depends on the inputs --------------------------------------------------------------
    def cached(self, kind: str, key: Hashable, make: Callable[[], _T]) -> _T:
        """``make()``, once per ``(kind, key)`` for this program: derivations for inputs like a
        call's (meta runs, the torch path's runners) live as long as the program."""
        table = self._cache.setdefault(kind, {})
        if key not in table:
            if len(table) > _MAX_CACHED:
                table.clear()
            table[key] = make()
        return cast(_T, table[key])

    def meta(self, inputs: Sequence[Any]) -> NodeMeta | None:
        """Shape and dtype of every node for inputs like ``inputs`` (run on the meta device), or
        ``None`` where torch rejects such inputs; cached per input signature."""
        return self.cached("meta", input_signature(inputs), lambda: _meta_run(self.module, inputs))


def _copy_checked(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` whose output is a non-empty tuple of nodes, placeholders first."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out_node = None
    for node in graph.nodes:
        if node.op == "output":
            out_node = node
            continue
        env[node] = g.node_copy(node, lambda n: env[n])
    if out_node is None:
        raise ValueError("a PointwiseProgram's graph needs an output node")
    outs = out_node.args[0]
    if not isinstance(outs, (tuple, list)):
        outs = (outs,)
    if len(outs) == 0:
        raise ValueError("a PointwiseProgram returns at least one value")
    if not all(isinstance(o, fx.Node) for o in outs):
        raise ValueError("every output of a PointwiseProgram must be a node, not a constant")
    g.output(tuple(fx.map_arg(tuple(outs), lambda n: env[n])))
    seen_op = False
    for node in g.nodes:
        if node.op == "placeholder" and seen_op:
            raise ValueError("placeholders must come before every other node")
        seen_op |= node.op != "placeholder"
    g.lint()
    return g


def _output_nodes(graph: fx.Graph) -> tuple[fx.Node, ...]:
    outs = next(n for n in graph.nodes if n.op == "output").args[0]
    assert isinstance(outs, tuple) and all(isinstance(o, fx.Node) for o in outs)  # _copy_checked
    return tuple(o for o in outs if isinstance(o, fx.Node))


def _canonical_key(graph: fx.Graph) -> str:
    """Each node as ``index=op:target(args){kwargs}``, nodes referred to by index: equal for graphs
    that compute the same thing whatever their node names."""
    index: dict[fx.Node, int] = {}
    parts = []
    for i, node in enumerate(graph.nodes):
        index[node] = i
        if node.op == "placeholder":
            parts.append(f"{i}=in")
        else:
            parts.append(f"{i}={node.op}:{target_name(node.target)}{_arg_key(tuple(node.args), index)}"
                         f"{_arg_key(dict(node.kwargs), index)}")
    return ";".join(parts)


def _arg_key(a: Any, index: dict[fx.Node, int]) -> str:
    if isinstance(a, fx.Node):
        return f"%{index[a]}"
    if isinstance(a, (tuple, list)):
        return "(" + ",".join(_arg_key(x, index) for x in a) + ")"
    if isinstance(a, dict):
        return "{" + ",".join(f"{k}={_arg_key(v, index)}" for k, v in sorted(a.items())) + "}"
    return f"{type(a).__name__}:{a!r}"


def _meta_run(module: fx.GraphModule, inputs: Sequence[Any]) -> NodeMeta | None:
    """Shape and dtype of every node for inputs like ``inputs``, by fake-tensor propagation (no
    arithmetic); ``None`` where torch rejects such inputs."""
    # On the meta device: callers describe an input by its shape alone (a meta tensor for a product
    # not computed yet) next to real tensors, and fake tensors must share one device.
    meta = [torch.empty(a.shape, dtype=a.dtype, device="meta") if isinstance(a, torch.Tensor) else a
            for a in inputs]
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        FakeTensorProp(module, mode).propagate(*meta)
    except (RuntimeError, TypeError):
        # torch rejects such inputs (shapes that do not broadcast, an argument of the wrong type, an
        # op without a fake kernel: NotImplementedError is a RuntimeError). Callers then run the
        # torch path, which raises the real error on the real inputs.
        return None
    out: NodeMeta = {}
    for n in module.graph.nodes:
        v = n.meta.pop("val", None)
        out[n] = (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else None
    return out


# ==== building programs ==============================================================================

@dataclass(frozen=True)
class Input:
    """A program input, by position (an argument source in :func:`compose`)."""

    index: int


@dataclass(frozen=True)
class StepResult:
    """The result of an earlier step of :func:`compose`; ``item`` picks one of a multi-output step."""

    step: int
    item: int | None = None


@dataclass(frozen=True)
class Step:
    """One step of :func:`compose`: ``fn(*args, **kwargs)`` where arguments are :class:`Input`,
    :class:`StepResult` or constants (activation attributes, scalars)."""

    fn: Any
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


# What fx raises when a function does not trace as a pointwise program: data-dependent control flow
# or iteration (TraceError), Python numbers required of a traced value (``math.exp(x)``,
# ``int(x)``: TypeError), builtins fx refuses to record (``len(x)``: RuntimeError).
_UNTRACEABLE = (fx.proxy.TraceError, TypeError, RuntimeError)

# A node, or several for a multi-output call.
Traced = fx.Node | tuple[fx.Node, ...]


class ProgramBuilder:
    """Builds one :class:`PointwiseProgram` from several functions by tracing them into one graph.

    >>> b = ProgramBuilder()
    >>> out, v = b.input("out"), b.input("v")
    >>> d1 = b.call(DERIVED[("tanh", "d1")], out)        # 1 - out*out
    >>> jv = b.call(JAC_T[("tanh", "x")], v, d1=d1)       # v * d1
    >>> program = b.build([jv, d1])

    Handles returned by :meth:`input` and :meth:`call` are the graph's fx nodes. A function is traced
    by calling it on fx proxies: anything that is not a pointwise torch call (data-dependent control
    flow, ``math.*`` on a tensor, tensor constants) raises :class:`NotFusible`.
    """

    def __init__(self) -> None:
        self._graph = fx.Graph()
        self._tracer = fx.proxy.GraphAppendingTracer(self._graph)
        self._first_op: fx.Node | None = None

    def input(self, name: str | None = None) -> fx.Node:
        """A new program input (inputs are numbered in the order they are made)."""
        if name is None:
            name = f"in{sum(1 for n in self._graph.nodes if n.op == 'placeholder')}"
        if self._first_op is None:
            return self._graph.placeholder(name)
        with self._graph.inserting_before(self._first_op):
            return self._graph.placeholder(name)

    def _mark(self) -> None:
        if self._first_op is None:
            for n in self._graph.nodes:
                if n.op != "placeholder":
                    self._first_op = n
                    break

    def _check(self, a: fx.Node) -> fx.Node:
        if a.graph is not self._graph:
            raise ValueError(f"node {a} belongs to another builder")
        return a

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Traced:
        """Trace ``fn(*args, **kwargs)`` into the program; a :class:`PointwiseProgram` is inlined.
        Returns a node, or a tuple of nodes for several results."""
        fx.map_arg((args, kwargs), self._check)
        if isinstance(fn, PointwiseProgram):
            result = self._inline(fn, args, kwargs)
        else:
            pargs, pkwargs = fx.node.map_aggregate((args, kwargs), self._proxy)
            try:
                out = fn(*pargs, **pkwargs)
            except _UNTRACEABLE as e:
                raise NotFusible(f"cannot trace {getattr(fn, '__name__', fn)} as a pointwise "
                                 f"program: {type(e).__name__}: {e}") from e
            result = _unwrap(out, fn)
        self._mark()
        return result

    def _proxy(self, a: Any) -> Any:
        return fx.Proxy(a, self._tracer) if isinstance(a, fx.Node) else a

    def _inline(self, program: PointwiseProgram, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Traced:
        names = program.input_names
        values = list(args) + [None] * (len(names) - len(args))
        for k, v in kwargs.items():
            if k not in names:
                raise TypeError(f"program has no input {k!r} (inputs: {names})")
            values[names.index(k)] = v
        if len(values) != len(names) or any(v is None for v in values):
            raise TypeError(f"program takes {len(names)} inputs {names}")
        env: dict[fx.Node, Any] = dict(zip(program.input_nodes, values))
        for node in program.graph.nodes:
            if node.op not in ("placeholder", "output"):
                env[node] = self._graph.node_copy(node, lambda n: env[n])
        outs = tuple(env[o] for o in program.output_nodes)
        if any(not isinstance(o, fx.Node) for o in outs):
            raise NotFusible("an inlined program output became a constant")
        return outs[0] if len(outs) == 1 else outs

    def build(self, outputs: fx.Node | Sequence[fx.Node]) -> PointwiseProgram:
        """The program returning ``outputs`` (a node or a sequence of nodes). Common subexpressions
        are merged and unused nodes dropped; the builder stays usable."""
        outs = (outputs,) if isinstance(outputs, fx.Node) else tuple(outputs)
        for o in outs:
            if not isinstance(o, fx.Node):
                raise NotFusible(f"program output {o!r} is not a traced value")
            self._check(o)
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        g.graph_copy(self._graph, env)
        g.output(tuple(env[o] for o in outs))
        _cse(g)
        g.eliminate_dead_code()
        return PointwiseProgram(g)


def _unwrap(out: Any, fn: Any) -> Traced:
    if isinstance(out, fx.Proxy):
        return out.node
    if isinstance(out, (tuple, list)) and out and all(isinstance(o, fx.Proxy) for o in out):
        return tuple(o.node for o in out)
    raise NotFusible(f"{getattr(fn, '__name__', fn)} returned {type(out).__name__}, not a traced "
                     "tensor")


def _freeze(a: Any) -> Any:
    if isinstance(a, fx.Node):
        return a
    if isinstance(a, (tuple, list)):
        return (type(a).__name__,) + tuple(_freeze(x) for x in a)
    if isinstance(a, dict):
        return ("dict",) + tuple((k, _freeze(v)) for k, v in sorted(a.items()))
    return (type(a).__name__, repr(a))


def _cse(g: fx.Graph) -> None:
    """Merge repeated pure calls: rule functions recompute shared terms (softplus' d1 and d2 both
    take ``sigmoid(beta * x)``)."""
    seen: dict[Hashable, fx.Node] = {}
    for node in list(g.nodes):
        if node.op not in ("call_function", "call_method"):
            continue
        if op_kind(node) is None:  # only ops of the pointwise vocabulary are known to be pure
            continue
        key = (node.op, node.target, _freeze(tuple(node.args)), _freeze(dict(node.kwargs)))
        if key in seen:
            node.replace_all_uses_with(seen[key])
            g.erase_node(node)
        else:
            seen[key] = node


def _resolve(ref: Any, inputs: Sequence[fx.Node], results: Sequence[Traced]) -> Any:
    if isinstance(ref, Input):
        return inputs[ref.index]
    if isinstance(ref, StepResult):
        r = results[ref.step]
        if ref.item is None:
            if isinstance(r, tuple):
                raise ValueError(f"step {ref.step} has {len(r)} results; say which with StepResult(step, item)")
            return r
        if isinstance(r, tuple):
            return r[ref.item]
        if ref.item != 0:
            raise IndexError(f"step {ref.step} has one result")
        return r
    if isinstance(ref, (tuple, list)):
        return type(ref)(_resolve(x, inputs, results) for x in ref)
    return ref


def _refs(x: Any) -> Iterator[Input | StepResult]:
    if isinstance(x, (Input, StepResult)):
        yield x
    elif isinstance(x, (tuple, list)):
        for y in x:
            yield from _refs(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _refs(y)


def _normalized(step: Step | tuple[Any, ...]) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    if isinstance(step, Step):
        return step.fn, tuple(step.args), dict(step.kwargs)
    if len(step) == 2:
        return step[0], tuple(step[1]), {}
    return step[0], tuple(step[1]), dict(step[2])


def compose(steps: Sequence[Step | tuple[Any, ...]],
            outputs: Sequence[Input | StepResult] | None = None,
            n_inputs: int | None = None, input_names: Sequence[str] | None = None) -> PointwiseProgram:
    """One program from a chain of steps; each step's arguments are program inputs, results of
    earlier steps or constants.

    ``steps``: :class:`Step` or ``(fn, args)`` / ``(fn, args, kwargs)`` tuples; ``fn`` is a pointwise
    function (a rule, ``torch.tanh``, a lambda) or a :class:`PointwiseProgram`. ``outputs``: what the
    program returns (default: the last step's result(s)). ``n_inputs``: default one more than the
    largest :class:`Input` index.

    HesScale through tanh, ``d_x = d * d1^2 + g * d2`` with ``d1, d2`` from ``out`` (inputs
    ``out, d, g``)::

        compose([(DERIVED[("tanh", "d1")], (Input(0),)),
                 (DERIVED[("tanh", "d2")], (Input(0),)),
                 (DIAG[("tanh", "x")], (Input(1),), {"d1": StepResult(0)}),
                 (RESIDUAL[("tanh", "x")], (Input(2),), {"d2": StepResult(1)}),
                 (operator.add, (StepResult(2), StepResult(3)))])
    """
    norm = [_normalized(s) for s in steps]
    if n_inputs is None:
        idx = [r.index for fn, a, k in norm for r in _refs((a, k)) if isinstance(r, Input)]
        idx += [r.index for r in (outputs or ()) if isinstance(r, Input)]
        n_inputs = max(idx) + 1 if idx else 0
    names = list(input_names) if input_names is not None else [f"in{i}" for i in range(n_inputs)]
    if len(names) != n_inputs:
        raise ValueError("input_names must name every input")
    b = ProgramBuilder()
    inputs = [b.input(n) for n in names]
    results: list[Traced] = []
    for fn, args, kwargs in norm:
        a = _resolve(args, inputs, results)
        k = {key: _resolve(v, inputs, results) for key, v in kwargs.items()}
        results.append(b.call(fn, *a, **k))
    if outputs is None:
        last = results[-1]
        outs = last if isinstance(last, tuple) else (last,)
    else:
        outs = tuple(_resolve(r, inputs, results) for r in outputs)
    return b.build(outs)


def program_from_nodes(nodes: Sequence[fx.Node], outputs: Sequence[fx.Node] | None = None,
                       leading: Sequence[fx.Node] = ()) -> tuple[PointwiseProgram, list[fx.Node]]:
    """The program computing ``nodes`` -- ``call_function`` nodes of another graph (rule calls such as
    ``_tanh_d1(out)``, ``elementwise_jac_t(v, d1=...)``) -- and the outside nodes it reads, in input
    order: replace ``nodes`` by one call ``pointwise(program, inputs)`` and pick its results.

    ``outputs`` (default: every node of ``nodes`` used outside them) become the program's outputs, in
    that order; ``leading`` outside nodes become the first inputs (a matmul epilogue's product is
    input 0). Raises :class:`NotFusible` when a rule cannot be traced or has an op the code
    generator cannot write.
    """
    inside = set(nodes)
    order = [n for n in nodes[0].graph.nodes if n in inside] if nodes else []
    if outputs is None:
        outputs = [n for n in order if any(u not in inside for u in n.users)]
    b = ProgramBuilder()
    env: dict[fx.Node, fx.Node] = {}
    externals: list[fx.Node] = []

    def arg(a: fx.Node) -> fx.Node:
        if a in env:
            return env[a]
        externals.append(a)
        env[a] = b.input(a.name)
        return env[a]

    for a in leading:
        arg(a)
    for n in order:
        if n.op != "call_function":
            raise NotFusible(f"node {n.name} ({n.op}) is not a function call")
        args, kwargs = fx.map_arg((n.args, dict(n.kwargs)), arg)
        result = b.call(n.target, *args, **kwargs)
        if isinstance(result, tuple):
            raise NotFusible(f"node {n.name} returns several values")
        env[n] = result
    program = b.build([env[o] for o in outputs])
    check_fusible(program)
    return program, externals


def trace_pointwise(fn: Callable[..., Any], n_tensor_args: int | None = None,
                    constants: dict[str, Any] | None = None) -> PointwiseProgram:
    """The program of one function: its first ``n_tensor_args`` parameters are the inputs, the
    ``constants`` are bound by name (activation attributes: ``approximate="tanh"``,
    ``negative_slope=0.1``; Python branches on them are resolved while tracing).

    ``n_tensor_args`` defaults to every parameter that is neither in ``constants`` nor has a default.
    """
    constants = dict(constants or {})
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins such as torch.tanh have no signature: one input
        n = 1 if n_tensor_args is None else n_tensor_args
        b = ProgramBuilder()
        ins = [b.input(f"in{i}") for i in range(n)]
        return b.build(b.call(fn, *ins, **constants))
    if n_tensor_args is None:
        tensor_params = [p for p in params if p.name not in constants and p.default is inspect.Parameter.empty
                         and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    else:
        tensor_params = params[:n_tensor_args]
    b = ProgramBuilder()
    ins = [b.input(p.name) for p in tensor_params]
    return b.build(b.call(fn, *ins, **constants))


def check_fusible(program: PointwiseProgram) -> None:
    """Raise :class:`NotFusible` if ``program`` has an op the code generator cannot write (no triton
    needed: this only generates source)."""
    to_triton_source(program)
