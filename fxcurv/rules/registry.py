"""The rule tables of fxcurv's canonical ops.

An *op* is one word of the canonical vocabulary (``linear``, ``conv2d``, ``tanh``, ...). Each family
file in this package defines its ops with :func:`define_op` and registers, in tables keyed by
``(op, input)`` as JAX does for its differentiation rules:

* **sources** -- which torch modules, functions and tensor methods canonicalize to the op;
* **message rules** -- how a backward message passes through the op to one of its tensor inputs:
  ``jac_t`` (transposed Jacobian, for gradients ``g [N, ...]`` and square-root factors
  ``S [K, N, ...]`` alike), ``diag`` (the HesScale/BL89 diagonal backpropagation, HesScale eq. 4 and 8)
  and ``residual`` (the op's own second-order term ``f''(x) * g`` of HBP eq. S.9);
* **parameter rules** -- what the op contributes to a quantity of a parameter input: ``grad``,
  ``diag_sqrt`` (``sum_{k,n} sign (J^T S)^2``, the GGN/Hessian diagonal from square-root factors),
  ``diag_diag`` (HesScale eq. 5 and 9) and ``per_sample`` (the per-sample transposed Jacobian
  ``[*lead, N, *param]``, needed where a parameter is used more than once).

A rule is a small pure function on tensors. Its first positional argument is the message (plus
``sign`` for ``diag_sqrt``); every other argument is looked up *by name* when the compiler binds the
rule to an op node: the op's inputs (``x``, ``weight``, ``bias``), its attributes (``stride``, ...), its
output ``out``, tensors its forward saved (``indices``), and *derived* quantities the op declares
(``d1 = f'(x)``, ``x_sq = x**2``). A derived quantity becomes a graph node of its own, so that the
gradient and every square-root factor passing through an activation share one ``f'(x)``.

Adding an op means adding one family file that calls :func:`define_op`; nothing else changes.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

# Message rules.
JAC_T: dict[tuple[str, str], Callable] = {}
DIAG: dict[tuple[str, str], Callable] = {}
RESIDUAL: dict[tuple[str, str], Callable] = {}
# Parameter rules.
GRAD: dict[tuple[str, str], Callable] = {}
DIAG_SQRT: dict[tuple[str, str], Callable] = {}
DIAG_DIAG: dict[tuple[str, str], Callable] = {}
PER_SAMPLE: dict[tuple[str, str], Callable] = {}
# Forward-side quantities shared by several rules of one op node.
DERIVED: dict[tuple[str, str], Callable] = {}
# Loss rules, keyed by (loss op, ""): the first and second derivatives w.r.t. the model output f.
LOSS_GRAD: dict[tuple[str, str], Callable] = {}
LOSS_SQRT_HESSIAN: dict[tuple[str, str], Callable] = {}
LOSS_SQRT_HESSIAN_MC: dict[tuple[str, str], Callable] = {}
LOSS_HESSIAN_DIAG: dict[tuple[str, str], Callable] = {}

OPS: dict[str, "OpDef"] = {}
# Canonicalization tables: torch source -> (op, canonicalizer).
MODULE_SOURCES: dict[type, tuple["OpDef", Callable]] = {}
FUNCTION_SOURCES: dict[Any, tuple["OpDef", Callable]] = {}
METHOD_SOURCES: dict[str, tuple["OpDef", Callable]] = {}


@dataclass
class Canonical:
    """What a canonicalizer returns: the op's tensor inputs (fx nodes, parameters, ``None``) and its
    attributes (plain Python values)."""

    inputs: dict[str, Any]
    attrs: dict[str, Any] = field(default_factory=dict)


class Args:
    """Positional-or-keyword access to a traced call's arguments, ``a(0, "input")``."""

    def __init__(self, args, kwargs):
        self.args, self.kwargs = tuple(args), dict(kwargs)

    _MISSING = object()

    def __call__(self, index: Optional[int], name: str, default=_MISSING):
        if index is not None and index < len(self.args):
            return self.args[index]
        if name in self.kwargs:
            return self.kwargs[name]
        if default is Args._MISSING:
            raise KeyError(name)
        return default


