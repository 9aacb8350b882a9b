"""Softmax and log-softmax over one per-sample axis (``torch.softmax``, ``F.softmax``, ``x.softmax(d)``,
``nn.Softmax``, and the ``log_softmax`` spellings; the ATen overloads ``aten.softmax.int``,
``aten._softmax.default``, ``aten.log_softmax.int``, ``aten._log_softmax.default``).

Along the axis ``dim`` every row ``x in R^D`` (one per position of the other axes) is mapped alone,
``s = softmax(x)``, ``s_i = e^{x_i} / sum_j e^{x_j}``. With ``a . b`` the sum over the row and
``delta`` Kronecker's:

**softmax** ``z = s``: ``J_{ki} = dz_k/dx_i = s_k (delta_ki - s_i)``, so

* ``jac_t``: ``J^T v = s o (v - (s . v))`` (HBP eq. S.6, first term);
* ``diag`` (HesScale eq. 8, ``d_x,i = sum_k J_{ki}^2 d_k``): ``J_{ki}^2 = s_k^2 (delta_ki (1 - 2 s_i) + s_i^2)``
  gives ``d_x = s^2 o (d o (1 - 2 s) + (s^2 . d))``, ``O(D)`` per row;
* second derivatives ``d2 s_k / dx_i dx_j = s_k (delta_ki - s_i)(delta_kj - s_j) - s_k s_i (delta_ij - s_j)``;
  summed with ``g_k`` they give (``w = J^T g = s o (g - (s . g))``)
  ``R = sum_k g_k d2 s_k/dx^2 = diag(w) - w s^T - s w^T``. Its diagonal ``w o (1 - 2 s)`` is the
  ``residual`` (HesScale eq. 4's second term); ``R`` itself is not diagonal, so the exact Hessian takes
  ``residual_sqrt``: ``R = U diag(l) U^T`` per row by a batched ``eigh``, columns ``sqrt|l_k| u_k`` with
  sign ``sign(l_k)`` (HBP Sec. C's factorization, as the generic rule's ``residual_sqrt``).

**log_softmax** ``z = x - logsumexp(x)``: ``J_{ki} = delta_ki - s_i``, so

* ``jac_t``: ``J^T v = v - s (1 . v)``;
* ``diag``: ``d_x,i = sum_k (delta_ki - s_i)^2 d_k = d_i (1 - 2 s_i) + s_i^2 (1 . d)``;
* ``d2 z_k / dx^2 = -(diag(s) - s s^T)`` for every ``k``: ``R = -G (diag(s) - s s^T)`` with ``G = 1 . g``;
  ``residual`` ``-G s o (1 - s)``; ``residual_sqrt`` in closed form: ``diag(s) - s s^T = C C^T`` with
  ``C = diag(sqrt s) (I - sqrt s sqrt s^T)`` (``I - q q^T`` is a projector for ``|q| = 1``), so the
  columns are ``sqrt|G| C_{:j}`` with sign ``-1`` where ``G > 0``, ``+1`` otherwise.

Columns of different rows stay separate: a row's ``D`` columns are zero outside the row, so a sample
of ``P`` entries gets ``P`` columns ``[P, N, *x]`` (the generic rule's layout), and
``sum_k sign_k s_k s_k^T`` is the block-diagonal matrix of the rows' ``R``.

The axis must be a per-sample one: a softmax over the batch axis (dim 0) mixes samples and is left to
the generic rule, which refuses it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .registry import Match, define_op, example


def softmax(x, dim):
    return torch.softmax(x, dim)


def log_softmax(x, dim):
    return torch.log_softmax(x, dim)


softmax_op = define_op("softmax", "softmax", softmax, inputs=("x",))
log_softmax_op = define_op("log_softmax", "softmax", log_softmax, inputs=("x",))

_aten = torch.ops.aten


# ---- canonicalization ------------------------------------------------------------------------------

def _canonical(x: Any, dim: Any, dtype: Any = None, half_to_float: bool = False) -> Match | None:
    """``{"x": x}`` with the axis as a non-negative index of ``x``, or ``None`` (the generic rule) where
    the call is not a per-sample softmax of ``x``'s own dtype: no axis given (the legacy implicit one),
    the batch axis, a cast (``dtype=``, ``half_to_float``), an unknown shape."""
    val = example(x)
    if val is None or not isinstance(dim, int) or half_to_float or val.dim() < 2:
        return None
    if dtype is not None and dtype != val.dtype:
        return None
    axis = dim % val.dim()
    if axis == 0:
        return None
    return Match({"x": x}, {"dim": axis})


def _register_sources(op: Any, module: type, functions: tuple[Any, ...], method: str, aten_int: Any,
                      aten_private: Any) -> None:
    @op.module(module)
    def _from_module(node, mod):
        return _canonical(node.args[0], mod.dim)

    @op.function(*functions)
    def _from_function(node, a):
        # torch.softmax(input, dim, dtype); F.softmax(input, dim, _stacklevel, dtype).
        dtype = a(3 if node.target in (F.softmax, F.log_softmax) else 2, "dtype", None)
        return _canonical(a(0, "input"), a(1, "dim", None), dtype)

    @op.function(aten_int)
    def _from_aten(node, a):
        return _canonical(a(0, "self"), a(1, "dim"), a(2, "dtype", None))

    @op.function(aten_private)
    def _from_aten_private(node, a):
        return _canonical(a(0, "self"), a(1, "dim"), half_to_float=bool(a(2, "half_to_float")))

    @op.method(method)
    def _from_method(node, a):
        return _canonical(a(0, "self"), a(1, "dim", None), a(2, "dtype", None))


_register_sources(softmax_op, nn.Softmax, (torch.softmax, F.softmax), "softmax", _aten.softmax.int,
                  _aten._softmax.default)
_register_sources(log_softmax_op, nn.LogSoftmax, (torch.log_softmax, F.log_softmax), "log_softmax",
                  _aten.log_softmax.int, _aten._log_softmax.default)


# ---- helpers ---------------------------------------------------------------------------------------

def _axis(out: torch.Tensor, dim: int) -> int:
    """The softmax axis counted from the end, valid for messages with leading column dims."""
    return dim - out.dim()


def _row_sum(t: torch.Tensor, axis: int) -> torch.Tensor:
    return t.sum(axis, keepdim=True)


def _split_rows(matrices: torch.Tensor, out: torch.Tensor, dim: int
                ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Signed columns of per-row symmetric matrices ``R [N, *rows, D, D]`` (the rows: ``out``'s shape with
    the axis ``dim`` taken out and put last), laid out as the generic rule's ``residual_sqrt``:
    ``R = U diag(l) U^T``, column ``(row, k)`` is ``sqrt|l_k| u_k`` inside its row and zero elsewhere,
    ``[K = P, N, *x]``, sign ``[K, N]`` (``+1`` where ``l_k >= 0``)."""
    eigenvalues, vectors = torch.linalg.eigh(matrices)
    factor = vectors * eigenvalues.abs().sqrt().unsqueeze(-2)  # [N, *rows, D(i), D(k)]
    sign = torch.where(eigenvalues >= 0, 1.0, -1.0).to(out.dtype)  # [N, *rows, D(k)]
    return _columns_of_rows(factor, sign, out, dim)


