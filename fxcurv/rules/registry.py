"""The rule tables of fxcurv's canonical ops.

An *op* is one word of the canonical vocabulary (``linear``, ``conv2d``, ``tanh``, ...). Each family
file in this package defines its ops with :func:`define_op` and registers, in tables keyed by
``(op, input)`` as JAX does for its differentiation rules:

* **sources** -- which torch modules, functions and tensor methods canonicalize to the op;
* **message rules** -- how a backward message passes through the op to one of its tensor inputs:
  ``jac_t`` (transposed Jacobian, for gradients ``g [N, ...]`` and square-root factors
  ``S [K, N, ...]`` alike), ``diag`` (the HesScale/BL89 diagonal backpropagation, HesScale eq. 4 and 8)
  and ``residual`` (the op's own second-order term ``f''(x) * g`` of HBP eq. S.9);
* **parameter rules** -- what the op contributes to a parameter input: ``grad``, ``diag_sqrt``
  (``sum_{k,n} sign (J^T S)^2``, the GGN/Hessian diagonal from square-root factors), ``diag_diag``
  (HesScale eq. 5 and 9), ``per_sample`` (the per-sample transposed Jacobian ``[*lead, N, *param]``,
  needed where a parameter is used more than once), and the per-sample reductions ``batch_l2``
  (``|J_n^T g_n|^2``, ``[N]``) and ``batch_diag_sqrt`` (``sum_k sign (J_n^T S_kn)^2``, ``[N, *param]``)
  that need no ``[N, *param]`` per-sample Jacobian product where the op has a shortcut, and ``gram``
  (the Gram matrix of the per-sample factors ``J_n^T S_kn`` over the parameter, ViViT eq. S.23 / C.1).

A rule is a small pure function on tensors, held with its metadata in a :class:`Rule`. Its first
positional arguments are the messages (plus ``sign`` for ``diag_sqrt``); every other argument is
looked up *by name* (:func:`bind`) when the compiler binds the rule to an op node: the op's inputs
(``x``, ``weight``, ``bias``), its attributes (``stride``, ...), its output ``out``, tensors its forward
saved (``indices``), and *derived* quantities the op declares (``d1 = f'(x)``, ``x_sq = x**2``). A
derived quantity becomes a graph node of its own, so that the gradient and every square-root factor
passing through an activation share one ``f'(x)``.

A rule also declares what the fusion pass may do with its node (:class:`Fusion`): fusion reads these
declarations, never function names. Every other function the compiler puts into a program (message
sums, column picks, fused kernels) declares the same through :func:`declare_target`.

Adding an op means adding one family file that calls :func:`define_op`; nothing else changes. Every
table refuses a second registration under the same key.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional, TypeVar

import torch

from ..data import LossScale
from ..operators.kronecker import KroneckerLayout
from ..targets import Fusion, LabeledTarget, declare_target

Fn = TypeVar("Fn", bound=Callable[..., Any])


class RuleKind(Enum):
    """The kinds of rules; ``label`` is how the program listing names them (``linear.jac_t[x]``)."""

    JAC_T = "jac_t"
    DIAG = "diag"
    RESIDUAL = "residual"
    GRAD = "grad"
    DIAG_SQRT = "diag_sqrt"
    DIAG_DIAG = "diag_diag"
    PER_SAMPLE = "per_sample"
    BATCH_L2 = "batch_l2"
    BATCH_DIAG_SQRT = "batch_diag_sqrt"
    DENSE = "dense"
    KRON_OUT = "kron_out"
    KRON_DENSE = "kron_dense"
    KRON_IN = "kron_in"
    GRAM = "gram"
    RESIDUAL_SQRT = "residual_sqrt"
    PARAM_RESIDUAL = "param_residual"
    DERIVED = "derived"
    LOSS_GRAD = "loss_grad"
    LOSS_SQRT_HESSIAN = "loss_sqrt_hessian"
    LOSS_SQRT_HESSIAN_MC = "loss_sqrt_hessian_mc"
    LOSS_HESSIAN_DIAG = "loss_hessian_diag"

    @property
    def label(self) -> str:
        return self.value.removeprefix("loss_") if self.value.startswith("loss_") else self.value


@dataclass(frozen=True)
class Rule:
    """One rule: the function, the op and input it belongs to, and its fusion declaration."""

    fn: Callable[..., Any]
    op: str
    kind: RuleKind
    key: str
    fusion: Fusion = Fusion()
    label: str = ""

    def context_names(self, n_messages: int) -> list[str]:
        """Names of the context arguments after the ``n_messages`` message arguments."""
        return list(signature(self.fn).parameters)[n_messages:]


@functools.cache
def signature(fn: Callable[..., Any]) -> inspect.Signature:
    """``inspect.signature(fn)``, read once per rule function: binding rules by name at every call (the
    loss rules in every product of :mod:`fxcurv.linops`) would otherwise spend more time in ``inspect``
    than in the rules' arithmetic on small tensors."""
    return inspect.signature(fn)


