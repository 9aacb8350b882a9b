"""Two-dimensional pooling (``nn.MaxPool2d``, ``F.max_pool2d``, ``nn.AvgPool2d``, ``F.avg_pool2d``):
HBP Sec. D.2, HesScale eq. 8 with the pooling matrix in place of the kernel.

Both poolings are linear maps of the input per sample (max-pooling locally, at the argmax):

* max-pooling is an index selection ``z = Pi x`` (HBP Sec. D.2) with the argmax as index map, so
  ``J^T v = Pi^T v`` scatters ``v`` back to the selected positions; overlapping windows can select
  the same input twice, and their messages add. ``Pi`` is binary, so the HesScale diagonal
  ``(Pi o Pi)^T d`` is the same scatter ``Pi^T d``. Piecewise linear: no residual term.
* average pooling is ``z = A x`` with ``A[j, i] = 1/divisor_j`` for ``i`` in window ``j`` ("a weighted
  sum of index selections", HBP Sec. D.2); the HesScale diagonal is ``(A o A)^T d = A^T (d / divisor)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from ..errors import UnsupportedOpError
from .registry import Match, define_op, example


def _check_batched(x, what):
    val = example(x)
    if val is not None and val.dim() != 4:
        raise UnsupportedOpError(
            f"{what} of an input with shape {tuple(val.shape)}: fxcurv takes batched inputs "
            "[N, C, H, W] (dim 0 is the batch); add a batch dimension to unbatched inputs"
        )


def _stride(stride, kernel_size):
    # torch pools with stride = kernel_size when stride is None or an empty list.
    return _pair(kernel_size) if stride is None or (isinstance(stride, (list, tuple)) and not stride) \
        else _pair(stride)


# ---- max-pooling --------------------------------------------------------------------------------

def max_pool2d(x, kernel_size, stride, padding=(0, 0), dilation=(1, 1), ceil_mode=False):
    return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)


def max_pool2d_saving(x, kernel_size, stride, padding=(0, 0), dilation=(1, 1), ceil_mode=False):
    """The forward with the argmax: ``(out, indices)``, indices flat over each ``H * W`` plane."""
    return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices=True)


max_op = define_op("max_pool2d", "pooling", max_pool2d, inputs=("x",),
                   forward_saving=max_pool2d_saving, saved=("indices",))


def _max_canonical(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
    if return_indices:
        raise UnsupportedOpError(
            "max-pooling with return_indices=True is not supported (the indices are not a "
            "differentiable output); supported: return_indices=False, e.g. nn.MaxPool2d(k) or "
            "F.max_pool2d(x, k)"
        )
    _check_batched(x, "max_pool2d")
    attrs = {"kernel_size": _pair(kernel_size), "stride": _stride(stride, kernel_size),
             "padding": _pair(padding), "dilation": _pair(dilation), "ceil_mode": bool(ceil_mode)}
    return Match({"x": x}, attrs)


@max_op.module(nn.MaxPool2d)
def _max_from_module(node, mod):
    return _max_canonical(node.args[0], mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                          mod.ceil_mode, mod.return_indices)


# F.max_pool2d dispatches on return_indices: torch.fx records the dispatcher, or, where
# return_indices=True is passed by keyword, max_pool2d_with_indices itself (registered to reject it
# with a clear message).
@max_op.function(F.max_pool2d, F.max_pool2d_with_indices, torch.max_pool2d)
def _max_from_function(node, a):
    return_indices = a(6, "return_indices", False)
    if getattr(node, "target", None) is F.max_pool2d_with_indices:
        return_indices = True
    return _max_canonical(a(0, "input"), a(1, "kernel_size"), a(2, "stride", None), a(3, "padding", 0),
                          a(4, "dilation", 1), a(5, "ceil_mode", False), return_indices)


def _scatter(v, x, indices):
    """``Pi^T v``: each entry of ``v [*lead, N, C, Y1, Y2]`` added at its argmax in ``x``'s plane."""
    batch = v.shape[:-2]  # (*lead, N, C)
    flat = v.reshape(batch + (-1,))
    # The same argmax for every column: expand (no copy) over the leading dims.
    idx = indices.reshape(indices.shape[:2] + (-1,)).expand(flat.shape)
    plane = x.shape[-2] * x.shape[-1]
    # scatter_add, not scatter: overlapping windows may select one input position more than once.
    out = flat.new_zeros(batch + (plane,)).scatter_add_(-1, idx, flat)
    return out.reshape(batch + tuple(x.shape[-2:]))


