"""Triton source from pointwise programs: the code generator of every generated kernel.

Each node of a :class:`~fxcurv.kernels.program.PointwiseProgram` becomes one line of Triton over
block values (:func:`emit_program`), so a chain of rules costs one pass over memory instead of one per
rule, and no activation needs a hand-written kernel. :func:`to_triton_source` wraps those lines into
a pointwise kernel over the flat index space of the output; :mod:`.matmul` feeds the same lines its
accumulator tile to write its epilogues. Ops outside the vocabulary (:mod:`.vocabulary`) raise
:class:`~fxcurv.kernels.runtime.NotFusible`: the caller keeps the unfused nodes.

Generating source needs no triton (and no GPU); compiling it is :mod:`.cache`'s job.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from .runtime import NotFusible
from .vocabulary import (
    BINARY_OPS,
    CLAMP_OPS,
    COMPARISONS,
    FILL_OPS,
    LOGICAL_OPS,
    MINMAX_OPS,
    UNARY_OPS,
    op_kind,
    target_name,
)

if TYPE_CHECKING:
    from .program import PointwiseProgram

__all__ = [
    "COMPUTE_DTYPES", "HELPERS", "KernelValue", "PointwiseSpec", "emit_program", "module_source",
    "pointwise_params", "to_triton_source",
]


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


# The dtypes arithmetic is done in, as Triton names them (float16 and bfloat16 data is computed in
# float32).
COMPUTE_DTYPES = {"float32": "tl.float32", "float64": "tl.float64"}

# A node's operands in generated code: positional, and by keyword.
_Args = list[KernelValue]
_Kwargs = dict[str, KernelValue]

# Integer powers up to this are written as products (exact like torch's), others as exp(c log x).
_MAX_PRODUCT_POW = 64
# torch multiplies small powers out in this association: x*x, x*x*x; larger ones by squaring.
_MAX_PLAIN_PRODUCT = 3


# Helpers emitted into every generated module. tanh: libdevice is unavailable in Triton's
# interpreter, so tanh is written with exp/log (<= 6 ulp in float32, tested on a dense grid), the same
# code on the GPU and in CI.
HELPERS = '''
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

    def __init__(self, compute: str, prefix: str = "v") -> None:
        if compute not in COMPUTE_DTYPES:
            raise NotFusible(f"compute dtype {compute!r} is not supported")
        self.compute = compute
        self.cdt = COMPUTE_DTYPES[compute]
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

    # ---- nodes ---------------------------------------------------------------------------------
    def node(self, node: fx.Node, env: dict[fx.Node, KernelValue]) -> KernelValue:
        def val(a: Any) -> KernelValue:
            if isinstance(a, fx.Node):
                return env[a]
            return self.constant(a)

        kind = op_kind(node)
        name = target_name(node.target)
        if kind is None:
            raise NotFusible(f"op {name} ({node.op}) of node {node.name} is not a supported pointwise op")
        args = [val(a) for a in node.args]
        kwargs = {k: val(v) for k, v in node.kwargs.items()}
        tensor = any(a.tensor for a in args) or any(v.tensor for v in kwargs.values())
        write: Callable[[fx.Node, _Args, _Kwargs, bool], KernelValue] = getattr(self, f"_{kind}")
        return write(node, args, kwargs, tensor)

    def _no_kwargs(self, node: fx.Node, kwargs: _Kwargs, allowed: Sequence[str] = ()) -> None:
        for k in kwargs:
            if k not in allowed:
                raise NotFusible(f"keyword {k}= of {node.name} is not supported")

    def _bin(self, node: fx.Node, args: _Args, kwargs: _Kwargs, tensor: bool) -> KernelValue:
        alpha = kwargs.pop("alpha", None)
        self._no_kwargs(node, kwargs)
        if len(args) != 2:
            raise NotFusible(f"{node.name}: expected two operands")
        op = BINARY_OPS[node.target]
        a, b = args
        if a.kind == "i" and b.kind == "i":
            raise NotFusible(f"{node.name}: integer arithmetic")
        bs = self.as_float(b)
        if alpha is not None and alpha.is_const and alpha.const != 1:
            bs = f"({self.as_float(alpha)} * {bs})"
        return self.let(f"{self.as_float(a)} {op} {bs}", "f", tensor)

    def _cmp(self, node: fx.Node, args: _Args, kwargs: _Kwargs, tensor: bool) -> KernelValue:
        self._no_kwargs(node, kwargs)
        a, b = args
        op = COMPARISONS[node.target]
        return self.let(f"{self._num(a)} {op} {self._num(b)}", "b", tensor)

    def _num(self, v: KernelValue) -> str:
        return v.expr if v.kind in ("f", "i") else self.as_float(v)

    def _bool(self, node: fx.Node, args: _Args, kwargs: _Kwargs, tensor: bool) -> KernelValue:
        self._no_kwargs(node, kwargs)
        if any(a.kind != "b" for a in args):
            raise NotFusible(f"{node.name}: logical op on non-boolean values")
        return self.let(f"{args[0].expr} {LOGICAL_OPS[node.target]} {args[1].expr}", "b", tensor)

    def _not(self, node: fx.Node, args: _Args, kwargs: _Kwargs, tensor: bool) -> KernelValue:
        self._no_kwargs(node, kwargs)
        if args[0].kind != "b":
            raise NotFusible(f"{node.name}: bitwise not of a number")
        return self.let(f"~{args[0].expr}", "b", tensor)

    def _unary(self, node: fx.Node, args: _Args, kwargs: _Kwargs, tensor: bool) -> KernelValue:
        self._no_kwargs(node, kwargs, ("inplace",) if node.target is F.relu else ())
        if "inplace" in kwargs and kwargs["inplace"].const:
            raise NotFusible(f"{node.name}: in-place relu")
        if len(args) != 1:
            raise NotFusible(f"{node.name}: expected one operand")
        op = UNARY_OPS[node.target]
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

    def _minmax(self, node: fx.Node, args: _Args, kwargs: _Kwargs, tensor: bool) -> KernelValue:
        self._no_kwargs(node, kwargs)
        a, b = (self.as_float(x) for x in args)
        op = MINMAX_OPS[node.target]
        # torch.maximum/minimum propagate NaN from either side
        return self.let(f"tl.where(({a} {op} {b}) | ({a} != {a}), {a}, {b})", "f", tensor)

    def _clamp(self, node: fx.Node, args: _Args, kwargs: _Kwargs, tensor: bool) -> KernelValue:
        which = CLAMP_OPS[node.target]
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

    def _pow(self, node: fx.Node, args: _Args, kwargs: _Kwargs, tensor: bool) -> KernelValue:
        self._no_kwargs(node, kwargs)
        base, exp = args
        if exp.is_const and exp.kind in ("i", "f"):
            e = exp.const
            if float(e).is_integer() and abs(e) <= _MAX_PRODUCT_POW:
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
        if m <= _MAX_PLAIN_PRODUCT:
            expr = " * ".join([x] * m)
            r = self.let(expr, "f", tensor)
        else:
            r = self._power_by_squaring(x, m, tensor)
        if n < 0:
            r = self.let(f"1.0 / {r.expr}", "f", tensor)
        return r

    def _power_by_squaring(self, x: str, m: int, tensor: bool) -> KernelValue:
        """``x**m`` for ``m >= 1``: one product per bit of ``m`` and one squaring per further bit."""
        r: KernelValue | None = None
        sq = KernelValue(x, "f", tensor)
        while m:
            if m & 1:
                r = sq if r is None else self.let(f"{r.expr} * {sq.expr}", "f", tensor)
            m >>= 1
            if m:
                sq = self.let(f"{sq.expr} * {sq.expr}", "f", tensor)
        assert r is not None, "m >= 1 has a set bit"
        return r

    def _where(self, node: fx.Node, args: _Args, kwargs: _Kwargs, tensor: bool) -> KernelValue:
        self._no_kwargs(node, kwargs)
        if len(args) != 3:
            raise NotFusible(f"{node.name}: torch.where needs three arguments")
        c, a, b = args
        cond = self.as_bool(c)
        if a.kind == "b" and b.kind == "b":
            return self.let(f"tl.where({cond}, {a.expr}, {b.expr})", "b", tensor)
        return self.let(f"tl.where({cond}, {self.as_float(a)}, {self.as_float(b)})", "f", tensor)

    def _fill(self, node: fx.Node, args: _Args, kwargs: _Kwargs, tensor: bool) -> KernelValue:
        x = args[0]
        fill = FILL_OPS[node.target]
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

    def _getattr(self, node: fx.Node, args: _Args, kwargs: _Kwargs, tensor: bool) -> KernelValue:
        if len(node.args) != 2 or node.args[1] != "dtype":
            raise NotFusible(f"{node.name}: only the .dtype attribute is supported")
        src = args[0]
        return KernelValue("", "dtype", False, torch.bool if src.kind == "b" else torch.float32, True)

    def _cast(self, node: fx.Node, args: _Args, kwargs: _Kwargs, tensor: bool) -> KernelValue:
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
    env: dict[fx.Node, KernelValue] = {}
    it = iter(inputs)
    outs: list[KernelValue] = []
    for node in program.graph.nodes:
        if node.op == "placeholder":
            env[node] = next(it)
        elif node.op == "output":
            for o in program.output_nodes:
                v = env[o]
                if v.kind not in ("f", "b") or v.is_const:
                    raise NotFusible(f"output {o.name} is not a computed value")
                outs.append(v)
        elif node.op in ("call_function", "call_method"):
            env[node] = em.node(node, env)
        else:
            raise NotFusible(f"node {node.name} ({node.op}) is not a pointwise call")
    return em.lines, outs


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

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    compute: str = "float32"
    int64: bool = False

    @classmethod
    def dense(cls, program: PointwiseProgram) -> PointwiseSpec:
        """Every input and output a tensor of the output's numel."""
        return cls(("full",) * program.n_inputs, ("full",) * program.n_outputs)