def _columns_of_rows(factor: torch.Tensor, sign: torch.Tensor, out: torch.Tensor, dim: int
                     ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """``factor [N, *rows, D(i), D(k)]`` (column ``k`` of each row's factor) and ``sign [N, *rows, D(k)]``
    as the columns ``[K, N, *x]`` of the whole sample, ``K = rows * D`` (row-major, then ``k``), each
    column zero outside its row, and the sign ``[K, N]``."""
    n, d = out.shape[0], out.shape[dim]
    rows_shape = tuple(factor.shape[1:-2])
    r = 1
    for s in rows_shape:
        r *= s
    flat = factor.reshape(n, r, d, d)
    cols = out.new_zeros(r, d, n, r, d)  # [R, D(k), N, R', D(i)], zero unless R = R'
    torch.diagonal(cols, dim1=0, dim2=3).copy_(flat.permute(3, 0, 2, 1))  # the view is [D(k), N, D(i), R]
    cols = cols.reshape((r * d, n) + rows_shape + (d,)).movedim(-1, dim + 1)
    signs = sign.reshape(n, r * d).T.contiguous()
    return (cols,), signs


# ---- softmax ---------------------------------------------------------------------------------------

@softmax_op.jac_t("x")
def softmax_jac_t(v, out, dim):
    """``J^T v = s o (v - (s . v))`` along the axis, for every column of ``v``."""
    axis = _axis(out, dim)
    return out * (v - _row_sum(out * v, axis))


@softmax_op.diag("x")
def softmax_diag(d, out, dim):
    """HesScale eq. 8: ``sum_k J_{ki}^2 d_k = s_i^2 (d_i (1 - 2 s_i) + (s^2 . d))``."""
    axis = _axis(out, dim)
    sq = out * out
    return sq * (d * (1 - 2 * out) + _row_sum(sq * d, axis))


def _softmax_w(g: torch.Tensor, out: torch.Tensor, dim: int) -> torch.Tensor:
    """``w = J^T g = s o (g - (s . g))``, with which ``R = diag(w) - w s^T - s w^T``."""
    return out * (g - _row_sum(out * g, _axis(out, dim)))


@softmax_op.residual("x")
def softmax_residual(g, out, dim):
    """The diagonal of ``R = sum_k g_k d2 s_k/dx^2 = diag(w) - w s^T - s w^T``: ``w o (1 - 2 s)``."""
    return _softmax_w(g, out, dim) * (1 - 2 * out)


@softmax_op.residual_sqrt("x")
def softmax_residual_sqrt(g, out, dim):
    """``R = diag(w) - w s^T - s w^T`` per row, built in closed form, factorized by a batched ``eigh``."""
    w = _softmax_w(g, out, dim).movedim(dim, -1)  # [N, *rows, D]
    s = out.movedim(dim, -1)
    outer = w.unsqueeze(-1) * s.unsqueeze(-2)
    matrices = torch.diag_embed(w) - outer - outer.transpose(-1, -2)
    return _split_rows(matrices, out, dim)


# ---- log_softmax -----------------------------------------------------------------------------------

@log_softmax_op.jac_t("x")
def log_softmax_jac_t(v, out, dim):
    """``J^T v = v - s (1 . v)`` along the axis (``s = exp(out)``)."""
    return v - out.exp() * _row_sum(v, _axis(out, dim))


@log_softmax_op.diag("x")
def log_softmax_diag(d, out, dim):
    """HesScale eq. 8: ``sum_k (delta_ki - s_i)^2 d_k = d_i (1 - 2 s_i) + s_i^2 (1 . d)``."""
    s = out.exp()
    return d * (1 - 2 * s) + s * s * _row_sum(d, _axis(out, dim))


@log_softmax_op.residual("x")
def log_softmax_residual(g, out, dim):
    """The diagonal of ``R = -(1 . g) (diag(s) - s s^T)``: ``-(1 . g) s o (1 - s)``."""
    s = out.exp()
    return -_row_sum(g, _axis(out, dim)) * s * (1 - s)


@log_softmax_op.residual_sqrt("x")
def log_softmax_residual_sqrt(g, out, dim):
    """``R = -G C C^T`` with ``G = 1 . g`` and ``C = diag(sqrt s) (I - sqrt s sqrt s^T)``: columns
    ``sqrt|G| C_{:j}``, sign ``-1`` where ``G > 0`` (``+1`` otherwise), no eigen-decomposition."""
    s = out.exp().movedim(dim, -1)  # [N, *rows, D]
    total = g.sum(dim).unsqueeze(-1)  # [N, *rows, 1]
    q = s.sqrt()
    c = torch.diag_embed(q) - (s.unsqueeze(-1) * q.unsqueeze(-2))  # C_ij = q_i delta_ij - s_i q_j
    factor = c * total.abs().sqrt().unsqueeze(-1)
    sign = torch.where(total > 0, -1.0, 1.0).to(out.dtype).expand(s.shape)
    return _columns_of_rows(factor, sign, out, dim)