# ---- tables ----------------------------------------------------------------------------------------

RuleTable = dict[tuple[str, str], Rule]
TABLES: dict[RuleKind, RuleTable] = {kind: {} for kind in RuleKind}
# Message rules.
JAC_T = TABLES[RuleKind.JAC_T]
DIAG = TABLES[RuleKind.DIAG]
RESIDUAL = TABLES[RuleKind.RESIDUAL]
# Parameter rules.
GRAD = TABLES[RuleKind.GRAD]
DIAG_SQRT = TABLES[RuleKind.DIAG_SQRT]
DIAG_DIAG = TABLES[RuleKind.DIAG_DIAG]
PER_SAMPLE = TABLES[RuleKind.PER_SAMPLE]
# Per-sample reductions (BackPACK's first-order and per-sample quantities).
BATCH_L2 = TABLES[RuleKind.BATCH_L2]
BATCH_DIAG_SQRT = TABLES[RuleKind.BATCH_DIAG_SQRT]
# The batch-averaged family (KFRA, HBP blocks) and Kronecker factors.
DENSE = TABLES[RuleKind.DENSE]
KRON_OUT = TABLES[RuleKind.KRON_OUT]
KRON_DENSE = TABLES[RuleKind.KRON_DENSE]
KRON_IN = TABLES[RuleKind.KRON_IN]
# The Gram matrix of a parameter's per-sample factors (ViViT).
GRAM = TABLES[RuleKind.GRAM]
# Ops whose second derivative w.r.t. their data inputs is not a diagonal (the generic rule): a signed
# square-root factor of it, joint over the data inputs, and a parameter's own second derivative.
RESIDUAL_SQRT = TABLES[RuleKind.RESIDUAL_SQRT]
PARAM_RESIDUAL = TABLES[RuleKind.PARAM_RESIDUAL]
# Forward-side quantities shared by several rules of one op node.
DERIVED = TABLES[RuleKind.DERIVED]
# Loss rules, keyed by (loss op, "f"): the first and second derivatives w.r.t. the model output f.
LOSS_GRAD = TABLES[RuleKind.LOSS_GRAD]
LOSS_SQRT_HESSIAN = TABLES[RuleKind.LOSS_SQRT_HESSIAN]
LOSS_SQRT_HESSIAN_MC = TABLES[RuleKind.LOSS_SQRT_HESSIAN_MC]
LOSS_HESSIAN_DIAG = TABLES[RuleKind.LOSS_HESSIAN_DIAG]

OPS: dict[str, OpDef] = {}
# Canonicalization tables: torch source -> (op, canonicalizer).
Canonicalizer = Callable[..., Optional["Match"]]
MODULE_SOURCES: dict[type, tuple[OpDef, Canonicalizer]] = {}
FUNCTION_SOURCES: dict[Any, tuple[OpDef, Canonicalizer]] = {}
METHOD_SOURCES: dict[str, tuple[OpDef, Canonicalizer]] = {}
# Calls returning several tensors whose outputs, picked one at a time (``q, k, v = h.chunk(3, -1)``), are
# each one op node: torch source -> (op, canonicalizer ``canon(node, args, pick) -> Match | None``).
OUTPUT_FUNCTION_SOURCES: dict[Any, tuple[OpDef, Canonicalizer]] = {}
OUTPUT_METHOD_SOURCES: dict[str, tuple[OpDef, Canonicalizer]] = {}


def _register(table: dict, key: Any, value: Any, what: str) -> None:
    if key in table:
        raise ValueError(f"{what} is registered twice: {key!r}")
    table[key] = value


def rule_of(target: Any) -> Rule | None:
    """The rule whose function ``target`` is, if any."""
    return _RULE_OF.get(target) if callable(target) and not isinstance(target, LabeledTarget) else None


_RULE_OF: dict[Callable[..., Any], Rule] = {}


# ---- binding ---------------------------------------------------------------------------------------

class Unresolved(KeyError):
    """A rule argument that is neither an input, attribute, output, saved nor derived value."""


