"""Every rule of every (non-loss) op against its generic torch.func derivation (float64).

Each case is one op application, canonicalized the way the compiler does it (the op's module,
function or method canonicalizer from ``registry.MODULE_SOURCES`` / ``FUNCTION_SOURCES`` /
``METHOD_SOURCES``), with random inputs. Each rule registered for the op is bound with
``helpers.call_rule`` (``registry.bind``, derived values included) and compared with the generic
derivation in :mod:`generic_rules`, which reads only the op's forward: ``jac_t`` against VJPs (HBP
eq. S.6, S.8a), ``diag`` against ``(J_n o J_n)^T d`` (HesScale eq. 4, 8), ``residual`` against the
per-sample Hessian of ``g . f`` (HBP eq. S.6, S.9), the parameter rules against (per-sample) VJPs and
Jacobians (HBP eq. S.8b-c, HesScale eq. 2, 5, 7, 9), and every derived value against its meaning.

Which rules exist is stated here per op (:data:`EXPECTED`), not read from the registry: a rule or op
registered but not listed, and a listed rule no longer registered, fail
:func:`test_expected_rules_are_exactly_the_registered_ones` (a lost registration also fails its own
rule's test); a listed rule that no case exercises fails :func:`test_every_expected_rule_is_exercised`.
Loss ops (their loss tables and derived values) are covered by ``tests/rules/test_losses.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import generic_rules as ref
import pytest
import torch
import torch.nn.functional as F
from generic_rules import OpContext
from helpers import call_rule, rel_error
from torch import nn

from fxcurv import gram as gram_products
from fxcurv.errors import UnsupportedOpError
from fxcurv.rules import concat as concat_rules
from fxcurv.rules import conv as conv_rules
from fxcurv.rules import generic as generic_op
from fxcurv.rules import registry
from fxcurv.rules.registry import RuleKind

DT = torch.float64
RTOL = 1e-10
K = 3  # square-root factor columns

JAC_T, DIAG, RESIDUAL, GRAD = RuleKind.JAC_T, RuleKind.DIAG, RuleKind.RESIDUAL, RuleKind.GRAD
DIAG_SQRT, DIAG_DIAG, PER_SAMPLE, DERIVED = (RuleKind.DIAG_SQRT, RuleKind.DIAG_DIAG, RuleKind.PER_SAMPLE,
                                             RuleKind.DERIVED)
DENSE, KRON_OUT, KRON_DENSE, KRON_IN = RuleKind.DENSE, RuleKind.KRON_OUT, RuleKind.KRON_DENSE, RuleKind.KRON_IN
BATCH_L2, BATCH_DIAG_SQRT, GRAM = RuleKind.BATCH_L2, RuleKind.BATCH_DIAG_SQRT, RuleKind.GRAM
RESIDUAL_SQRT, PARAM_RESIDUAL = RuleKind.RESIDUAL_SQRT, RuleKind.PARAM_RESIDUAL

# ---- the rules each op must have ------------------------------------------------------------------

_PARAMETRIC = {JAC_T: ("x",), DIAG: ("x",), GRAD: ("weight", "bias"), DIAG_SQRT: ("weight", "bias"),
               DIAG_DIAG: ("weight", "bias"), PER_SAMPLE: ("weight", "bias"), KRON_OUT: ("weight", "bias"),
               KRON_DENSE: ("weight", "bias"), KRON_IN: ("weight",), BATCH_L2: ("weight", "bias"),
               BATCH_DIAG_SQRT: ("weight", "bias"), GRAM: ("weight", "bias")}
_SMOOTH = {JAC_T: ("x",), DIAG: ("x",), RESIDUAL: ("x",), DENSE: ("x",), DERIVED: ("d1", "d2")}
_PIECEWISE_LINEAR = {JAC_T: ("x",), DIAG: ("x",), DENSE: ("x",), DERIVED: ("d1",)}
_LINEAR_MAP = {JAC_T: ("x",), DIAG: ("x",)}
_CONV = {**_PARAMETRIC, DERIVED: ("weight_sq", "x_sq", "x_cols")}
# Transposed convolutions: Kronecker factors of weight.transpose(0, 1) (their output channel is the weight's
# second axis), over the input unfolded by the transposed convolution (x_cols).
_CONV_TRANSPOSE = _CONV

EXPECTED: dict[str, dict[RuleKind, tuple[str, ...]]] = {
    "linear": {**_PARAMETRIC, DENSE: ("x",), DERIVED: ("x_sq", "weight_sq")},
    "conv1d": _CONV,
    "conv2d": _CONV,
    "conv3d": _CONV,
    "conv_transpose1d": _CONV_TRANSPOSE,
    "conv_transpose2d": _CONV_TRANSPOSE,
    "conv_transpose3d": _CONV_TRANSPOSE,
    "relu": _PIECEWISE_LINEAR,
    "leaky_relu": _PIECEWISE_LINEAR,
    "sigmoid": _SMOOTH,
    "tanh": _SMOOTH,
    "elu": _SMOOTH,
    "softplus": _SMOOTH,
    "silu": _SMOOTH,
    "gelu": _SMOOTH,
    "selu": _SMOOTH,
    "celu": _SMOOTH,
    "logsigmoid": _SMOOTH,
    "mish": _SMOOTH,
    "softsign": _SMOOTH,
    "hardswish": _SMOOTH,
    "hardtanh": _PIECEWISE_LINEAR,
    "hardsigmoid": _PIECEWISE_LINEAR,
    "pow": _SMOOTH,
    "scalar_affine": {**_LINEAR_MAP, DENSE: ("x",)},
    "reshape": {**_LINEAR_MAP, DENSE: ("x",)},
    **{f"max_pool{nd}d": _LINEAR_MAP for nd in (1, 2, 3)},
    **{f"avg_pool{nd}d": {**_LINEAR_MAP, DERIVED: ("inv_divisor",)} for nd in (1, 2, 3)},
    **{f"adaptive_avg_pool{nd}d": _LINEAR_MAP for nd in (1, 2, 3)},
    **{f"adaptive_max_pool{nd}d": _LINEAR_MAP for nd in (1, 2, 3)},
    # linear in x, w and b (running statistics are constants): no residual
    "batch_norm_eval": {**_LINEAR_MAP, **{kind: ("weight", "bias") for kind in (
        GRAD, DIAG_SQRT, DIAG_DIAG, PER_SAMPLE, BATCH_L2, BATCH_DIAG_SQRT, GRAM)}, DERIVED: ("x_hat",)},
    # per-sample normalizations: nonlinear in x (a residual coupling each group's entries: its diagonal and
    # its exact joint factor), linear in w and b
    **{name: {**{kind: ("x",) for kind in (JAC_T, DIAG, RESIDUAL, RESIDUAL_SQRT)},
              **{kind: params for kind in (GRAD, DIAG_SQRT, DIAG_DIAG, PER_SAMPLE, BATCH_L2, BATCH_DIAG_SQRT, GRAM)},
              DERIVED: ("x_hat",)}
       for name, params in (("layer_norm", ("weight", "bias")), ("rms_norm", ("weight",)),
                            ("group_norm", ("weight", "bias")))},
    # integer indices x carry no messages: parameter rules only
    "embedding": {kind: ("weight",) for kind in (GRAD, DIAG_SQRT, DIAG_DIAG, PER_SAMPLE, BATCH_L2, BATCH_DIAG_SQRT,
                                                 GRAM)},
    "pad": _LINEAR_MAP,
    "add": {JAC_T: ("a", "b"), DIAG: ("a", "b"), DENSE: ("a", "b")},
    # x + p, p a parameter broadcast over the batch (and positions): linear in both
    "add_param": {**_LINEAR_MAP, **{kind: ("p",) for kind in (GRAD, DIAG_SQRT, DIAG_DIAG, PER_SAMPLE, BATCH_L2,
                                                              BATCH_DIAG_SQRT, GRAM)}},
    "reduce_sum": _LINEAR_MAP,
    # cat([p.expand(N, ...), x]): a block of the message for x, the parameter's block per sample for p
    "cat_param": {**_LINEAR_MAP, **{kind: ("p",) for kind in (GRAD, DIAG_SQRT, DIAG_DIAG, PER_SAMPLE, BATCH_L2,
                                                              BATCH_DIAG_SQRT, GRAM)}},
    # second derivatives that couple a row's features: the diagonal for HesScale, the joint factor for the rest
    "softmax": {JAC_T: ("x",), DIAG: ("x",), RESIDUAL: ("x",), RESIDUAL_SQRT: ("x",)},
    "log_softmax": {JAC_T: ("x",), DIAG: ("x",), RESIDUAL: ("x",), RESIDUAL_SQRT: ("x",)},
    "permute": _LINEAR_MAP,
    # index maps (basic indexing, concatenation): a 0/1 selection, no second derivative
    "index": _LINEAR_MAP,
    "index_select": _LINEAR_MAP,
    "cat": {JAC_T: concat_rules.INPUTS, DIAG: concat_rules.INPUTS},
    # bilinear in two activations: a zero Hessian diagonal (no residual), a joint factor over (a, b)
    "matmul": {JAC_T: ("a", "b"), DIAG: ("a", "b"), RESIDUAL_SQRT: ("a", "b")},
    "identity": {},  # folded away at canonicalization (alias): no rules
    # The generic rule: every slot has the data and the parameter rules (which apply is per node);
    # GENERIC_CASES below exercise them, one slot per kind suffices (the rules of all slots come from
    # one factory, fxcurv.rules.generic._register_slot).
    "generic": {kind: generic_op.SLOTS for kind in (JAC_T, DIAG, RESIDUAL, GRAD, PER_SAMPLE, DIAG_SQRT,
                                                    DIAG_DIAG, BATCH_L2, BATCH_DIAG_SQRT, RESIDUAL_SQRT,
                                                    PARAM_RESIDUAL, GRAM)},
}


def _expected_triples() -> set[tuple[RuleKind, str, str]]:
    return {(kind, op, key) for op, kinds in EXPECTED.items() for kind, keys in kinds.items() for key in keys}


# ---- building a case the way the compiler canonicalizes it ------------------------------------------

class _Traced:
    """Stands for a traced fx node: the example value shape propagation records (``meta["val"]``)."""

    def __init__(self, val: Any, args: tuple = (), target: Any = None, kwargs: dict | None = None):
        self.meta = {"val": val}
        self.args, self.target, self.kwargs = args, target, dict(kwargs or {})


def _context(op: registry.OpDef, match: registry.Match, tensors: dict[int, torch.Tensor],
             expected: torch.Tensor) -> OpContext:
    def value(v: Any) -> torch.Tensor | None:
        if isinstance(v, _Traced):
            return tensors[id(v)]
        if isinstance(v, torch.Tensor):  # a module's parameter
            return v.detach()
        assert v is None, v
        return None

    assert set(match.inputs) <= set(op.inputs)
    inputs = {k: value(match.inputs.get(k)) for k in op.inputs}
    attrs = dict(match.attrs)
    args = [inputs[k] for k in op.inputs]
    out = op.forward(*args, **attrs)
    # The canonical op computes what the user's call computed.
    assert out.shape == expected.shape and rel_error(out, expected.detach()) < 1e-14
    saved = {}
    if op.forward_saving is not None:
        out_saving, *values = op.forward_saving(*args, **attrs)
        assert torch.equal(out_saving, out)
        saved = dict(zip(op.saved, values))
    return OpContext(op, inputs, attrs, out, saved)


def module_call(mod: nn.Module, *xs: torch.Tensor) -> OpContext:
    """``mod(*xs)`` through the module canonicalizer (``registry.MODULE_SOURCES``)."""
    op, canon = registry.MODULE_SOURCES[type(mod)]
    nodes = tuple(_Traced(x) for x in xs)
    expected = mod(*xs)
    match = canon(_Traced(expected, nodes), mod)
    return _context(registry.matched_op(op, match), match, {id(n): x for n, x in zip(nodes, xs)}, expected)


def module_call_output_size(mod: nn.Module, x: torch.Tensor, output_size: list[int]) -> OpContext:
    """``mod(x, output_size=output_size)`` (a transposed convolution) through the module canonicalizer."""
    op, canon = registry.MODULE_SOURCES[type(mod)]
    node = _Traced(x)
    expected = mod(x, output_size=output_size)
    match = canon(_Traced(expected, (node,), kwargs={"output_size": output_size}), mod)
    return _context(op, match, {id(node): x}, expected)


def _trace_args(args: tuple, kwargs: dict) -> tuple[tuple, dict, dict[int, torch.Tensor]]:
    tensors: dict[int, torch.Tensor] = {}

    def standin(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter):
            node = _Traced(v)
            tensors[id(node)] = v
            return node
        if isinstance(v, (tuple, list)):  # torch.cat's sequence of tensors
            return type(v)(map(standin, v))
        return v

    return tuple(map(standin, args)), {k: standin(v) for k, v in kwargs.items()}, tensors


def function_call(fn: Callable, *args: Any, **kwargs: Any) -> OpContext:
    """``fn(*args, **kwargs)`` through the function canonicalizer (``registry.FUNCTION_SOURCES``);
    tensors stand for traced values, ``nn.Parameter`` arguments for parameters."""
    op, canon = registry.FUNCTION_SOURCES[fn]
    expected = fn(*args, **kwargs)
    targs, tkwargs, tensors = _trace_args(args, kwargs)
    match = canon(_Traced(expected, targs, fn), registry.Args(targs, tkwargs))
    return _context(registry.matched_op(op, match), match, tensors, expected)


def method_call(name: str, self_: torch.Tensor, *args: Any, **kwargs: Any) -> OpContext:
    """``self_.name(*args, **kwargs)`` through the method canonicalizer (``registry.METHOD_SOURCES``)."""
    op, canon = registry.METHOD_SOURCES[name]
    expected = getattr(self_, name)(*args, **kwargs)
    targs, tkwargs, tensors = _trace_args((self_,) + args, kwargs)
    match = canon(_Traced(expected, targs, name), registry.Args(targs, tkwargs))
    return _context(registry.matched_op(op, match), match, tensors, expected)


def pick_call(fn: Any, pick: int, *args: Any, **kwargs: Any) -> OpContext:
    """Output ``pick`` of the multi-output call ``fn(*args, **kwargs)`` (a function, or a method name with
    the tensor first) through its output canonicalizer (``registry.OUTPUT_*_SOURCES``)."""
    method = isinstance(fn, str)
    op, canon = (registry.OUTPUT_METHOD_SOURCES if method else registry.OUTPUT_FUNCTION_SOURCES)[fn]
    expected = getattr(args[0], fn)(*args[1:], **kwargs) if method else fn(*args, **kwargs)
    targs, tkwargs, tensors = _trace_args(args, kwargs)
    match = canon(_Traced(tuple(expected), targs, fn), registry.Args(targs, tkwargs), pick)
    return _context(registry.matched_op(op, match), match, tensors, expected[pick])


def learned_tokens_call(p: nn.Parameter, x: torch.Tensor, dim: int, p_first: bool) -> OpContext:
    """``torch.cat([p.expand(N, ...), x], dim)`` (or ``[x, p.expand(...)]``) through the cat canonicalizer,
    the expansion a traced ``Tensor.expand`` of the parameter."""
    tokens = _Traced(p.expand((x.shape[0],) + tuple(p.shape[1:])), (p,), "expand")
    tokens.op = "call_method"  # type: ignore[attr-defined]
    node = _Traced(x)
    parts = [tokens, node] if p_first else [node, tokens]
    expected = torch.cat([tokens.meta["val"], x] if p_first else [x, tokens.meta["val"]], dim)
    op, canon = registry.FUNCTION_SOURCES[torch.cat]
    match = canon(_Traced(expected, (parts, dim), torch.cat), registry.Args((parts, dim), {}))
    return _context(registry.matched_op(op, match), match, {id(node): x}, expected)


def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, dtype=DT)


def param(*shape: int) -> nn.Parameter:
    return nn.Parameter(randn(*shape))


# ---- cases ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One op application. ``without``: inputs absent here (no bias); ``patches``: module attributes
    set while its rules run (to reach a code path small inputs do not take); ``only``: the rule kinds
    that path concerns (every kind where empty)."""

    id: str
    op: str
    build: Callable[[], OpContext]
    without: tuple[str, ...] = ()
    patches: tuple[tuple[Any, str, Any], ...] = ()
    only: tuple[RuleKind, ...] = ()  # check only these kinds (a case for one code path)


