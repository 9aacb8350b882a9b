"""Elementwise kernels generated from fx graphs: the derivative epilogues of the curvature program.

The per-op rules of an activation are tiny pointwise functions (``phi'(out) = 1 - out*out``,
``J^T v = v * d1``, ``d * (d1*d1)``, ``g * d2``, ...). Run one by one, each reads and writes a full
message; a chain of them is memory-bound work that one kernel can do in a single pass. Instead of
one hand-written kernel per activation and message kind, the chain is held as a
:class:`PointwiseProgram` -- an fx graph of pointwise torch calls -- and a Triton kernel is generated
from it (:func:`to_triton_source`). The same code generator writes the epilogues of
:mod:`fxcurv.kernels.matmul`.

Two ways to run a program, always with the same meaning (:func:`pointwise`):

* the torch path runs the graph op by op (the reference semantics; intermediates that die are
  overwritten in place, which gives bitwise the same numbers with fewer allocations);
* the Triton path launches one kernel over the output's flat index space. Inputs are tensors whose
  shape is a suffix of the output shape (a ``[N, D]`` derivative against ``[K, N, D]`` factor
  columns is read at ``offset % (N*D)``) or Python scalars.

Build programs with :func:`trace_pointwise` (one function, attributes bound as constants),
:class:`ProgramBuilder` or :func:`compose` (several rule functions chained, several outputs).
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import math
import operator
import os
import sys
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.fx as fx
import torch.nn.functional as F


class NotFusible(Exception):
    """A program (or its inputs) cannot become a Triton kernel; keep the unfused nodes."""


# ==== triton: optional ===============================================================================

_TRITON: Any = None
_TRITON_CHECKED = False
_LOCK = threading.RLock()
# Kernel launches per kind ("pointwise", "matmul", ...): lets tests assert the Triton path ran.
LAUNCHES: Counter = Counter()


def triton_available() -> bool:
    """Whether ``import triton`` works. Imported lazily so that ``import fxcurv`` never needs it."""
    global _TRITON, _TRITON_CHECKED
    if not _TRITON_CHECKED:
        try:
            import triton  # noqa: F401

            _TRITON = triton
        except Exception:  # ImportError, or a broken install on an odd platform
            _TRITON = None
        _TRITON_CHECKED = True
    return _TRITON is not None


def interpreting() -> bool:
    """Triton's interpreter runs kernels on CPU tensors (numpy); it is read when a kernel is defined."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(tensors: Sequence[torch.Tensor], force: Optional[str]) -> bool:
    """The dispatch rule shared by every kernel: Triton for CUDA tensors, torch otherwise.

    ``force="triton"`` runs the kernel whatever the device (CPU tensors need ``TRITON_INTERPRET=1``);
    ``force="torch"`` runs the reference. Unforced, inputs that need gradients (grad mode on) stay
    on torch: the kernels are forward-only.
    """
    if force == "torch":
        return False
    if force == "triton":
        if not triton_available():
            raise RuntimeError("force='triton' but triton cannot be imported")
        return True
    if force is not None:
        raise ValueError(f"force must be 'triton', 'torch' or None, not {force!r}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False  # the kernels have no backward; torch ops keep the autograd graph
    return any(t.is_cuda for t in tensors) and triton_available()


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def dot_precision(dtype: torch.dtype) -> Optional[str]:
    """``tl.dot``'s input precision: follow torch's own TF32 switch, so kernel and reference agree."""
    if dtype != torch.float32:
        return None
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


# ==== programs =======================================================================================

def _target_name(t: Any) -> str:
    if isinstance(t, str):
        return t
    mod = getattr(t, "__module__", None) or ""
    return f"{mod}.{getattr(t, '__qualname__', getattr(t, '__name__', repr(t)))}"


def _const_key(c: Any) -> str:
    if isinstance(c, (tuple, list)):
        return f"{type(c).__name__}({','.join(_const_key(x) for x in c)})"
    if isinstance(c, dict):
        return "{" + ",".join(f"{k}:{_const_key(v)}" for k, v in sorted(c.items())) + "}"
    return f"{type(c).__name__}:{c!r}"


class PointwiseProgram:
    """An fx graph of pointwise torch calls: placeholders are the inputs (in order), the output node
    returns a tuple of one or more values.

    Immutable: the graph is copied on construction and must not be changed through :attr:`graph`.
    Two programs with the same :meth:`key` compute the same thing and share compiled kernels.
    Calling a program runs :func:`pointwise` on it.
    """

    def __init__(self, graph: fx.Graph):
        g = fx.Graph()
        env: dict = {}
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
        self._graph = g
        self._inputs = tuple(n for n in g.nodes if n.op == "placeholder")
        self._outputs = tuple(next(n for n in g.nodes if n.op == "output").args[0])
        self._key = self._canonical_key()
        self._module: Optional[fx.GraphModule] = None
        self._runners: dict = {}
        self._meta: dict = {}

    # ---- description ---------------------------------------------------------------------------
    @property
    def graph(self) -> fx.Graph:
        return self._graph

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

    def key(self) -> str:
        """A stable string naming what the program computes (independent of node names)."""
        return self._key

    def _canonical_key(self) -> str:
        index: dict = {}
        parts = []
        for i, node in enumerate(self._graph.nodes):
            index[node] = i

            def arg(a):
                if isinstance(a, fx.Node):
                    return f"%{index[a]}"
                if isinstance(a, (tuple, list)):
                    return "(" + ",".join(arg(x) for x in a) + ")"
                if isinstance(a, dict):
                    return "{" + ",".join(f"{k}={arg(v)}" for k, v in sorted(a.items())) + "}"
                return _const_key(a)

            if node.op == "placeholder":
                parts.append(f"{i}=in")
            else:
                parts.append(f"{i}={node.op}:{_target_name(node.target)}{arg(tuple(node.args))}"
                             f"{arg(dict(node.kwargs))}")
        return ";".join(parts)

    def __eq__(self, other):
        return isinstance(other, PointwiseProgram) and other._key == self._key

    def __hash__(self):
        return hash(self._key)

    def __repr__(self):
        return f"PointwiseProgram({self.n_inputs} -> {self.n_outputs})\n{self.code}"

    def __call__(self, *inputs, force: Optional[str] = None) -> tuple:
        return pointwise(self, list(inputs), force=force)

    # ---- torch execution -----------------------------------------------------------------------
    @property
    def module(self) -> fx.GraphModule:
        if self._module is None:
            self._module = fx.GraphModule(torch.nn.Module(), self._graph, "PointwiseProgram")
        return self._module

    def run_torch(self, inputs: Sequence[Any], owned: frozenset = frozenset()) -> tuple:
        """The reference: the graph's ops, in order. ``owned`` lists input positions whose tensors
        the caller gives away (a fresh matmul result), so the program may overwrite them."""
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in inputs):
            # overwriting an intermediate autograd saved for backward would break the backward
            return tuple(self.module(*inputs))
        sig = (_signature(inputs), owned)
        runner = self._runners.get(sig)
        if runner is None:
            if len(self._runners) > 256:
                self._runners.clear()
            runner = self._runners[sig] = _build_runner(self, inputs, owned)
        return runner(*inputs)

    def meta(self, inputs: Sequence[Any]) -> Optional[dict]:
        """Shape and dtype of every node for inputs like ``inputs`` (run on the meta device), or
        ``None`` where that fails; cached per input signature."""
        sig = _signature(inputs)
        if sig not in self._meta:
            if len(self._meta) > 256:
                self._meta.clear()
            self._meta[sig] = _meta_run(self, inputs)
        return self._meta[sig]


