"""Pooling in one, two and three dimensions (``nn.MaxPool1d/2d/3d``, ``F.max_pool1d/2d/3d``,
``nn.AvgPool1d/2d/3d``, ``F.avg_pool1d/2d/3d``, ``nn.AdaptiveAvgPool1d/2d/3d``,
``F.adaptive_avg_pool1d/2d/3d``, ``nn.AdaptiveMaxPool1d/2d/3d``, ``F.adaptive_max_pool1d/2d/3d``):
HBP Sec. D.2, HesScale eq. 8 with the pooling matrix in place of the kernel. One op per
dimensionality (``max_pool2d``, ...), all defined by the same N-d code below.

Every pooling is a linear map of the input per sample (max-pooling locally, at the argmax):

* max-pooling is an index selection ``z = Pi x`` (HBP Sec. D.2) with the argmax as index map, so
  ``J^T v = Pi^T v`` scatters ``v`` back to the selected positions; overlapping windows can select
  the same input twice, and their messages add. ``Pi`` is binary, so the HesScale diagonal
  ``(Pi o Pi)^T d`` is the same scatter ``Pi^T d``. Piecewise linear: no residual term. Adaptive
  max-pooling is the same selection over the adaptive windows below.
* average pooling is ``z = A x`` with ``A[j, i] = 1/divisor_j`` for ``i`` in window ``j`` ("a weighted
  sum of index selections", HBP Sec. D.2); the HesScale diagonal is ``(A o A)^T d = A^T (d / divisor)``.
* adaptive average pooling to an output size ``O`` averages, along each spatial axis ``d``, the input
  entries ``floor(o I_d / O_d) <= i < ceil((o + 1) I_d / O_d)`` of window ``o``; its divisor is the
  product of the windows' lengths, so ``A = A_1 (x) ... (x) A_D`` is the Kronecker product of one small
  matrix per axis, ``A_d[o, i] = 1 / len_o`` inside window ``o``. Then ``J^T v = A^T v`` and
  ``(A o A)^T d = (A_1 o A_1)^T (x) ... (A_D o A_D)^T d``: one product per axis, for every output size
  (those dividing the input size are average pooling with kernel = stride = ``I / O``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _ntuple

from ..errors import UnsupportedOpError
from .registry import Match, OpDef, define_op, example

DIMS = (1, 2, 3)
_SHAPES = {1: "[N, C, L]", 2: "[N, C, H, W]", 3: "[N, C, D, H, W]"}


def _check_batched(x, what, nd):
    val = example(x)
    if val is not None and val.dim() != nd + 2:
        raise UnsupportedOpError(
            f"{what} of an input with shape {tuple(val.shape)}: fxcurv takes batched inputs "
            f"{_SHAPES[nd]} (dim 0 is the batch); add a batch dimension to unbatched inputs"
        )


def _stride(stride, kernel_size, nd):
    # torch pools with stride = kernel_size when stride is None or an empty list.
    tup = _ntuple(nd)
    return tup(kernel_size) if stride is None or (isinstance(stride, (list, tuple)) and not stride) \
        else tup(stride)


def _aten_op(name: str):
    """The exported (ATen) op ``aten.<name>.default``, which takes F.<name>'s arguments in its order."""
    return getattr(torch.ops.aten, name).default


def _fn(name: str, nd: int):
    return getattr(F, f"{name}{nd}d")


# ---- shared N-d helpers -------------------------------------------------------------------------

def _named(fn, name: str):
    """``fn`` named ``name`` (the program's code and listing show it)."""
    fn.__name__ = fn.__qualname__ = name
    return fn


def _scatter(v, x, indices, nd):
    """``Pi^T v``: each entry of ``v [*lead, N, C, *out]`` added at its argmax in ``x``'s spatial block
    (torch's indices are flat over the ``nd`` spatial axes of a channel)."""
    batch = v.shape[:-nd]  # (*lead, N, C)
    flat = v.reshape(batch + (-1,))
    # The same argmax for every column: expand (no copy) over the leading dims.
    idx = indices.reshape(indices.shape[:2] + (-1,)).expand(flat.shape)
    plane = math.prod(x.shape[-nd:])
    # scatter_add, not scatter: overlapping windows may select one input position more than once.
    out = flat.new_zeros(batch + (plane,)).scatter_add_(-1, idx, flat)
    return out.reshape(batch + tuple(x.shape[-nd:]))


