"""Two-dimensional convolution ``Z = W * X + b`` (``nn.Conv2d``, ``F.conv2d``): HBP Sec. D.3-D.4,
HesScale App. B eq. 6-9.

HBP writes the convolution as ``Z = W [[X]] + b 1^T`` with the unfolded input ``[[X]]`` (im2col, an
index map, Sec. D.2), so that it is a linear layer shared over the ``P`` output positions. Two
consequences shape the rules below:

* messages to the input are transposed convolutions (``J_X^T = [[.]]^T (I_P (x) W)^T``), computed by
  torch's convolution backward with the square-root columns folded into the batch;
* a sample's parameter Jacobian *sums* over the output positions, so the diagonal of
  ``J_W^T S S^T J_W`` is ``sum_k (J_W^T S_k)^2`` with the square taken *after* that sum. Squaring
  position by position (the Kronecker shortcut of the linear layer) would drop the cross terms between
  output positions, which is exact only for a ``1 x 1`` output. The exact route below forms the
  per-sample ``J_W^T S_k`` (``[K, N, *W]``) and squares it.

The HesScale stream ``d`` (a diagonal) needs no such care: for a diagonal ``H_Z`` the squares of the
Jacobian entries suffice (HesScale eq. 8 and 9).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from .. import gram as gram_products
from ..errors import UnsupportedOpError
from ..factors import product_square_norms, signed_column_squares, signed_square_sum
from ..gram import blocked_gram_into, gram_into
from ..targets import SampleReduction
from .registry import Match, define_op, example


def conv2d(x, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


op = define_op(
    "conv2d", "conv", conv2d,
    inputs=("x", "weight", "bias"), params=("weight", "bias"),
    bilinear=(("x", "weight"),),
)


# ---- canonicalization ---------------------------------------------------------------------------

def _shape_of(value):
    """The shape of a traced value (fx node with an example value) or a tensor; ``None`` if unknown."""
    val = example(value)
    return None if val is None else tuple(val.shape)


def _resolve_padding(padding, kernel_shape, dilation):
    """Explicit symmetric ``(ph, pw)`` for ``padding`` given as ints or as ``'valid'``/``'same'``.

    The rules (unfold, convolution backward) take symmetric padding only; ``'same'`` is symmetric
    unless ``dilation * (kernel - 1)`` is odd, where torch pads one more on the bottom/right.
    """
    if not isinstance(padding, str):
        return _pair(padding)
    if padding == "valid":
        return (0, 0)
    if padding != "same":
        raise UnsupportedOpError(f"padding={padding!r} is not a conv2d padding; use ints, 'valid' or 'same'")
    if kernel_shape is None:
        raise UnsupportedOpError("padding='same' needs the kernel's shape, which is unknown here; "
                                 "pass explicit integer padding")
    out = []
    for k, d in zip(kernel_shape[-2:], dilation):
        total = d * (k - 1)
        if total % 2:
            raise UnsupportedOpError(
                f"padding='same' with kernel {tuple(kernel_shape[-2:])} and dilation {tuple(dilation)} "
                "pads asymmetrically, which is not supported; supported: integer padding, 'valid', and "
                "'same' where dilation * (kernel_size - 1) is even (or an explicit F.pad before a "
                "padding=0 convolution)"
            )
        out.append(total // 2)
    return tuple(out)


def _canonical(x, weight, bias, stride, padding, dilation, groups):
    x_shape = _shape_of(x)
    if x_shape is not None and len(x_shape) != 4:
        raise UnsupportedOpError(
            f"conv2d of an input with shape {x_shape}: fxcurv takes batched inputs [N, C, H, W] "
            "(dim 0 is the batch); add a batch dimension to unbatched inputs"
        )
    dilation = _pair(dilation)
    padding = _resolve_padding(padding, _shape_of(weight), dilation)
    attrs = {"stride": _pair(stride), "padding": padding, "dilation": dilation, "groups": int(groups)}
    return Match({"x": x, "weight": weight, "bias": bias}, attrs)


@op.module(nn.Conv2d)
def _from_module(node, mod):
    if mod.padding_mode != "zeros":
        raise UnsupportedOpError(
            f"nn.Conv2d with padding_mode={mod.padding_mode!r} is not supported; supported: "
            "padding_mode='zeros' (the default)"
        )
    return _canonical(node.args[0], mod.weight, mod.bias, mod.stride, mod.padding, mod.dilation, mod.groups)


@op.function(F.conv2d)
def _from_function(node, a):
    return _canonical(a(0, "input"), a(1, "weight"), a(2, "bias", None), a(3, "stride", 1),
                      a(4, "padding", 0), a(5, "dilation", 1), a(6, "groups", 1))


# ---- derived quantities -------------------------------------------------------------------------

@op.derived("weight_sq", pointwise=True, squares="weight")
def conv2d_weight_sq(weight):
    return weight * weight


@op.derived("x_sq", pointwise=True)
def conv2d_x_sq(x):
    return x * x


@op.derived("x_cols")
def conv2d_x_cols(x, weight, stride, padding, dilation, groups):
    """The unfolded input ``[[X]]`` (HBP Sec. D.3), ``[N, groups, C_in/groups * K1 * K2, P]``; shared by
    every square-root factor origin that reaches the weight."""
    return _unfold(x, weight.shape, stride, padding, dilation, groups)


def _unfold(x, weight_shape, stride, padding, dilation, groups):
    """``[[X]]`` as ``[N, groups, C_in/groups * K1 * K2, P]``, rows channel-major like ``F.unfold``.

    Built from strided views of the padded input and one copy: on the CPU this is several times
    faster than ``F.unfold``'s im2col (measured 0.5 vs 8.9 ms for the c3d3's first layer, N=128).
    """
    k1, k2 = weight_shape[-2:]
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0])) if any(padding) else x
    span1, span2 = dilation[0] * (k1 - 1) + 1, dilation[1] * (k2 - 1) + 1
    windows = xp.unfold(2, span1, stride[0]).unfold(3, span2, stride[1])  # [N, C, Y1, Y2, span1, span2]
    windows = windows[..., :: dilation[0], :: dilation[1]]
    n, c, y1, y2 = windows.shape[:4]
    cols = windows.permute(0, 1, 4, 5, 2, 3).reshape(n, groups, (c // groups) * k1 * k2, y1 * y2)
    return cols


# ---- messages to the input ----------------------------------------------------------------------

def _conv_transpose(v, x, kernel, stride, padding, dilation, groups):
    """``J_X^T v`` for ``v [*lead, N, C_out, Y1, Y2]`` with ``kernel`` in place of ``W``.

    Leading dims fold into the batch; torch's convolution backward picks the output padding that
    restores ``x``'s spatial size (strided convolutions lose the remainder of the last window).
    """
    batch = v.shape[:-3]
    flat = v.reshape((-1,) + tuple(v.shape[-3:]))
    # The transposed convolution maps Y back to (Y - 1) * stride - 2 * padding + span; a strided
    # convolution dropped the remainder of the last window, which output_padding restores.
    out_padding = tuple(
        x.shape[2 + i]
        - ((v.shape[-2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (kernel.shape[2 + i] - 1) + 1)
        for i in range(2))
    # conv_transpose2d: measured 10-15% faster than aten's convolution_backward on this CPU.
    out = F.conv_transpose2d(flat, kernel, None, stride, padding, out_padding, groups, dilation)
    return out.reshape(batch + tuple(x.shape[1:]))


@op.jac_t("x", fresh=True)
def conv2d_jac_t_x(v, x, weight, stride, padding, dilation, groups):
    """HBP Sec. D.4 (with eq. S.8a for ``Z = W [[X]]`` and D.2 for the unfold): ``J_X^T v``, the
    transposed convolution of every column of ``v``; HesScale eq. 6 for the gradient."""
    return _conv_transpose(v, x, weight, stride, padding, dilation, groups)


@op.diag("x", fresh=True)
def conv2d_diag_x(d, x, weight_sq, stride, padding, dilation, groups):
    """HesScale eq. 8 (first term): ``d_X = (J_X o J_X)^T d``, the transposed convolution of ``d``
    with the squared kernel; the cross terms between output positions are dropped."""
    return _conv_transpose(d, x, weight_sq, stride, padding, dilation, groups)


# ---- parameters ---------------------------------------------------------------------------------

def _conv_weight_vjp(g, x, weight, stride, padding, dilation, groups):
    # Only the kernel's shape is read.
    like = g.new_empty(()).expand(weight.shape)
    return torch.ops.aten.convolution_backward(
        g, x, like, None, list(stride), list(padding), list(dilation), False, [0, 0], groups,
        [False, True, False])[1]


# Elements of one block of per-sample products in conv2d_sample_reductions: small enough that squaring
# and summing a block reads it from cache (measured on the c3d3's convolutions: 1-2x faster than
# blocks of _BLOCK_ELEMENTS, where the products' memory traffic dominates).
_SAMPLE_BLOCK_ELEMENTS = 1 << 20


def conv2d_sample_reductions(v, reduces, x, weight, stride, padding, dilation, groups):
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
        # Few output positions: the norms by Gram matrices (conv2d_batch_l2_weight's route) and the
        # gradient by the convolution's backward cost less than forming the products.
        cols = _unfold(x, weight.shape, stride, padding, dilation, groups)
        found = {"sum": lambda: conv2d_grad_weight(v, x, weight, stride, padding, dilation, groups),
                 "norms": lambda: conv2d_batch_l2_weight(v, cols, weight, groups)}
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


@op.grad("weight", sample_reduction=SampleReduction("sum", conv2d_sample_reductions))
def conv2d_grad_weight(g, x, weight, stride, padding, dilation, groups):
    """HesScale eq. 7: ``dL/dW`` sums ``g`` times the input patch over output positions and samples."""
    return _conv_weight_vjp(g, x, weight, stride, padding, dilation, groups)


@op.grad("bias")
def conv2d_grad_bias(g):
    """HBP Sec. D.4 (bias): ``J_b = 1_P (x) I``, a sum over output positions (and samples)."""
    return g.sum(dim=(0, 2, 3))


@op.diag_diag("weight")
def conv2d_diag_diag_weight(d, x_sq, weight, stride, padding, dilation, groups):
    """HesScale eq. 9: ``d_W = sum_{n,p} d[n, p] [[X]]^2[n, :, p]``, the weight VJP of ``d`` with the
    squared input. Exact for a diagonal ``H_Z``: ``(J_W^T diag(d) J_W)_ii = sum_j d_j J_ji^2``."""
    return _conv_weight_vjp(d, x_sq, weight, stride, padding, dilation, groups)


@op.diag_diag("bias")
def conv2d_diag_diag_bias(d):
    """HesScale eq. 9 for the bias (``J_b`` entries are 0/1): ``d`` summed over samples and space."""
    return d.sum(dim=(0, 2, 3))


def _per_sample_from_cols(v, cols, weight_shape, groups):
    """``[*lead, N, *W]`` from ``v [*lead, N, C_out, Y1, Y2]`` and ``cols = [[X]]`` (grouped)."""
    batch = v.shape[:-3]
    vg = v.reshape(batch + (groups, weight_shape[0] // groups, -1))
    # The sum over output positions p happens inside the contraction, before any square is taken.
    out = torch.einsum("...ngop,ngip->...ngoi", vg, cols)
    return out.reshape(batch + tuple(weight_shape))


@op.per_sample("weight")
def conv2d_per_sample_weight(v, x, weight, stride, padding, dilation, groups):
    """HBP Sec. D.4 (weight): per-sample ``J_W^T v = v [[X]]^T``, ``[*lead, N, *W]``, summed over the
    output positions."""
    cols = _unfold(x, weight.shape, stride, padding, dilation, groups)
    return _per_sample_from_cols(v, cols, weight.shape, groups)


@op.per_sample("bias")
def conv2d_per_sample_bias(v):
    """HBP Sec. D.4 (bias): per-sample ``(1_P (x) I)^T v``, ``[*lead, N, C_out]``."""
    return v.sum(dim=(-2, -1))


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
    # Per sample block, one copy of the message (even a crop's strided view) into [b, G, P, K*O];
    # each product is then [[X]] [I, P] @ S [P, K*O] with both operands in their natural layout
    # (measured up to 22% faster on this CPU than S @ [[X]]^T when I is small, e.g. I = 75 in the
    # c3d3's first conv). Blocks small enough for malloc to recycle avoid fresh page faults.
    s_view = S.unflatten(2, (g, o)).permute(1, 2, 4, 5, 0, 3)  # [N, G, H, W, K, O], a view
    w = None if sign is None else sign.T.reshape(n, 1, 1, k, 1).to(S.dtype)
    block = max(1, _BLOCK_ELEMENTS // max(1, g * k * o * max(i, p)))
    for start in range(0, n, block):
        stop = min(n, start + block)
        prod = torch.matmul(x_cols[start:stop], s_view[start:stop].reshape(stop - start, g, p, k * o))
        prod = prod.square_().reshape(stop - start, g, i, k, o)  # [b, G, I, K, O]
        if w is not None:
            prod.mul_(w[start:stop])
        yield slice(start, stop), prod


@op.diag_sqrt("weight", sample_reduction=SampleReduction("squares", conv2d_sample_reductions))
def conv2d_diag_sqrt_weight(S, sign, x_cols, weight, groups):
    """``diag(sum_k sign_k J_W^T S_k S_k^T J_W)`` (HBP Sec. D.4, ``H_W`` from ``H_Z``) as
    ``sum_{k,n} sign[k, n] (J_W^T S[k, n])^2`` with the per-sample ``J_W^T`` summing over positions
    before squaring: exact for every output size. The squared products are reduced block by block
    of samples (:func:`_signed_squared_products`)."""
    total = S.new_zeros(groups, x_cols.shape[2], S.shape[0], weight.shape[0] // groups)  # [G, I, K, O]
    for _, prod in _signed_squared_products(S, sign, x_cols, weight, groups):
        total += prod.sum(0)
    return total.sum(2).transpose(1, 2).reshape(weight.shape)


@op.diag_sqrt("bias")
def conv2d_diag_sqrt_bias(S, sign):
    """HBP Sec. D.4 (bias): ``diag((1_P (x) I)^T H_B (1_P (x) I))`` from the columns, summed over
    positions before squaring."""
    return signed_square_sum(conv2d_per_sample_bias(S), sign, S.dim() - 4)


# ---- per-sample reductions (BackPACK's first-order and per-sample quantities) -------------------

@op.batch_l2("weight", sample_reduction=SampleReduction("norms", conv2d_sample_reductions))
def conv2d_batch_l2_weight(g, x_cols, weight, groups):
    """``|J_W,n^T g_n|^2`` per sample (HBP Sec. D.4: ``J_W,n^T g_n = g_n [[X_n]]^T``, per group) without
    the ``[N, *W]`` per-sample gradients: by the Gram matrices over output positions,
    ``sum_{p,q} (g_p . g_q)([[x]]_p . [[x]]_q)``, or block by block from the products, whichever is cheaper
    (:func:`fxcurv.factors.product_square_norms`)."""
    n = g.shape[0]
    i, p = x_cols.shape[2], x_cols.shape[3]
    a = g.reshape(n * groups, weight.shape[0] // groups, p)
    norms = product_square_norms(a, x_cols.reshape(n * groups, i, p), _BLOCK_ELEMENTS)
    return norms.reshape(n, groups).sum(1)


@op.batch_l2("bias")
def conv2d_batch_l2_bias(g):
    """``|J_b,n^T g_n|^2 = |sum_p g_np|^2`` per sample (HBP Sec. D.4, bias)."""
    per_sample = conv2d_per_sample_bias(g)
    return (per_sample * per_sample).sum(-1)


@op.batch_diag_sqrt("weight")
def conv2d_batch_diag_sqrt_weight(S, sign, x_cols, weight, groups):
    """``sum_k sign_kn (J_W,n^T S_kn)^2`` per sample, ``[N, *W]``: :func:`conv2d_diag_sqrt_weight` before its
    sum over samples, with the per-sample products (summed over positions, then squared) formed block by
    block (:func:`_signed_squared_products`) so that ``[K, N, *W]`` never exists."""
    n = S.shape[1]
    out = S.new_empty(n, groups, weight.shape[0] // groups, x_cols.shape[2])  # [N, G, O, I]
    for rows, prod in _signed_squared_products(S, sign, x_cols, weight, groups):
        out[rows] = prod.sum(3).transpose(2, 3)
    return out.reshape((n,) + tuple(weight.shape))


@op.batch_diag_sqrt("bias")
def conv2d_batch_diag_sqrt_bias(S, sign):
    """``sum_k sign_kn (J_b,n^T S_kn)^2`` per sample (HBP Sec. D.4, bias): positions summed, then squared."""
    return signed_column_squares(conv2d_per_sample_bias(S), sign)
# ---- ViViT's Gram matrix --------------------------------------------------------------------------

# Which route conv2d_gram takes for the weight: None picks the cheaper by its flop count; "factors" or
# "positions" force one (the tests check both on small convolutions).
GRAM_ROUTE = None
# The positions route's products contract over the P output positions (36 for the c3d3's third
# convolution): thin GEMMs and one transposing copy per block pair, measured at about half the flop
# rate of the factors' products on this CPU; it is taken where its flop count is below half theirs.
_POSITIONS_EFFICIENCY = 0.5


def _gram_flops(k: int, positions: int, i: int, o: int, groups: int) -> tuple[int, int]:
    """Multiply-adds per pair of samples of the two weight routes (see conv2d_gram): the per-sample
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
    out = total.view(k, n, k, n) if total is not None else S.new_zeros(k, n, k, n)
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
            out[:, i:i_stop, :, j:j_stop] += block
            if j != i:
                out[:, j:j_stop, :, i:i_stop] += block.permute(2, 3, 0, 1)
    return total if total is not None else out.reshape(k * n, k * n)