def _signature(inputs: Sequence[Any]) -> tuple:
    return tuple((a.shape, a.dtype) if isinstance(a, torch.Tensor) else type(a) for a in inputs)


def _meta_run(program: PointwiseProgram, inputs: Sequence[Any]) -> Optional[dict]:
    fake = [torch.empty(a.shape, dtype=a.dtype, device="meta") if isinstance(a, torch.Tensor) else a
            for a in inputs]
    values: dict = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            values[n] = out
            return out

    try:
        _Recorder(program.module, garbage_collect_values=False).run(*fake)
    except Exception:
        return None
    return {n: ((tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else None)
            for n, v in values.items()}


# ---- the torch path: a straight-line function that overwrites dead intermediates -----------------

# Ops that always return a new tensor (never a view or the input itself).
_FRESH_FUNCS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
    operator.abs, operator.gt, operator.lt, operator.ge, operator.le, operator.eq, operator.ne,
    torch.add, torch.sub, torch.mul, torch.div, torch.tanh, torch.sigmoid, torch.exp, torch.log,
    torch.sqrt, torch.rsqrt, torch.erf, torch.abs, torch.sign, torch.relu, torch.neg, torch.square,
    torch.where, torch.ones_like, torch.zeros_like, torch.full_like, torch.clamp, torch.maximum,
    torch.minimum, torch.reciprocal, F.relu,
}
_FRESH_METHODS = {
    "add", "sub", "mul", "div", "tanh", "sigmoid", "exp", "log", "sqrt", "rsqrt", "erf", "abs",
    "sign", "relu", "neg", "square", "pow", "reciprocal", "clamp", "clamp_min", "clamp_max",
}
# In-place twins (same kernels, so the same bits).
_INPLACE_BINARY = {
    operator.add: "add_", operator.mul: "mul_", operator.sub: "sub_", operator.truediv: "div_",
    torch.add: "add_", torch.mul: "mul_", torch.sub: "sub_", torch.div: "div_",
    "add": "add_", "mul": "mul_", "sub": "sub_", "div": "div_",
}
_COMMUTATIVE = {"add_", "mul_"}
_INPLACE_UNARY = {
    torch.tanh: "tanh_", torch.sigmoid: "sigmoid_", torch.exp: "exp_", torch.log: "log_",
    torch.sqrt: "sqrt_", torch.rsqrt: "rsqrt_", torch.erf: "erf_", torch.abs: "abs_",
    torch.sign: "sign_", torch.relu: "relu_", torch.neg: "neg_", operator.neg: "neg_",
    operator.abs: "abs_", torch.reciprocal: "reciprocal_",
    "tanh": "tanh_", "sigmoid": "sigmoid_", "exp": "exp_", "log": "log_", "sqrt": "sqrt_",
    "rsqrt": "rsqrt_", "erf": "erf_", "abs": "abs_", "sign": "sign_", "relu": "relu_", "neg": "neg_",
    "reciprocal": "reciprocal_",
}


def _build_runner(program: PointwiseProgram, inputs: Sequence[Any], owned_inputs: frozenset) -> Callable:
    meta = program.meta(inputs)
    if meta is None:
        mod = program.module
        return lambda *args: tuple(mod(*args))
    nodes = list(program.graph.nodes)
    last_use: dict = {}
    for i, node in enumerate(nodes):
        for a in node.all_input_nodes:
            last_use[a] = i
    names: dict = {}
    glb: dict = {}
    lines = []
    owned: set = set()
    # Tensors another value may alias (the source of a same-dtype .to()): never overwritten.
    pinned: set = set()

    def ref(a):
        if isinstance(a, fx.Node):
            return names[a]
        if isinstance(a, (tuple, list)):
            inner = ", ".join(ref(x) for x in a)
            return f"({inner},)" if isinstance(a, tuple) else f"[{inner}]"
        if isinstance(a, (bool, int)) or a is None:
            return repr(a)
        if isinstance(a, float) and math.isfinite(a):
            return repr(a)
        name = f"_c{len(glb)}"
        glb[name] = a
        return name

    def is_tensor(n):
        return isinstance(n, fx.Node) and meta.get(n) is not None

    def can_overwrite(a, node, i):
        """``a`` may hold ``node``'s result: a fresh buffer of the same shape and dtype, dead after."""
        return (isinstance(a, fx.Node) and a in owned and a not in pinned and last_use.get(a) == i
                and is_tensor(a)
                and meta[node] is not None and meta[a] == meta[node])

    params = []
    outputs = _output_set(program)
    for i, node in enumerate(nodes):
        if node.op == "placeholder":
            idx = len(params)
            names[node] = f"a{idx}"
            params.append(names[node])
            if idx in owned_inputs:
                owned.add(node)
            continue
        if node.op == "output":
            lines.append(f"return {ref(tuple(node.args[0]))}")
            continue
        var = names[node] = f"v{i}"
        target = node.target
        args, kwargs = node.args, node.kwargs
        line = None
        if (node.op == "call_function" and _hashable(target) and target in _INPLACE_BINARY and not kwargs
                and len(args) == 2):
            method = _INPLACE_BINARY[target]
            a, b = args
            if can_overwrite(a, node, i):
                line = f"{var} = {ref(a)}.{method}({ref(b)})"
            elif method in _COMMUTATIVE and can_overwrite(b, node, i):
                line = f"{var} = {ref(b)}.{method}({ref(a)})"
            elif method == "sub_" and a is not b and can_overwrite(b, node, i):
                # c - t == (-t) + c exactly in IEEE arithmetic
                line = f"{var} = {ref(b)}.neg_().add_({ref(a)})"
        elif node.op == "call_method" and target in _INPLACE_BINARY and not kwargs and len(args) == 2:
            method = _INPLACE_BINARY[target]
            if can_overwrite(args[0], node, i):
                line = f"{var} = {ref(args[0])}.{method}({ref(args[1])})"
        elif (_hashable(target) and target in _INPLACE_UNARY and len(args) == 1 and not kwargs
              and can_overwrite(args[0], node, i)):
            line = f"{var} = {ref(args[0])}.{_INPLACE_UNARY[target]}()"
        elif (target in (operator.pow, torch.pow, "pow") and len(args) == 2 and not kwargs
              and isinstance(args[1], (int, float)) and can_overwrite(args[0], node, i)):
            line = f"{var} = {ref(args[0])}.pow_({ref(args[1])})"
        if line is not None:
            lines.append(line)
            owned.add(node)
        else:
            arg_s = ", ".join([ref(a) for a in args] + [f"{k}={ref(v)}" for k, v in kwargs.items()])
            if node.op == "call_method":
                lines.append(f"{var} = {ref(args[0])}.{target}("
                             + ", ".join([ref(a) for a in args[1:]]
                                         + [f"{k}={ref(v)}" for k, v in kwargs.items()]) + ")")
            else:
                fname = f"_f{len(glb)}"
                glb[fname] = target
                lines.append(f"{var} = {fname}({arg_s})")
            fresh = (target in _FRESH_METHODS) if node.op == "call_method" else (
                _hashable(target) and target in _FRESH_FUNCS)
            if fresh and is_tensor(node):
                owned.add(node)
            elif is_tensor(node):
                pinned.update(a for a in node.all_input_nodes if is_tensor(a))
        # Free what dies here, so peak memory is that of the live messages only.
        dead = [names[a] for a in node.all_input_nodes if last_use.get(a) == i
                and a.op != "placeholder" and a not in outputs]
        if dead:
            lines.append("del " + ", ".join(sorted(set(dead))))
    src = f"def run({', '.join(params)}):\n" + "\n".join("    " + ln for ln in lines) + "\n"
    exec(compile(src, f"<fxcurv pointwise torch path {hash(program.key()) & 0xffff:x}>", "exec"), glb)
    run = glb["run"]
    run.source = src
    return run