def _argmax_rules(op: OpDef, name: str, nd: int) -> OpDef:
    """A max-pooling's message rules, by its argmax index map ``Pi`` (HBP Sec. D.2): ``J^T v = Pi^T v``, and
    HesScale eq. 8's ``(Pi o Pi)^T d = Pi^T d`` (``Pi`` is binary)."""

    def jac_t(v, x, indices):
        """HBP Sec. D.2: ``J^T v = Pi^T v`` for the argmax index map ``Pi``."""
        return _scatter(v, x, indices, nd)

    def diag(d, x, indices):
        """HBP Sec. D.2 with HesScale eq. 8: ``diag(Pi^T diag(d) Pi) = Pi^T d`` (``Pi`` is binary)."""
        return _scatter(d, x, indices, nd)

    op.jac_t("x", fresh=True)(_named(jac_t, f"{name}_jac_t"))
    op.diag("x", fresh=True)(_named(diag, f"{name}_diag"))
    return op


def _lift(nd, kernel_size, stride, padding):
    """One-dimensional average pooling as two-dimensional with a unit first axis (torch has no
    ``avg_pool1d`` backward): the same windows, the same divisors."""
    if nd != 1:
        return kernel_size, stride, padding
    return (1,) + tuple(kernel_size), (1,) + tuple(stride), (0,) + tuple(padding)


def _avg_pool(t, nd, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    """Average pooling of ``t [B, C, *spatial]`` in ``nd`` dimensions, ``divisor_override`` for every ``nd``."""
    k, s, p = _lift(nd, kernel_size, stride, padding)
    if nd == 1:
        return F.avg_pool2d(t.unsqueeze(-2), k, s, p, ceil_mode, count_include_pad, divisor_override).squeeze(-2)
    return _fn("avg_pool", nd)(t, k, s, p, ceil_mode, count_include_pad, divisor_override)


_AVG_BACKWARD = {2: torch.ops.aten.avg_pool2d_backward, 3: torch.ops.aten.avg_pool3d_backward}


def _avg_transpose(v, x, nd, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    """``A^T v`` for ``v [*lead, N, C, *out]``, with the leading dims folded into the batch."""
    flat = v.reshape((-1,) + tuple(v.shape[-nd - 1:]))
    # The backward reads only the input's size: a stride-0 expansion allocates nothing.
    like = x.new_empty(()).expand((flat.shape[0],) + tuple(x.shape[1:]))
    k, s, p = _lift(nd, kernel_size, stride, padding)
    if nd == 1:
        flat, like = flat.unsqueeze(-2), like.unsqueeze(-2)
    out = _AVG_BACKWARD[max(nd, 2)](flat, like, list(k), list(s), list(p), ceil_mode, count_include_pad,
                                    divisor_override)
    return out.reshape(v.shape[:-nd - 1] + tuple(x.shape[1:]))


# ---- max-pooling --------------------------------------------------------------------------------

# Channels from which the CPU's 2-d max-pooling with indices runs faster on a channels-last copy of its
# input: that kernel vectorizes over channels where the contiguous (NCHW) kernel walks one plane at a
# time. Measured (one thread, 3x3 windows, stride 2, copies in and out included): c3d3's pools
# [128, 64, 29, 29] 52 -> 14 ms, [128, 96, 13, 13] 15 -> 5.6 ms, [128, 128, 7, 7] 5.3 -> 1.1 ms,
# [128, 16, 32, 32] 15 -> 5.6 ms; with 3 or 8 channels the copies cost more than they save.
CHANNELS_LAST_MIN_CHANNELS = 16


def channels_last_pays(x: torch.Tensor) -> bool:
    """Whether :func:`max_pool2d_with_indices` takes the channels-last route for ``x``."""
    return (x.device.type == "cpu" and x.dim() == 4 and x.shape[1] >= CHANNELS_LAST_MIN_CHANNELS
            and x.is_contiguous() and not torch.compiler.is_compiling())


def max_pool2d_with_indices(x, kernel_size, stride, padding, dilation, ceil_mode):
    """``F.max_pool2d(..., return_indices=True)`` with contiguous results, on a channels-last copy of
    ``x`` where that is faster (:func:`channels_last_pays`). Both kernels scan each window in the same
    order and keep the first maximum (a strict ``>``), so values and indices -- flat over each channel's
    ``H x W`` plane in either layout -- are the same, ties included (tests/rules/test_pooling.py)."""
    if not channels_last_pays(x):
        return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices=True)
    out, indices = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), kernel_size, stride, padding,
                                dilation, ceil_mode, return_indices=True)
    return out.contiguous(), indices.contiguous()