def _softplus_both_sides(beta: float, threshold: float, x: torch.Tensor) -> torch.Tensor:
    above = beta * x > threshold
    assert above.any() and (~above).any(), "softplus case must have inputs on both sides of the threshold"
    return x


def _with(x: torch.Tensor, index: tuple, value: float) -> torch.Tensor:
    x = x.clone()
    x[index] = value
    return x


def _batch_norm(cls: type, channels: int, affine: bool = True) -> nn.Module:
    """A batch norm in evaluation mode with random running statistics (and affine parameters)."""
    bn = cls(channels, affine=affine).to(DT).eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    if affine:
        bn.weight.data.normal_()
        bn.bias.data.normal_()
    return bn


def _affine(norm: nn.Module) -> nn.Module:
    """A LayerNorm / RMSNorm / GroupNorm in float64 with random affine parameters (where it has them)."""
    norm = norm.to(DT)
    with torch.no_grad():
        for p in norm.parameters():
            p.normal_()
    return norm


def _tokens(vocab: int, *shape: int) -> torch.Tensor:
    """Random indices ``[N, *positions]`` below ``vocab``; sample 0 reads row 0 at two positions (and the
    padding row of the cases with ``padding_idx``) where it has two."""
    x = torch.randint(0, vocab, shape)
    if x[0].numel() > 1:
        x.view(shape[0], -1)[0, :2] = 0
    return x


_GRAM_BLOCKS = ((gram_products, "GRAM_BLOCK_ELEMENTS", 1),)