def _output_set(program: PointwiseProgram) -> set:
    return {o for o in program._outputs if isinstance(o, fx.Node)}


def _hashable(x) -> bool:
    try:
        hash(x)
        return True
    except TypeError:
        return False


# ==== building programs ==============================================================================

@dataclass(frozen=True)
class Input:
    """A program input, by position (an argument source in :func:`compose`)."""

    index: int


@dataclass(frozen=True)
class Result:
    """The result of an earlier step of :func:`compose`; ``item`` picks one of a multi-output step."""

    step: int
    item: Optional[int] = None


@dataclass(frozen=True)
class Step:
    """One step of :func:`compose`: ``fn(*args, **kwargs)`` where arguments are :class:`Input`,
    :class:`Result` or constants (activation attributes, scalars)."""

    fn: Any
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


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

    def __init__(self):
        self._graph = fx.Graph()
        self._tracer = fx.proxy.GraphAppendingTracer(self._graph)
        self._first_op: Optional[fx.Node] = None

    def input(self, name: Optional[str] = None) -> fx.Node:
        """A new program input (inputs are numbered in the order they are made)."""
        if name is None:
            name = f"in{sum(1 for n in self._graph.nodes if n.op == 'placeholder')}"
        if self._first_op is None:
            return self._graph.placeholder(name)
        with self._graph.inserting_before(self._first_op):
            return self._graph.placeholder(name)

    def _mark(self):
        if self._first_op is None:
            for n in self._graph.nodes:
                if n.op != "placeholder":
                    self._first_op = n
                    break

    def _check(self, a):
        if isinstance(a, fx.Node) and a.graph is not self._graph:
            raise ValueError(f"node {a} belongs to another builder")
        return a

    def call(self, fn: Any, *args, **kwargs):
        """Trace ``fn(*args, **kwargs)`` into the program; a :class:`PointwiseProgram` is inlined.
        Returns a node, or a tuple of nodes for several results."""
        fx.map_arg((args, kwargs), self._check)
        if isinstance(fn, PointwiseProgram):
            result = self._inline(fn, args, kwargs)
        else:
            pargs, pkwargs = fx.node.map_aggregate(
                (args, kwargs), lambda a: fx.Proxy(a, self._tracer) if isinstance(a, fx.Node) else a)
            try:
                out = fn(*pargs, **pkwargs)
            except NotFusible:
                raise
            except Exception as e:
                raise NotFusible(f"cannot trace {getattr(fn, '__name__', fn)} as a pointwise "
                                 f"program: {type(e).__name__}: {e}") from e
            result = self._unwrap(out, fn)
        self._mark()
        return result

    def _unwrap(self, out, fn):
        if isinstance(out, fx.Proxy):
            return out.node
        if isinstance(out, (tuple, list)) and out and all(isinstance(o, fx.Proxy) for o in out):
            return tuple(o.node for o in out)
        raise NotFusible(f"{getattr(fn, '__name__', fn)} returned {type(out).__name__}, not a traced "
                         "tensor")

    def _inline(self, program: PointwiseProgram, args, kwargs):
        names = program.input_names
        values = list(args) + [None] * (len(names) - len(args))
        for k, v in kwargs.items():
            if k not in names:
                raise TypeError(f"program has no input {k!r} (inputs: {names})")
            values[names.index(k)] = v
        if len(values) != len(names) or any(v is None for v in values):
            raise TypeError(f"program takes {len(names)} inputs {names}")
        env: dict = {}
        it = iter(values)
        for node in program.graph.nodes:
            if node.op == "placeholder":
                env[node] = next(it)
            elif node.op == "output":
                outs = tuple(env[o] if isinstance(o, fx.Node) else o for o in node.args[0])
            else:
                env[node] = self._graph.node_copy(node, lambda n: env[n])
        if any(not isinstance(o, fx.Node) for o in outs):
            raise NotFusible("an inlined program output became a constant")
        return outs[0] if len(outs) == 1 else outs

    def build(self, outputs) -> PointwiseProgram:
        """The program returning ``outputs`` (a node or a sequence of nodes). Common subexpressions
        are merged and unused nodes dropped; the builder stays usable."""
        if isinstance(outputs, fx.Node):
            outputs = (outputs,)
        outputs = tuple(outputs)
        for o in outputs:
            if not isinstance(o, fx.Node):
                raise NotFusible(f"program output {o!r} is not a traced value")
            self._check(o)
        g = fx.Graph()
        env: dict = {}
        g.graph_copy(self._graph, env)
        g.output(tuple(env[o] for o in outputs))
        _cse(g)
        g.eliminate_dead_code()
        return PointwiseProgram(g)


def _freeze(a):
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
    seen: dict = {}
    for node in list(g.nodes):
        if node.op not in ("call_function", "call_method"):
            continue
        if _op_kind(node) is None:  # only ops of the pointwise vocabulary are known to be pure
            continue
        key = (node.op, node.target, _freeze(tuple(node.args)), _freeze(dict(node.kwargs)))
        try:
            hash(key)
        except TypeError:
            continue
        if key in seen:
            node.replace_all_uses_with(seen[key])
            g.erase_node(node)
        else:
            seen[key] = node


def _resolve(ref, inputs, results):
    if isinstance(ref, Input):
        return inputs[ref.index]
    if isinstance(ref, Result):
        r = results[ref.step]
        if ref.item is None:
            if isinstance(r, tuple):
                raise ValueError(f"step {ref.step} has {len(r)} results; say which with Result(step, item)")
            return r
        if isinstance(r, tuple):
            return r[ref.item]
        if ref.item != 0:
            raise IndexError(f"step {ref.step} has one result")
        return r
    if isinstance(ref, (tuple, list)):
        return type(ref)(_resolve(x, inputs, results) for x in ref)
    return ref