def bind(rule: Rule, resolve: Callable[[str], Any], n_messages: int) -> dict[str, Any]:
    """Keyword arguments of ``rule`` after its ``n_messages`` messages, each looked up by name with
    ``resolve`` (which raises :class:`Unresolved` for names it does not know); an unknown name takes
    the function's default or is an error. The compiler and the tests bind rules through this."""
    params = signature(rule.fn).parameters
    kwargs: dict[str, Any] = {}
    for name in rule.context_names(n_messages):
        try:
            kwargs[name] = resolve(name)
        except Unresolved:
            if params[name].default is inspect.Parameter.empty:
                raise Unresolved(
                    f"rule {rule.label} needs '{name}', which is neither an input, attribute, output, "
                    "saved nor derived value of the op") from None
    return kwargs


def example(value: Any) -> torch.Tensor | None:
    """The example value shape propagation recorded on a traced node (torch.fx's ``"val"``), or the
    tensor itself; ``None`` where unknown. Canonicalizers read shapes through this."""
    if isinstance(value, torch.Tensor):
        return value
    val = getattr(value, "meta", {}).get("val")
    return val if isinstance(val, torch.Tensor) else None


# ---- ops ---------------------------------------------------------------------------------------------

@dataclass
class Match:
    """What a canonicalizer returns: the op's tensor inputs (fx nodes, parameters, ``None``) and its
    attributes (plain Python values). ``op``, where given, is the op the call canonicalizes to when
    that is not the op the canonicalizer is registered for: one torch function may mean several ops
    (``operator.add`` of two branches is ``add``, of a tensor and a number ``scalar_affine``), and
    each function has one canonicalizer (:func:`matched_op`)."""

    inputs: dict[str, Any]
    attrs: dict[str, Any] = field(default_factory=dict)
    op: OpDef | None = None


def matched_op(registered: OpDef, match: Match) -> OpDef:
    """The op a canonicalizer's ``match`` stands for: its own ``op`` if it names one, else the op the
    canonicalizer is registered for."""
    return registered if match.op is None else match.op