CASES: list[Case] = [
    # linear: [N, in] takes the Kronecker shortcut of diag_sqrt, [N, *mid, in] the per-sample route.
    Case("linear", "linear", lambda: module_call(nn.Linear(4, 3).to(DT), randn(3, 4))),
    Case("linear_nobias", "linear", lambda: module_call(nn.Linear(4, 3, bias=False).to(DT), randn(3, 4)),
         without=("bias",)),
    Case("linear_mid_fn", "linear", lambda: function_call(F.linear, randn(3, 2, 4), param(3, 4), param(3))),
    Case("linear_mid2", "linear", lambda: module_call(nn.Linear(4, 2).to(DT), randn(2, 2, 3, 4))),
    # one position: batch_l2 takes the Gram route (the products' route on the cases above)
    Case("linear_mid1_fn", "linear", lambda: function_call(F.linear, randn(3, 1, 4), param(3, 4), param(3))),
    # conv2d
    Case("conv", "conv2d", lambda: module_call(nn.Conv2d(2, 3, 3).to(DT), randn(3, 2, 5, 4))),
    # (6 + 2 - 3) / 2 leaves a remainder: the transposed convolution needs an output padding.
    Case("conv_s2_p1", "conv2d", lambda: module_call(nn.Conv2d(2, 3, 3, stride=2, padding=1).to(DT),
                                                     randn(3, 2, 6, 5))),
    Case("conv_dil2", "conv2d", lambda: module_call(nn.Conv2d(2, 3, 3, padding=1, dilation=2).to(DT),
                                                    randn(2, 2, 5, 4))),
    Case("conv_groups2", "conv2d", lambda: module_call(nn.Conv2d(4, 4, 3, padding=1, groups=2).to(DT),
                                                       randn(3, 4, 4, 3))),
    Case("conv_rect_stride_nobias", "conv2d", lambda: module_call(
        nn.Conv2d(2, 3, (3, 2), stride=(2, 1), bias=False).to(DT), randn(3, 2, 6, 4)), without=("bias",)),
    Case("conv_out1x1", "conv2d", lambda: module_call(nn.Conv2d(2, 3, (4, 3)).to(DT), randn(3, 2, 4, 3))),
    Case("conv_same_fn", "conv2d", lambda: function_call(F.conv2d, randn(2, 2, 5, 4), param(3, 2, 3, 3), param(3),
                                                         1, "same", (2, 1), 1)),
    Case("conv_groups_fn_kw", "conv2d", lambda: function_call(F.conv2d, randn(2, 4, 5, 4), param(6, 2, 2, 3),
                                                              bias=param(6), stride=2, padding=(1, 0), groups=2)),
    # The exact weight diagonal reduces blocks of samples; a tiny bound makes every sample a block.
    Case("conv_blocked", "conv2d", lambda: module_call(nn.Conv2d(4, 4, 3, padding=1, groups=2).to(DT),
                                                       randn(3, 4, 4, 3)),
         patches=((conv_rules, "_BLOCK_ELEMENTS", 1),), only=(DIAG_SQRT, BATCH_L2, BATCH_DIAG_SQRT)),
    Case("conv_out1x1_blocked", "conv2d", lambda: module_call(nn.Conv2d(2, 3, (4, 3)).to(DT), randn(3, 2, 4, 3)),
         patches=((conv_rules, "_BLOCK_ELEMENTS", 1),), only=(BATCH_L2,)),
    # Gram matrices of per-sample factors a sample at a time.
    Case("conv_gram_blocked", "conv2d", lambda: module_call(nn.Conv2d(4, 4, 3, padding=1, groups=2).to(DT),
                                                            randn(3, 4, 4, 3)),
         patches=_GRAM_BLOCKS, only=(GRAM,)),
    Case("conv_gram_positions", "conv2d", lambda: module_call(
        nn.Conv2d(4, 4, 3, padding=1, stride=2, groups=2).to(DT), randn(3, 4, 5, 4)),
         patches=((conv_rules, "GRAM_ROUTE", "positions"),), only=(GRAM,)),
    Case("conv_gram_positions_blocked", "conv2d", lambda: module_call(nn.Conv2d(2, 3, 2).to(DT), randn(3, 2, 4, 3)),
         patches=((conv_rules, "GRAM_ROUTE", "positions"), *_GRAM_BLOCKS), only=(GRAM,)),
    Case("conv_gram_factors", "conv2d", lambda: module_call(nn.Conv2d(2, 3, (4, 3)).to(DT), randn(3, 2, 4, 3)),
         patches=((conv_rules, "GRAM_ROUTE", "factors"),), only=(GRAM,)),
    # conv1d / conv3d: the same rules over one and three spatial dims
    Case("conv1d", "conv1d", lambda: module_call(nn.Conv1d(2, 3, 3).to(DT), randn(3, 2, 7))),
    Case("conv1d_s2_p1_dil2_nobias", "conv1d", lambda: module_call(
        nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=2, bias=False).to(DT), randn(3, 2, 8)), without=("bias",)),
    Case("conv1d_groups2", "conv1d", lambda: module_call(nn.Conv1d(4, 4, 3, padding=1, groups=2).to(DT),
                                                         randn(3, 4, 5))),
    Case("conv1d_same_fn", "conv1d", lambda: function_call(F.conv1d, randn(2, 2, 6), param(3, 2, 3), param(3), 1,
                                                           "same", 2, 1)),
    Case("conv1d_out1", "conv1d", lambda: module_call(nn.Conv1d(2, 3, 5).to(DT), randn(3, 2, 5))),
    Case("conv1d_blocked", "conv1d", lambda: module_call(nn.Conv1d(4, 4, 3, padding=1, groups=2).to(DT),
                                                         randn(3, 4, 5)),
         patches=((conv_rules, "_BLOCK_ELEMENTS", 1),), only=(DIAG_SQRT, BATCH_L2, BATCH_DIAG_SQRT)),
    Case("conv1d_gram_positions", "conv1d", lambda: module_call(nn.Conv1d(4, 4, 3, stride=2, groups=2).to(DT),
                                                                randn(3, 4, 7)),
         patches=((conv_rules, "GRAM_ROUTE", "positions"), *_GRAM_BLOCKS), only=(GRAM,)),
    Case("conv1d_gram_factors", "conv1d", lambda: module_call(nn.Conv1d(2, 3, 3).to(DT), randn(3, 2, 6)),
         patches=((conv_rules, "GRAM_ROUTE", "factors"), *_GRAM_BLOCKS), only=(GRAM,)),
    Case("conv3d", "conv3d", lambda: module_call(nn.Conv3d(2, 3, 2).to(DT), randn(2, 2, 3, 4, 3))),
    Case("conv3d_s_p_groups2", "conv3d", lambda: module_call(
        nn.Conv3d(2, 4, (3, 2, 2), stride=(2, 1, 2), padding=1, groups=2).to(DT), randn(3, 2, 4, 3, 4))),
    Case("conv3d_dil_fn_nobias", "conv3d", lambda: function_call(
        F.conv3d, randn(2, 2, 4, 4, 3), param(3, 2, 2, 2, 2), None, 1, (1, 0, 1), (2, 1, 1)), without=("bias",)),
    Case("conv3d_blocked", "conv3d", lambda: module_call(nn.Conv3d(2, 3, 2, padding=1).to(DT), randn(2, 2, 2, 3, 2)),
         patches=((conv_rules, "_BLOCK_ELEMENTS", 1),), only=(DIAG_SQRT, BATCH_L2, BATCH_DIAG_SQRT)),
    Case("conv3d_gram_positions", "conv3d", lambda: module_call(nn.Conv3d(2, 3, 2).to(DT), randn(3, 2, 3, 3, 2)),
         patches=((conv_rules, "GRAM_ROUTE", "positions"),), only=(GRAM,)),
    # transposed convolutions (stride, padding, output_padding, dilation, groups)
    Case("convT1d", "conv_transpose1d", lambda: module_call(nn.ConvTranspose1d(2, 3, 3).to(DT), randn(3, 2, 5))),
    Case("convT1d_s2_p1_op1", "conv_transpose1d", lambda: module_call(
        nn.ConvTranspose1d(2, 3, 3, stride=2, padding=1, output_padding=1).to(DT), randn(3, 2, 4))),
    Case("convT1d_groups_dil_nobias", "conv_transpose1d", lambda: module_call(
        nn.ConvTranspose1d(4, 4, 3, stride=2, dilation=2, groups=2, bias=False).to(DT), randn(3, 4, 4)),
         without=("bias",)),
    # output_padding >= stride (allowed below the dilation): the adjoint's windows pass the input's end
    Case("convT1d_op_past_stride", "conv_transpose1d", lambda: module_call(
        nn.ConvTranspose1d(2, 3, 3, dilation=3, output_padding=2).to(DT), randn(3, 2, 4))),
    Case("convT1d_groups_fn", "conv_transpose1d", lambda: function_call(
        F.conv_transpose1d, randn(3, 4, 4), param(4, 3, 2), param(6), 2, 0, 1, 2, 1)),
    Case("convT1d_blocked", "conv_transpose1d", lambda: module_call(
        nn.ConvTranspose1d(4, 4, 3, stride=2, padding=1, groups=2).to(DT), randn(3, 4, 4)),
         patches=((conv_rules, "_BLOCK_ELEMENTS", 1),), only=(DIAG_SQRT, BATCH_L2, BATCH_DIAG_SQRT)),
    Case("convT1d_gram_blocked", "conv_transpose1d", lambda: module_call(
        nn.ConvTranspose1d(4, 4, 3, stride=2, groups=2).to(DT), randn(3, 4, 3)), patches=_GRAM_BLOCKS, only=(GRAM,)),
    Case("convT2d", "conv_transpose2d", lambda: module_call(
        nn.ConvTranspose2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0), output_padding=(1, 0)).to(DT),
        randn(3, 2, 3, 4))),
    Case("convT2d_groups_dil", "conv_transpose2d", lambda: module_call(
        nn.ConvTranspose2d(4, 2, 3, padding=1, groups=2, dilation=(1, 2)).to(DT), randn(2, 4, 3, 3))),
    # output_size= picks the output padding at call time: read off the output's shape
    Case("convT2d_output_size", "conv_transpose2d", lambda: module_call_output_size(
        nn.ConvTranspose2d(2, 2, 3, stride=2, padding=1).to(DT), randn(2, 2, 3, 2), [6, 4])),
    Case("convT3d", "conv_transpose3d", lambda: module_call(
        nn.ConvTranspose3d(2, 2, 2, stride=2, output_padding=(1, 0, 1)).to(DT), randn(2, 2, 2, 3, 2))),
    Case("convT3d_groups_pad", "conv_transpose3d", lambda: module_call(
        nn.ConvTranspose3d(2, 4, (2, 3, 2), padding=(0, 1, 0), groups=2).to(DT), randn(2, 2, 2, 3, 3))),
    Case("linear_mid_gram_blocked", "linear", lambda: module_call(nn.Linear(4, 3).to(DT), randn(3, 2, 4)),
         patches=_GRAM_BLOCKS, only=(GRAM,)),
    # activations (module, function and method forms; their attributes)
    Case("relu", "relu", lambda: module_call(nn.ReLU(), randn(3, 2, 3))),
    Case("relu_method", "relu", lambda: method_call("relu", randn(3, 5))),
    Case("leaky_relu", "leaky_relu", lambda: module_call(nn.LeakyReLU(0.2), randn(3, 2, 3))),
    Case("leaky_relu_fn", "leaky_relu", lambda: function_call(F.leaky_relu, randn(3, 5), 0.3)),
    Case("sigmoid", "sigmoid", lambda: module_call(nn.Sigmoid(), randn(3, 2, 3, scale=2.0))),
    Case("tanh", "tanh", lambda: module_call(nn.Tanh(), randn(3, 2, 3, scale=2.0))),
    Case("tanh_fn", "tanh", lambda: function_call(torch.tanh, randn(3, 4))),
    Case("elu", "elu", lambda: module_call(nn.ELU(alpha=0.7), randn(3, 2, 3))),
    Case("elu_fn", "elu", lambda: function_call(F.elu, randn(3, 5), 1.3)),
    Case("softplus", "softplus", lambda: module_call(
        nn.Softplus(beta=2.0, threshold=1.5), _softplus_both_sides(2.0, 1.5, randn(3, 2, 3, scale=2.0)))),
    Case("softplus_default_fn", "softplus", lambda: function_call(
        F.softplus, _softplus_both_sides(1.0, 20.0, _with(randn(3, 5, scale=3.0), (0, 1), 25.0)))),
    Case("silu", "silu", lambda: module_call(nn.SiLU(), randn(3, 2, 3, scale=2.0))),
    Case("gelu", "gelu", lambda: module_call(nn.GELU(), randn(3, 2, 3, scale=2.0))),
    Case("gelu_tanh", "gelu", lambda: module_call(nn.GELU(approximate="tanh"), randn(3, 2, 3, scale=2.0))),
    Case("gelu_tanh_fn", "gelu", lambda: function_call(F.gelu, randn(3, 5, scale=2.0), approximate="tanh")),
    Case("selu", "selu", lambda: module_call(nn.SELU(), randn(3, 2, 3, scale=2.0))),
    Case("selu_fn", "selu", lambda: function_call(torch.selu, randn(3, 5, scale=2.0))),
    Case("celu", "celu", lambda: module_call(nn.CELU(alpha=0.6), randn(3, 2, 3, scale=2.0))),
    Case("celu_fn", "celu", lambda: function_call(F.celu, randn(3, 5, scale=2.0), 1.7)),
    Case("logsigmoid", "logsigmoid", lambda: module_call(nn.LogSigmoid(), randn(3, 2, 3, scale=3.0))),
    Case("logsigmoid_fn", "logsigmoid", lambda: function_call(F.logsigmoid, randn(3, 5, scale=3.0))),
    Case("mish", "mish", lambda: module_call(nn.Mish(), randn(3, 2, 3, scale=3.0))),
    Case("softsign", "softsign", lambda: module_call(nn.Softsign(), randn(3, 2, 3, scale=2.0))),
    # hard activations: inputs on every piece (|x| > 3 for some entries)
    Case("hardswish", "hardswish", lambda: module_call(nn.Hardswish(), randn(3, 2, 4, scale=4.0))),
    Case("hardswish_fn", "hardswish", lambda: function_call(F.hardswish, randn(3, 6, scale=4.0))),
    Case("hardtanh", "hardtanh", lambda: module_call(nn.Hardtanh(-0.5, 1.5), randn(3, 2, 3, scale=2.0))),
    Case("hardtanh_fn", "hardtanh", lambda: function_call(F.hardtanh, randn(3, 5, scale=2.0), -2.0, 0.5)),
    Case("relu6", "hardtanh", lambda: module_call(nn.ReLU6(), randn(3, 2, 3, scale=5.0))),
    Case("relu6_fn", "hardtanh", lambda: function_call(F.relu6, randn(3, 5, scale=5.0))),
    Case("hardsigmoid", "hardsigmoid", lambda: module_call(nn.Hardsigmoid(), randn(3, 2, 4, scale=4.0))),
    Case("hardsigmoid_fn", "hardsigmoid", lambda: function_call(F.hardsigmoid, randn(3, 6, scale=4.0))),
    # max-pooling (the saved argmax indices are bound as `indices`)
    Case("max_k3s2_overlap", "max_pool2d", lambda: module_call(nn.MaxPool2d(3, 2), randn(3, 2, 7, 5))),
    Case("max_ceil", "max_pool2d", lambda: module_call(nn.MaxPool2d(3, 2, ceil_mode=True), randn(3, 2, 6, 6))),
    Case("max_pad_dil", "max_pool2d", lambda: module_call(nn.MaxPool2d(2, 1, padding=1, dilation=2),
                                                          randn(3, 2, 5, 6))),
    Case("max_fn", "max_pool2d", lambda: function_call(F.max_pool2d, randn(3, 2, 7, 4), (3, 2), (2, 1), (1, 0),
                                                       ceil_mode=True)),
    # average pooling
    Case("avg_k2", "avg_pool2d", lambda: module_call(nn.AvgPool2d(2), randn(3, 2, 6, 5))),
    Case("avg_pad_incl", "avg_pool2d", lambda: module_call(nn.AvgPool2d(3, 2, padding=1), randn(3, 2, 7, 5))),
    Case("avg_pad_excl", "avg_pool2d", lambda: module_call(nn.AvgPool2d(3, 2, padding=1, count_include_pad=False),
                                                           randn(3, 2, 7, 5))),
    Case("avg_ceil_incl", "avg_pool2d", lambda: module_call(nn.AvgPool2d(3, 2, padding=1, ceil_mode=True),
                                                            randn(3, 2, 6, 6))),
    Case("avg_ceil_excl", "avg_pool2d", lambda: module_call(
        nn.AvgPool2d(3, 2, padding=1, ceil_mode=True, count_include_pad=False), randn(3, 2, 6, 6))),
    Case("avg_divisor", "avg_pool2d", lambda: module_call(nn.AvgPool2d((2, 3), 1, divisor_override=4),
                                                          randn(3, 2, 4, 5))),
    Case("avg_fn", "avg_pool2d", lambda: function_call(F.avg_pool2d, randn(3, 2, 7, 6), 3, None, 1, True, False)),
    # pooling in one and three dimensions (the same N-d code as above)
    Case("max1d_k3s2", "max_pool1d", lambda: module_call(nn.MaxPool1d(3, 2), randn(3, 2, 9))),
    Case("max1d_fn", "max_pool1d", lambda: function_call(F.max_pool1d, randn(3, 2, 8), 3, 2, 1, ceil_mode=True)),
    Case("max1d_torch_dil", "max_pool1d", lambda: function_call(torch.max_pool1d, randn(3, 2, 8), 2, 1, 1, 2)),
    Case("max3d", "max_pool3d", lambda: module_call(nn.MaxPool3d(2, 1, padding=1), randn(2, 2, 3, 4, 3))),
    Case("max3d_fn", "max_pool3d", lambda: function_call(F.max_pool3d, randn(2, 2, 5, 4, 3), (3, 2, 2), 2,
                                                         ceil_mode=True)),
    Case("avg1d_pad_excl", "avg_pool1d", lambda: module_call(nn.AvgPool1d(3, 2, padding=1, count_include_pad=False),
                                                             randn(3, 2, 8))),
    Case("avg1d_ceil_fn", "avg_pool1d", lambda: function_call(F.avg_pool1d, randn(3, 2, 8), 3, 2, 1, True)),
    Case("avg3d_divisor", "avg_pool3d", lambda: module_call(nn.AvgPool3d(2, 1, divisor_override=3),
                                                            randn(2, 2, 3, 4, 3))),
    Case("avg3d_ceil_excl_fn", "avg_pool3d", lambda: function_call(
        F.avg_pool3d, randn(2, 2, 5, 4, 3), 3, 2, 1, True, False)),
    # adaptive average pooling: windows that divide the input, that overlap, global pooling
    Case("adaptive1d_overlap", "adaptive_avg_pool1d", lambda: module_call(nn.AdaptiveAvgPool1d(3), randn(3, 2, 7))),
    Case("adaptive1d_fn", "adaptive_avg_pool1d", lambda: function_call(F.adaptive_avg_pool1d, randn(3, 2, 5), 4)),
    Case("adaptive2d_keep_h", "adaptive_avg_pool2d", lambda: module_call(nn.AdaptiveAvgPool2d((None, 3)),
                                                                         randn(3, 2, 4, 5))),
    Case("adaptive2d_global", "adaptive_avg_pool2d", lambda: module_call(nn.AdaptiveAvgPool2d(1), randn(3, 2, 4, 3))),
    Case("adaptive2d_divides_fn", "adaptive_avg_pool2d", lambda: function_call(F.adaptive_avg_pool2d,
                                                                               randn(3, 2, 4, 6), (2, 3))),
    Case("adaptive3d", "adaptive_avg_pool3d", lambda: module_call(nn.AdaptiveAvgPool3d((2, 1, 3)),
                                                                  randn(2, 2, 3, 4, 5))),
    # adaptive max-pooling (overlapping windows select an input twice)
    Case("adaptive_max1d_overlap", "adaptive_max_pool1d", lambda: module_call(nn.AdaptiveMaxPool1d(4), randn(3, 2, 7))),
    Case("adaptive_max2d_fn", "adaptive_max_pool2d", lambda: function_call(F.adaptive_max_pool2d, randn(3, 2, 5, 4),
                                                                           (3, None))),
    Case("adaptive_max3d", "adaptive_max_pool3d", lambda: module_call(nn.AdaptiveMaxPool3d((2, 1, 2)),
                                                                      randn(2, 2, 3, 4, 3))),
    # batch normalization in evaluation mode (running statistics: constants of the op)
    Case("bn2d", "batch_norm_eval", lambda: module_call(_batch_norm(nn.BatchNorm2d, 3), randn(3, 3, 4, 2))),
    Case("bn1d_features", "batch_norm_eval", lambda: module_call(_batch_norm(nn.BatchNorm1d, 4), randn(3, 4))),
    Case("bn1d_sequence", "batch_norm_eval", lambda: module_call(_batch_norm(nn.BatchNorm1d, 2), randn(3, 2, 5))),
    Case("bn3d", "batch_norm_eval", lambda: module_call(_batch_norm(nn.BatchNorm3d, 2), randn(2, 2, 3, 2, 3))),
    Case("sync_bn", "batch_norm_eval", lambda: module_call(_batch_norm(nn.SyncBatchNorm, 2), randn(3, 2, 3))),
    Case("bn2d_no_affine", "batch_norm_eval", lambda: module_call(_batch_norm(nn.BatchNorm2d, 3, affine=False),
                                                                  randn(3, 3, 2, 2)), without=("weight", "bias")),
    Case("bn_fn", "batch_norm_eval", lambda: function_call(
        F.batch_norm, randn(3, 2, 4), randn(2), randn(2).exp(), param(2), param(2), False, 0.1, 1e-3)),
    # LayerNorm: over the last dim (two tokens), over two trailing dims (with and without token dims), without
    # affine parameters, without bias; F.layer_norm and the ATen overload
    Case("ln", "layer_norm", lambda: module_call(_affine(nn.LayerNorm(4)), randn(3, 2, 4))),
    Case("ln_two_dims", "layer_norm", lambda: module_call(_affine(nn.LayerNorm((2, 3), eps=1e-3)), randn(3, 2, 2, 3))),
    Case("ln_whole_sample", "layer_norm", lambda: module_call(_affine(nn.LayerNorm((2, 3))), randn(3, 2, 3))),
    Case("ln_no_affine", "layer_norm", lambda: module_call(nn.LayerNorm(5, elementwise_affine=False).to(DT),
                                                           randn(3, 2, 5)), without=("weight", "bias")),
    Case("ln_no_bias", "layer_norm", lambda: module_call(_affine(nn.LayerNorm(4, bias=False)), randn(3, 4)),
         without=("bias",)),
    Case("ln_fn", "layer_norm", lambda: function_call(F.layer_norm, randn(3, 2, 4), (4,), param(4), param(4), 1e-2)),
    Case("ln_aten", "layer_norm", lambda: function_call(torch.ops.aten.layer_norm.default, randn(3, 3, 4), [4],
                                                        param(4), param(4), 1e-5)),
    # RMSNorm: eps=None (the dtype's machine epsilon), two trailing dims, no weight; F.rms_norm and ATen
    Case("rms", "rms_norm", lambda: module_call(_affine(nn.RMSNorm(4)), randn(3, 2, 4))),
    Case("rms_two_dims", "rms_norm", lambda: module_call(_affine(nn.RMSNorm((2, 3), eps=1e-3)), randn(3, 2, 2, 3))),
    Case("rms_no_affine", "rms_norm", lambda: module_call(nn.RMSNorm(5, elementwise_affine=False).to(DT),
                                                          randn(3, 2, 5)), without=("weight",)),
    Case("rms_fn", "rms_norm", lambda: function_call(F.rms_norm, randn(3, 2, 4), (4,), param(4), 1e-2)),
    Case("rms_aten", "rms_norm", lambda: function_call(torch.ops.aten.rms_norm.default, randn(3, 4), [4], param(4))),
    # GroupNorm over [N, C, *spatial] (two and one spatial dims, none), one group per channel, no affine
    Case("gn", "group_norm", lambda: module_call(_affine(nn.GroupNorm(2, 4)), randn(3, 4, 3, 2))),
    Case("gn_1d_three_groups", "group_norm", lambda: module_call(_affine(nn.GroupNorm(3, 6, eps=1e-3)),
                                                                 randn(3, 6, 2))),
    Case("gn_features", "group_norm", lambda: module_call(_affine(nn.GroupNorm(2, 6)), randn(3, 6))),
    Case("gn_per_channel", "group_norm", lambda: module_call(_affine(nn.GroupNorm(3, 3)), randn(3, 3, 4))),
    Case("gn_no_affine", "group_norm", lambda: module_call(nn.GroupNorm(2, 4, affine=False).to(DT),
                                                           randn(3, 4, 3)), without=("weight", "bias")),
    Case("gn_fn", "group_norm", lambda: function_call(F.group_norm, randn(3, 4, 3), 2, param(4), param(4), 1e-2)),
    Case("gn_aten", "group_norm", lambda: function_call(torch.ops.aten.group_norm.default, randn(2, 4, 2, 2), 2,
                                                        param(4), param(4), 1e-5, False)),
    # embeddings: integer indices, rows read several times by one sample (summed before squaring)
    Case("embedding", "embedding", lambda: module_call(nn.Embedding(6, 3).to(DT), _tokens(6, 3, 5))),
    Case("embedding_padding", "embedding", lambda: module_call(nn.Embedding(6, 3, padding_idx=2).to(DT),
                                                               _tokens(6, 3, 5))),
    Case("embedding_one_token_fn", "embedding", lambda: function_call(F.embedding, _tokens(5, 4), param(5, 2),
                                                                      padding_idx=-1)),
    Case("embedding_positions_fn", "embedding", lambda: function_call(F.embedding, _tokens(4, 3, 2, 3), param(4, 2))),
    # constant padding: non-negative pads crop by a view, negative ones by a zero pad
    Case("pad_zero", "pad", lambda: module_call(nn.ZeroPad2d((0, 1, 2, 1)), randn(3, 2, 4, 3))),
    Case("pad_const", "pad", lambda: module_call(nn.ConstantPad2d(1, 0.5), randn(3, 2, 3, 3))),
    Case("pad_crop_mixed", "pad", lambda: module_call(nn.ZeroPad2d((-1, 1, 0, -1)), randn(3, 2, 4, 4))),
    Case("pad_crop_fn", "pad", lambda: function_call(F.pad, randn(3, 2, 4, 5), (-1, -2, -1, 0))),
    Case("pad_features_fn", "pad", lambda: function_call(F.pad, randn(3, 5), (2, 1), value=-1.0)),
    Case("pad_three_dims_fn", "pad", lambda: function_call(F.pad, randn(3, 2, 3, 4), (1, 0, 0, 1, 1, 1))),
    # reshape
    Case("flatten", "reshape", lambda: module_call(nn.Flatten(), randn(3, 2, 3, 2))),
    Case("unflatten", "reshape", lambda: module_call(nn.Unflatten(1, (2, 3)), randn(3, 6))),
    Case("view_method", "reshape", lambda: method_call("view", randn(3, 2, 3, 2), 3, 2, -1)),
    # basic indexing of the per-sample axes (slices with steps, integers, None, Ellipsis)
    Case("index_slice", "index", lambda: function_call(operator.getitem, randn(3, 4, 5), (slice(None), slice(1, 3)))),
    Case("index_token", "index", lambda: function_call(operator.getitem, randn(3, 4, 5), (slice(None), 0))),
    Case("index_last_token", "index", lambda: function_call(operator.getitem, randn(3, 4, 5), (slice(None), -1))),
    Case("index_strided_ellipsis", "index", lambda: function_call(
        operator.getitem, randn(3, 2, 3, 7), (Ellipsis, slice(1, None, 2)))),
    Case("index_mixed", "index", lambda: function_call(
        operator.getitem, randn(3, 4, 3, 5), (slice(None), None, slice(None, None, 3), 1, slice(-3, None)))),
    Case("index_method", "index", lambda: method_call("__getitem__", randn(3, 6), (slice(None), slice(-4, 5)))),
    Case("narrow_method", "index", lambda: method_call("narrow", randn(3, 4, 5), -1, 1, 3)),
    Case("narrow_fn", "index", lambda: function_call(torch.narrow, randn(3, 4, 5), 1, -3, 2)),
    Case("select_method", "index", lambda: method_call("select", randn(3, 4, 5), 2, -2)),
    Case("select_fn", "index", lambda: function_call(torch.select, randn(3, 4, 5), 1, 3)),
    Case("slice_aten", "index", lambda: function_call(torch.ops.aten.slice.Tensor, randn(3, 4, 6), 2, 1,
                                                      9223372036854775807, 2)),
    Case("select_aten", "index", lambda: function_call(torch.ops.aten.select.int, randn(3, 4, 5), 1, 2)),
    Case("narrow_aten", "index", lambda: function_call(torch.ops.aten.narrow.default, randn(3, 4, 5), 2, 0, 4)),
    # one constant index vector along a per-sample axis (rows picked twice, out of order)
    Case("index_select_fn", "index_select", lambda: function_call(torch.index_select, randn(3, 4, 5), 2,
                                                                  torch.tensor([4, 0, 4, 1]))),
    Case("index_select_method", "index_select", lambda: method_call("index_select", randn(3, 5), 1,
                                                                    torch.tensor([2, 2, 0]))),
    Case("index_tensor_getitem", "index_select", lambda: function_call(
        operator.getitem, randn(3, 4, 2), (slice(None), torch.tensor([3, 1, 3])))),
    Case("index_select_aten", "index_select", lambda: function_call(torch.ops.aten.index_select.default,
                                                                    randn(3, 4, 5), -1, torch.tensor([1, 1]))),
    Case("index_tensor_aten", "index_select", lambda: function_call(
        torch.ops.aten.index.Tensor, randn(3, 4, 5), [None, None, torch.tensor([0, 4, 0])])),
    # the outputs of chunk / split / unbind / tensor_split, one pick at a time
    Case("chunk_q", "index", lambda: pick_call("chunk", 0, randn(3, 2, 9), 3, -1)),
    Case("chunk_v", "index", lambda: pick_call("chunk", 2, randn(3, 2, 9), 3, dim=-1)),
    Case("chunk_uneven_fn", "index", lambda: pick_call(torch.chunk, 1, randn(3, 7, 2), 3, 1)),
    Case("split_size_fn", "index", lambda: pick_call(torch.split, 2, randn(3, 7), 3, dim=1)),
    Case("split_sizes_method", "index", lambda: pick_call("split", 1, randn(3, 2, 6), [1, 4, 1], 2)),
    Case("split_with_sizes_kw", "index", lambda: pick_call("split_with_sizes", 2, randn(3, 6), split_sizes=[3, 1, 2],
                                                           dim=1)),
    Case("unbind_method", "index", lambda: pick_call("unbind", 1, randn(3, 3, 4), 1)),
    Case("unbind_fn", "index", lambda: pick_call(torch.unbind, -1, randn(3, 4, 2), -1)),
    Case("tensor_split_sections", "index", lambda: pick_call(torch.tensor_split, 2, randn(3, 8), 3, 1)),
    Case("tensor_split_indices", "index", lambda: pick_call("tensor_split", 1, randn(3, 2, 8), [2, -3], 2)),
    Case("split_aten", "index", lambda: pick_call(torch.ops.aten.split.Tensor, 1, randn(3, 7, 2), 3, 1)),
    Case("split_sizes_aten", "index", lambda: pick_call(torch.ops.aten.split_with_sizes.default, 0, randn(3, 6),
                                                        [2, 4], 1)),
    Case("chunk_aten", "index", lambda: pick_call(torch.ops.aten.chunk.default, 1, randn(3, 2, 6), 2, -1)),
    Case("unbind_aten", "index", lambda: pick_call(torch.ops.aten.unbind.int, 0, randn(3, 2, 3), 1)),
    # concatenation and stacking of activations along a per-sample axis
    Case("cat_two", "cat", lambda: function_call(torch.cat, [randn(3, 2, 4), randn(3, 3, 4)], dim=1),
         without=concat_rules.INPUTS[2:]),
    Case("cat_last_axis", "cat", lambda: function_call(torch.concatenate, (randn(3, 2, 1), randn(3, 2, 3)), -1),
         without=concat_rules.INPUTS[2:]),
    Case("cat_sixteen", "cat", lambda: function_call(torch.cat, [randn(3, i % 3 + 1, 2) for i in range(16)], 1)),
    Case("stack_fn", "cat", lambda: function_call(torch.stack, [randn(3, 2, 4), randn(3, 2, 4), randn(3, 2, 4)], 2),
         without=concat_rules.INPUTS[3:]),
    Case("stack_last", "cat", lambda: function_call(torch.stack, [randn(3, 4), randn(3, 4)], dim=-1),
         without=concat_rules.INPUTS[2:]),
    Case("cat_aten", "cat", lambda: function_call(torch.ops.aten.cat.default, [randn(3, 2), randn(3, 5)], 1),
         without=concat_rules.INPUTS[2:]),
    Case("stack_aten", "cat", lambda: function_call(torch.ops.aten.stack.default, [randn(3, 2), randn(3, 2)], 1),
         without=concat_rules.INPUTS[2:]),
    # unsqueeze / squeeze of per-sample axes: reshapes
    Case("unsqueeze_method", "reshape", lambda: method_call("unsqueeze", randn(3, 4), 1)),
    Case("unsqueeze_fn", "reshape", lambda: function_call(torch.unsqueeze, randn(3, 4, 2), -1)),
    Case("squeeze_method", "reshape", lambda: method_call("squeeze", randn(3, 1, 4), 1)),
    Case("squeeze_all_fn", "reshape", lambda: function_call(torch.squeeze, randn(3, 1, 4, 1))),
    Case("squeeze_aten", "reshape", lambda: function_call(torch.ops.aten.squeeze.dim, randn(3, 4, 1), -1)),
    # add
    Case("add", "add", lambda: function_call(operator.add, randn(3, 2, 4), randn(3, 2, 4))),
    Case("add_method", "add", lambda: method_call("add", randn(3, 5), randn(3, 5))),
    Case("add_positions", "add_param", lambda: function_call(operator.add, randn(3, 4, 2), param(1, 4, 2))),
    Case("add_bias_last_axis", "add_param", lambda: function_call(operator.add, randn(3, 4, 2), param(2))),
    Case("add_param_first", "add_param", lambda: function_call(operator.add, param(4, 1), randn(3, 2, 4, 5))),
    Case("add_param_method", "add_param", lambda: method_call("add", randn(2, 3, 4), param(3, 1))),
    Case("class_token", "cat_param", lambda: learned_tokens_call(param(1, 1, 3), randn(3, 4, 3), 1, True)),
    Case("tokens_appended", "cat_param", lambda: learned_tokens_call(param(1, 2, 3), randn(2, 4, 3), -2, False)),
    Case("channels_appended", "cat_param", lambda: learned_tokens_call(param(1, 2, 3, 2), randn(3, 4, 3, 2), 1,
                                                                        False)),
    Case("mean_tokens", "reduce_sum", lambda: method_call("mean", randn(3, 4, 5), 1)),
    Case("sum_positions", "reduce_sum", lambda: method_call("sum", randn(2, 3, 4, 2), (2, -1))),
    Case("mean_keepdim_fn", "reduce_sum", lambda: function_call(torch.mean, randn(3, 4, 2), dim=-1, keepdim=True)),
    Case("sum_fn", "reduce_sum", lambda: function_call(torch.sum, randn(3, 4, 2), [1, 2])),
    Case("mean_aten", "reduce_sum", lambda: function_call(torch.ops.aten.mean.dim, randn(3, 4, 2), [1])),
    Case("sum_aten_keepdim", "reduce_sum", lambda: function_call(torch.ops.aten.sum.dim_IntList, randn(3, 4, 2),
                                                                 [2], True)),
    # arithmetic with Python numbers: z = a x + c
    Case("mul_number", "scalar_affine", lambda: function_call(operator.mul, randn(3, 2, 4), 0.5)),
    Case("number_mul", "scalar_affine", lambda: function_call(operator.mul, -1.5, randn(3, 5))),
    Case("div_number", "scalar_affine", lambda: function_call(operator.truediv, randn(3, 5), 3.0)),
    Case("torch_div", "scalar_affine", lambda: function_call(torch.div, randn(3, 5), -4)),
    Case("add_number", "scalar_affine", lambda: function_call(operator.add, randn(3, 5), 2.0)),
    Case("number_add", "scalar_affine", lambda: function_call(operator.add, 0.25, randn(3, 2, 3))),
    Case("torch_add_alpha", "scalar_affine", lambda: function_call(torch.add, randn(3, 5), 2.0, alpha=3)),
    Case("sub_number", "scalar_affine", lambda: function_call(operator.sub, randn(3, 5), 1.0)),
    Case("number_sub", "scalar_affine", lambda: function_call(operator.sub, 1.0, randn(3, 5))),
    Case("torch_sub_alpha", "scalar_affine", lambda: function_call(torch.sub, randn(3, 5), 2.0, alpha=-2)),
    Case("torch_rsub", "scalar_affine", lambda: function_call(torch.rsub, randn(3, 5), 2.0, alpha=3)),
    Case("neg", "scalar_affine", lambda: function_call(operator.neg, randn(3, 5))),
    Case("neg_method", "scalar_affine", lambda: method_call("neg", randn(3, 5))),
    Case("mul_method", "scalar_affine", lambda: method_call("mul", randn(3, 5), 3)),
    Case("div_method", "scalar_affine", lambda: method_call("div", randn(3, 5), 0.5)),
    Case("add_method_number", "scalar_affine", lambda: method_call("add", randn(3, 5), -2.5)),
    Case("sub_method", "scalar_affine", lambda: method_call("sub", randn(3, 5), 0.5, alpha=2)),
    Case("rsub_method", "scalar_affine", lambda: method_call("__rsub__", randn(3, 5), 0.5)),
    # powers with a number exponent
    Case("square", "pow", lambda: function_call(operator.pow, randn(3, 2, 4), 2)),
    Case("cube_method", "pow", lambda: method_call("pow", randn(3, 5), 3)),
    Case("pow_half", "pow", lambda: function_call(torch.pow, randn(3, 5).abs() + 0.1, 0.5)),
    Case("pow_negative", "pow", lambda: function_call(operator.pow, randn(3, 5).abs() + 0.5, -1.5)),
    Case("torch_square", "pow", lambda: function_call(torch.square, randn(3, 5))),
    Case("square_method", "pow", lambda: method_call("square", randn(3, 5))),
    # softmax and log_softmax over a per-sample axis (last, middle, of a [N, C] output)
    Case("softmax_module", "softmax", lambda: module_call(nn.Softmax(dim=-1), randn(3, 2, 4, scale=2.0))),
    Case("softmax_fn_middle", "softmax", lambda: function_call(F.softmax, randn(3, 4, 2, scale=2.0), dim=1)),
    Case("softmax_torch", "softmax", lambda: function_call(torch.softmax, randn(2, 2, 3, 3, scale=2.0), 2)),
    Case("softmax_method", "softmax", lambda: method_call("softmax", randn(3, 5, scale=2.0), -1)),
    Case("softmax_aten", "softmax", lambda: function_call(torch.ops.aten.softmax.int, randn(3, 2, 4), -1)),
    Case("softmax_aten_private", "softmax", lambda: function_call(torch.ops.aten._softmax.default,
                                                                  randn(3, 4, 2), 1, False)),
    Case("log_softmax_module", "log_softmax", lambda: module_call(nn.LogSoftmax(1), randn(3, 5, scale=2.0))),
    Case("log_softmax_fn_middle", "log_softmax", lambda: function_call(F.log_softmax, randn(3, 4, 2), dim=1)),
    Case("log_softmax_method", "log_softmax", lambda: method_call("log_softmax", randn(2, 2, 3, 3), dim=-1)),
    Case("log_softmax_aten", "log_softmax", lambda: function_call(torch.ops.aten.log_softmax.int, randn(3, 2, 4),
                                                                  2)),
    Case("log_softmax_aten_private", "log_softmax", lambda: function_call(torch.ops.aten._log_softmax.default,
                                                                          randn(3, 4), 1, False)),
    # permutations of the per-sample axes (attention's head split and k^T)
    Case("transpose_method", "permute", lambda: method_call("transpose", randn(3, 2, 4), 1, 2)),
    Case("transpose_negative", "permute", lambda: method_call("transpose", randn(2, 2, 3, 4), -2, -1)),
    Case("transpose_fn", "permute", lambda: function_call(torch.transpose, randn(3, 2, 4, 2), 1, 3)),
    Case("swapaxes_fn", "permute", lambda: function_call(torch.swapaxes, randn(3, 2, 4), 2, 1)),
    Case("permute_method", "permute", lambda: method_call("permute", randn(2, 3, 2, 4), 0, 2, 3, 1)),
    Case("permute_method_tuple", "permute", lambda: method_call("permute", randn(2, 3, 2, 4), (0, 3, 1, -2))),
    Case("permute_fn", "permute", lambda: function_call(torch.permute, randn(2, 3, 2, 4), [0, 2, 1, 3])),
    Case("transpose_aten", "permute", lambda: function_call(torch.ops.aten.transpose.int, randn(3, 2, 4), 1, 2)),
    Case("permute_aten", "permute", lambda: function_call(torch.ops.aten.permute.default, randn(2, 3, 4),
                                                          [0, 2, 1])),
    # the product of two activations (attention's q k^T and attn v)
    Case("matmul_op", "matmul", lambda: function_call(operator.matmul, randn(3, 2, 4), randn(3, 4, 3))),
    Case("matmul_heads", "matmul", lambda: function_call(torch.matmul, randn(2, 2, 3, 4), randn(2, 2, 4, 2))),
    Case("matmul_wide", "matmul", lambda: function_call(torch.matmul, randn(2, 3, 2), randn(2, 2, 4))),
    Case("bmm", "matmul", lambda: function_call(torch.bmm, randn(3, 3, 2), randn(3, 2, 2))),
    Case("matmul_method", "matmul", lambda: method_call("matmul", randn(2, 3, 3), randn(2, 3, 2))),
    Case("bmm_method", "matmul", lambda: method_call("bmm", randn(2, 2, 3), randn(2, 3, 3))),
    Case("matmul_aten", "matmul", lambda: function_call(torch.ops.aten.matmul.default, randn(2, 2, 3),
                                                        randn(2, 3, 2))),
    Case("bmm_aten", "matmul", lambda: function_call(torch.ops.aten.bmm.default, randn(2, 3, 2), randn(2, 2, 3))),
]
CASE_BY_ID = {c.id: c for c in CASES}
assert len(CASE_BY_ID) == len(CASES), "case ids must be unique"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: tests/conftest.py