def _refs(x):
    if isinstance(x, (Input, Result)):
        yield x
    elif isinstance(x, (tuple, list)):
        for y in x:
            yield from _refs(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _refs(y)


def compose(steps: Sequence[Union[Step, tuple]], outputs: Optional[Sequence[Union[Input, Result]]] = None,
            n_inputs: Optional[int] = None, input_names: Optional[Sequence[str]] = None) -> PointwiseProgram:
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
                 (DIAG[("tanh", "x")], (Input(1),), {"d1": Result(0)}),
                 (RESIDUAL[("tanh", "x")], (Input(2),), {"d2": Result(1)}),
                 (operator.add, (Result(2), Result(3)))])
    """
    norm = []
    for s in steps:
        if isinstance(s, Step):
            norm.append((s.fn, tuple(s.args), dict(s.kwargs)))
        elif len(s) == 2:
            norm.append((s[0], tuple(s[1]), {}))
        else:
            norm.append((s[0], tuple(s[1]), dict(s[2])))
    if n_inputs is None:
        idx = [r.index for fn, a, k in norm for r in _refs((a, k)) if isinstance(r, Input)]
        idx += [r.index for r in (outputs or ()) if isinstance(r, Input)]
        n_inputs = max(idx) + 1 if idx else 0
    names = list(input_names) if input_names is not None else [f"in{i}" for i in range(n_inputs)]
    if len(names) != n_inputs:
        raise ValueError("input_names must name every input")
    b = ProgramBuilder()
    inputs = [b.input(n) for n in names]
    results: list = []
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


def program_from_nodes(nodes: Sequence[fx.Node], outputs: Optional[Sequence[fx.Node]] = None,
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
    env: dict = {}
    externals: list[fx.Node] = []

    def arg(a):
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
        env[n] = b.call(n.target, *args, **kwargs)
        if isinstance(env[n], tuple):
            raise NotFusible(f"node {n.name} returns several values")
    program = b.build([env[o] for o in outputs])
    check_fusible(program)
    return program, externals


def trace_pointwise(fn: Callable, n_tensor_args: Optional[int] = None,
                    constants: Optional[dict] = None) -> PointwiseProgram:
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


# ==== code generation ================================================================================

@dataclass
class KernelValue:
    """A value in generated kernel code: ``expr`` (a Python expression over names in scope), ``kind``
    (``"f"`` float, ``"b"`` bool, ``"i"`` int, ``"dtype"``), ``tensor`` (a block, not a scalar) and the
    Python value of a constant."""

    expr: str
    kind: str = "f"
    tensor: bool = True
    const: Any = None
    is_const: bool = False


_CDT = {"float32": "tl.float32", "float64": "tl.float64"}

_BINOP = {
    operator.add: "+", operator.sub: "-", operator.mul: "*", operator.truediv: "/",
    torch.add: "+", torch.sub: "-", torch.mul: "*", torch.div: "/", torch.true_divide: "/",
    torch.multiply: "*", torch.subtract: "-",
    "add": "+", "sub": "-", "mul": "*", "div": "/", "true_divide": "/",
}
_CMPOP = {
    operator.gt: ">", operator.lt: "<", operator.ge: ">=", operator.le: "<=", operator.eq: "==",
    operator.ne: "!=", torch.gt: ">", torch.lt: "<", torch.ge: ">=", torch.le: "<=", torch.eq: "==",
    torch.ne: "!=", "gt": ">", "lt": "<", "ge": ">=", "le": "<=", "eq": "==", "ne": "!=",
}
_BOOLOP = {operator.and_: "&", operator.or_: "|", operator.xor: "^", torch.logical_and: "&",
           torch.logical_or: "|", torch.logical_xor: "^", "logical_and": "&", "logical_or": "|",
           "logical_xor": "^"}
_UNARY_NAMES = {"tanh", "sigmoid", "exp", "log", "sqrt", "rsqrt", "erf", "abs", "sign", "relu", "neg",
                "square", "reciprocal"}
_UNARY = {getattr(torch, n): n for n in _UNARY_NAMES}
_UNARY.update({n: n for n in _UNARY_NAMES})
_UNARY.update({operator.neg: "neg", operator.abs: "abs", F.relu: "relu", operator.pos: "pos",
               torch.Tensor.tanh: "tanh", torch.Tensor.sigmoid: "sigmoid", torch.Tensor.exp: "exp"})
_NOTS = {operator.invert: "~", torch.logical_not: "~", "logical_not": "~", "bitwise_not": "~"}
_FILLS = {torch.ones_like: 1.0, torch.zeros_like: 0.0, torch.full_like: None}
_CASTS = {"to", "float", "double", "half", "bfloat16", "type_as"}
_MINMAX = {torch.maximum: ">", torch.minimum: "<", "maximum": ">", "minimum": "<"}
_CLAMPS = {torch.clamp: "clamp", "clamp": "clamp", torch.clamp_min: "clamp_min", "clamp_min": "clamp_min",
           torch.clamp_max: "clamp_max", "clamp_max": "clamp_max"}
_POWS = {operator.pow, torch.pow, "pow"}
_WHERES = {torch.where}


def _op_kind(node: fx.Node) -> Optional[str]:
    t = node.target
    if node.op == "call_function" and t is getattr:
        return "getattr"
    if not _hashable(t):
        return None
    if node.op == "call_method":
        if t in _CASTS:
            return "cast"
    elif node.op != "call_function":
        return None
    for kind, table in (("bin", _BINOP), ("cmp", _CMPOP), ("bool", _BOOLOP), ("unary", _UNARY),
                        ("not", _NOTS), ("minmax", _MINMAX), ("clamp", _CLAMPS)):
        if t in table:
            return kind
    if node.op == "call_function":
        if t in _FILLS:
            return "fill"
        if t in _WHERES:
            return "where"
    if t in _POWS:
        return "pow"
    return None


# Helpers emitted into every generated module. tanh: libdevice is unavailable in Triton's
# interpreter, so tanh is written with exp/log (<= 6 ulp in float32, tested on a dense grid), the same
# code on the GPU and in CI.
_HELPERS = '''
@triton.jit
def _fx_tanh(x):
    # tanh(20) == 1 in float64 already; the clamp keeps exp finite (and NaN stays NaN)
    a = tl.abs(x)
    a = tl.where(a > 20.0, 20.0, a)
    # |x| >= 0.55: 1 - 2/(e^{2a}+1) loses at most a factor 2 to cancellation (tanh >= 0.5).
    big = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)
    # |x| < 0.55: tanh(a) = -m / (2 + m) with m = expm1(-2a), expm1 by Kahan's (u - 1) * y / log(u).
    y = -2.0 * a
    u = tl.exp(y)
    um1 = u - 1.0
    m = tl.where(um1 == 0.0, y, um1 * y / tl.log(tl.where(um1 == 0.0, 0.5, u)))
    small = -m / (2.0 + m)
    r = tl.where(a >= 0.55, big, small)
    return tl.where(x < 0, -r, r)
'''


class _Emitter:
    """Turns the nodes of a program into lines of Triton code over named block values."""

    def __init__(self, compute: str, prefix: str = "v"):
        if compute not in _CDT:
            raise NotFusible(f"compute dtype {compute!r} is not supported")
        self.compute = compute
        self.cdt = _CDT[compute]
        self.prefix = prefix
        self.lines: list[str] = []
        self.count = 0

    # ---- values --------------------------------------------------------------------------------
    def let(self, expr: str, kind: str, tensor: bool) -> KernelValue:
        name = f"{self.prefix}{self.count}"
        self.count += 1
        self.lines.append(f"{name} = {expr}")
        return KernelValue(name, kind, tensor)

    def float_literal(self, c: float) -> str:
        if not math.isfinite(c):
            raise NotFusible(f"non-finite constant {c!r}")
        if self.compute == "float64":
            # Triton types a bare float literal as float32; keep float64 constants exact.
            return f"tl.full([], {c!r}, tl.float64)"
        return repr(float(c))

    def constant(self, c: Any) -> KernelValue:
        if isinstance(c, bool):
            return KernelValue("True" if c else "False", "b", False, c, True)
        if isinstance(c, int):
            return KernelValue(repr(c), "i", False, c, True)
        if isinstance(c, float):
            return KernelValue(self.float_literal(c), "f", False, c, True)
        if isinstance(c, torch.dtype):
            return KernelValue("", "dtype", False, c, True)
        if c is None:
            return KernelValue("None", "none", False, None, True)
        if isinstance(c, str):  # attribute names, rounding modes: ops decide what they accept
            return KernelValue(repr(c), "str", False, c, True)
        raise NotFusible(f"constant {c!r} of type {type(c).__name__} is not supported")

    def as_float(self, v: KernelValue) -> str:
        if v.kind == "f":
            return v.expr
        if v.kind == "i":
            return f"({v.expr}).to({self.cdt})" if not v.is_const else self.float_literal(float(v.const))
        if v.kind == "b":
            if v.is_const:
                return "1.0" if v.const else "0.0"
            return f"({v.expr}).to({self.cdt})"
        raise NotFusible(f"value of kind {v.kind!r} used as a number")

    def as_bool(self, v: KernelValue) -> str:
        if v.kind == "b":
            return v.expr
        if v.kind in ("f", "i"):
            return f"({v.expr} != 0)"
        raise NotFusible(f"value of kind {v.kind!r} used as a condition")

    def shape_of(self, v: KernelValue) -> str:
        return f"{v.expr}.shape"

    # ---- nodes ---------------------------------------------------------------------------------
    def node(self, node: fx.Node, env: dict) -> KernelValue:
        def val(a):
            if isinstance(a, fx.Node):
                return env[a]
            return self.constant(a)

        kind = _op_kind(node)
        name = _target_name(node.target)
        if kind is None:
            raise NotFusible(f"op {name} ({node.op}) of node {node.name} is not a supported pointwise op")
        args = [val(a) for a in node.args]
        kwargs = {k: val(v) for k, v in node.kwargs.items()}
        tensor = any(a.tensor for a in args) or any(v.tensor for v in kwargs.values())
        fn = getattr(self, f"_{kind}")
        return fn(node, args, kwargs, tensor)

    def _no_kwargs(self, node, kwargs, allowed=()):
        for k, v in kwargs.items():
            if k not in allowed:
                raise NotFusible(f"keyword {k}= of {node.name} is not supported")

    def _bin(self, node, args, kwargs, tensor):
        alpha = kwargs.pop("alpha", None)
        self._no_kwargs(node, kwargs)
        if len(args) != 2:
            raise NotFusible(f"{node.name}: expected two operands")
        op = _BINOP[node.target]
        a, b = args
        if a.kind == "i" and b.kind == "i":
            raise NotFusible(f"{node.name}: integer arithmetic")
        bs = self.as_float(b)
        if alpha is not None and alpha.is_const and alpha.const != 1:
            bs = f"({self.as_float(alpha)} * {bs})"
        return self.let(f"{self.as_float(a)} {op} {bs}", "f", tensor)

    def _cmp(self, node, args, kwargs, tensor):
        self._no_kwargs(node, kwargs)
        a, b = args
        op = _CMPOP[node.target]
        return self.let(f"{self._num(a)} {op} {self._num(b)}", "b", tensor)

    def _num(self, v):
        return v.expr if v.kind in ("f", "i") else self.as_float(v)

    def _bool(self, node, args, kwargs, tensor):
        self._no_kwargs(node, kwargs)
        if any(a.kind != "b" for a in args):
            raise NotFusible(f"{node.name}: logical op on non-boolean values")
        return self.let(f"{args[0].expr} {_BOOLOP[node.target]} {args[1].expr}", "b", tensor)

    def _not(self, node, args, kwargs, tensor):
        self._no_kwargs(node, kwargs)
        if args[0].kind != "b":
            raise NotFusible(f"{node.name}: bitwise not of a number")
        return self.let(f"~{args[0].expr}", "b", tensor)

    def _unary(self, node, args, kwargs, tensor):
        self._no_kwargs(node, kwargs, ("inplace",) if node.target is F.relu else ())
        if "inplace" in kwargs and kwargs["inplace"].const:
            raise NotFusible(f"{node.name}: in-place relu")
        if len(args) != 1:
            raise NotFusible(f"{node.name}: expected one operand")
        op = _UNARY[node.target]
        if op == "abs" and args[0].kind == "b":
            return args[0]
        x = self.as_float(args[0])
        expr = {
            "tanh": f"_fx_tanh({x})",
            "sigmoid": f"tl.sigmoid({x})",
            "exp": f"tl.exp({x})",
            "log": f"tl.log({x})",
            # sqrt_rn: IEEE-rounded like torch (plain tl.sqrt may be approximate on the GPU)
            "sqrt": f"tl.sqrt_rn({x})",
            "rsqrt": f"1.0 / tl.sqrt_rn({x})",
            "erf": f"tl.erf({x})",
            "abs": f"tl.abs({x})",
            # where() keeps NaN where torch does: sign(nan) = nan, relu(nan) = nan
            "sign": f"tl.where({x} > 0, 1.0, tl.where({x} < 0, -1.0, {x}))",
            "relu": f"tl.where({x} < 0, 0.0, {x})",
            "neg": f"-{x}",
            "pos": f"{x}",
            "square": f"{x} * {x}",
            "reciprocal": f"1.0 / {x}",
        }[op]
        return self.let(expr, "f", tensor)

    def _minmax(self, node, args, kwargs, tensor):
        self._no_kwargs(node, kwargs)
        a, b = (self.as_float(x) for x in args)
        op = _MINMAX[node.target]
        # torch.maximum/minimum propagate NaN from either side
        return self.let(f"tl.where(({a} {op} {b}) | ({a} != {a}), {a}, {b})", "f", tensor)

    def _clamp(self, node, args, kwargs, tensor):
        which = _CLAMPS[node.target]
        x = self.as_float(args[0])
        rest = list(args[1:])
        if which == "clamp":
            lo = kwargs.pop("min", rest[0] if len(rest) > 0 else None)
            hi = kwargs.pop("max", rest[1] if len(rest) > 1 else None)
        elif which == "clamp_min":
            lo, hi = kwargs.pop("min", rest[0] if rest else None), None
        else:
            lo, hi = None, kwargs.pop("max", rest[0] if rest else None)
        self._no_kwargs(node, kwargs)
        cur = x
        for bound, op in ((lo, "<"), (hi, ">")):
            if bound is None or bound.kind == "none":
                continue
            bnd = self.as_float(bound)
            cur = self.let(f"tl.where({cur} {op} {bnd}, {bnd}, {cur})", "f", tensor).expr
        return KernelValue(cur, "f", tensor) if cur != x else self.let(x, "f", tensor)

    def _pow(self, node, args, kwargs, tensor):
        self._no_kwargs(node, kwargs)
        base, exp = args
        if exp.is_const and exp.kind in ("i", "f"):
            e = exp.const
            if float(e).is_integer() and abs(e) <= 64:
                return self._int_pow(self.as_float(base), int(e), tensor)
            x = self.as_float(base)
            if e == 0.5:
                return self.let(f"tl.sqrt_rn({x})", "f", tensor)
            if e == -0.5:
                return self.let(f"1.0 / tl.sqrt_rn({x})", "f", tensor)
            # x**c = exp(c log x): NaN for x < 0, 0 or inf at x = 0, as torch
            return self.let(f"tl.exp({self.float_literal(float(e))} * tl.log({x}))", "f", tensor)
        if base.is_const and base.kind in ("i", "f") and base.const > 0:
            x = self.as_float(exp)
            if base.const == 1:
                return self.let(f"tl.full({x}.shape, 1.0, {self.cdt})" if exp.tensor else "1.0", "f", tensor)
            return self.let(f"tl.exp({x} * {self.float_literal(math.log(base.const))})", "f", tensor)
        raise NotFusible(f"{node.name}: pow needs a constant exponent (or a positive constant base)")

    def _int_pow(self, x: str, n: int, tensor: bool) -> KernelValue:
        if n == 0:
            return self.let(f"tl.full({x}.shape, 1.0, {self.cdt})" if tensor else "1.0", "f", tensor)
        m = abs(n)
        # the same association torch uses for small powers: x*x, x*x*x
        if m <= 3:
            expr = " * ".join([x] * m)
            r = self.let(expr, "f", tensor)
        else:
            r, sq = None, KernelValue(x, "f", tensor)
            while m:
                if m & 1:
                    r = sq if r is None else self.let(f"{r.expr} * {sq.expr}", "f", tensor)
                m >>= 1
                if m:
                    sq = self.let(f"{sq.expr} * {sq.expr}", "f", tensor)
        if n < 0:
            r = self.let(f"1.0 / {r.expr}", "f", tensor)
        return r

    def _where(self, node, args, kwargs, tensor):
        self._no_kwargs(node, kwargs)
        if len(args) != 3:
            raise NotFusible(f"{node.name}: torch.where needs three arguments")
        c, a, b = args
        cond = self.as_bool(c)
        if a.kind == "b" and b.kind == "b":
            return self.let(f"tl.where({cond}, {a.expr}, {b.expr})", "b", tensor)
        return self.let(f"tl.where({cond}, {self.as_float(a)}, {self.as_float(b)})", "f", tensor)

    def _fill(self, node, args, kwargs, tensor):
        x = args[0]
        fill = _FILLS[node.target]
        if fill is None:
            fv = kwargs.pop("fill_value", args[1] if len(args) > 1 else None)
            if fv is None or not fv.is_const or fv.kind not in ("f", "i", "b"):
                raise NotFusible(f"{node.name}: full_like needs a constant fill value")
            fill = fv.const
        dtype = kwargs.pop("dtype", None)
        for k in ("layout", "device", "pin_memory", "memory_format"):
            kwargs.pop(k, None)
        rg = kwargs.pop("requires_grad", None)
        self._no_kwargs(node, kwargs)
        if rg is not None and rg.const:
            raise NotFusible(f"{node.name}: requires_grad=True")
        as_bool = (dtype is not None and dtype.kind == "dtype" and dtype.const == torch.bool) or (
            (dtype is None or dtype.kind == "none") and x.kind == "b")
        if dtype is not None and dtype.kind == "dtype" and not (dtype.const == torch.bool
                                                               or dtype.const.is_floating_point):
            raise NotFusible(f"{node.name}: dtype {dtype.const}")
        if as_bool:
            if not x.tensor:
                return self.constant(bool(fill))
            return self.let(f"tl.full({x.expr}.shape, {1 if fill else 0}, tl.int1)", "b", True)
        if not x.tensor:
            return self.constant(float(fill))
        return self.let(f"tl.full({x.expr}.shape, {self.float_literal(float(fill))}, {self.cdt})", "f", True)

    def _getattr(self, node, args, kwargs, tensor):
        if len(node.args) != 2 or node.args[1] != "dtype":
            raise NotFusible(f"{node.name}: only the .dtype attribute is supported")
        src = args[0]
        return KernelValue("", "dtype", False, torch.bool if src.kind == "b" else torch.float32, True)

    def _cast(self, node, args, kwargs, tensor):
        x = args[0]
        m = node.target
        for k in ("non_blocking", "copy", "memory_format"):
            kwargs.pop(k, None)
        if m == "to":
            target = kwargs.pop("dtype", None)
            rest = [a for a in args[1:]]
            if target is None:
                dts = [a for a in rest if a.kind == "dtype"]
                if len(dts) != 1 or len(rest) != 1:
                    raise NotFusible(f"{node.name}: .to() without a dtype")
                target = dts[0]
            self._no_kwargs(node, kwargs)
            if target.kind != "dtype":
                raise NotFusible(f"{node.name}: .to() without a dtype")
            dt = target.const
        elif m == "type_as":
            dt = torch.bool if args[1].kind == "b" else torch.float32
        else:
            dt = torch.float32
        if dt == torch.bool:
            return self.let(self.as_bool(x), "b", x.tensor)
        if not dt.is_floating_point:
            raise NotFusible(f"{node.name}: cast to {dt}")
        return self.let(self.as_float(x), "f", x.tensor)


def emit_program(program: PointwiseProgram, inputs: Sequence[KernelValue], compute: str = "float32",
                 prefix: str = "v") -> tuple[list[str], list[KernelValue]]:
    """The lines of Triton code computing ``program`` on ``inputs`` (one :class:`KernelValue` per
    program input, already in the compute dtype), and its output values. Raises :class:`NotFusible`.

    Shared by the pointwise kernels and the matmul epilogues, which feed it the accumulator tile.
    """
    if len(inputs) != program.n_inputs:
        raise ValueError(f"program takes {program.n_inputs} inputs, got {len(inputs)}")
    em = _Emitter(compute, prefix)
    env: dict = {}
    it = iter(inputs)
    outs: list[KernelValue] = []
    for node in program.graph.nodes:
        if node.op == "placeholder":
            env[node] = next(it)
        elif node.op == "output":
            for o in node.args[0]:
                if not isinstance(o, fx.Node):
                    raise NotFusible("a program output is a constant")
                v = env[o]
                if v.kind not in ("f", "b") or v.is_const:
                    raise NotFusible(f"output {o.name} is not a computed value")
                outs.append(v)
        elif node.op in ("call_function", "call_method"):
            env[node] = em.node(node, env)
        else:
            raise NotFusible(f"node {node.name} ({node.op}) is not a pointwise call")
    return em.lines, outs


def check_fusible(program: PointwiseProgram) -> None:
    """Raise :class:`NotFusible` if ``program`` has an op the code generator cannot write (no triton
    needed: this only generates source)."""
    to_triton_source(program)


# ---- pointwise kernels --------------------------------------------------------------------------

@dataclass(frozen=True)
class PointwiseSpec:
    """How a kernel sees its arguments: what varies between launches of one program.

    ``inputs[i]``: ``"full"`` (a tensor of the output's numel), ``"bcast"`` (a tensor whose shape is a
    proper suffix of the output shape: read at ``offs % n_in``), ``"one"`` (a one-element tensor) or
    ``"scalar"`` (a Python number, a kernel argument). ``outputs[j]``: ``"full"``, ``"prefix"`` (an
    output of fewer elements than the index space: a suffix-shaped result stored where
    ``offs < n_out``) or ``"skip"`` (not stored: an input passed through, or a repeated output).
    ``compute``: the dtype of the arithmetic. ``int64``: 64-bit offsets for more than 2**31 elements.
    """

    inputs: tuple
    outputs: tuple
    compute: str = "float32"
    int64: bool = False


def _pointwise_params(spec: PointwiseSpec) -> list[str]:
    ps = []
    for i, s in enumerate(spec.inputs):
        ps.append(f"in{i}" if s == "scalar" else f"in{i}_ptr")
    for j, s in enumerate(spec.outputs):
        if s != "skip":
            ps.append(f"out{j}_ptr")
    ps.append("numel")
    ps += [f"n_in{i}" for i, s in enumerate(spec.inputs) if s == "bcast"]
    ps += [f"n_out{j}" for j, s in enumerate(spec.outputs) if s == "prefix"]
    return ps


def to_triton_source(program: PointwiseProgram, spec: Optional[PointwiseSpec] = None) -> str:
    """The source of a Python module defining ``kernel``, a ``@triton.jit`` function computing
    ``program`` over the flat index space of the output (one ``BLOCK`` of elements per program).

    Arithmetic is done in ``spec.compute`` (float32 unless an operand or result is float64) and each
    output is stored in its tensor's dtype. Raises :class:`NotFusible` for unsupported ops.
    """
    if spec is None:
        spec = PointwiseSpec(("full",) * program.n_inputs, ("full",) * program.n_outputs)
    if len(spec.inputs) != program.n_inputs or len(spec.outputs) != program.n_outputs:
        raise ValueError("spec does not match the program's inputs and outputs")
    cdt = _CDT.get(spec.compute)
    if cdt is None:
        raise NotFusible(f"compute dtype {spec.compute}")
    body = []
    pid = "tl.program_id(0).to(tl.int64)" if spec.int64 else "tl.program_id(0)"
    body.append(f"offs = {pid} * BLOCK + tl.arange(0, BLOCK)")
    body.append("mask = offs < numel")
    values = []
    for i, s in enumerate(spec.inputs):
        if s == "full":
            body.append(f"x{i} = tl.load(in{i}_ptr + offs, mask=mask, other=0).to({cdt})")
            values.append(KernelValue(f"x{i}", "f", True))
        elif s == "bcast":
            body.append(f"x{i} = tl.load(in{i}_ptr + offs % n_in{i}, mask=mask, other=0).to({cdt})")
            values.append(KernelValue(f"x{i}", "f", True))
        elif s == "one":
            body.append(f"x{i} = tl.load(in{i}_ptr).to({cdt})")
            values.append(KernelValue(f"x{i}", "f", False))
        elif s == "scalar":
            values.append(KernelValue(f"in{i}", "f", False))
        else:
            raise ValueError(f"input spec {s!r}")
    lines, outs = emit_program(program, values, spec.compute)
    body += lines
    for j, (s, v) in enumerate(zip(spec.outputs, outs)):
        if s == "skip":
            continue
        val = v.expr
        if not v.tensor:
            if v.kind != "f":
                raise NotFusible("a boolean output that depends on no tensor")
            val = f"(tl.zeros([BLOCK], {cdt}) + {val})"
        m = "mask" if s == "full" else f"mask & (offs < n_out{j})"
        body.append(f"tl.store(out{j}_ptr + offs, ({val}).to(out{j}_ptr.dtype.element_ty), mask={m})")
    params = ", ".join(_pointwise_params(spec) + ["BLOCK: tl.constexpr"])
    return _module_source(f"def kernel({params}):", body, program)


def _module_source(signature: str, body: list[str], program: Optional[PointwiseProgram]) -> str:
    header = "# Generated by fxcurv.kernels; do not edit.\n"
    if program is not None:
        header += "".join(f"# {ln}\n" for ln in program.code.strip().splitlines() if ln.strip())
    return (header + "import triton\nimport triton.language as tl\n" + _HELPERS + "\n\n@triton.jit\n"
            + signature + "\n" + "".join(f"    {ln}\n" for ln in body))


# ---- compiling generated modules ------------------------------------------------------------------

_MODULES: dict = {}
_KERNELS: dict = {}


def cache_dir() -> str:
    """Where generated kernel modules are written (``triton.jit`` reads a kernel's source file, so a
    string cannot simply be ``exec``-ed). ``FXCURV_KERNEL_CACHE`` overrides the default."""
    d = os.environ.get("FXCURV_KERNEL_CACHE")
    if not d:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        d = os.path.join(base, "fxcurv", "kernels")
    try:
        os.makedirs(d, exist_ok=True)
        if not os.access(d, os.W_OK):
            raise OSError(d)
    except OSError:
        d = os.path.join(tempfile.gettempdir(), f"fxcurv-kernels-{os.getuid() if hasattr(os, 'getuid') else 0}")
        os.makedirs(d, exist_ok=True)
    return d


def load_source(source: str, prefix: str = "k") -> Any:
    """Import generated source as a module (written once under :func:`cache_dir`, named by its hash);
    the same source always gives the same module object within a process."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    mode = "interp" if interpreting() else "jit"
    key = (digest, mode)
    with _LOCK:
        mod = _MODULES.get(key)
        if mod is not None:
            return mod
        if not triton_available():
            raise RuntimeError("triton is not installed")
        name = f"fxcurv_gen_{prefix}_{digest}"
        path = os.path.join(cache_dir(), name + ".py")
        try:
            with open(path) as f:
                same = f.read() == source
        except OSError:
            same = False
        if not same:
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
            with open(tmp, "w") as f:
                f.write(source)
            os.replace(tmp, path)  # atomic: concurrent processes never import half a file
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        _MODULES[key] = mod
        return mod