class Args:
    """Positional-or-keyword access to a traced call's arguments, ``a(0, "input")``."""

    _MISSING = object()

    def __init__(self, args: Any, kwargs: Any):
        self.args, self.kwargs = tuple(args), dict(kwargs)

    def __call__(self, index: int | None, name: str, default: Any = _MISSING) -> Any:
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
    forward: Callable[..., Any]
    inputs: tuple[str, ...]
    # Inputs that may be parameters (a weight, a bias); a parameter anywhere else is used as data.
    params: tuple[str, ...] = ()
    # Inputs that are constants of the op, shared by all samples and never differentiated (batch
    # norm's running statistics): module buffers or frozen tensors, never computed from the input or
    # from a trainable parameter (refused at canonicalization), so they carry no messages.
    constants: tuple[str, ...] = ()
    # Integer index inputs (an embedding's token ids): batched data without a derivative, so they
    # carry no messages; computing them from a trainable parameter is refused.
    indices: tuple[str, ...] = ()
    forward_saving: Callable[..., Any] | None = None
    saved: tuple[str, ...] = ()
    # (data input, parameter input) pairs in which the op is bilinear: the mixed second derivative
    # couples them, which matters for the exact Hessian of a weight used more than once.
    bilinear: tuple[tuple[str, str], ...] = ()
    # (data input, parameter input) pairs with a nonzero mixed second derivative d2z / (dx dp) that is not
    # bilinear (a normalization's ``w o y(x)``): the op has no rule for it, so a parameter that also computes
    # that data input is refused where the Hessian's mixed terms are needed.
    mixed_without_rule: tuple[tuple[str, str], ...] = ()
    # Ops that are the identity (nn.Identity, dropout in eval mode) are folded away.
    alias: bool = False
    # Losses end the graph: inputs ("f", "y"), rules in the LOSS_* tables.
    is_loss: bool = False
    # A loss whose per-sample Hessian w.r.t. f is positive semi-definite has unsigned factors.
    psd_hessian: bool = True
    # check(shape, dtype, y, **attrs) raises InputError for targets the loss cannot take, given the
    # model output's shape and dtype; cheap enough to run at every call (it checks y's values).
    check: Callable[..., None] | None = None
    # The number of columns of the loss's square-root factor for a model output of this shape
    # (default: one per output entry of a sample).
    sqrt_columns: Callable[[tuple[int, ...]], int] | None = None
    # scale(shape, y, **attrs) -> LossScale: how a batch's loss enters a data set's loss (its
    # reduction and, for "mean", what it averages over; see fxcurv.data).
    scale: Callable[..., LossScale] | None = None
    # A variadic op (the generic rule) takes any number of tensor inputs, each of which may be data,
    # a parameter or a constant; which one is known per node, not per op.
    variadic: bool = False
    # An op with a fixed list of input slots of which a node uses the first few (``cat``): its nodes leave out
    # the absent inputs after the last present one, so that programs list only what the call joins.
    drops_absent_tail: bool = False
    # applies(node, kind, key) -> whether the op's registered ``kind`` rule for ``key`` applies at this
    # node (a generic node linear in its inputs has no residual); ``None``: every registered rule does.
    applies: Callable[[Any, RuleKind, str], bool] | None = None
    # Parameter inputs whose Kronecker factors (KRON_* rules) split an arrangement other than
    # ``param.reshape(param.shape[0], -1)``: a transposed convolution's weight ``[C_in, C_out/G, *k]``
    # (factors of ``weight.transpose(0, 1)``, BackPACK's convention). Others: KroneckerLayout.ROWS.
    kron_layouts: tuple[tuple[str, KroneckerLayout], ...] = ()

    def kron_layout(self, param: str) -> KroneckerLayout:
        """Which arrangement of parameter input ``param`` its Kronecker factors split."""
        return dict(self.kron_layouts).get(param, KroneckerLayout.ROWS)

    def is_batched(self, name: str) -> bool:
        """Whether input ``name`` carries the batch as its dimension 0 (data inputs, index inputs), not
        one value shared by the samples (parameters, constants)."""
        return name not in self.params and name not in self.constants

    # ---- sources -------------------------------------------------------------------------------
    def module(self, *types: type) -> Callable[[Fn], Fn]:
        """Register ``canon(node, module) -> Match`` for ``call_module`` nodes of ``types``."""

        def deco(fn: Fn) -> Fn:
            for t in types:
                _register(MODULE_SOURCES, t, (self, fn), "module source")
            return fn

        return deco

    def function(self, *fns: Any) -> Callable[[Fn], Fn]:
        """Register ``canon(node, args: Args) -> Match`` for ``call_function`` nodes."""

        def deco(fn: Fn) -> Fn:
            for f in fns:
                _register(FUNCTION_SOURCES, f, (self, fn), "function source")
            return fn

        return deco

    def method(self, *names: str) -> Callable[[Fn], Fn]:
        """Register ``canon(node, args: Args) -> Match`` for ``call_method`` nodes; ``args(0)``
        is the tensor the method is called on."""

        def deco(fn: Fn) -> Fn:
            for n in names:
                _register(METHOD_SOURCES, n, (self, fn), "method source")
            return fn

        return deco

    def output_function(self, *fns: Any) -> Callable[[Fn], Fn]:
        """Register ``canon(node, args: Args, pick: int) -> Match`` for output ``pick`` of ``call_function``
        nodes returning several tensors (``torch.split``): each output its users pick is one op node."""

        def deco(fn: Fn) -> Fn:
            for f in fns:
                _register(OUTPUT_FUNCTION_SOURCES, f, (self, fn), "output function source")
            return fn

        return deco

    def output_method(self, *names: str) -> Callable[[Fn], Fn]:
        """Register ``canon(node, args: Args, pick: int) -> Match`` for output ``pick`` of ``call_method``
        nodes returning several tensors (``h.chunk(3, -1)``); ``args(0)`` is the tensor."""

        def deco(fn: Fn) -> Fn:
            for n in names:
                _register(OUTPUT_METHOD_SOURCES, n, (self, fn), "output method source")
            return fn

        return deco

    # ---- rules ---------------------------------------------------------------------------------
    def rule(self, kind: RuleKind, key: str, label: str | None = None, *also: str,
             **fusion: Any) -> Callable[[Fn], Fn]:
        """Register ``fn`` as the ``kind`` rule of this op for input/parameter/derived name ``key`` (and
        the names ``also``: one function for several inputs computes one value, which the program
        then shares between them)."""

        def deco(fn: Fn) -> Fn:
            keys = (key,) + also
            rule = Rule(fn, self.name, kind, key, Fusion(**fusion),
                        label or f"{self.name}.{kind.label}[{','.join(keys)}]")
            for k in keys:
                _register(TABLES[kind], (self.name, k), rule, f"{kind.value} rule")
            _register(_RULE_OF, fn, rule, "rule function")
            declare_target(fn, rule.label, rule.fusion)
            return fn

        return deco

    def derived(self, name: str, label: str | None = None, **fusion: Any) -> Callable[[Fn], Fn]:
        return self.rule(RuleKind.DERIVED, name, label, **fusion)

    def jac_t(self, input: str, **fusion: Any) -> Callable[[Fn], Fn]:
        return self.rule(RuleKind.JAC_T, input, **fusion)

    def diag(self, input: str, **fusion: Any) -> Callable[[Fn], Fn]:
        return self.rule(RuleKind.DIAG, input, **fusion)

    def residual(self, input: str, **fusion: Any) -> Callable[[Fn], Fn]:
        return self.rule(RuleKind.RESIDUAL, input, **fusion)

    def grad(self, param: str, **fusion: Any) -> Callable[[Fn], Fn]:
        return self.rule(RuleKind.GRAD, param, **fusion)

    def diag_sqrt(self, param: str, **fusion: Any) -> Callable[[Fn], Fn]:
        return self.rule(RuleKind.DIAG_SQRT, param, **fusion)

    def diag_diag(self, param: str, **fusion: Any) -> Callable[[Fn], Fn]:
        return self.rule(RuleKind.DIAG_DIAG, param, **fusion)

    def per_sample(self, param: str, **fusion: Any) -> Callable[[Fn], Fn]:
        return self.rule(RuleKind.PER_SAMPLE, param, **fusion)

    def batch_l2(self, param: str, **fusion: Any) -> Callable[[Fn], Fn]:
        """``|J_n^T g_n|^2`` per sample, ``[N]``, from the gradient ``g [N, *out]`` at the op's output: the
        squared norm of each sample's share of the gradient (BackPACK's BatchL2Grad)."""
        return self.rule(RuleKind.BATCH_L2, param, **fusion)

    def batch_diag_sqrt(self, param: str, **fusion: Any) -> Callable[[Fn], Fn]:
        """``sum_k sign_kn (J_n^T S_kn)^2`` per sample, ``[N, *param]``: ``diag_sqrt`` before the sum over
        samples (the per-sample curvature diagonal, BackPACK's BatchDiagGGN)."""
        return self.rule(RuleKind.BATCH_DIAG_SQRT, param, **fusion)

    def dense(self, input: str, **fusion: Any) -> Callable[[Fn], Fn]:
        """``E_n[J_n^T M J_n]``: a batch-averaged matrix ``M [D_out, D_out]`` passed to ``input``
        (``[D_in, D_in]``), the expectation approximation of KFRA / HBP (Botev eq. 29, HBP Sec. 3.2)."""
        return self.rule(RuleKind.DENSE, input, **fusion)

    def kron_out(self, param: str, *also: str, **fusion: Any) -> Callable[[Fn], Fn]:
        """The output-side Kronecker factor of ``param`` (and ``also``) from factor columns at the op's
        output, ``sum_{k,n} sign S S^T`` (summed over positions for a convolution): KFLR, KFAC."""
        return self.rule(RuleKind.KRON_OUT, param, None, *also, **fusion)

    def kron_dense(self, param: str, *also: str, **fusion: Any) -> Callable[[Fn], Fn]:
        """The output-side Kronecker factor of ``param`` (and ``also``) from the batch-averaged matrix
        at the op's output: KFRA, HBP blocks."""
        return self.rule(RuleKind.KRON_DENSE, param, None, *also, **fusion)

    def kron_in(self, param: str, **fusion: Any) -> Callable[[Fn], Fn]:
        """The input-side Kronecker factor of ``param``, from the op's input (``x^T x / N``)."""
        return self.rule(RuleKind.KRON_IN, param, **fusion)

    def gram(self, param: str, *also: str, **fusion: Any) -> Callable[[Fn], Fn]:
        """``fn(S, ..., include=(param, *also), total=None)``: the Gram matrix ``[K N, K N]`` of the
        per-sample factors ``a_kn = J_n^T S_kn`` of the parameters ``include`` (rows and columns
        ``k``-major, like ``S.flatten(0, 1)``), summed over them -- their share of the GGN's Gram matrix
        ``V^T V`` (ViViT eq. S.23) -- added in place into ``total`` where given. One function serves the
        op's parameters so that their shares can share products (a linear layer's ``S S^T``). The rule
        reads samples only through the op's data inputs, so that the caller may pass the columns and
        data inputs of a subset of the batch."""
        return self.rule(RuleKind.GRAM, param, None, *also, **fusion)

    # ---- loss rules: (**ctx) with f, y and derived values by name ------------------------------
    def loss_grad(self) -> Callable[[Fn], Fn]:
        """``g = dL/df``, shaped like ``f``."""
        return self.rule(RuleKind.LOSS_GRAD, "f")

    def loss_sqrt_hessian(self) -> Callable[[Fn], Fn]:
        """``(S, sign)`` with ``sum_k sign[k] S[k] S[k]^T`` the per-sample Hessian ``d2L/df2``;
        ``S`` is ``[K, N, *f]``, ``sign`` is ``[K, N]`` or ``None`` where the Hessian is PSD."""
        return self.rule(RuleKind.LOSS_SQRT_HESSIAN, "f")

    def loss_sqrt_hessian_mc(self) -> Callable[[Fn], Fn]:
        """``S [mc_samples, N, *f]`` with ``E[S S^T]`` the per-sample Hessian (sampled targets)."""
        return self.rule(RuleKind.LOSS_SQRT_HESSIAN_MC, "f", impure=True)

    def residual_sqrt(self, *keys: str, **fusion: Any) -> Callable[[Fn], Fn]:
        """``fn(g, ...) -> (parts, sign)``: a signed square-root factor of the op's own second-order term
        ``R_n = d2(g_n . z_n)/dx_n^2`` joint over its data inputs (HBP eq. S.6, second term, for an op
        whose ``R`` is not a diagonal): ``parts`` holds, per input of ``op.inputs``, the columns
        ``[K, N, *x_i]`` (``None`` for inputs outside the factor), ``sign [K, N]``, so that
        ``sum_k sign_k s_k s_k^T = R_n`` with ``s_k`` the concatenation of the parts. One function serves
        all the keys (the joint factor is computed once per node)."""
        return self.rule(RuleKind.RESIDUAL_SQRT, keys[0], None, *keys[1:], **fusion)

    def param_residual(self, param: str, **fusion: Any) -> Callable[[Fn], Fn]:
        """``fn(g, ...)``: the diagonal of the op's own second derivative w.r.t. parameter ``param``,
        ``diag sum_n d2(g_n . z_n)/dp^2`` (zero for an op linear in ``param``: linear, conv)."""
        return self.rule(RuleKind.PARAM_RESIDUAL, param, **fusion)

    def loss_hessian_diag(self) -> Callable[[Fn], Fn]:
        """The exact diagonal of the per-sample Hessian, ``[N, *f]`` (HesScale App. A)."""
        return self.rule(RuleKind.LOSS_HESSIAN_DIAG, "f")


