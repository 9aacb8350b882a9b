"""The torch path of a pointwise program: its graph run op by op, overwriting what dies.

This is the reference semantics of every fused pointwise node and matmul epilogue, and what runs on
the CPU. Per input signature the graph becomes a straight-line Python function (a runner); where an
op's result may go into a buffer that is fresh -- made by an earlier op of the program, or given
away by the caller (``owned``) -- and dead after the op, the op's in-place twin writes it there
(``a.mul_(b)`` for ``a * b``): the same kernels, so bitwise the same numbers, without an allocation.
On the CPU the page faults of a fresh large buffer cost more than the arithmetic of an elementwise
product.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
import torch.fx as fx
import torch.nn.functional as F

from .program import input_signature
from .vocabulary import is_hashable

if TYPE_CHECKING:
    from .program import NodeMeta, PointwiseProgram

__all__ = ["Runner", "build_runner", "run_torch"]


class Runner(Protocol):
    """A program compiled for one input signature; ``source`` is its generated Python."""

    source: str

    def __call__(self, *inputs: Any) -> tuple[Any, ...]: ...


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
_INPLACE_BINARY: dict[Any, str] = {
    operator.add: "add_", operator.mul: "mul_", operator.sub: "sub_", operator.truediv: "div_",
    torch.add: "add_", torch.mul: "mul_", torch.sub: "sub_", torch.div: "div_",
    "add": "add_", "mul": "mul_", "sub": "sub_", "div": "div_",
}
_COMMUTATIVE = {"add_", "mul_"}
_INPLACE_UNARY: dict[Any, str] = {
    torch.tanh: "tanh_", torch.sigmoid: "sigmoid_", torch.exp: "exp_", torch.log: "log_",
    torch.sqrt: "sqrt_", torch.rsqrt: "rsqrt_", torch.erf: "erf_", torch.abs: "abs_",
    torch.sign: "sign_", torch.relu: "relu_", torch.neg: "neg_", operator.neg: "neg_",
    operator.abs: "abs_", torch.reciprocal: "reciprocal_",
    "tanh": "tanh_", "sigmoid": "sigmoid_", "exp": "exp_", "log": "log_", "sqrt": "sqrt_",
    "rsqrt": "rsqrt_", "erf": "erf_", "abs": "abs_", "sign": "sign_", "relu": "relu_", "neg": "neg_",
    "reciprocal": "reciprocal_",
}
_POWS = (operator.pow, torch.pow, "pow")


def run_torch(program: PointwiseProgram, inputs: Sequence[Any], owned: frozenset[int] = frozenset()) -> tuple[Any, ...]:
    """The reference: the graph's ops, in order. ``owned`` lists input positions whose tensors
    the caller gives away (a fresh matmul result), so the program may overwrite them."""
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in inputs):
        # overwriting an intermediate autograd saved for backward would break the backward
        return tuple(program.module(*inputs))
    runner = program.cached("torch runner", (input_signature(inputs), owned),
                            lambda: build_runner(program, inputs, owned))
    return runner(*inputs)


def build_runner(program: PointwiseProgram, inputs: Sequence[Any], owned_inputs: frozenset[int]) -> Runner:
    """The runner of ``program`` for inputs like ``inputs``: each op writes into a dead fresh buffer
    of its shape and dtype where there is one, and every value is freed after its last use."""
    meta = program.meta(inputs)
    if meta is None:
        return _plain_runner(program)
    return _RunnerWriter(program, meta, owned_inputs).runner()


def _plain_runner(program: PointwiseProgram) -> Runner:
    module = program.module

    def run(*inputs: Any) -> tuple[Any, ...]:
        return tuple(module(*inputs))

    runner = cast(Runner, run)
    runner.source = program.code
    return runner


class _RunnerWriter:
    """Writes the runner's source, one line per node (state: names, globals, the buffers it may
    overwrite)."""

    def __init__(self, program: PointwiseProgram, meta: NodeMeta, owned_inputs: frozenset[int]) -> None:
        self.program = program
        self.meta = meta
        self.owned_inputs = owned_inputs
        self.nodes = list(program.graph.nodes)
        self.last_use: dict[fx.Node, int] = {}
        for i, node in enumerate(self.nodes):
            for a in node.all_input_nodes:
                self.last_use[a] = i
        self.names: dict[fx.Node, str] = {}
        self.glb: dict[str, Any] = {}
        self.lines: list[str] = []
        # Fresh buffers of this run: results of ops that allocate, and the inputs given away.
        self.owned: set[fx.Node] = set()
        # Tensors another value may alias (the source of a same-dtype .to()): never overwritten.
        self.pinned: set[fx.Node] = set()
        self.outputs = set(program.output_nodes)

    def ref(self, a: Any) -> str:
        """``a`` as an expression: a node's variable, a literal, or a new global holding it."""
        if isinstance(a, fx.Node):
            return self.names[a]
        if isinstance(a, (tuple, list)):
            inner = ", ".join(self.ref(x) for x in a)
            return f"({inner},)" if isinstance(a, tuple) else f"[{inner}]"
        if isinstance(a, (bool, int)) or a is None:
            return repr(a)
        if isinstance(a, float) and math.isfinite(a):
            return repr(a)
        name = f"_c{len(self.glb)}"
        self.glb[name] = a
        return name

    def is_tensor(self, n: Any) -> bool:
        return isinstance(n, fx.Node) and self.meta.get(n) is not None

    def can_overwrite(self, a: Any, node: fx.Node, i: int) -> bool:
        """``a`` may hold ``node``'s result: a fresh buffer of the same shape and dtype, dead after."""
        return (isinstance(a, fx.Node) and a in self.owned and a not in self.pinned
                and self.last_use.get(a) == i and self.is_tensor(a)
                and self.meta[node] is not None and self.meta[a] == self.meta[node])

    def runner(self) -> Runner:
        params: list[str] = []
        for i, node in enumerate(self.nodes):
            if node.op == "placeholder":
                idx = len(params)
                self.names[node] = f"a{idx}"
                params.append(self.names[node])
                if idx in self.owned_inputs:
                    self.owned.add(node)
                continue
            if node.op == "output":
                self.lines.append(f"return {self.ref(self.program.output_nodes)}")
                continue
            self.call(node, i)
            # Free what dies here, so peak memory is that of the live messages only.
            dead = [self.names[a] for a in node.all_input_nodes if self.last_use.get(a) == i
                    and a.op != "placeholder" and a not in self.outputs]
            if dead:
                self.lines.append("del " + ", ".join(sorted(set(dead))))
        src = f"def run({', '.join(params)}):\n" + "\n".join("    " + ln for ln in self.lines) + "\n"
        name = f"<fxcurv pointwise torch path {hash(self.program.key()) & 0xffff:x}>"
        exec(compile(src, name, "exec"), self.glb)  # noqa: S102 -- the source is ours, written above
        runner = cast(Runner, self.glb["run"])
        runner.source = src
        return runner

    def call(self, node: fx.Node, i: int) -> None:
        """The line of one call: in place where a dead fresh operand can take the result."""
        var = self.names[node] = f"v{i}"
        line = self.inplace(node, i, var)
        if line is not None:
            self.lines.append(line)
            self.owned.add(node)
            return
        self.lines.append(self.plain(node, var))
        target = node.target
        fresh = (target in _FRESH_METHODS) if node.op == "call_method" else (
            is_hashable(target) and target in _FRESH_FUNCS)
        if fresh and self.is_tensor(node):
            self.owned.add(node)
        elif self.is_tensor(node):
            self.pinned.update(a for a in node.all_input_nodes if self.is_tensor(a))

    def inplace(self, node: fx.Node, i: int, var: str) -> str | None:
        """``node`` as an in-place op on a dead fresh operand, or ``None``."""
        target, args, kwargs = node.target, node.args, node.kwargs
        if (node.op == "call_function" and is_hashable(target) and target in _INPLACE_BINARY and not kwargs
                and len(args) == 2):
            method = _INPLACE_BINARY[target]
            a, b = args
            if self.can_overwrite(a, node, i):
                return f"{var} = {self.ref(a)}.{method}({self.ref(b)})"
            if method in _COMMUTATIVE and self.can_overwrite(b, node, i):
                return f"{var} = {self.ref(b)}.{method}({self.ref(a)})"
            if method == "sub_" and a is not b and self.can_overwrite(b, node, i):
                # c - t == (-t) + c exactly in IEEE arithmetic
                return f"{var} = {self.ref(b)}.neg_().add_({self.ref(a)})"
        elif node.op == "call_method" and target in _INPLACE_BINARY and not kwargs and len(args) == 2:
            method = _INPLACE_BINARY[target]
            if self.can_overwrite(args[0], node, i):
                return f"{var} = {self.ref(args[0])}.{method}({self.ref(args[1])})"
        elif (is_hashable(target) and target in _INPLACE_UNARY and len(args) == 1 and not kwargs
              and self.can_overwrite(args[0], node, i)):
            return f"{var} = {self.ref(args[0])}.{_INPLACE_UNARY[target]}()"
        elif (target in _POWS and len(args) == 2 and not kwargs
              and isinstance(args[1], (int, float)) and self.can_overwrite(args[0], node, i)):
            return f"{var} = {self.ref(args[0])}.pow_({self.ref(args[1])})"
        return None

    def plain(self, node: fx.Node, var: str) -> str:
        """``node`` as the call it is."""
        args, kwargs = node.args, node.kwargs
        if node.op == "call_method":
            return f"{var} = {self.ref(args[0])}.{node.target}({self.arguments(args[1:], kwargs)})"
        arg_s = self.arguments(args, kwargs)
        fname = f"_f{len(self.glb)}"
        self.glb[fname] = node.target
        return f"{var} = {fname}({arg_s})"

    def arguments(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
        return ", ".join([self.ref(a) for a in args] + [f"{k}={self.ref(v)}" for k, v in kwargs.items()])
