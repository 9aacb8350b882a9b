"""Sums and means over per-sample axes (``x.mean(1)`` over tokens, ``x.sum((2, 3))`` over positions).

``z = c sum_{i in R} x_i`` with ``c = 1`` (sum) or ``c = 1 / |R|`` (mean) over the reduced axes ``R`` of one
sample: a linear map whose Jacobian copies ``c`` to every reduced position, so ``J^T v`` broadcasts ``c v``
back over the reduced axes and the HesScale diagonal (eq. 8, ``(J o J)^T d``) broadcasts ``c^2 d``. No
second derivative (HBP eq. S.6 alone). A reduction over the batch axis (``dim=0``, or no ``dim``: every
axis) mixes samples and is not this op (the generic rule refuses it, naming the node).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .registry import Match, define_op, example
from .scalar import is_traced


def reduce_sum(x, dims, keepdim, scale):
    return x.sum(dim=dims, keepdim=keepdim) * scale if scale != 1.0 else x.sum(dim=dims, keepdim=keepdim)


op = define_op("reduce_sum", "reduce", reduce_sum, inputs=("x",))


def _canonical(x: Any, dim: Any, keepdim: Any, dtype: Any, mean: bool) -> Match | None:
    """Sum / mean of a traced tensor over per-sample axes; ``None`` (the generic rule) for a reduction
    over the batch axis or every axis, a dtype cast, or arguments known only at run time."""
    val = example(x)
    if not is_traced(x) or val is None or dtype is not None or not isinstance(keepdim, bool):
        return None
    dims_in = (dim,) if isinstance(dim, int) else tuple(dim) if isinstance(dim, (tuple, list)) else None
    if not dims_in or not all(isinstance(d, int) for d in dims_in):
        return None
    if not all(-val.dim() <= d < val.dim() for d in dims_in):
        return None
    dims = tuple(sorted({d % val.dim() for d in dims_in}))
    if 0 in dims:
        return None
    count = math.prod(val.shape[d] for d in dims)
    scale = 1.0 / count if mean else 1.0
    return Match({"x": x}, {"dims": dims, "keepdim": keepdim, "scale": scale})


@op.method("mean")
def _from_mean_method(node, a):
    return _canonical(a(0, "self"), a(1, "dim", None), a(2, "keepdim", False), a(3, "dtype", None), mean=True)


@op.method("sum")
def _from_sum_method(node, a):
    return _canonical(a(0, "self"), a(1, "dim", None), a(2, "keepdim", False), a(3, "dtype", None), mean=False)


@op.function(torch.mean, torch.ops.aten.mean.dim)
def _from_mean(node, a):
    return _canonical(a(0, "input"), a(1, "dim", None), a(2, "keepdim", False), a(3, "dtype", None), mean=True)


@op.function(torch.sum, torch.ops.aten.sum.dim_IntList)
def _from_sum(node, a):
    return _canonical(a(0, "input"), a(1, "dim", None), a(2, "keepdim", False), a(3, "dtype", None), mean=False)


def _broadcast_back(v: torch.Tensor, x: torch.Tensor, dims: tuple[int, ...], keepdim: bool,
                    scale: float) -> torch.Tensor:
    """``[*lead, N, *out] -> [*lead, N, *x.shape[1:]]``: ``scale v`` copied over the reduced axes."""
    lead = v.dim() - (x.dim() if keepdim else x.dim() - len(dims))
    if not keepdim:
        for d in dims:
            v = v.unsqueeze(lead + d)
    return (v * scale).expand(tuple(v.shape[:lead]) + tuple(x.shape))


@op.jac_t("x")
def reduce_sum_jac_t(v, x, dims, keepdim, scale):
    """``J^T v``: ``c v`` broadcast over the reduced axes."""
    return _broadcast_back(v, x, dims, keepdim, scale)


@op.diag("x")
def reduce_sum_diag(d, x, dims, keepdim, scale):
    """HesScale eq. 8, ``(J o J)^T d``: ``c^2 d`` broadcast over the reduced axes."""
    return _broadcast_back(d, x, dims, keepdim, scale * scale)