def _define_max_pool(nd: int):
    name = f"max_pool{nd}d"
    tup = _ntuple(nd)

    def forward(x, kernel_size, stride, padding=(0,) * nd, dilation=(1,) * nd, ceil_mode=False):
        return _fn("max_pool", nd)(x, kernel_size, stride, padding, dilation, ceil_mode)

    def forward_saving(x, kernel_size, stride, padding=(0,) * nd, dilation=(1,) * nd, ceil_mode=False):
        """The forward with the argmax: ``(out, indices)``, indices flat over each channel's spatial block."""
        if nd == 2:
            return max_pool2d_with_indices(x, kernel_size, stride, padding, dilation, ceil_mode)
        return _fn("max_pool", nd)(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices=True)

    op = define_op(name, "pooling", _named(forward, name), inputs=("x",),
                   forward_saving=_named(forward_saving, f"{name}_saving"), saved=("indices",))

    def canonical(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
        if return_indices:
            raise UnsupportedOpError(
                "max-pooling with return_indices=True is not supported (the indices are not a "
                f"differentiable output); supported: return_indices=False, e.g. nn.MaxPool{nd}d(k) or "
                f"F.max_pool{nd}d(x, k)"
            )
        _check_batched(x, name, nd)
        attrs = {"kernel_size": tup(kernel_size), "stride": _stride(stride, kernel_size, nd),
                 "padding": tup(padding), "dilation": tup(dilation), "ceil_mode": bool(ceil_mode)}
        return Match({"x": x}, attrs)

    @op.module(getattr(nn, f"MaxPool{nd}d"))
    def from_module(node, mod):
        return canonical(node.args[0], mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode,
                         mod.return_indices)

    with_indices = getattr(F, f"{name}_with_indices")

    # F.max_pool<n>d dispatches on return_indices: torch.fx records the dispatcher, or, where
    # return_indices=True is passed by keyword, max_pool<n>d_with_indices itself (registered to reject
    # it with a clear message).
    @op.function(_fn("max_pool", nd), with_indices, getattr(torch, name), _aten_op(name))
    def from_function(node, a):
        return_indices = a(6, "return_indices", False)
        if getattr(node, "target", None) is with_indices:
            return_indices = True
        return canonical(a(0, "input"), a(1, "kernel_size"), a(2, "stride", None), a(3, "padding", 0),
                         a(4, "dilation", 1), a(5, "ceil_mode", False), return_indices)

    return _argmax_rules(op, name, nd)


# ---- average pooling ----------------------------------------------------------------------------

def _define_avg_pool(nd: int):
    name = f"avg_pool{nd}d"
    tup = _ntuple(nd)

    def forward(x, kernel_size, stride, padding=(0,) * nd, ceil_mode=False, count_include_pad=True,
                divisor_override=None):
        if nd == 1:  # F.avg_pool1d has no divisor_override (nor has nn.AvgPool1d)
            return F.avg_pool1d(x, kernel_size, stride, padding, ceil_mode, count_include_pad)
        return _fn("avg_pool", nd)(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)

    op = define_op(name, "pooling", _named(forward, name), inputs=("x",))

    def canonical(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
        _check_batched(x, name, nd)
        attrs = {"kernel_size": tup(kernel_size), "stride": _stride(stride, kernel_size, nd),
                 "padding": tup(padding), "ceil_mode": bool(ceil_mode),
                 "count_include_pad": bool(count_include_pad),
                 "divisor_override": None if divisor_override is None else int(divisor_override)}
        return Match({"x": x}, attrs)

    @op.module(getattr(nn, f"AvgPool{nd}d"))
    def from_module(node, mod):
        return canonical(node.args[0], mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode,
                         mod.count_include_pad, getattr(mod, "divisor_override", None))

    @op.function(_fn("avg_pool", nd), _aten_op(name))
    def from_function(node, a):
        return canonical(a(0, "input"), a(1, "kernel_size"), a(2, "stride", None), a(3, "padding", 0),
                         a(4, "ceil_mode", False), a(5, "count_include_pad", True),
                         a(6, "divisor_override", None))

    def inv_divisor(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
        """``1/divisor_j`` per window, ``[1, 1, *out]``: the nonzero entry of row ``j`` of ``A``.

        Pooling ones gives ``count_j / divisor_j``, pooling ones with divisor 1 gives ``count_j`` (the
        input entries in window ``j``); this covers padding, ``ceil_mode``'s clipped last windows,
        ``count_include_pad`` and ``divisor_override`` without restating torch's divisor logic.
        """
        ones = x.new_ones((1, 1) + tuple(x.shape[2:]))
        args = (nd, kernel_size, stride, padding, ceil_mode, count_include_pad)
        avg = _avg_pool(ones, *args, divisor_override)
        count = _avg_pool(ones, *args, 1)
        return avg / count.clamp_min(1)

    def jac_t(v, x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
        """HBP Sec. D.2 (average pooling as a weighted index selection): ``J^T v = A^T v``."""
        return _avg_transpose(v, x, nd, kernel_size, stride, padding, ceil_mode, count_include_pad,
                              divisor_override)

    def diag(d, x, inv_divisor, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
        """HesScale eq. 8 with ``A`` as the kernel: ``d_x = (A o A)^T d = A^T (d / divisor)``, since every
        nonzero of row ``j`` of ``A`` is ``1/divisor_j`` and ``A^T`` applies that factor once."""
        return _avg_transpose(d * inv_divisor, x, nd, kernel_size, stride, padding, ceil_mode, count_include_pad,
                              divisor_override)

    op.derived("inv_divisor")(_named(inv_divisor, f"{name}_inv_divisor"))
    op.jac_t("x", fresh=True)(_named(jac_t, f"{name}_jac_t"))
    op.diag("x", fresh=True)(_named(diag, f"{name}_diag"))
    return op


# ---- adaptive average pooling -------------------------------------------------------------------

def _window_matrix(size_in: int, size_out: int, like: torch.Tensor) -> torch.Tensor:
    """``A_d [O, I]``: ``1 / len_o`` on adaptive window ``o = floor(o I / O) <= i < ceil((o + 1) I / O)``."""
    o = torch.arange(size_out, device=like.device)
    start = torch.div(o * size_in, size_out, rounding_mode="floor")
    stop = torch.div((o + 1) * size_in + size_out - 1, size_out, rounding_mode="floor")
    i = torch.arange(size_in, device=like.device)
    inside = (i >= start[:, None]) & (i < stop[:, None])
    return inside.to(like.dtype) / (stop - start)[:, None].to(like.dtype)


def _windows_transpose(v, x, nd, square):
    """``(A_1 (x) ... (x) A_D)^T v`` (entries squared where ``square``) for ``v [..., *out]``: one product
    per spatial axis; each contracts the first remaining output axis and appends its input axis."""
    out_sizes = v.shape[-nd:]
    for size_in, size_out in zip(x.shape[-nd:], out_sizes):
        a = _window_matrix(size_in, size_out, v)
        v = torch.tensordot(v, a * a if square else a, dims=([v.dim() - nd], [0]))
    return v


def _output_size(x, output_size, nd: int, name: str) -> tuple[int, ...]:
    """An adaptive pooling's output size with ``None`` (keep the input's size) resolved."""
    _check_batched(x, name, nd)
    sizes = _ntuple(nd)(output_size)
    if any(s is None for s in sizes):
        val = example(x)
        if val is None:
            raise UnsupportedOpError(f"{name} with output size {output_size}: the input's shape is unknown")
        sizes = tuple(i if s is None else s for s, i in zip(sizes, val.shape[-nd:]))
    return tuple(int(s) for s in sizes)


def _define_adaptive_avg_pool(nd: int):
    name = f"adaptive_avg_pool{nd}d"

    def forward(x, output_size):
        return _fn("adaptive_avg_pool", nd)(x, output_size)

    op = define_op(name, "pooling", _named(forward, name), inputs=("x",))

    def canonical(x, output_size):
        return Match({"x": x}, {"output_size": _output_size(x, output_size, nd, name)})

    @op.module(getattr(nn, f"AdaptiveAvgPool{nd}d"))
    def from_module(node, mod):
        return canonical(node.args[0], mod.output_size)

    @op.function(_fn("adaptive_avg_pool", nd), _aten_op(name))
    def from_function(node, a):
        return canonical(a(0, "input"), a(1, "output_size"))

    def jac_t(v, x):
        """``J^T v = A^T v`` with ``A = A_1 (x) ... (x) A_D`` the adaptive windows' averaging."""
        return _windows_transpose(v, x, nd, square=False)

    def diag(d, x):
        """HesScale eq. 8: ``(A o A)^T d``, ``A o A`` the Kronecker product of the squared ``A_d``."""
        return _windows_transpose(d, x, nd, square=True)

    op.jac_t("x", fresh=True)(_named(jac_t, f"{name}_jac_t"))
    op.diag("x", fresh=True)(_named(diag, f"{name}_diag"))
    return op


# ---- adaptive max-pooling -----------------------------------------------------------------------

def _define_adaptive_max_pool(nd: int):
    """Adaptive max-pooling selects the argmax of each adaptive window: an index selection ``Pi`` as
    max-pooling's (windows may overlap where the output size does not divide the input's)."""
    name = f"adaptive_max_pool{nd}d"

    def forward(x, output_size):
        return _fn("adaptive_max_pool", nd)(x, output_size)

    def forward_saving(x, output_size):
        """The forward with the argmax: ``(out, indices)``, indices flat over each channel's spatial block."""
        return _fn("adaptive_max_pool", nd)(x, output_size, return_indices=True)

    op = define_op(name, "pooling", _named(forward, name), inputs=("x",),
                   forward_saving=_named(forward_saving, f"{name}_saving"), saved=("indices",))

    def canonical(x, output_size, return_indices):
        if return_indices:
            raise UnsupportedOpError(
                "adaptive max-pooling with return_indices=True is not supported (the indices are not a "
                f"differentiable output); supported: return_indices=False, e.g. nn.AdaptiveMaxPool{nd}d(size)")
        return Match({"x": x}, {"output_size": _output_size(x, output_size, nd, name)})

    @op.module(getattr(nn, f"AdaptiveMaxPool{nd}d"))
    def from_module(node, mod):
        return canonical(node.args[0], mod.output_size, mod.return_indices)

    with_indices = getattr(F, f"{name}_with_indices")

    @op.function(_fn("adaptive_max_pool", nd), with_indices)
    def from_function(node, a):
        return_indices = a(2, "return_indices", False) or getattr(node, "target", None) is with_indices
        return canonical(a(0, "input"), a(1, "output_size"), return_indices)

    return _argmax_rules(op, name, nd)


MAX_POOLS = {nd: _define_max_pool(nd) for nd in DIMS}
AVG_POOLS = {nd: _define_avg_pool(nd) for nd in DIMS}
ADAPTIVE_AVG_POOLS = {nd: _define_adaptive_avg_pool(nd) for nd in DIMS}
ADAPTIVE_MAX_POOLS = {nd: _define_adaptive_max_pool(nd) for nd in DIMS}