def define_op(name: str, family: str, forward: Callable[..., Any], inputs: Any, params: Any = (),
              **kw: Any) -> OpDef:
    op = OpDef(name, family, forward, tuple(inputs), tuple(params), **kw)
    _register(OPS, name, op, "op")
    declare_target(forward, name)
    if op.forward_saving is not None:
        declare_target(op.forward_saving, f"{name}+saved")
    return op


def source_name(fn: Any) -> str:
    """How users spell a function: ``F.linear``, ``torch.tanh``, ``operator.add``, ``aten.linear.default``."""
    import operator

    import torch.nn.functional as nnf

    if isinstance(fn, torch._ops.OpOverload):
        return str(fn)  # an exported op: aten.linear.default
    name = getattr(fn, "__name__", str(fn))
    for prefix, namespace in (("F.", nnf), ("torch.", torch), ("operator.", operator)):
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
    for f, (op, _) in OUTPUT_FUNCTION_SOURCES.items():
        by_op.setdefault(op.name, []).append(f"{source_name(f)}(...)[i]")
    for m, (op, _) in OUTPUT_METHOD_SOURCES.items():
        by_op.setdefault(op.name, []).append(f"Tensor.{m}(...)[i]")
    lines = [f"{name}: {', '.join(sorted(set(srcs)))}" for name, srcs in sorted(by_op.items())]
    return "\n  ".join(lines)


def lookup(op: OpDef, kind: RuleKind, key: str, node: Any = None) -> Rule | None:
    """The op's ``kind`` rule for ``key`` where it applies at ``node`` (:attr:`OpDef.applies`), else
    ``None``. Every part of the compiler that asks whether an op node has a rule asks here."""
    rule = TABLES[kind].get((op.name, key))
    if rule is not None and node is not None and op.applies is not None and not op.applies(node, kind, key):
        return None
    return rule