@dataclass
class OpDef:
    """One canonical op: its torch forward, its tensor inputs and which of them may be parameters.

    ``forward(*inputs, **attrs)`` is the reference implementation and the target of the op's node in
    every program. ``forward_saving``, when given, returns ``(out, *saved)`` so that rules can use
    tensors the forward computes anyway (max-pooling's argmax indices).
    """

    name: str
    family: str
    forward: Callable
    inputs: tuple[str, ...]
    params: tuple[str, ...] = ()
    forward_saving: Optional[Callable] = None
    saved: tuple[str, ...] = ()
    # (data input, parameter input) pairs in which the op is bilinear: the mixed second derivative
    # couples them, which matters for the exact Hessian of a weight used more than once.
    bilinear: tuple[tuple[str, str], ...] = ()
    # Elementwise ops map each input entry to one output entry: diagonal messages stay diagonal.
    elementwise: bool = False
    # Ops that are the identity (nn.Identity, dropout in eval mode) are folded away.
    alias: bool = False
    # Losses end the graph: inputs ("f", "y"), rules in the LOSS_* tables.
    is_loss: bool = False
    # A loss whose per-sample Hessian w.r.t. f is positive semi-definite has unsigned factors.
    psd_hessian: bool = True
    # check(f, y, **attrs) raises InputError for targets the loss cannot take.
    check: Optional[Callable] = None
    # The number of columns of the loss's square-root factor for a model output of this shape
    # (default: one per output entry of a sample).
    sqrt_columns: Optional[Callable] = None
    doc: str = ""

    # ---- sources -------------------------------------------------------------------------------
    def module(self, *types: type):
        """Register ``canon(node, module) -> Canonical`` for ``call_module`` nodes of ``types``."""

        def deco(fn):
            for t in types:
                MODULE_SOURCES[t] = (self, fn)
            return fn

        return deco

    def function(self, *fns: Any):
        """Register ``canon(node, args: Args) -> Canonical`` for ``call_function`` nodes."""

        def deco(fn):
            for f in fns:
                FUNCTION_SOURCES[f] = (self, fn)
            return fn

        return deco

    def method(self, *names: str):
        """Register ``canon(node, args: Args) -> Canonical`` for ``call_method`` nodes; ``args(0)``
        is the tensor the method is called on."""

        def deco(fn):
            for n in names:
                METHOD_SOURCES[n] = (self, fn)
            return fn

        return deco

    # ---- rules ---------------------------------------------------------------------------------
    def _table(self, table: dict, key: str, kind: str, pointwise: bool = False, matmul: Optional[str] = None,
               fresh: bool = False, view: bool = False):
        """Register ``fn`` under ``(op, key)``. Tags tell the fusion pass what a rule is:
        ``pointwise`` -- an elementwise function of its tensor arguments (broadcast over leading
        dims), fusible into generated kernels; ``matmul="weight"`` -- ``message @ weight`` (the
        product an elementwise epilogue can be fused into, HBP B.4); ``fresh`` -- returns a newly
        allocated tensor (implied by the two tags before), which a fused kernel reading it last may
        overwrite; ``view`` -- returns a view of its message (a crop), fresh if the message was."""

        def deco(fn):
            fn.rule_label = f"{self.name}.{kind}[{key}]"
            fn.pointwise = pointwise
            fn.matmul = matmul
            fn.fresh = fresh or pointwise or matmul is not None
            fn.view = view
            table[(self.name, key)] = fn
            return fn

        return deco

    def derived(self, name: str, pointwise: bool = False):
        return self._table(DERIVED, name, "derived", pointwise)

    def jac_t(self, input: str, pointwise: bool = False, matmul: Optional[str] = None, fresh: bool = False,
              view: bool = False):
        return self._table(JAC_T, input, "jac_t", pointwise, matmul, fresh, view)

    def diag(self, input: str, pointwise: bool = False, matmul: Optional[str] = None, fresh: bool = False,
             view: bool = False):
        return self._table(DIAG, input, "diag", pointwise, matmul, fresh, view)

    def residual(self, input: str, pointwise: bool = False):
        return self._table(RESIDUAL, input, "residual", pointwise)

    def grad(self, param: str):
        return self._table(GRAD, param, "grad")

    def diag_sqrt(self, param: str):
        return self._table(DIAG_SQRT, param, "diag_sqrt")

    def diag_diag(self, param: str):
        return self._table(DIAG_DIAG, param, "diag_diag")

    def per_sample(self, param: str):
        return self._table(PER_SAMPLE, param, "per_sample")

    # ---- loss rules: (f, y, **ctx) -------------------------------------------------------------
    def loss_grad(self):
        """``g = dL/df``, shaped like ``f``."""
        return self._table(LOSS_GRAD, "f", "grad")

    def loss_sqrt_hessian(self):
        """``(S, sign)`` with ``sum_k sign[k] S[k] S[k]^T`` the per-sample Hessian ``d2L/df2``;
        ``S`` is ``[K, N, *f]``, ``sign`` is ``[K, N]`` or ``None`` where the Hessian is PSD."""
        return self._table(LOSS_SQRT_HESSIAN, "f", "sqrt_hessian")

    def loss_sqrt_hessian_mc(self):
        """``S [mc_samples, N, *f]`` with ``E[S S^T]`` the per-sample Hessian (sampled targets)."""
        return self._table(LOSS_SQRT_HESSIAN_MC, "f", "sqrt_hessian_mc")

    def loss_hessian_diag(self):
        """The exact diagonal of the per-sample Hessian, ``[N, *f]`` (HesScale App. A)."""
        return self._table(LOSS_HESSIAN_DIAG, "f", "hessian_diag")