@op.gram("weight", "bias")
def conv2d_gram(S, x, weight, stride, padding, dilation, groups, include=("weight", "bias"), total=None):
    """ViViT eq. S.22-S.23 for a convolution: the Gram matrix of the per-sample weight factors
    ``J_W^T S_kn = S_kn [[X_n]]^T`` (HBP Sec. D.4, summed over output positions before the products) and
    of the bias's ``J_b^T S_kn = sum_p S_kn[:, p]``. The weight's share takes the cheaper of two routes
    by multiply-adds: the per-sample factors (``K N x |W|``, far larger than the columns) formed a block
    of samples at a time from that block's unfolded input (:func:`fxcurv.gram.blocked_gram_into`), or the
    position Grams of inputs and columns (:func:`_position_gram_into`). ``include``: the parameters whose
    shares are summed; ``total``: a running Gram matrix to add them into (in place)."""
    k, n = S.shape[0], S.shape[1]
    if "weight" in include:
        positions = S.shape[-1] * S.shape[-2]
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
        total = gram_into(conv2d_per_sample_bias(S).reshape(k * n, -1), total, k)
    return total


# ---- the Kronecker-factored family (KFC, in BackPACK's convention) ------------------------------

def _check_ungrouped(groups: int) -> None:
    if groups != 1:
        raise UnsupportedOpError(
            f"Kronecker factors of a grouped convolution (groups={groups}) are not defined here (nor in "
            "BackPACK); supported: groups=1. The exact diagonals (diag_ggn, diag_hessian) take groups.")