@max_op.jac_t("x", fresh=True)
def max_pool2d_jac_t(v, x, indices):
    """HBP Sec. D.2: ``J^T v = Pi^T v`` for the argmax index map ``Pi``."""
    return _scatter(v, x, indices)


@max_op.diag("x", fresh=True)
def max_pool2d_diag(d, x, indices):
    """HBP Sec. D.2 with HesScale eq. 8: ``diag(Pi^T diag(d) Pi) = Pi^T d`` (``Pi`` is binary)."""
    return _scatter(d, x, indices)


# ---- average pooling ----------------------------------------------------------------------------

def avg_pool2d(x, kernel_size, stride, padding=(0, 0), ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    return F.avg_pool2d(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


avg_op = define_op("avg_pool2d", "pooling", avg_pool2d, inputs=("x",))


def _avg_canonical(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    _check_batched(x, "avg_pool2d")
    attrs = {"kernel_size": _pair(kernel_size), "stride": _stride(stride, kernel_size),
             "padding": _pair(padding), "ceil_mode": bool(ceil_mode),
             "count_include_pad": bool(count_include_pad),
             "divisor_override": None if divisor_override is None else int(divisor_override)}
    return Match({"x": x}, attrs)


@avg_op.module(nn.AvgPool2d)
def _avg_from_module(node, mod):
    return _avg_canonical(node.args[0], mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode,
                          mod.count_include_pad, mod.divisor_override)


@avg_op.function(F.avg_pool2d)
def _avg_from_function(node, a):
    return _avg_canonical(a(0, "input"), a(1, "kernel_size"), a(2, "stride", None), a(3, "padding", 0),
                          a(4, "ceil_mode", False), a(5, "count_include_pad", True),
                          a(6, "divisor_override", None))


@avg_op.derived("inv_divisor")
def avg_pool2d_inv_divisor(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    """``1/divisor_j`` per window, ``[1, 1, Y1, Y2]``: the nonzero entry of row ``j`` of ``A``.

    Pooling ones gives ``count_j / divisor_j``, pooling ones with divisor 1 gives ``count_j`` (the
    input entries in window ``j``); this covers padding, ``ceil_mode``'s clipped last windows,
    ``count_include_pad`` and ``divisor_override`` without restating torch's divisor logic.
    """
    ones = x.new_ones((1, 1) + tuple(x.shape[-2:]))
    avg = F.avg_pool2d(ones, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
    count = F.avg_pool2d(ones, kernel_size, stride, padding, ceil_mode, count_include_pad, 1)
    return avg / count.clamp_min(1)


def _avg_transpose(v, x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    """``A^T v`` for ``v [*lead, N, C, Y1, Y2]``, with the leading dims folded into the batch."""
    flat = v.reshape((-1,) + tuple(v.shape[-3:]))
    # avg_pool2d_backward reads only the input's size: a stride-0 expansion allocates nothing.
    like = x.new_empty(()).expand((flat.shape[0],) + tuple(x.shape[1:]))
    out = torch.ops.aten.avg_pool2d_backward(flat, like, list(kernel_size), list(stride), list(padding),
                                             ceil_mode, count_include_pad, divisor_override)
    return out.reshape(v.shape[:-3] + tuple(x.shape[1:]))


@avg_op.jac_t("x", fresh=True)
def avg_pool2d_jac_t(v, x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    """HBP Sec. D.2 (average pooling as a weighted index selection): ``J^T v = A^T v``."""
    return _avg_transpose(v, x, kernel_size, stride, padding, ceil_mode, count_include_pad,
                          divisor_override)


@avg_op.diag("x", fresh=True)
def avg_pool2d_diag(d, x, inv_divisor, kernel_size, stride, padding, ceil_mode, count_include_pad,
                    divisor_override):
    """HesScale eq. 8 with ``A`` as the kernel: ``d_x = (A o A)^T d = A^T (d / divisor)``, since every
    nonzero of row ``j`` of ``A`` is ``1/divisor_j`` and ``A^T`` applies that factor once."""
    return _avg_transpose(d * inv_divisor, x, kernel_size, stride, padding, ceil_mode, count_include_pad,
                          divisor_override)