@functools.cache
def context(case_id: str) -> OpContext:
    """The case's context, built once (seeded by the case id)."""
    torch.manual_seed(zlib.crc32(case_id.encode()))
    c = CASE_BY_ID[case_id].build()
    assert c.op.name == CASE_BY_ID[case_id].op
    return c


def messages(case_id: str, what: str) -> torch.Generator:
    """A generator for the random messages of one check, seeded by case and check."""
    return torch.Generator().manual_seed(zlib.crc32(f"{case_id}/{what}".encode()))


def rand_like(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, dtype=DT, generator=gen)


def assert_matches(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert isinstance(got, torch.Tensor), f"{what}: got {type(got).__name__}"
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    # A vanishing reference would reduce the comparison to an absolute one: the cases avoid it.
    assert want.abs().max() > 0, f"{what}: the reference is zero; the case does not test the rule"
    err = rel_error(got, want)
    assert err < RTOL, f"{what}: relative error {err:.3e} >= {RTOL:.0e}"


# ---- the checks, one per rule kind ------------------------------------------------------------------

def _rule(kind: RuleKind, op: str, key: str, *msgs: Any, c: OpContext, **extra: Any) -> torch.Tensor:
    assert (op, key) in registry.TABLES[kind], f"lost registration: {op} has no {kind.value} rule for {key}"
    return call_rule(registry.TABLES[kind], op, key, *msgs, **c.bindings(), **extra)


def check_jac_t(case: Case, c: OpContext, key: str) -> None:
    v = rand_like((2, 2) + tuple(c.out.shape), messages(case.id, f"jac_t[{key}]"))
    want = ref.jac_t(c, key, v)
    # Square-root factor columns [K, N, ...], the gradient [N, ...] without a column axis, and
    # columns with two leading axes.
    assert_matches(_rule(JAC_T, case.op, key, v.flatten(0, 1), c=c), want.flatten(0, 1),
                   f"jac_t[{key}] of [K, N, ...] columns")
    assert_matches(_rule(JAC_T, case.op, key, v[0, 0], c=c), want[0, 0], f"jac_t[{key}] of a gradient [N, ...]")
    assert_matches(_rule(JAC_T, case.op, key, v, c=c), want, f"jac_t[{key}] of [2, 2, N, ...] columns")


def check_diag(case: Case, c: OpContext, key: str) -> None:
    d = rand_like(tuple(c.out.shape), messages(case.id, f"diag[{key}]"))
    assert_matches(_rule(DIAG, case.op, key, d, c=c), ref.diag(c, key, d), f"diag[{key}]")


def check_residual(case: Case, c: OpContext, key: str) -> None:
    g = rand_like(tuple(c.out.shape), messages(case.id, f"residual[{key}]"))
    got = _rule(RESIDUAL, case.op, key, g, c=c)
    hessians = ref.residual_hessians(c, key, g)  # [N, P, P]
    diagonal = torch.diagonal(hessians, dim1=1, dim2=2).reshape(c.inputs[key].shape)
    assert_matches(got, diagonal, f"residual[{key}] (Hessian diagonal)")
    if (case.op, key) in registry.RESIDUAL_SQRT:
        return  # a Hessian coupling entries: the whole of it is the joint factor's (check_residual_sqrt)
    # The compiler holds the residual as diag(r) where the op has no joint factor: the per-sample Hessian
    # must be diagonal.
    assert_matches(torch.diag_embed(got.reshape(c.n, -1)), hessians, f"residual[{key}] (whole Hessian)")


def check_grad(case: Case, c: OpContext, key: str) -> None:
    g = rand_like(tuple(c.out.shape), messages(case.id, f"grad[{key}]"))
    assert_matches(_rule(GRAD, case.op, key, g, c=c), ref.grad(c, key, g), f"grad[{key}]")


def check_per_sample(case: Case, c: OpContext, key: str) -> None:
    v = rand_like((K,) + tuple(c.out.shape), messages(case.id, f"per_sample[{key}]"))
    assert_matches(_rule(PER_SAMPLE, case.op, key, v, c=c), ref.per_sample(c, key, v), f"per_sample[{key}]")


def check_gram(case: Case, c: OpContext, key: str) -> None:
    gen = messages(case.id, f"gram[{key}]")
    s = rand_like((K,) + tuple(c.out.shape), gen)
    want = ref.gram(c, key, s)
    assert_matches(_rule(GRAM, case.op, key, s, c=c, include=(key,)), want, f"gram[{key}]")
    # Added in place into a running total.
    total = rand_like(want.shape, gen)
    total = total + total.T
    expected = total + want
    got = _rule(GRAM, case.op, key, s, c=c, include=(key,), total=total)
    assert got is total, f"gram[{key}] with a total must add into it in place"
    assert_matches(got, expected, f"gram[{key}] into a total")
    # With every parameter of the op: the sum of their shares (one product of the columns).
    params = tuple(p for p in registry.OPS[case.op].params if c.inputs.get(p) is not None)
    if len(params) > 1:
        both = sum(ref.gram(c, p, s) for p in params)
        assert_matches(_rule(GRAM, case.op, key, s, c=c, include=params), both, f"gram[{','.join(params)}]")
    # The rule reads samples only through the op's data inputs: the columns and inputs of a subset of
    # the batch give the Gram matrix of that subset (how ggn_eigen subsamples).
    keep = [n for n in range(c.n) if n != 1]
    rows = torch.tensor([k * c.n + n for k in range(K) for n in keep])
    sub = {**c.bindings(), "x": c.inputs["x"][keep], "include": (key,)}
    got = call_rule(registry.GRAM, case.op, key, s[:, keep], **sub)
    assert_matches(got, want[rows][:, rows], f"gram[{key}] of a subset of samples")


def signed_columns(case: Case, c: OpContext, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``K`` random factor columns ``[K, N, *out]`` and a random sign ``+-1`` per column and sample
    ``[K, N]``, both signs occurring, seeded by case and check."""
    gen = messages(case.id, what)
    s = rand_like((K,) + tuple(c.out.shape), gen)
    sign = torch.randint(0, 2, (K, c.n), generator=gen).to(DT) * 2 - 1
    sign[0, 0], sign[1, 0] = 1.0, -1.0  # both signs occur
    return s, sign


def check_diag_sqrt(case: Case, c: OpContext, key: str) -> None:
    s, sign = signed_columns(case, c, f"diag_sqrt[{key}]")
    for signs, what in ((None, "unsigned"), (sign, "signed")):
        got = _rule(DIAG_SQRT, case.op, key, s, signs, c=c)
        assert_matches(got, ref.diag_sqrt(c, key, s, signs), f"diag_sqrt[{key}] {what}")


def check_batch_l2(case: Case, c: OpContext, key: str) -> None:
    g = rand_like(tuple(c.out.shape), messages(case.id, f"batch_l2[{key}]"))
    assert_matches(_rule(BATCH_L2, case.op, key, g, c=c), ref.batch_l2(c, key, g), f"batch_l2[{key}]")


def check_batch_diag_sqrt(case: Case, c: OpContext, key: str) -> None:
    s, sign = signed_columns(case, c, f"batch_diag_sqrt[{key}]")
    for signs, what in ((None, "unsigned"), (sign, "signed")):
        got = _rule(BATCH_DIAG_SQRT, case.op, key, s, signs, c=c)
        assert_matches(got, ref.batch_diag_sqrt(c, key, s, signs), f"batch_diag_sqrt[{key}] {what}")


def check_diag_diag(case: Case, c: OpContext, key: str) -> None:
    d = rand_like(tuple(c.out.shape), messages(case.id, f"diag_diag[{key}]"))
    assert_matches(_rule(DIAG_DIAG, case.op, key, d, c=c), ref.diag_diag(c, key, d), f"diag_diag[{key}]")


def check_derived(case: Case, c: OpContext, key: str) -> None:
    assert key in ref.DERIVED, f"derived value {key} has no generic meaning in generic_rules.DERIVED"
    assert_matches(_rule(DERIVED, case.op, key, c=c), ref.DERIVED[key](c), f"derived {key}")


def _symmetric(d: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, d, dtype=DT, generator=gen)
    return a + a.T


def check_dense(case: Case, c: OpContext, key: str) -> None:
    m = _symmetric(c.out[0].numel(), messages(case.id, f"dense[{key}]"))
    assert_matches(_rule(DENSE, case.op, key, m, c=c), ref.dense(c, key, m), f"dense[{key}]")


def check_kron_out(case: Case, c: OpContext, key: str) -> None:
    s, sign = signed_columns(case, c, f"kron_out[{key}]")
    for signs, what in ((None, "unsigned"), (sign, "signed")):
        assert_matches(_rule(KRON_OUT, case.op, key, s, signs, c=c), ref.kron_out(c, s, signs),
                       f"kron_out[{key}] {what}")


def check_kron_dense(case: Case, c: OpContext, key: str) -> None:
    m = _symmetric(c.out[0].numel(), messages(case.id, f"kron_dense[{key}]"))
    assert_matches(_rule(KRON_DENSE, case.op, key, m, c=c), ref.kron_dense(c, m), f"kron_dense[{key}]")


def check_kron_in(case: Case, c: OpContext, key: str) -> None:
    assert_matches(_rule(KRON_IN, case.op, key, c=c), ref.kron_in(c), f"kron_in[{key}]")


CHECKS: dict[RuleKind, Callable[[Case, OpContext, str], None]] = {
    JAC_T: check_jac_t, DIAG: check_diag, RESIDUAL: check_residual, GRAD: check_grad,
    PER_SAMPLE: check_per_sample, DIAG_SQRT: check_diag_sqrt, DIAG_DIAG: check_diag_diag, DERIVED: check_derived,
    DENSE: check_dense, KRON_OUT: check_kron_out, KRON_DENSE: check_kron_dense, KRON_IN: check_kron_in,
    BATCH_L2: check_batch_l2, BATCH_DIAG_SQRT: check_batch_diag_sqrt,
    GRAM: check_gram, RESIDUAL_SQRT: lambda case, c, key: check_residual_sqrt(case, c, key),
}

_KRONECKER = (KRON_OUT, KRON_DENSE, KRON_IN)


_CONV_FAMILY = ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")


def _grouped(case: Case) -> bool:
    return case.op in _CONV_FAMILY and context(case.id).attrs["groups"] != 1


def _refused_when_grouped(case: Case, kind: RuleKind, key: str) -> bool:
    """The Kronecker factors, and a transposed convolution's unfolded input (read by them alone)."""
    return kind in _KRONECKER or (kind is DERIVED and key == "x_cols" and case.op.startswith("conv_transpose"))


# Every (case, kind, key) to check: the op's expected rules, less those of inputs the case lacks and
# the Kronecker factors of grouped convolutions (refused: test_grouped_convolution_has_no_kronecker_factors).
PARAMS = [(case, kind, key) for case in CASES if case.op != "generic" for kind, keys in EXPECTED[case.op].items()
          for key in keys
          if key not in case.without and (not case.only or kind in case.only)
          and not (_grouped(case) and _refused_when_grouped(case, kind, key))]
GROUPED = [(case, kind, key) for case in CASES if _grouped(case) for kind in _KRONECKER
           for key in EXPECTED[case.op][kind] if key not in case.without]


@pytest.mark.parametrize("case, kind, key", PARAMS,
                         ids=[f"{c.id}-{kind.value}[{key}]" for c, kind, key in PARAMS])
def test_rule_matches_generic_derivation(case, kind, key, monkeypatch):
    for module, name, value in case.patches:
        monkeypatch.setattr(module, name, value)
    CHECKS[kind](case, context(case.id), key)


@pytest.mark.parametrize("case, kind, key", GROUPED, ids=[f"{c.id}-{kind.value}[{key}]" for c, kind, key in GROUPED])
def test_grouped_convolution_has_no_kronecker_factors(case, kind, key):
    """Neither fxcurv nor BackPACK defines Kronecker factors for groups != 1: a clear refusal."""
    c = context(case.id)
    args = {KRON_OUT: (rand_like((K,) + tuple(c.out.shape), messages(case.id, "grouped")), None),
            KRON_DENSE: (_symmetric(c.out[0].numel(), messages(case.id, "grouped")),), KRON_IN: ()}[kind]
    with pytest.raises(UnsupportedOpError, match="groups="):
        _rule(kind, case.op, key, *args, c=c)


# ---- what the rules take for granted ----------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case_is_canonical_and_per_sample(case):
    """The case's canonical inputs are float64 (absent exactly where the case says), and the op maps
    each sample alone: the batched forward is the stack of single-sample forwards, which every rule and
    every reference above assumes."""
    c = context(case.id)
    assert {k for k, v in c.inputs.items() if v is None} == set(case.without)
    # float64, but index inputs and integer constants (index_select's index vector)
    assert all(v.dtype == DT or (k in c.op.constants and not v.is_floating_point())
               for k, v in c.inputs.items() if v is not None and k not in c.op.indices)
    assert all(not v.is_floating_point() for k, v in c.inputs.items() if v is not None and k in c.op.indices)
    for key, value in c.inputs.items():
        if value is None or not c.op.is_batched(key):
            continue
        stacked = torch.stack([c.sample_forward(key, n)[0](value[n]) for n in range(c.n)])
        assert rel_error(stacked, c.out) < 1e-14


# Constants (running statistics) and integer indices are never differentiated: no derivative to check.
NO_RESIDUAL = [(case, key) for case in CASES if case.op != "generic" for key in registry.OPS[case.op].inputs
               if key not in case.without and key not in EXPECTED[case.op].get(RESIDUAL, ()) and not case.only
               and key not in registry.OPS[case.op].constants and key not in registry.OPS[case.op].indices]


@pytest.mark.parametrize("case, key", NO_RESIDUAL, ids=[f"{c.id}-{key}" for c, key in NO_RESIDUAL])
def test_inputs_without_residual_rule_have_no_second_derivative(case, key):
    """HBP eq. S.6: where an op has no residual rule for an input (a data input or a parameter), the
    compiler passes no second-order term there; that is exact only if the per-sample Hessian of
    ``g . f`` w.r.t. that input vanishes (linear maps, piecewise-linear activations, poolings at
    their argmax)."""
    c = context(case.id)
    gen = messages(case.id, f"no_residual[{key}]")
    g = rand_like(tuple(c.out.shape), gen)
    # One product with a random direction and random g: a nonzero per-sample Hessian gives a nonzero
    # product with probability one (the batched Hessian is block diagonal for a data input, the sum of
    # the per-sample Hessians, each linear in its own g_n, for a parameter).
    hw = ref.hvp(c, key, g, rand_like(tuple(c.inputs[key].shape), gen))
    assert hw.abs().max() == 0, f"{case.op}: d2(g . f)/d{key}^2 != 0 but there is no residual rule for {key}"


# ---- completeness -----------------------------------------------------------------------------------

def test_expected_rules_are_exactly_the_registered_ones():
    """Every rule registered for a non-loss op is listed in EXPECTED, and every listed rule is
    registered: a rule added without a generic test fails here, and so does a lost registration."""
    losses = {name for name, op in registry.OPS.items() if op.is_loss}
    assert set(EXPECTED) == set(registry.OPS) - losses, "every non-loss op needs an EXPECTED entry"
    registered = {(kind, op, key) for kind, table in registry.TABLES.items() for (op, key) in table
                  if op not in losses}
    expected = _expected_triples()
    untested = sorted(f"{op}.{kind.value}[{key}]" for kind, op, key in registered - expected)
    lost = sorted(f"{op}.{kind.value}[{key}]" for kind, op, key in expected - registered)
    assert not untested, f"registered without a generic test (add them to EXPECTED and a case): {untested}"
    assert not lost, f"expected but not registered (lost registration): {lost}"
    # Loss tables hold loss ops only (tests/rules/test_losses.py covers them).
    for kind in (RuleKind.LOSS_GRAD, RuleKind.LOSS_SQRT_HESSIAN, RuleKind.LOSS_SQRT_HESSIAN_MC,
                 RuleKind.LOSS_HESSIAN_DIAG):
        assert {op for op, _ in registry.TABLES[kind]} <= losses


def test_every_expected_rule_is_exercised():
    """Each expected (kind, op, key) is checked by at least one case, with a check for its kind."""
    exercised = {(kind, case.op, key) for case, kind, key in PARAMS}
    generic = {kind for _, kind, _ in GENERIC_PARAMS}
    exercised |= {(kind, "generic", key) for kind in generic for key in generic_op.SLOTS}
    missing = sorted(f"{op}.{kind.value}[{key}]" for kind, op, key in _expected_triples() - exercised)
    assert not missing, f"no case exercises: {missing}"
    assert {kind for kind, _, _ in exercised} <= set(CHECKS) | set(GENERIC_CHECKS)
    # Every derived value has a generic meaning, and some rule reads it.
    for kind, op, key in exercised:
        if kind is DERIVED:
            assert key in ref.DERIVED
            readers = [rule for (o, _), rule in _non_derived_rules() if o == op and key in _reads(rule)]
            assert readers, f"{op}'s derived value {key} is read by no rule"


def _non_derived_rules():
    return [(k, rule) for kind, table in registry.TABLES.items() if kind is not DERIVED for k, rule in table.items()]


def _reads(rule: registry.Rule) -> set[str]:
    """Argument names a rule binds, directly or through the derived values it reads."""
    names = set(rule.context_names(0))
    for name in list(names):
        derived = registry.DERIVED.get((rule.op, name))
        if derived is not None:
            names |= _reads(derived)
    return names


# ---- the generic rule ---------------------------------------------------------------------------------
#
# fxcurv's generic rule (fxcurv.rules.generic) differentiates any call with torch.func; here it meets the
# same independent derivations as the hand-written rules, on calls of every shape it serves: a function,
# a method, a module with parameters (linear and nonlinear in them), several data inputs, an output
# picked from several. Then every hand-written rule is checked against the generic rule itself.

G = generic_op


class GenericContext(OpContext):
    """A generic node's context: its slots, its call, and the tuple of slots its rules read."""

    def bindings(self) -> dict[str, Any]:
        return {**super().bindings(), "inputs": tuple(v for v in self.inputs.values())}


def _scaled_tanh(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``tanh(x w)``: nonlinear in the parameter ``w``."""
    return torch.tanh(x * w)


@dataclass(frozen=True)
class GenericCase:
    """A generic call: ``build() -> (call, slots)``; which slots are data and parameters, and which have
    second derivatives (what the probe must find)."""

    id: str
    build: Callable[[], tuple[G.GenericCall, tuple[torch.Tensor, ...]]]
    data: tuple[int, ...]
    params: tuple[int, ...] = ()
    smooth_data: bool = False
    smooth_params: tuple[int, ...] = ()
    op: str = "generic"
    zero_diagonal: bool = False  # the Hessian's diagonal vanishes (a product of two inputs)


def _call(kind: G.CallKind, target: Any, args: tuple, kinds: str, kwargs: dict | None = None,
          module_params: tuple = (), pick: int | None = None) -> G.GenericCall:
    k = {"d": G.SlotKind.DATA, "p": G.SlotKind.PARAM, "c": G.SlotKind.CONSTANT}
    return G.GenericCall(kind, target, args, kwargs or {}, tuple(k[c] for c in kinds), str(target), module_params,
                         pick)


def _mha() -> tuple[G.GenericCall, tuple[torch.Tensor, ...]]:
    mod = nn.MultiheadAttention(4, 2, batch_first=True).to(DT)
    names = [name for name, _ in mod.named_parameters()]
    call = _call(G.CallKind.MODULE, mod, (G.Slot(0), G.Slot(0), G.Slot(0)), "d" + "p" * len(names),
                 {"need_weights": False}, tuple((n, i + 1) for i, n in enumerate(names)), pick=0)
    return call, (randn(3, 2, 4),) + tuple(p.detach() for p in mod.parameters())


def _layer_norm() -> tuple[G.GenericCall, tuple[torch.Tensor, ...]]:
    mod = nn.LayerNorm(4).to(DT)
    with torch.no_grad():
        mod.weight.normal_()
        mod.bias.normal_()
    call = _call(G.CallKind.MODULE, mod, (G.Slot(0),), "dpp", module_params=(("weight", 1), ("bias", 2)))
    return call, (randn(3, 2, 4), mod.weight.detach(), mod.bias.detach())


F_ = G.CallKind.FUNCTION
GENERIC_CASES = [
    GenericCase("softmax", lambda: (_call(F_, torch.softmax, (G.Slot(0), -1), "d"), (randn(3, 5),)), (0,),
                smooth_data=True),
    GenericCase("product_of_activations", lambda: (_call(F_, torch.mul, (G.Slot(0), G.Slot(1)), "dd"),
                                                   (randn(3, 4), randn(3, 4))), (0, 1), smooth_data=True,
                zero_diagonal=True),
    GenericCase("cat", lambda: (_call(F_, torch.cat, ([G.Slot(0), G.Slot(1)], 1), "dd"),
                                (randn(3, 2), randn(3, 3))), (0, 1)),
    GenericCase("slice", lambda: (_call(F_, operator.getitem, (G.Slot(0), (slice(None), slice(1, 3))), "d"),
                                  (randn(3, 4),)), (0,)),
    GenericCase("mean_method", lambda: (_call(G.CallKind.METHOD, "mean", (G.Slot(0), 1), "d"),
                                        (randn(3, 4, 2),)), (0,)),
    GenericCase("matmul_with_parameter", lambda: (_call(F_, torch.matmul, (G.Slot(0), G.Slot(1)), "dp"),
                                                  (randn(3, 2, 4), randn(4, 3))), (0,), (1,)),
    GenericCase("tanh_of_scaled", lambda: (_call(F_, _scaled_tanh, (G.Slot(0), G.Slot(1)), "dp"),
                                           (randn(3, 4), randn(4))), (0,), (1,), smooth_data=True,
                smooth_params=(1,)),
    GenericCase("layer_norm", _layer_norm, (0,), (1, 2), smooth_data=True),
    # The packed in-projection: q k^T is quadratic in its weight and in its bias (query and key parts).
    GenericCase("multihead_attention", _mha, (0,), (1, 2, 3, 4), smooth_data=True, smooth_params=(1, 2)),
]
GENERIC_BY_ID = {c.id: c for c in GENERIC_CASES}

_DATA_KINDS = (JAC_T, DIAG)
_PARAM_KINDS = (GRAD, PER_SAMPLE, DIAG_SQRT, DIAG_DIAG, BATCH_L2, BATCH_DIAG_SQRT, GRAM)


def _generic_checks(case: GenericCase) -> list[tuple[RuleKind, str]]:
    checks = [(kind, G.SLOTS[i]) for i in case.data for kind in _DATA_KINDS]
    if case.smooth_data:
        checks += [(RESIDUAL, G.SLOTS[i]) for i in case.data if not case.zero_diagonal]
        checks += [(RESIDUAL_SQRT, G.SLOTS[case.data[0]])]
    checks += [(kind, G.SLOTS[i]) for i in case.params for kind in _PARAM_KINDS]
    checks += [(PARAM_RESIDUAL, G.SLOTS[i]) for i in case.smooth_params]
    return checks


GENERIC_PARAMS = [(case, kind, key) for case in GENERIC_CASES for kind, key in _generic_checks(case)]


def generic_context(call: G.GenericCall, slots: tuple[torch.Tensor, ...]) -> GenericContext:
    """The generic node's context; its op seen with this node's slots (data inputs batched, the other
    slots shared by the samples, as the references expect)."""
    names = G.SLOTS[: len(slots)]
    shared = tuple(n for n, k in zip(names, call.kinds) if k is not G.SlotKind.DATA)
    view = dataclasses.replace(registry.OPS["generic"], inputs=names, params=shared)
    return GenericContext(view, dict(zip(names, slots)), {"call": call}, call(*slots))


@functools.cache
def generic_case_context(case_id: str) -> GenericContext:
    torch.manual_seed(zlib.crc32(case_id.encode()))
    call, slots = GENERIC_BY_ID[case_id].build()
    return generic_context(G.probe_curvature(call, slots), slots)


def check_generic_residual(case: Any, c: OpContext, key: str) -> None:
    """The generic residual is the diagonal of the per-sample Hessian (HesScale's term); the whole
    Hessian is carried by the joint factor (``residual_sqrt``)."""
    g = rand_like(tuple(c.out.shape), messages(case.id, f"residual[{key}]"))
    diagonal = torch.diagonal(ref.residual_hessians(c, key, g), dim1=1, dim2=2).reshape(c.inputs[key].shape)
    assert_matches(_rule(RESIDUAL, "generic", key, g, c=c), diagonal, f"residual[{key}] (Hessian diagonal)")


def _joint_hessians(c: OpContext, data: tuple[str, ...], g: torch.Tensor) -> torch.Tensor:
    """Per sample, the Hessian of ``g_n . f`` w.r.t. all data inputs of sample ``n`` jointly, ``[N, D, D]``
    (their flattened concatenation), by reverse over reverse mode on one sample's forward."""
    out = []
    for n in range(c.n):
        values = [c.inputs[k][n] for k in data]
        sizes = [v.numel() for v in values]

        def scalar(flat: torch.Tensor, n: int = n, values: list = values, sizes: list = sizes) -> torch.Tensor:
            parts = torch.split(flat, sizes)
            args = dict(c.inputs)
            for k, part, v in zip(data, parts, values):
                args[k] = part.reshape((1,) + tuple(v.shape))
            shared = {k: v for k, v in args.items() if k not in data}
            shared = {k: (v if c.is_param(k) else v[n:n + 1]) for k, v in shared.items()}
            z = c.op.forward(*[{**args, **shared}[k] for k in c.op.inputs], **c.attrs)
            return (g[n] * z[0]).sum()

        flat = torch.cat([v.reshape(-1) for v in values])
        out.append(torch.func.jacrev(torch.func.jacrev(scalar))(flat))
    return torch.stack(out)


def check_residual_sqrt(case: Any, c: OpContext, key: str) -> None:
    """``sum_k sign_k s_k s_k^T`` of the joint factor is each sample's Hessian over all data inputs."""
    g = rand_like(tuple(c.out.shape), messages(case.id, "residual_sqrt"))
    parts, sign = _rule(RESIDUAL_SQRT, c.op.name, key, g, c=c)
    data = tuple(k for k, v in c.inputs.items() if v is not None and not c.is_param(k) and k not in c.op.constants)
    assert len(parts) == len(c.inputs) and all(p is None for k, p in zip(c.inputs, parts) if k not in data)
    s = torch.cat([parts[list(c.inputs).index(k)].flatten(2) for k in data], dim=2)  # [K, N, D]
    got = torch.einsum("kn,kni,knj->nij", sign, s, s)
    assert_matches(got, _joint_hessians(c, data, g), "residual_sqrt (joint per-sample Hessian)")


def check_param_residual(case: Any, c: OpContext, key: str) -> None:
    """The diagonal of ``d2(sum_n g_n . z_n)/dp^2``, from the batched forward."""
    g = rand_like(tuple(c.out.shape), messages(case.id, f"param_residual[{key}]"))
    f = c.forward(key)
    p = c.inputs[key]
    hess = torch.func.jacrev(torch.func.jacrev(lambda t: (g * f(t)).sum()))(p).reshape(p.numel(), p.numel())
    assert_matches(_rule(PARAM_RESIDUAL, "generic", key, g, c=c), torch.diagonal(hess).reshape(p.shape),
                   f"param_residual[{key}]")


def check_generic_gram(case: Any, c: OpContext, key: str) -> None:
    """ViViT eq. S.23 for one parameter slot, for all of them at once, and added into a total."""
    gen = messages(case.id, f"gram[{key}]")
    s = rand_like((K,) + tuple(c.out.shape), gen)
    want = ref.gram(c, key, s)
    assert_matches(_rule(GRAM, "generic", key, s, c=c, include=(key,)), want, f"gram[{key}]")
    params = tuple(k for k in c.inputs if c.is_param(k))
    both = sum(ref.gram(c, p, s) for p in params)
    total = rand_like(want.shape, gen)
    expected = total + both
    got = _rule(GRAM, "generic", key, s, c=c, include=params, total=total)
    assert got is total, "gram with a total must add into it in place"
    assert_matches(got, expected, f"gram[{','.join(params)}] into a total")


CHECKS[RESIDUAL_SQRT] = check_residual_sqrt  # hand ops with a joint factor (softmax, matmul)
GENERIC_CHECKS = {**CHECKS, RESIDUAL: check_generic_residual, RESIDUAL_SQRT: check_residual_sqrt,
                  PARAM_RESIDUAL: check_param_residual, GRAM: check_generic_gram}


@pytest.mark.parametrize("case, kind, key", GENERIC_PARAMS,
                         ids=[f"generic-{c.id}-{kind.value}[{key}]" for c, kind, key in GENERIC_PARAMS])
def test_generic_rule_matches_generic_derivation(case, kind, key):
    GENERIC_CHECKS[kind](case, generic_case_context(case.id), key)


@pytest.mark.parametrize("case", GENERIC_CASES, ids=[c.id for c in GENERIC_CASES])
def test_generic_probe_finds_the_second_derivatives(case):
    """The probe gives the residual rules to exactly the calls with second derivatives (a linear or
    index map has none), and the parameter residual to the parameters the call is nonlinear in."""
    call = generic_case_context(case.id).attrs["call"]
    assert call.smooth_data == case.smooth_data
    assert call.smooth_params == frozenset(case.smooth_params)


# ---- every hand-written rule equals the generic rule ---------------------------------------------------

_AS_GENERIC = (JAC_T, DIAG, RESIDUAL, GRAD, PER_SAMPLE, DIAG_SQRT, DIAG_DIAG, BATCH_L2, BATCH_DIAG_SQRT,
               RESIDUAL_SQRT)
HAND = [(case, kind, key) for case, kind, key in PARAMS if kind in _AS_GENERIC]


def as_generic(c: OpContext) -> tuple[GenericContext, dict[str, str]]:
    """The op application as a generic call of the op's forward, and the slot of each input."""
    present = [k for k in c.op.inputs if c.inputs.get(k) is not None]
    slot = {k: G.SLOTS[i] for i, k in enumerate(present)}
    args = tuple(G.Slot(present.index(k)) if k in slot else None for k in c.op.inputs)
    kinds = tuple(G.SlotKind.PARAM if c.is_param(k) else G.SlotKind.CONSTANT if k in c.op.constants
                  else G.SlotKind.DATA for k in present)
    call = G.GenericCall(G.CallKind.FUNCTION, c.op.forward, args, dict(c.attrs), kinds, c.op.name)
    slots = tuple(c.inputs[k] for k in present)
    assert all(isinstance(s, torch.Tensor) for s in slots)
    return generic_context(call, slots), slot  # type: ignore[arg-type]


@pytest.mark.parametrize("case, kind, key", HAND, ids=[f"{c.id}-{kind.value}[{key}]" for c, kind, key in HAND])
def test_hand_rule_equals_generic_rule(case, kind, key, monkeypatch):
    """A hand-written rule is an optimization of the generic rule: on random messages they agree."""
    for module, name, value in case.patches:
        monkeypatch.setattr(module, name, value)
    c = context(case.id)
    gc, slot = as_generic(c)
    gen = messages(case.id, f"as_generic/{kind.value}[{key}]")
    if kind in (DIAG_SQRT, BATCH_DIAG_SQRT):
        s, sign = signed_columns(case, c, f"as_generic/{kind.value}[{key}]")
        msgs: tuple[Any, ...] = (s, sign)
    elif kind is PER_SAMPLE:
        msgs = (rand_like((K,) + tuple(c.out.shape), gen),)
    else:
        msgs = (rand_like(tuple(c.out.shape), gen),)
    hand = _rule(kind, case.op, key, *msgs, c=c)
    generic = call_rule(registry.TABLES[kind], "generic", slot[key], *msgs, **gc.bindings())
    if kind is RESIDUAL_SQRT:  # factors are unique up to rotations: compare sum_k sign_k s_k s_k^T
        hand, generic = _signed_outer(*hand), _signed_outer(*generic)
    assert_matches(hand, generic, f"{case.op}.{kind.value}[{key}] vs generic")


def _signed_outer(parts: tuple[torch.Tensor | None, ...], sign: torch.Tensor) -> torch.Tensor:
    """``sum_k sign_k s_k s_k^T`` per sample, ``[N, D, D]``, of a joint factor (its parts side by side)."""
    s = torch.cat([p.flatten(2) for p in parts if p is not None], dim=2)
    return torch.einsum("kn,kni,knj->nij", sign, s, s)


# ---- calls without a hand rule ----------------------------------------------------------------------

def _canonicalize_function(fn: Callable, *args: Any, **kwargs: Any) -> registry.Match | None:
    targs, tkwargs, _ = _trace_args(args, kwargs)
    _, canon = registry.FUNCTION_SOURCES[fn]
    return canon(_Traced(None, targs, fn), registry.Args(targs, tkwargs))


def _canonicalize_with_value(fn: Callable, *args: Any) -> registry.Match | None:
    """As :func:`_canonicalize_function`, with the call's value recorded on its node (canonicalizers that read
    the output's shape)."""
    targs, tkwargs, _ = _trace_args(args, {})
    _, canon = registry.FUNCTION_SOURCES[fn]
    return canon(_Traced(fn(*args), targs, fn), registry.Args(targs, tkwargs))


_NO_HAND_RULE = {
    "tensor_times_tensor": lambda: _canonicalize_function(operator.mul, randn(3, 5), randn(3, 5)),
    "number_over_tensor": lambda: _canonicalize_function(operator.truediv, 2.0, randn(3, 5)),
    "over_zero": lambda: _canonicalize_function(operator.truediv, randn(3, 5), 0.0),
    "broadcasting_sum": lambda: _canonicalize_function(operator.add, randn(3, 5), randn(5)),
    "sum_with_alpha": lambda: _canonicalize_function(torch.add, randn(3, 5), randn(3, 5), alpha=2),
    "tensor_constant": lambda: _canonicalize_function(operator.mul, randn(3, 5), torch.tensor(2.0, dtype=DT)),
    "floor_division": lambda: _canonicalize_function(torch.div, randn(3, 5), 2.0, rounding_mode="floor"),
    "number_to_the_tensor": lambda: _canonicalize_function(operator.pow, 2.0, randn(3, 5)),
    "tensor_exponent": lambda: _canonicalize_function(torch.pow, randn(3, 5), randn(3, 5)),
    # a product with a parameter or a constant is linear in its data: it stays with the generic rule
    "matmul_parameter": lambda: _canonicalize_function(operator.matmul, randn(3, 2, 4), param(4, 3)),
    "parameter_matmul": lambda: _canonicalize_function(torch.matmul, param(2, 3), randn(3, 3, 4)),
    # [N, K] @ [K', J] of two activations mixes samples; broadcasting leading dims
    "matmul_flat": lambda: _canonicalize_function(operator.matmul, randn(3, 4), randn(4, 3)),
    "matmul_broadcast": lambda: _canonicalize_function(torch.matmul, randn(3, 2, 2, 4), randn(3, 1, 4, 3)),
    "matmul_vector": lambda: _canonicalize_function(torch.matmul, randn(3, 2, 4), randn(3, 4)),
    # softmax over the batch axis, with a cast, with the legacy implicit axis
    "softmax_batch_axis": lambda: _canonicalize_function(torch.softmax, randn(3, 5), 0),
    "softmax_cast": lambda: _canonicalize_function(F.softmax, randn(3, 5), dim=1, dtype=torch.float32),
    "softmax_implicit_axis": lambda: _canonicalize_function(F.softmax, randn(3, 5, 2)),
    # permutations that move the batch axis, or none
    "transpose_batch": lambda: _canonicalize_function(torch.transpose, randn(3, 4, 2), 0, 1),
    "permute_batch": lambda: _canonicalize_function(torch.permute, randn(3, 4, 2), (2, 0, 1)),
    "transpose_same_axis": lambda: _canonicalize_function(torch.transpose, randn(3, 4, 2), 1, 1),
    "log_softmax_batch_axis": lambda: _canonicalize_function(F.log_softmax, randn(3, 5), -2),
    # indexing that reads the batch axis, advanced (tensor, boolean) indexing; joins with constants, on the batch
    "index_sample": lambda: _canonicalize_function(operator.getitem, randn(3, 5), 0),
    "index_batch_slice": lambda: _canonicalize_function(operator.getitem, randn(3, 5), (slice(1, None), 2)),
    "index_new_axis_first": lambda: _canonicalize_function(operator.getitem, randn(3, 5), None),
    "index_tensor_batch": lambda: _canonicalize_function(operator.getitem, randn(3, 5), torch.tensor([0, 2])),
    "index_two_tensors": lambda: _canonicalize_function(operator.getitem, randn(3, 5, 2),
                                                        (slice(None), torch.tensor([0, 2]), torch.tensor([1, 0]))),
    "index_traced_tensor": lambda: _canonicalize_function(operator.getitem, randn(3, 5),
                                                          (slice(None), randn(2))),
    "index_bool": lambda: _canonicalize_function(operator.getitem, randn(3, 5), (slice(None), True)),
    "narrow_batch": lambda: _canonicalize_function(torch.narrow, randn(3, 5), 0, 0, 2),
    "select_batch": lambda: _canonicalize_function(torch.select, randn(3, 5), -2, 1),
    "unsqueeze_batch": lambda: _canonicalize_with_value(torch.unsqueeze, randn(3, 5), 0),
    "squeeze_batch_of_one": lambda: _canonicalize_with_value(torch.squeeze, randn(1, 1, 5)),
    "cat_batch": lambda: _canonicalize_function(torch.cat, [randn(3, 5), randn(2, 5)]),
    "cat_parameter": lambda: _canonicalize_function(torch.cat, [randn(3, 5), param(3, 2)], 1),
}


@pytest.mark.parametrize("case", sorted(_NO_HAND_RULE))
def test_arithmetic_without_hand_rule_is_left_to_the_generic_rule(case):
    """Products of two activations, broadcasting sums, tensor constants, ``c / x``, ``2 ** x``: the
    canonicalizer returns ``None`` (the generic rule), never a wrong hand rule."""
    assert _NO_HAND_RULE[case]() is None


def test_sum_of_two_branches_stays_add_and_number_sum_is_affine():
    """``operator.add`` dispatches on its arguments: two traced tensors of one shape are ``add``, a
    tensor and a number ``scalar_affine``."""
    two = _canonicalize_function(operator.add, randn(3, 5), randn(3, 5))
    assert two is not None and two.op is None and set(two.inputs) == {"a", "b"}
    one = _canonicalize_function(operator.add, randn(3, 5), 1.5)
    assert one is not None and one.op is registry.OPS["scalar_affine"] and one.attrs == {"scale": 1.0, "shift": 1.5}