def pointwise_kernel(program: PointwiseProgram, spec: Optional[PointwiseSpec] = None) -> Any:
    """The compiled (``@triton.jit``) kernel of ``program`` under ``spec``, cached per
    ``(program.key(), spec)``: equal programs share one kernel."""
    if spec is None:
        spec = PointwiseSpec(("full",) * program.n_inputs, ("full",) * program.n_outputs)
    return cached_kernel((program.key(), spec, interpreting()), lambda: to_triton_source(program, spec), "pw")


def cached_kernel(key: Any, source: Callable[[], str], prefix: str) -> Any:
    """The kernel compiled from ``source()``, once per ``key``; a :class:`NotFusible` raised while
    generating the source is cached too (and raised again), so a program is tried once."""
    with _LOCK:
        hit = _KERNELS.get(key)
        if hit is None:
            try:
                hit = load_source(source(), prefix).kernel
            except NotFusible as e:
                hit = e
            _KERNELS[key] = hit
    if isinstance(hit, NotFusible):
        raise hit
    return hit


# ==== running ========================================================================================

def _suffix_of(shape: tuple, full: tuple) -> bool:
    return len(shape) <= len(full) and tuple(full[len(full) - len(shape):]) == tuple(shape)


def _block_size(numel: int) -> tuple[int, int]:
    if interpreting():
        # the interpreter pays per program, not per element: one large block
        return min(next_pow2(max(numel, 16)), 1 << 16), 1
    return 1024, 4


