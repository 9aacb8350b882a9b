"""Convolutions ``Z = W * X + b`` and transposed convolutions over 1, 2 and 3 spatial dimensions
(``nn.Conv1d/2d/3d``, ``F.conv1d/2d/3d``; ``nn.ConvTranspose1d/2d/3d``, ``F.conv_transpose1d/2d/3d``):
HBP Sec. D.2-D.4, HesScale App. B eq. 6-9.

HBP writes the convolution as ``Z = W [[X]] + b 1^T`` with the unfolded input ``[[X]]`` (im2col, an
index map, Sec. D.2), so that it is a linear layer shared over the ``P`` output positions; nothing in
this depends on the number of spatial dimensions, so one set of rules serves ``conv1d``, ``conv2d``
and ``conv3d`` (the dimension is read off the kernel, ``weight.dim() - 2``). Two consequences shape
the rules below:

* messages to the input are transposed convolutions (``J_X^T = [[.]]^T (I_P (x) W)^T``), computed by
  torch's transposed convolution with the square-root columns folded into the batch;
* a sample's parameter Jacobian *sums* over the output positions, so the diagonal of
  ``J_W^T S S^T J_W`` is ``sum_k (J_W^T S_k)^2`` with the square taken *after* that sum. Squaring
  position by position (the Kronecker shortcut of the linear layer) would drop the cross terms between
  output positions, which is exact only for a single output position. The exact route below forms the
  per-sample ``J_W^T S_k`` (``[K, N, *W]``) and squares it.

The HesScale stream ``d`` (a diagonal) needs no such care: for a diagonal ``H_Z`` the squares of the
Jacobian entries suffice (HesScale eq. 8 and 9).

**Transposed convolutions** (``conv_transpose1d/2d/3d``) are the adjoints: with ``C`` the convolution
of stride ``s``, padding ``p``, dilation ``d`` and groups ``G`` whose kernel is the transposed
convolution's weight ``W`` (``[C_in, C_out/G, *k]``, read as a convolution from ``C_out`` to ``C_in``
channels), ``Z = C^T X + b 1^T`` (``output_padding`` only appends output positions that the
convolution's windows do not start from). Hence

* ``J_X^T v = C v``: the convolution of ``v`` with ``W``, cropped to ``X``'s positions, and
  ``(J_X o J_X)^T d`` the convolution of ``d`` with ``W o W``;
* per sample and group, ``J_W^T v = X [[v]]^T``: the roles of input and message swap, ``[[v]]`` being the
  message unfolded by ``C``'s windows (``[C_out/G prod(k), P_X]``, one column per *input* position);
  ``J_W^T S`` is thus formed from the unfolded columns of ``S``, block by block of samples.

Kronecker factors (KFAC, KFLR, KFRA) of a transposed convolution follow BackPACK's convention: ``Z = C^T X``
is also a linear layer shared over *its output* positions, ``Z[:, q] = W' [[X]]^T[:, q]`` with
``W' = weight.transpose(0, 1).reshape(C_out, C_in prod(k))`` and ``[[X]]^T`` the input unfolded by the
transposed convolution (:func:`_unfold_transposed`: ``[[X]]^T[(c, k), q] = X[c, j]`` where input position
``j``'s window puts tap ``k`` on output position ``q``, zero elsewhere). So the factors are the
convolution's, over ``C_out`` and ``C_in prod(k)``, and they split ``weight.transpose(0, 1)``: the op
declares ``kron_layouts = (("weight", KroneckerLayout.TRANSPOSED),)`` and its blocks are matrices over
``weight.reshape(-1)`` all the same (:class:`fxcurv.operators.Kronecker`). Groups are refused, as BackPACK
refuses them. Its Gram matrix (ViViT) is registered.

Every op of the family registers its own copy of the shared rule functions (:func:`_own_copy`): the
registry keys a rule by its function, one function per op.

Configurations the rules do not cover canonicalize to ``None`` (the generic rule takes them):
``padding_mode`` other than ``'zeros'`` and ``padding='same'`` that pads asymmetrically
(``dilation * (kernel - 1)`` odd).
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _ntuple

from .. import gram as gram_products
from ..buffers import fresh
from ..errors import UnsupportedOpError
from ..factors import product_square_norms, signed_column_squares, signed_square_sum
from ..gram import blocked_gram_into, gram_into
from ..operators.kronecker import KroneckerLayout
from ..targets import SampleReduction
from .registry import Match, OpDef, RuleKind, define_op, example

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


# ---- the ops' forwards --------------------------------------------------------------------------

def conv1d(x, weight, bias=None, stride=(1,), padding=(0,), dilation=(1,), groups=1):
    return F.conv1d(x, weight, bias, stride, padding, dilation, groups)


def conv2d(x, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def conv3d(x, weight, bias=None, stride=(1, 1, 1), padding=(0, 0, 0), dilation=(1, 1, 1), groups=1):
    return F.conv3d(x, weight, bias, stride, padding, dilation, groups)


def conv_transpose1d(x, weight, bias=None, stride=(1,), padding=(0,), output_padding=(0,), dilation=(1,),
                     groups=1):
    return F.conv_transpose1d(x, weight, bias, stride, padding, output_padding, groups, dilation)


def conv_transpose2d(x, weight, bias=None, stride=(1, 1), padding=(0, 0), output_padding=(0, 0),
                     dilation=(1, 1), groups=1):
    return F.conv_transpose2d(x, weight, bias, stride, padding, output_padding, groups, dilation)


def conv_transpose3d(x, weight, bias=None, stride=(1, 1, 1), padding=(0, 0, 0), output_padding=(0, 0, 0),
                     dilation=(1, 1, 1), groups=1):
    return F.conv_transpose3d(x, weight, bias, stride, padding, output_padding, groups, dilation)


class ConvKind(Enum):
    """The two op kinds of the family: a convolution, or its adjoint (transposed convolution)."""

    CONV = "conv"
    TRANSPOSED = "conv_transpose"


@dataclass(frozen=True)
class ConvOp:
    """One op of the family: its kind, its number of spatial dimensions and its torch sources."""

    kind: ConvKind
    dims: int
    forward: Callable[..., Any]
    module: type
    function: Callable[..., Any]

    @property
    def name(self) -> str:
        return f"{self.kind.value}{self.dims}d"


FAMILY = (
    ConvOp(ConvKind.CONV, 1, conv1d, nn.Conv1d, F.conv1d),
    ConvOp(ConvKind.CONV, 2, conv2d, nn.Conv2d, F.conv2d),
    ConvOp(ConvKind.CONV, 3, conv3d, nn.Conv3d, F.conv3d),
    ConvOp(ConvKind.TRANSPOSED, 1, conv_transpose1d, nn.ConvTranspose1d, F.conv_transpose1d),
    ConvOp(ConvKind.TRANSPOSED, 2, conv_transpose2d, nn.ConvTranspose2d, F.conv_transpose2d),
    ConvOp(ConvKind.TRANSPOSED, 3, conv_transpose3d, nn.ConvTranspose3d, F.conv_transpose3d),
)


# ---- the shared rules, collected by kind and registered per op at the end of the file -----------

@dataclass(frozen=True)
class _RuleSpec:
    kind: RuleKind
    keys: tuple[str, ...]
    fn: Callable[..., Any]
    fusion: dict[str, Any] = field(default_factory=dict)


_RULES: dict[ConvKind, list[_RuleSpec]] = {kind: [] for kind in ConvKind}
_BOTH = tuple(ConvKind)


def _rule(kind: RuleKind, *keys: str, ops: tuple[ConvKind, ...] = (ConvKind.CONV,),
          **fusion: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Collect ``fn`` as the ``kind`` rule for ``keys`` of every op of the kinds ``ops``."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        for op_kind in ops:
            _RULES[op_kind].append(_RuleSpec(kind, keys, fn, dict(fusion)))
        return fn

    return deco


def _own_copy(fn: Callable[..., Any], op_name: str) -> Callable[..., Any]:
    """A new function object with ``fn``'s code, signature and docstring, named ``<op>_<fn>``: the
    registry and the listing key a rule by its function, so each op of the family registers its own
    copy of the shared rule (no wrapper: the copy costs nothing per call)."""
    assert isinstance(fn, types.FunctionType)
    name = f"{op_name}_{fn.__name__.removeprefix('transposed_')}"
    copy = types.FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__doc__ = fn.__doc__
    copy.__qualname__ = name
    copy.__module__ = fn.__module__
    copy.__annotations__ = dict(fn.__annotations__)
    return copy


# ---- canonicalization ---------------------------------------------------------------------------

def _shape_of(value):
    """The shape of a traced value (fx node with an example value) or a tensor; ``None`` if unknown."""
    val = example(value)
    return None if val is None else tuple(val.shape)


def _resolve_padding(op: ConvOp, padding, kernel_shape, dilation) -> tuple[int, ...] | None:
    """Explicit symmetric padding for ``padding`` given as ints or as ``'valid'``/``'same'``; ``None``
    where ``'same'`` pads asymmetrically (``dilation * (kernel - 1)`` odd: torch pads one more at the
    end), which the rules (unfold, transposed convolution) do not take."""
    if not isinstance(padding, str):
        return _ntuple(op.dims)(padding)
    if padding == "valid":
        return (0,) * op.dims
    if padding != "same":
        raise UnsupportedOpError(f"padding={padding!r} is not a {op.name} padding; use ints, 'valid' or 'same'")
    if kernel_shape is None:
        raise UnsupportedOpError("padding='same' needs the kernel's shape, which is unknown here; "
                                 "pass explicit integer padding")
    totals = [d * (k - 1) for k, d in zip(kernel_shape[2:], dilation)]
    if any(t % 2 for t in totals):
        return None
    return tuple(t // 2 for t in totals)


def _check_batched(op: ConvOp, x) -> None:
    x_shape = _shape_of(x)
    if x_shape is not None and len(x_shape) != 2 + op.dims:
        raise UnsupportedOpError(
            f"{op.name} of an input with shape {x_shape}: fxcurv takes batched inputs [N, C, *spatial] with "
            f"{op.dims} spatial dims (dim 0 is the batch); add a batch dimension to unbatched inputs")


def _canonical(op: ConvOp, x, weight, bias, stride, padding, dilation, groups) -> Match | None:
    _check_batched(op, x)
    tup = _ntuple(op.dims)
    dilation = tup(dilation)
    resolved = _resolve_padding(op, padding, _shape_of(weight), dilation)
    if resolved is None:
        return None
    attrs = {"stride": tup(stride), "padding": resolved, "dilation": dilation, "groups": int(groups)}
    return Match({"x": x, "weight": weight, "bias": bias}, attrs)


def _output_padding_from_shapes(op: ConvOp, x, weight, out, stride, padding, dilation) -> tuple[int, ...] | None:
    """The output padding a transposed convolution applied, from its input, kernel and output shapes
    (``output_size=`` passed to the module); ``None`` where a shape is unknown."""
    shapes = _shape_of(x), _shape_of(weight), _shape_of(out)
    if any(s is None for s in shapes):
        return None
    xs, ws, zs = shapes
    assert xs is not None and ws is not None and zs is not None
    return tuple(zs[2 + i] - ((xs[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (ws[2 + i] - 1) + 1)
                 for i in range(op.dims))


def _canonical_transposed(op: ConvOp, node, x, weight, bias, stride, padding, output_padding, groups, dilation,
                          output_size=None) -> Match | None:
    _check_batched(op, x)
    tup = _ntuple(op.dims)
    stride, padding, dilation = tup(stride), tup(padding), tup(dilation)
    if output_size is not None:
        found = _output_padding_from_shapes(op, x, weight, node, stride, padding, dilation)
        if found is None:
            return None
        output_padding = found
    attrs = {"stride": stride, "padding": padding, "output_padding": tup(output_padding), "dilation": dilation,
             "groups": int(groups)}
    return Match({"x": x, "weight": weight, "bias": bias}, attrs)


def _module_canonicalizer(op: ConvOp) -> Callable[..., Match | None]:
    def canonicalize(node, mod):
        if mod.padding_mode != "zeros":
            return None  # reflect / replicate / circular padding: the generic rule
        if op.kind is ConvKind.CONV:
            return _canonical(op, node.args[0], mod.weight, mod.bias, mod.stride, mod.padding, mod.dilation,
                              mod.groups)
        output_size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return _canonical_transposed(op, node, node.args[0], mod.weight, mod.bias, mod.stride, mod.padding,
                                     mod.output_padding, mod.groups, mod.dilation, output_size)

    return canonicalize


def _function_canonicalizer(op: ConvOp) -> Callable[..., Match | None]:
    def canonicalize(node, a):
        if op.kind is ConvKind.CONV:
            return _canonical(op, a(0, "input"), a(1, "weight"), a(2, "bias", None), a(3, "stride", 1),
                              a(4, "padding", 0), a(5, "dilation", 1), a(6, "groups", 1))
        return _canonical_transposed(op, node, a(0, "input"), a(1, "weight"), a(2, "bias", None), a(3, "stride", 1),
                                     a(4, "padding", 0), a(5, "output_padding", 0), a(6, "groups", 1),
                                     a(7, "dilation", 1))

    return canonicalize


# ---- derived quantities -------------------------------------------------------------------------

@_rule(RuleKind.DERIVED, "weight_sq", ops=_BOTH, pointwise=True, squares="weight")
def weight_sq(weight):
    return weight * weight


@_rule(RuleKind.DERIVED, "x_sq", ops=_BOTH, pointwise=True)
def x_sq(x):
    return x * x


@_rule(RuleKind.DERIVED, "x_cols")
def x_cols(x, weight, stride, padding, dilation, groups):
    """The unfolded input ``[[X]]`` (HBP Sec. D.3), ``[N, groups, C_in/groups * prod(k), P]``; shared by
    every square-root factor origin that reaches the weight."""
    return _unfold(x, weight.shape, stride, padding, dilation, groups)


@_rule(RuleKind.DERIVED, "x_cols", ops=(ConvKind.TRANSPOSED,))
def transposed_x_cols(x, weight, stride, padding, output_padding, dilation, groups):
    """The input unfolded by the transposed convolution ``Z = C^T X``, ``[N, 1, C_in prod(k), P_Z]``
    (:func:`_unfold_transposed`): the Kronecker input factor's patches (read by no other rule). Groups are
    refused here, as by the Kronecker rules (:func:`_check_ungrouped`)."""
    _check_ungrouped(groups)
    return _unfold_transposed(x, weight.shape, stride, padding, output_padding, dilation)


def _unfold_transposed(x, weight_shape, stride, padding, output_padding, dilation) -> torch.Tensor:
    """``[[X]]^T`` for ``Z = C^T X`` (groups 1): ``[N, 1, C_in prod(k), P_Z]`` with
    ``Z[n, o, q] = sum_{c,k} W[c, o, k] [[X_n]]^T[(c, k), q]``, rows channel-major then kernel taps in the
    kernel's order, columns ``Z``'s positions (``output_padding`` included).

    A transposed convolution is the stride-1 convolution, with the flipped kernel, of the input dilated
    by ``s`` (``s - 1`` zeros between entries) and padded by ``d (k - 1) - p`` on each side (``+ op`` at
    the end): output position ``q`` meets dilated position ``q + d m`` at flipped tap ``m = k - 1 - t``,
    which is input ``j`` with ``j s - p + d t = q``. So ``[[X]]^T`` is :func:`_unfold` of that dilated,
    padded input with the taps reversed (negative padding crops)."""
    d = len(weight_shape) - 2
    kernel = tuple(weight_shape[2:])
    n, c = x.shape[:2]
    if any(step > 1 for step in stride):
        spread = x.new_zeros((n, c) + tuple((length - 1) * step + 1 for length, step in zip(x.shape[2:], stride)))
        spread[(slice(None), slice(None)) + tuple(slice(None, None, step) for step in stride)] = x
        x = spread
    pads = []
    for i in reversed(range(d)):
        edge = dilation[i] * (kernel[i] - 1) - padding[i]
        pads += [edge, edge + output_padding[i]]
    x = F.pad(x, pads)
    cols = _unfold(x, weight_shape, (1,) * d, (0,) * d, dilation, 1)  # [N, 1, C_in prod(k), P_Z]
    flipped = cols.reshape((n, c) + kernel + (-1,)).flip(tuple(range(2, 2 + d)))
    return flipped.reshape(n, 1, c * math.prod(kernel), -1)


def _unfold(x, weight_shape, stride, padding, dilation, groups, positions=None):
    """``[[X]]`` as ``[N, groups, C/groups * prod(k), P]``, rows channel-major like ``F.unfold``, for
    ``x [N, C, *spatial]`` and a kernel of spatial size ``weight_shape[2:]``; ``positions``: keep the
    first of each spatial dimension's window positions only (a transposed convolution's
    ``output_padding`` can leave windows past its input).

    Built from strided views of the padded input and one copy: on the CPU this is several times
    faster than ``F.unfold``'s im2col (measured 0.5 vs 8.9 ms for the c3d3's first layer, N=128).
    """
    kernel = tuple(weight_shape[2:])
    d = len(kernel)
    if any(padding):
        x = F.pad(x, [p for p in reversed(padding) for _ in range(2)])
    windows = x
    for i in range(d):
        windows = windows.unfold(2 + i, dilation[i] * (kernel[i] - 1) + 1, stride[i])  # [N, C, *Y, *span]
    windows = windows[(Ellipsis,) + tuple(slice(None, None, step) for step in dilation)]
    if positions is not None:
        windows = windows[(slice(None), slice(None)) + tuple(slice(0, length) for length in positions)]
    n, c = windows.shape[:2]
    ys = windows.shape[2:2 + d]
    order = (0, 1) + tuple(range(2 + d, 2 + 2 * d)) + tuple(range(2, 2 + d))
    return windows.permute(order).reshape(n, groups, (c // groups) * math.prod(kernel), math.prod(ys))


# ---- messages to the input ----------------------------------------------------------------------

def _conv_transpose(v, x, kernel, stride, padding, dilation, groups):
    """``J_X^T v`` of a convolution for ``v [*lead, N, C_out, *Y]`` with ``kernel`` in place of ``W``.

    Leading dims fold into the batch; the output padding restores ``x``'s spatial size (strided
    convolutions lose the remainder of the last window).
    """
    d = kernel.dim() - 2
    batch = v.shape[:v.dim() - 1 - d]
    flat = v.reshape((-1,) + tuple(v.shape[v.dim() - 1 - d:]))
    # The transposed convolution maps Y back to (Y - 1) * stride - 2 * padding + span; a strided
    # convolution dropped the remainder of the last window, which output_padding restores.
    out_padding = tuple(
        x.shape[2 + i]
        - ((v.shape[v.dim() - d + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (kernel.shape[2 + i] - 1) + 1)
        for i in range(d))
    # the transposed convolution: measured 10-15% faster than aten's convolution_backward on this CPU.
    out = _CONV_TRANSPOSE[d](flat, kernel, None, stride, padding, out_padding, groups, dilation)
    return out.reshape(batch + tuple(x.shape[1:]))


def _conv_adjoint(v, x, kernel, stride, padding, dilation, groups):
    """``J_X^T v`` of a transposed convolution for ``v [*lead, N, C_out, *Z]``: the convolution of every
    column with ``kernel``, cropped to ``x``'s positions (an ``output_padding`` of at least the stride
    leaves window positions past them)."""
    d = kernel.dim() - 2
    batch = v.shape[:v.dim() - 1 - d]
    flat = v.reshape((-1,) + tuple(v.shape[v.dim() - 1 - d:]))
    out = _CONV[d](flat, kernel, None, stride, padding, dilation, groups)
    if tuple(out.shape[2:]) != tuple(x.shape[2:]):
        out = out[(slice(None), slice(None)) + tuple(slice(0, length) for length in x.shape[2:])]
    return out.reshape(batch + tuple(x.shape[1:]))


@_rule(RuleKind.JAC_T, "x", fresh=True)
def jac_t_x(v, x, weight, stride, padding, dilation, groups):
    """HBP Sec. D.4 (with eq. S.8a for ``Z = W [[X]]`` and D.2 for the unfold): ``J_X^T v``, the
    transposed convolution of every column of ``v``; HesScale eq. 6 for the gradient."""
    return _conv_transpose(v, x, weight, stride, padding, dilation, groups)


@_rule(RuleKind.DIAG, "x", fresh=True)
def diag_x(d, x, weight_sq, stride, padding, dilation, groups):
    """HesScale eq. 8 (first term): ``d_X = (J_X o J_X)^T d``, the transposed convolution of ``d``
    with the squared kernel; the cross terms between output positions are dropped."""
    return _conv_transpose(d, x, weight_sq, stride, padding, dilation, groups)


@_rule(RuleKind.JAC_T, "x", ops=(ConvKind.TRANSPOSED,), fresh=True)
def transposed_jac_t_x(v, x, weight, stride, padding, dilation, groups):
    """``J_X^T v = C v`` for ``Z = C^T X`` (the adjoint of HBP Sec. D.4's ``J_X^T``): the convolution of
    every column of ``v`` with the weight."""
    return _conv_adjoint(v, x, weight, stride, padding, dilation, groups)


@_rule(RuleKind.DIAG, "x", ops=(ConvKind.TRANSPOSED,), fresh=True)
def transposed_diag_x(d, x, weight_sq, stride, padding, dilation, groups):
    """HesScale eq. 8 (first term) for ``Z = C^T X``: ``(J_X o J_X)^T d``, the convolution of ``d`` with
    the squared weight (``J_X = C^T`` has the entries of ``W``)."""
    return _conv_adjoint(d, x, weight_sq, stride, padding, dilation, groups)


# ---- parameters ---------------------------------------------------------------------------------

def _weight_vjp(g, x, weight, stride, padding, dilation, groups, output_padding=None):
    """``sum_n J_W,n^T g_n`` by aten's convolution backward; ``output_padding`` given: of the transposed
    convolution. Only the kernel's shape is read."""
    like = g.new_empty(()).expand(weight.shape)
    transposed = output_padding is not None
    return torch.ops.aten.convolution_backward(
        g, x, like, None, list(stride), list(padding), list(dilation), transposed,
        list(output_padding) if transposed else [0] * (weight.dim() - 2), groups, [False, True, False])[1]


def _position_dims(v: torch.Tensor, stride) -> tuple[int, ...]:
    """The spatial (position) dims of a message ``v [*lead, N, C, *spatial]``."""
    return tuple(range(v.dim() - len(stride), v.dim()))


# Elements of one block of per-sample products in sample_reductions: small enough that squaring
# and summing a block reads it from cache (measured on the c3d3's convolutions: 1-2x faster than
# blocks of _BLOCK_ELEMENTS, where the products' memory traffic dominates).
_SAMPLE_BLOCK_ELEMENTS = 1 << 20


def sample_reductions(v, reduces, x, weight, stride, padding, dilation, groups):
    """Several reductions of the per-sample weight products ``J_W,n^T v_n = v_n [[X_n]]^T`` (HBP Sec. D.4)
    from one pass over them, block by block of samples: ``"sum"`` (the gradient, HesScale eq. 7),
    ``"squares"`` (``sum_n (J_W,n^T v_n)^2``) and ``"norms"`` (``|J_W,n^T v_n|^2``, ``[N]``), in the order of
    ``reduces``. What the fusion pass puts in place of the rules declaring them (:class:`SampleReduction`)
    when a program asks for more than one: the products are formed once instead of once per rule, and
    each block unfolds its own samples (no ``[[X]]`` of the whole batch)."""
    n = v.shape[0]
    g, o = groups, weight.shape[0] // groups
    v_cols = v.reshape(n, g, o, -1).transpose(2, 3)  # [N, G, P, O], a view
    i, p = weight[0].numel(), v_cols.shape[2]
    if "squares" not in reduces and p * (o + i) < o * i:
        # Few output positions: the norms by Gram matrices (batch_l2_weight's route) and the
        # gradient by the convolution's backward cost less than forming the products.
        cols = _unfold(x, weight.shape, stride, padding, dilation, groups)
        found = {"sum": lambda: grad_weight(v, x, weight, stride, padding, dilation, groups),
                 "norms": lambda: batch_l2_weight(v, cols, weight, groups)}
        return tuple(found[r]() for r in reduces)
    total = v.new_zeros(g, i, o) if "sum" in reduces else None
    squares = v.new_zeros(g, i, o) if "squares" in reduces else None
    norms = v.new_empty(n) if "norms" in reduces else None
    block = max(1, _SAMPLE_BLOCK_ELEMENTS // max(1, g * o * max(i, p)))
    for start in range(0, n, block):
        stop = min(n, start + block)
        cols = _unfold(x[start:stop], weight.shape, stride, padding, dilation, groups)  # [b, G, I, P]
        prod = torch.matmul(cols, v_cols[start:stop])  # [b, G, I, O]
        if total is not None:
            total += prod.sum(0)
        if squares is not None or norms is not None:
            prod.square_()
            if norms is not None:
                norms[start:stop] = prod.sum((1, 2, 3))
            if squares is not None:
                squares += prod.sum(0)
    results = {"sum": total, "squares": squares, "norms": norms}
    out = []
    for r in reduces:
        value = results[r]
        assert value is not None
        out.append(value if r == "norms" else value.transpose(1, 2).reshape(weight.shape))
    return tuple(out)


@_rule(RuleKind.GRAD, "weight", sample_reduction=SampleReduction("sum", sample_reductions))
def grad_weight(g, x, weight, stride, padding, dilation, groups):
    """HesScale eq. 7: ``dL/dW`` sums ``g`` times the input patch over output positions and samples."""
    return _weight_vjp(g, x, weight, stride, padding, dilation, groups)


@_rule(RuleKind.GRAD, "weight", ops=(ConvKind.TRANSPOSED,))
def transposed_grad_weight(g, x, weight, stride, padding, output_padding, dilation, groups):
    """``dL/dW = sum_n X_n [[g_n]]^T`` per group for ``Z = C^T X`` (HesScale eq. 7 with the roles of input
    and message swapped), by the transposed convolution's backward."""
    return _weight_vjp(g, x, weight, stride, padding, dilation, groups, output_padding)


@_rule(RuleKind.GRAD, "bias", ops=_BOTH)
def grad_bias(g):
    """HBP Sec. D.4 (bias): ``J_b = 1_P (x) I``, a sum over output positions (and samples).

    Positions first, over the contiguous inner dims, then samples: torch's one reduction over the
    non-adjacent dims ``(0, 2, 3)`` took 6x as long (6 ms against 1 ms for c3d3's ``[128, 64, 28, 28]``,
    one thread)."""
    return g.sum(dim=tuple(range(2, g.dim()))).sum(0) if g.dim() > 2 else g.sum(0)


@_rule(RuleKind.DIAG_DIAG, "weight")
def diag_diag_weight(d, x_sq, weight, stride, padding, dilation, groups):
    """HesScale eq. 9: ``d_W = sum_{n,p} d[n, p] [[X]]^2[n, :, p]``, the weight VJP of ``d`` with the
    squared input. Exact for a diagonal ``H_Z``: ``(J_W^T diag(d) J_W)_ii = sum_j d_j J_ji^2``."""
    return _weight_vjp(d, x_sq, weight, stride, padding, dilation, groups)


@_rule(RuleKind.DIAG_DIAG, "weight", ops=(ConvKind.TRANSPOSED,))
def transposed_diag_diag_weight(d, x_sq, weight, stride, padding, output_padding, dilation, groups):
    """HesScale eq. 9 for ``Z = C^T X``: each entry of ``J_W`` is an entry of ``X`` (or zero), so
    ``(J_W o J_W)^T d`` is the weight VJP of ``d`` with the squared input."""
    return _weight_vjp(d, x_sq, weight, stride, padding, dilation, groups, output_padding)


@_rule(RuleKind.DIAG_DIAG, "bias", ops=_BOTH)
def diag_diag_bias(d):
    """HesScale eq. 9 for the bias (``J_b`` entries are 0/1): ``d`` summed over samples and space."""
    return d.sum(dim=(0,) + tuple(range(2, d.dim())))


def _per_sample_from_cols(v, cols, weight_shape, groups):
    """``[*lead, N, *W]`` from ``v [*lead, N, C_out, *Y]`` and ``cols = [[X]]`` (grouped)."""
    batch = v.shape[:v.dim() - 1 - (len(weight_shape) - 2)]
    vg = v.reshape(batch + (groups, weight_shape[0] // groups, -1))
    # The sum over output positions p happens inside the contraction, before any square is taken; the
    # result, N kernels, goes into one fresh buffer with huge pages advised (fxcurv.buffers).
    out = fresh(vg.shape[:-1] + (cols.shape[-2],), torch.result_type(vg, cols), vg.device)
    return torch.matmul(vg, cols.mT, out=out).reshape(batch + tuple(weight_shape))


@_rule(RuleKind.PER_SAMPLE, "weight")
def per_sample_weight(v, x, weight, stride, padding, dilation, groups):
    """HBP Sec. D.4 (weight): per-sample ``J_W^T v = v [[X]]^T``, ``[*lead, N, *W]``, summed over the
    output positions."""
    cols = _unfold(x, weight.shape, stride, padding, dilation, groups)
    return _per_sample_from_cols(v, cols, weight.shape, groups)


@_rule(RuleKind.PER_SAMPLE, "bias", ops=_BOTH)
def per_sample_bias(v, stride):
    """HBP Sec. D.4 (bias): per-sample ``(1_P (x) I)^T v``, ``[*lead, N, C_out]``."""
    return v.sum(dim=_position_dims(v, stride))


# Elements of one block of per-sample weight factors: bounds the memory of the exact diagonal
# (the c3d3's third convolution has 141M entries [K, N, *W] at N=128) at a few blocks' worth, and
# keeps blocks (16 MB in float32) under glibc's largest mmap threshold, so that freed blocks are
# recycled instead of returned to the OS and faulted in again.
_BLOCK_ELEMENTS = 1 << 22


def _signed_squared_products(S, sign, x_cols, weight, groups) -> Iterator[tuple[slice, torch.Tensor]]:
    """``sign[k, n] (J_W,n^T S[k, n])^2`` (HBP Sec. D.4: ``J_W,n^T S_kn = S_kn [[X_n]]^T``, per group, summed
    over positions before squaring) for a block of samples at a time: ``(rows, [b, G, I, K, O])``, the
    rows of the batch the block holds, so that the full ``[K, N, *W]`` tensor never exists.

    Per sample and group, ``J_W^T S`` for all ``K`` columns is one GEMM ``[I, P] @ [P, K*O]``, run as
    batched GEMMs over the block and squared in place. Each block's tensor is new: the caller may keep it.
    """
    k, n = S.shape[0], S.shape[1]
    g, o, i = groups, weight.shape[0] // groups, x_cols.shape[2]
    p = x_cols.shape[3]
    d = weight.dim() - 2
    # Per sample block, one copy of the message (even a crop's strided view) into [b, G, P, K*O];
    # each product is then [[X]] [I, P] @ S [P, K*O] with both operands in their natural layout
    # (measured up to 22% faster on this CPU than S @ [[X]]^T when I is small, e.g. I = 75 in the
    # c3d3's first conv). Blocks small enough for malloc to recycle avoid fresh page faults.
    s_view = S.unflatten(2, (g, o)).permute((1, 2) + tuple(range(4, 4 + d)) + (0, 3))  # [N, G, *Y, K, O], a view
    w = None if sign is None else sign.T.reshape(n, 1, 1, k, 1).to(S.dtype)
    block = max(1, _BLOCK_ELEMENTS // max(1, g * k * o * max(i, p)))
    for start in range(0, n, block):
        stop = min(n, start + block)
        prod = torch.matmul(x_cols[start:stop], s_view[start:stop].reshape(stop - start, g, p, k * o))
        prod = prod.square_().reshape(stop - start, g, i, k, o)  # [b, G, I, K, O]
        if w is not None:
            prod.mul_(w[start:stop])
        yield slice(start, stop), prod


@_rule(RuleKind.DIAG_SQRT, "weight", sample_reduction=SampleReduction("squares", sample_reductions))
def diag_sqrt_weight(S, sign, x_cols, weight, groups):
    """``diag(sum_k sign_k J_W^T S_k S_k^T J_W)`` (HBP Sec. D.4, ``H_W`` from ``H_Z``) as
    ``sum_{k,n} sign[k, n] (J_W^T S[k, n])^2`` with the per-sample ``J_W^T`` summing over positions
    before squaring: exact for every output size. The squared products are reduced block by block
    of samples (:func:`_signed_squared_products`)."""
    total = S.new_zeros(groups, x_cols.shape[2], S.shape[0], weight.shape[0] // groups)  # [G, I, K, O]
    for _, prod in _signed_squared_products(S, sign, x_cols, weight, groups):
        total += prod.sum(0)
    return total.sum(2).transpose(1, 2).reshape(weight.shape)


@_rule(RuleKind.DIAG_SQRT, "bias", ops=_BOTH)
def diag_sqrt_bias(S, sign, stride):
    """HBP Sec. D.4 (bias): ``diag((1_P (x) I)^T H_B (1_P (x) I))`` from the columns, summed over
    positions before squaring."""
    per_sample = per_sample_bias(S, stride)
    return signed_square_sum(per_sample, sign, per_sample.dim() - 2)


# ---- per-sample reductions (BackPACK's first-order and per-sample quantities) -------------------

@_rule(RuleKind.BATCH_L2, "weight", sample_reduction=SampleReduction("norms", sample_reductions))
def batch_l2_weight(g, x_cols, weight, groups):
    """``|J_W,n^T g_n|^2`` per sample (HBP Sec. D.4: ``J_W,n^T g_n = g_n [[X_n]]^T``, per group) without
    the ``[N, *W]`` per-sample gradients: by the Gram matrices over output positions,
    ``sum_{p,q} (g_p . g_q)([[x]]_p . [[x]]_q)``, or block by block from the products, whichever is cheaper
    (:func:`fxcurv.factors.product_square_norms`)."""
    n = g.shape[0]
    i, p = x_cols.shape[2], x_cols.shape[3]
    a = g.reshape(n * groups, weight.shape[0] // groups, p)
    norms = product_square_norms(a, x_cols.reshape(n * groups, i, p), _BLOCK_ELEMENTS)
    return norms.reshape(n, groups).sum(1)


@_rule(RuleKind.BATCH_L2, "bias", ops=_BOTH)
def batch_l2_bias(g, stride):
    """``|J_b,n^T g_n|^2 = |sum_p g_np|^2`` per sample (HBP Sec. D.4, bias)."""
    per_sample = per_sample_bias(g, stride)
    return (per_sample * per_sample).sum(-1)


@_rule(RuleKind.BATCH_DIAG_SQRT, "weight")
def batch_diag_sqrt_weight(S, sign, x_cols, weight, groups):
    """``sum_k sign_kn (J_W,n^T S_kn)^2`` per sample, ``[N, *W]``: :func:`diag_sqrt_weight` before its
    sum over samples, with the per-sample products (summed over positions, then squared) formed block by
    block (:func:`_signed_squared_products`) so that ``[K, N, *W]`` never exists."""
    n = S.shape[1]
    out = S.new_empty(n, groups, weight.shape[0] // groups, x_cols.shape[2])  # [N, G, O, I]
    for rows, prod in _signed_squared_products(S, sign, x_cols, weight, groups):
        out[rows] = prod.sum(3).transpose(2, 3)
    return out.reshape((n,) + tuple(weight.shape))


@_rule(RuleKind.BATCH_DIAG_SQRT, "bias", ops=_BOTH)
def batch_diag_sqrt_bias(S, sign, stride):
    """``sum_k sign_kn (J_b,n^T S_kn)^2`` per sample (HBP Sec. D.4, bias): positions summed, then squared."""
    return signed_column_squares(per_sample_bias(S, stride), sign)


# ---- the transposed convolution's per-sample weight products ------------------------------------

def _transposed_products(v, x, weight, stride, padding, dilation, groups) -> torch.Tensor:
    """``J_W,n^T v_n = X_n [[v_n]]^T`` per group for ``Z = C^T X`` and messages ``v [*lead, N, C_out, *Z]``:
    ``[*lead, N, G, C_in/G, C_out/G prod(k)]``, ``[[v]]`` unfolded by ``C``'s windows at ``X``'s positions.
    (``dZ[o, q] / dW[i, o, k] = X[i, j]`` where the window of input position ``j`` puts kernel tap ``k`` on
    output position ``q``: the sum over ``j`` is that of a convolution's weight gradient.)"""
    d = weight.dim() - 2
    n = x.shape[0]
    batch = v.shape[:v.dim() - 2 - d]
    flat = v.reshape((-1,) + tuple(v.shape[v.dim() - 1 - d:]))
    cols = _unfold(flat, weight.shape, stride, padding, dilation, groups, positions=x.shape[2:])
    cols = cols.reshape((-1, n) + tuple(cols.shape[1:]))  # [L, N, G, I', P]
    xg = x.reshape(n, groups, x.shape[1] // groups, -1)  # [N, G, C_in/G, P]
    out = torch.matmul(xg, cols.transpose(-1, -2))  # [L, N, G, C_in/G, I']
    return out.reshape(batch + tuple(out.shape[1:]))


def _transposed_blocks(S, x, weight, stride, padding, dilation, groups) -> Iterator[tuple[slice, torch.Tensor]]:
    """:func:`_transposed_products` of ``S [K, N, ...]`` a block of samples at a time:
    ``(rows, [K, b, G, C_in/G, I'])``, each block's tensor new."""
    k, n = S.shape[0], S.shape[1]
    i_out = weight[0].numel()
    per_sample = k * groups * max(i_out * math.prod(x.shape[2:]), (x.shape[1] // groups) * i_out)
    block = max(1, _BLOCK_ELEMENTS // max(1, per_sample))
    for start in range(0, n, block):
        stop = min(n, start + block)
        yield slice(start, stop), _transposed_products(S[:, start:stop], x[start:stop], weight, stride, padding,
                                                       dilation, groups)


def _signed(prod: torch.Tensor, sign, rows: slice) -> torch.Tensor:
    """``sign[k, n] prod[k, n]^2`` in place, for a block ``prod [K, b, ...]`` of the samples ``rows``."""
    prod.square_()
    if sign is not None:
        s = sign[:, rows].to(prod.dtype)
        prod.mul_(s.reshape(s.shape + (1,) * (prod.dim() - 2)))
    return prod


@_rule(RuleKind.PER_SAMPLE, "weight", ops=(ConvKind.TRANSPOSED,))
def transposed_per_sample_weight(v, x, weight, stride, padding, dilation, groups):
    """Per-sample ``J_W^T v = X [[v]]^T`` (per group) for ``Z = C^T X``, ``[*lead, N, *W]``."""
    out = _transposed_products(v, x, weight, stride, padding, dilation, groups)
    return out.reshape(out.shape[:-3] + tuple(weight.shape))


@_rule(RuleKind.DIAG_SQRT, "weight", ops=(ConvKind.TRANSPOSED,))
def transposed_diag_sqrt_weight(S, sign, x, weight, stride, padding, dilation, groups):
    """``sum_{k,n} sign[k, n] (J_W,n^T S[k, n])^2`` for ``Z = C^T X`` (the per-sample products summed over
    positions, then squared), block by block of samples."""
    total = S.new_zeros(weight.shape[0], weight[0].numel())  # [C_in, C_out/G prod(k)]
    for rows, prod in _transposed_blocks(S, x, weight, stride, padding, dilation, groups):
        total += _signed(prod, sign, rows).sum((0, 1)).reshape(total.shape)
    return total.reshape(weight.shape)


@_rule(RuleKind.BATCH_DIAG_SQRT, "weight", ops=(ConvKind.TRANSPOSED,))
def transposed_batch_diag_sqrt_weight(S, sign, x, weight, stride, padding, dilation, groups):
    """``sum_k sign_kn (J_W,n^T S_kn)^2`` per sample for ``Z = C^T X``, ``[N, *W]``, block by block."""
    n = S.shape[1]
    out = S.new_empty((n,) + tuple(weight.shape))
    for rows, prod in _transposed_blocks(S, x, weight, stride, padding, dilation, groups):
        out[rows] = _signed(prod, sign, rows).sum(0).reshape((-1,) + tuple(weight.shape))
    return out


@_rule(RuleKind.BATCH_L2, "weight", ops=(ConvKind.TRANSPOSED,))
def transposed_batch_l2_weight(g, x, weight, stride, padding, dilation, groups):
    """``|J_W,n^T g_n|^2 = |X_n [[g_n]]^T|^2`` per sample (per group, summed) for ``Z = C^T X``, by the Gram
    matrices over input positions or the products, whichever is cheaper
    (:func:`fxcurv.factors.product_square_norms`)."""
    n = g.shape[0]
    cols = _unfold(g, weight.shape, stride, padding, dilation, groups, positions=x.shape[2:])  # [N, G, I', P]
    p = cols.shape[-1]
    a = x.reshape(n * groups, x.shape[1] // groups, p)
    norms = product_square_norms(a, cols.reshape(n * groups, -1, p), _BLOCK_ELEMENTS)
    return norms.reshape(n, groups).sum(1)


# ---- ViViT's Gram matrix --------------------------------------------------------------------------

# Which route gram takes for the weight: None picks the cheaper by its flop count; "factors" or
# "positions" force one (the tests check both on small convolutions).
GRAM_ROUTE = None
# The positions route's products contract over the P output positions (36 for the c3d3's third
# convolution): thin GEMMs and one transposing copy per block pair, measured at about half the flop
# rate of the factors' products on this CPU; it is taken where its flop count is below half theirs.
_POSITIONS_EFFICIENCY = 0.5


def _gram_flops(k: int, positions: int, i: int, o: int, groups: int) -> tuple[int, int]:
    """Multiply-adds per pair of samples of the two weight routes (see gram): the per-sample
    factors' product ``K^2 G O I``, and the positions' ``G (I P^2 + K O P^2 + K^2 O P)``."""
    return k * k * groups * o * i, groups * (i * positions**2 + k * o * positions**2 + k * k * o * positions)


def _position_gram_into(S, cols, groups, total, k, n):
    """The weight's share without per-sample factors: ``a_kn . a_k'n' = sum_{p,q} (X_n^T X_n')[p, q]
    (S_kn^T S_k'n')[p, q]`` per group, ``X_n = [[X_n]]`` (``I x P``), ``S_kn`` (``O x P``): for a pair of
    sample blocks, the inputs' position Gram ``T`` (contracting ``I``), then ``T`` against the second
    block's columns (contracting ``q``), then against the first block's (contracting ``o, p``). Cheaper
    than the factors' product where the output has few positions (the c3d3's third convolution: 36
    positions, 3x fewer multiply-adds). Block pairs ``(i, j >= i)``, mirrored."""
    positions = cols.shape[-1]
    s = S.reshape(k, n, groups, -1, positions)  # [K, N, G, O, P]
    o = s.shape[3]
    per_block = max(1, math.isqrt(max(1, gram_products.GRAM_BLOCK_ELEMENTS // (groups * positions * k * o))))
    packed = gram_products.PackedGram(total, k * n) if total is not None and total.dim() == 1 else None
    out = None if packed is not None else total.view(k, n, k, n) if total is not None else S.new_zeros(k, n, k, n)
    for i in range(0, n, per_block):
        i_stop = min(n, i + per_block)
        b_i = i_stop - i
        # [a, K, G O P]: the first block's columns, rows per sample a
        first = s[:, i:i_stop].permute(1, 0, 2, 3, 4).reshape(b_i, k, -1)
        for j in range(i, n, per_block):
            j_stop = min(n, j + per_block)
            b_j = j_stop - j
            # T[g, b, (a, p), q] = X_a^T X_b per group, then U = T S_b: [g, b, (a, p), (m, o)]
            t = torch.einsum("agip,bgiq->gbapq", cols[i:i_stop], cols[j:j_stop]).reshape(groups * b_j, b_i * positions,
                                                                                      positions)
            second = s[:, j:j_stop].permute(2, 1, 4, 0, 3).reshape(groups * b_j, positions, k * o)
            u = torch.bmm(t, second).reshape(groups, b_j, b_i, positions, k, o)
            u = u.permute(2, 0, 5, 3, 4, 1).reshape(b_i, groups * o * positions, k * b_j)  # [a, (g, o, p), (m, b)]
            block = torch.bmm(first, u).reshape(b_i, k, k, b_j).permute(1, 0, 2, 3)  # [k, a, m, b]
            if out is None:
                assert packed is not None
                gram_products.add_sample_blocks(packed, block, k, n, i, j)
                continue
            out[:, i:i_stop, :, j:j_stop] += block
            if j != i:
                out[:, j:j_stop, :, i:i_stop] += block.permute(2, 3, 0, 1)
    if total is not None:
        return total
    assert out is not None
    return out.reshape(k * n, k * n)


def _bias_gram_into(S, stride, total, k, n):
    return gram_into(per_sample_bias(S, stride).reshape(k * n, -1), total, k)


@_rule(RuleKind.GRAM, "weight", "bias")
def gram(S, x, weight, stride, padding, dilation, groups, include=("weight", "bias"), total=None):
    """ViViT eq. S.22-S.23 for a convolution: the Gram matrix of the per-sample weight factors
    ``J_W^T S_kn = S_kn [[X_n]]^T`` (HBP Sec. D.4, summed over output positions before the products) and
    of the bias's ``J_b^T S_kn = sum_p S_kn[:, p]``. The weight's share takes the cheaper of two routes
    by multiply-adds: the per-sample factors (``K N x |W|``, far larger than the columns) formed a block
    of samples at a time from that block's unfolded input (:func:`fxcurv.gram.blocked_gram_into`), or the
    position Grams of inputs and columns (:func:`_position_gram_into`). ``include``: the parameters whose
    shares are summed; ``total``: a running Gram matrix to add them into (in place)."""
    k, n = S.shape[0], S.shape[1]
    if "weight" in include:
        positions = math.prod(S.shape[3:])
        factors, by_positions = _gram_flops(k, positions, weight[0].numel(), weight.shape[0] // groups, groups)
        route = GRAM_ROUTE or ("positions" if by_positions < _POSITIONS_EFFICIENCY * factors else "factors")
        if route == "positions":
            cols = _unfold(x, weight.shape, stride, padding, dilation, groups)
            total = _position_gram_into(S, cols, groups, total, k, n)
        else:
            def rows(start, stop):
                cols = _unfold(x[start:stop], weight.shape, stride, padding, dilation, groups)
                return _per_sample_from_cols(S[:, start:stop], cols, weight.shape, groups).reshape(
                    k * (stop - start), -1)

            total = blocked_gram_into(rows, total, k, n, k * weight.numel())
    if "bias" in include:
        total = _bias_gram_into(S, stride, total, k, n)
    return total


@_rule(RuleKind.GRAM, "weight", "bias", ops=(ConvKind.TRANSPOSED,))
def transposed_gram(S, x, weight, stride, padding, dilation, groups, include=("weight", "bias"), total=None):
    """ViViT eq. S.22-S.23 for ``Z = C^T X``: the Gram matrix of the per-sample weight factors
    ``J_W^T S_kn = X_n [[S_kn]]^T`` (per group), formed a block of samples at a time
    (:func:`fxcurv.gram.blocked_gram_into`), and of the bias's ``sum_p S_kn[:, p]``. ``include`` and
    ``total`` as for :func:`gram`."""
    k, n = S.shape[0], S.shape[1]
    if "weight" in include:
        def rows(start, stop):
            prod = _transposed_products(S[:, start:stop], x[start:stop], weight, stride, padding, dilation, groups)
            return prod.reshape(k * (stop - start), -1)

        total = blocked_gram_into(rows, total, k, n, k * weight.numel())
    if "bias" in include:
        total = _bias_gram_into(S, stride, total, k, n)
    return total


# ---- the Kronecker-factored family (KFC, in BackPACK's convention) ------------------------------
# A transposed convolution's factors are the same functions of its columns and of its own unfolded
# input (transposed_x_cols); they split weight.transpose(0, 1) (module docstring).

def _check_ungrouped(groups: int) -> None:
    if groups != 1:
        raise UnsupportedOpError(
            f"Kronecker factors of a grouped convolution or transposed convolution (groups={groups}) are not "
            "defined here (nor in BackPACK); supported: groups=1. The exact diagonals (diag_ggn, diag_hessian) "
            "take groups.")


def _spatially_summed_gram(S: torch.Tensor, sign) -> torch.Tensor:
    # [K, N, C_out]: the positions summed before the outer product (a reduction over all spatial
    # dims reads a strided message in place; flattening it first would copy it).
    s = S.sum(tuple(range(3, S.dim())))
    w = s if sign is None else s * sign.unsqueeze(-1).to(s.dtype)
    return torch.einsum("kno,knp->op", w, s)


@_rule(RuleKind.KRON_OUT, "weight", "bias", ops=_BOTH)
def kron_out(S, sign, groups):
    """KFLR / KFAC output factor of weight and bias in BackPACK's convention: ``sum_{k,n} sign (sum_p S)
    (sum_p S)^T``, the exact GGN of the bias (HBP Sec. D.4) -- KFC's ``Gamma`` times the number of output
    positions."""
    _check_ungrouped(groups)
    return _spatially_summed_gram(S, sign)


@_rule(RuleKind.KRON_IN, "weight", ops=_BOTH)
def kron_in_weight(x_cols, groups):
    """KFC input factor: ``(1/N) sum_{n,p} [[x]]_{n,p} [[x]]_{n,p}^T`` over the unfolded patches
    (HBP Sec. D.3's ``[[X]]``; a transposed convolution's :func:`_unfold_transposed`),
    ``[C_in prod(k), C_in prod(k)]``."""
    _check_ungrouped(groups)
    cols = x_cols[:, 0]  # [N, C_in prod(k), P]
    return torch.einsum("nip,njp->ij", cols, cols) / cols.shape[0]


def _channel_blocks_summed(m: torch.Tensor, channels: int) -> torch.Tensor:
    p = m.shape[0] // channels
    return m.reshape(channels, p, channels, p).sum((1, 3))


@_rule(RuleKind.KRON_DENSE, "weight", "bias")
def kron_dense(m, weight, groups):
    """KFRA output factor of weight and bias in BackPACK's convention: the batch-averaged matrix at the
    output summed over pairs of positions, ``(1_P (x) I)^T M (1_P (x) I)``, ``[C_out, C_out]``."""
    _check_ungrouped(groups)
    return _channel_blocks_summed(m, weight.shape[0])


@_rule(RuleKind.KRON_DENSE, "weight", "bias", ops=(ConvKind.TRANSPOSED,))
def transposed_kron_dense(m, weight, groups):
    """:func:`kron_dense` for ``Z = C^T X``, whose output channels are the weight's second axis
    (``[C_in, C_out, *k]`` with groups 1): ``[C_out, C_out]``."""
    _check_ungrouped(groups)
    return _channel_blocks_summed(m, weight.shape[1])


# ---- the ops ------------------------------------------------------------------------------------

def _define(spec: ConvOp) -> OpDef:
    layouts = (("weight", KroneckerLayout.TRANSPOSED),) if spec.kind is ConvKind.TRANSPOSED else ()
    op = define_op(spec.name, "conv", spec.forward, inputs=("x", "weight", "bias"), params=("weight", "bias"),
                   bilinear=(("x", "weight"),), kron_layouts=layouts)
    op.module(spec.module)(_module_canonicalizer(spec))
    # The exported (ATen) ops take F.conv*'s arguments in F.conv*'s order; ``.padding`` takes a string.
    aten = getattr(torch.ops.aten, spec.name)
    op.function(spec.function, *(getattr(aten, o) for o in aten.overloads()))(_function_canonicalizer(spec))
    for rule in _RULES[spec.kind]:
        op.rule(rule.kind, rule.keys[0], None, *rule.keys[1:], **rule.fusion)(_own_copy(rule.fn, spec.name))
    return op


CONV_OPS: dict[str, OpDef] = {spec.name: _define(spec) for spec in FAMILY}