def define_op(name: str, family: str, forward: Callable, inputs, params=(), **kw) -> OpDef:
    if name in OPS:
        raise ValueError(f"op {name!r} is defined twice")
    forward.rule_label = name
    op = OpDef(name, family, forward, tuple(inputs), tuple(params), **kw)
    OPS[name] = op
    return op


def rule_inputs(fn: Callable, n_messages: int) -> list[str]:
    """Names of the context arguments a rule takes after its ``n_messages`` message arguments."""
    params = list(inspect.signature(fn).parameters.values())[n_messages:]
    return [p.name for p in params]


def rule_defaults(fn: Callable) -> dict[str, Any]:
    return {
        p.name: p.default
        for p in inspect.signature(fn).parameters.values()
        if p.default is not inspect.Parameter.empty
    }


def source_name(fn: Any) -> str:
    """How users spell a function: ``F.linear``, ``torch.tanh``, ``operator.add``."""
    import operator

    import torch.nn.functional as F

    name = getattr(fn, "__name__", str(fn))
    for prefix, namespace in (("F.", F), ("torch.", torch), ("operator.", operator)):
        if getattr(namespace, name, None) is fn:
            return prefix + name
    return name


def supported_sources() -> str:
    """A human-readable list of the vocabulary, for error messages."""
    by_op: dict[str, list[str]] = {}
    for t, (op, _) in MODULE_SOURCES.items():
        by_op.setdefault(op.name, []).append(f"nn.{t.__name__}")
    for f, (op, _) in FUNCTION_SOURCES.items():
        by_op.setdefault(op.name, []).append(source_name(f))
    for m, (op, _) in METHOD_SOURCES.items():
        by_op.setdefault(op.name, []).append(f"Tensor.{m}")
    lines = [f"{name}: {', '.join(sorted(set(srcs)))}" for name, srcs in sorted(by_op.items())]
    return "\n  ".join(lines)