def _triton_launch_plan(program: PointwiseProgram, inputs: list):
    """``(spec, args, outputs, numel)`` for a launch, or a string saying why the inputs do not fit."""
    tensors = [a for a in inputs if isinstance(a, torch.Tensor)]
    if not tensors:
        return "no tensor input"
    device = tensors[0].device
    for a in inputs:
        if isinstance(a, torch.Tensor):
            if a.device != device:
                return "inputs on different devices"
            if not a.dtype.is_floating_point:
                return f"input of dtype {a.dtype}"
            if not a.is_contiguous():
                return "a non-contiguous input"
        elif isinstance(a, bool) or not isinstance(a, (int, float)):
            return f"input of type {type(a).__name__}"
    meta = program.meta(inputs)
    if meta is None:
        return "torch cannot run the program on these inputs"
    try:
        full = tuple(torch.broadcast_shapes(*[a.shape for a in tensors]))
    except RuntimeError:
        return "inputs do not broadcast"
    numel = math.prod(full)
    out_meta = [meta[o] for o in program._outputs]
    if any(m is None for m in out_meta):
        return "an output is not a tensor"
    dtypes = [a.dtype for a in tensors] + [m[1] for m in out_meta]
    compute = "float64" if torch.float64 in dtypes else "float32"
    in_spec, args, extra = [], [], []
    for i, a in enumerate(inputs):
        if not isinstance(a, torch.Tensor):
            if compute == "float64":
                # kernels take Python floats as float32 arguments; keep float64 values exact
                args.append(torch.tensor(float(a), dtype=torch.float64, device=device))
                in_spec.append("one")
            else:
                args.append(float(a))
                in_spec.append("scalar")
            continue
        if not _suffix_of(tuple(a.shape), full):
            return f"input {i} of shape {tuple(a.shape)} is not a suffix of {full}"
        args.append(a)
        n = a.numel()
        if n == numel:
            in_spec.append("full")
        elif n == 1:
            in_spec.append("one")
        else:
            in_spec.append("bcast")
            extra.append(n)
    out_spec, outs, out_args, out_extra = [], [], [], []
    made: dict = {}
    for j, (o, (shape, dtype)) in enumerate(zip(program._outputs, out_meta)):
        if o.op == "placeholder":
            out_spec.append("skip")
            outs.append(inputs[program._inputs.index(o)])
            continue
        if o in made:
            out_spec.append("skip")
            outs.append(made[o])
            continue
        if not (dtype.is_floating_point or dtype == torch.bool):
            return f"output of dtype {dtype}"
        if not _suffix_of(shape, full):
            return f"output of shape {shape} is not a suffix of {full}"
        t = torch.empty(shape, dtype=dtype, device=device)
        made[o] = t
        outs.append(t)
        out_args.append(t)
        if t.numel() == numel:
            out_spec.append("full")
        else:
            out_spec.append("prefix")
            out_extra.append(t.numel())
    spec = PointwiseSpec(tuple(in_spec), tuple(out_spec), compute, numel >= 2**31 - 2**16)
    return spec, args + out_args + [numel] + extra + out_extra, outs, numel