def pointwise_params(spec: PointwiseSpec) -> list[str]:
    """The parameters of the kernel :func:`to_triton_source` writes for ``spec``, in order (less the
    ``BLOCK`` constexpr)."""
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


def to_triton_source(program: PointwiseProgram, spec: PointwiseSpec | None = None) -> str:
    """The source of a Python module defining ``kernel``, a ``@triton.jit`` function computing
    ``program`` over the flat index space of the output (one ``BLOCK`` of elements per program).

    Arithmetic is done in ``spec.compute`` (float32 unless an operand or result is float64) and each
    output is stored in its tensor's dtype. Raises :class:`NotFusible` for unsupported ops.
    """
    if spec is None:
        spec = PointwiseSpec.dense(program)
    if len(spec.inputs) != program.n_inputs or len(spec.outputs) != program.n_outputs:
        raise ValueError("spec does not match the program's inputs and outputs")
    cdt = COMPUTE_DTYPES.get(spec.compute)
    if cdt is None:
        raise NotFusible(f"compute dtype {spec.compute}")
    body: list[str] = []
    pid = "tl.program_id(0).to(tl.int64)" if spec.int64 else "tl.program_id(0)"
    body.append(f"offs = {pid} * BLOCK + tl.arange(0, BLOCK)")
    body.append("mask = offs < numel")
    values: list[KernelValue] = []
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
    params = ", ".join(pointwise_params(spec) + ["BLOCK: tl.constexpr"])
    return module_source(f"def kernel({params}):", body, program)


def module_source(signature: str, body: list[str], program: PointwiseProgram | None) -> str:
    """A generated module: a header quoting ``program``'s code, the helpers, and one
    ``@triton.jit`` function of ``signature`` and ``body`` (unindented lines)."""
    header = "# Generated by fxcurv.kernels; do not edit.\n"
    if program is not None:
        header += "".join(f"# {ln}\n" for ln in program.code.strip().splitlines() if ln.strip())
    return (header + "import triton\nimport triton.language as tl\n" + HELPERS + "\n\n@triton.jit\n"
            + signature + "\n" + "".join(f"    {ln}\n" for ln in body))