def _spatially_summed_gram(S: torch.Tensor, sign) -> torch.Tensor:
    # [K, N, C_out]: the positions summed before the outer product (a reduction over both spatial
    # dims reads a strided message in place; flattening it first would copy it).
    s = S.sum((-2, -1))
    w = s if sign is None else s * sign.unsqueeze(-1).to(s.dtype)
    return torch.einsum("kno,knp->op", w, s)


@op.kron_out("weight", "bias")
def conv2d_kron_out(S, sign, groups):
    """KFLR / KFAC output factor of weight and bias in BackPACK's convention: ``sum_{k,n} sign (sum_p S)
    (sum_p S)^T``, the exact GGN of the bias (HBP Sec. D.4) -- KFC's ``Gamma`` times the number of output
    positions."""
    _check_ungrouped(groups)
    return _spatially_summed_gram(S, sign)


@op.kron_in("weight")
def conv2d_kron_in_weight(x_cols, groups):
    """KFC input factor: ``(1/N) sum_{n,p} [[x]]_{n,p} [[x]]_{n,p}^T`` over the unfolded patches
    (HBP Sec. D.3's ``[[X]]``), ``[C_in k1 k2, C_in k1 k2]``."""
    _check_ungrouped(groups)
    cols = x_cols[:, 0]  # [N, C_in k1 k2, P]
    return torch.einsum("nip,njp->ij", cols, cols) / cols.shape[0]


def _channel_blocks_summed(m: torch.Tensor, channels: int) -> torch.Tensor:
    p = m.shape[0] // channels
    return m.reshape(channels, p, channels, p).sum((1, 3))


@op.kron_dense("weight", "bias")
def conv2d_kron_dense(m, weight, groups):
    """KFRA output factor of weight and bias in BackPACK's convention: the batch-averaged matrix at the
    output summed over pairs of positions, ``(1_P (x) I)^T M (1_P (x) I)``, ``[C_out, C_out]``."""
    _check_ungrouped(groups)
    return _channel_blocks_summed(m, weight.shape[0])