def pointwise(program: PointwiseProgram, inputs: Sequence[Any], force: Optional[str] = None,
              owned: frozenset = frozenset()) -> tuple:
    """Run ``program`` on ``inputs``: Triton on CUDA tensors, the torch graph otherwise.

    ``owned``: positions of inputs the caller will not read again (fresh buffers at their last use);
    the torch path may write results into them instead of allocating, which on the CPU also saves
    the page faults of fresh large allocations.

    Triton path: one kernel, outputs allocated contiguous with the broadcast shape of the inputs.
    Inputs that do not fit it (non-contiguous, non-float, broadcasting other than by a shape suffix,
    mixed devices) and programs with an unsupported op run the torch graph instead -- unless
    ``force="triton"``, which raises :class:`NotFusible` so that tests never pass by falling back.
    """
    inputs = list(inputs)
    if len(inputs) != program.n_inputs:
        raise TypeError(f"program takes {program.n_inputs} inputs, got {len(inputs)}")
    tensors = [a for a in inputs if isinstance(a, torch.Tensor)]
    if not use_triton(tensors, force):
        return program.run_torch(inputs, owned)
    plan = _triton_launch_plan(program, inputs)
    if isinstance(plan, str):
        if force == "triton":
            raise NotFusible(f"cannot run on the Triton path: {plan}")
        return program.run_torch(inputs, owned)
    spec, args, outs, numel = plan
    try:
        kernel = pointwise_kernel(program, spec)
    except NotFusible:
        if force == "triton":
            raise
        return program.run_torch(inputs, owned)
    if numel:
        block, warps = _block_size(numel)
        grid = (triton_cdiv(numel, block),)
        kernel[grid](*args, BLOCK=block, num_warps=warps)
        LAUNCHES["pointwise"] += 1
    return tuple(outs)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
