"""The product of two activations, ``z = a @ b`` (user-written attention: ``q @ k.transpose(-2, -1)``,
``attn @ v``): ``operator.matmul`` (``@``), ``torch.matmul``, ``torch.bmm``, ``Tensor.matmul`` / ``bmm``
and the ATen overloads ``aten.matmul.default``, ``aten.bmm.default``.

Both operands carry the batch: ``a [N, *L, I, K]``, ``b [N, *L, K, J]`` with the same leading dims
``[N, *L]`` (no broadcasting), ``z [N, *L, I, J]``; every sample and leading index ``l`` is one matrix
product ``z_l = a_l b_l``. Where one side is a parameter or a constant (``x @ W``) the call is linear in
its data and stays with the generic rule, as do broadcasting products and ``a @ a`` (one value used as both
operands: the generic rule's HesScale diagonal of that one-input call keeps the cross terms of the two
uses, which a two-input op would drop): the canonicalizer returns ``None``.

Per block ``l`` (HBP eq. S.6 with ``dz_ij/da_ik = b_kj``, ``dz_ij/db_kj = a_ik``):

* ``jac_t``: ``J_a^T v = v b^T``, ``J_b^T v = a^T v``;
* ``diag`` (HesScale eq. 8, ``sum_m J_{m,p}^2 d_m``): ``d_a = d (b o b)^T``, ``d_b = (a o a)^T d``;
* second order: the op is bilinear, ``d2z/da2 = d2z/db2 = 0``, so the Hessian of ``g . (a @ b)`` has a
  zero diagonal (no ``residual`` rule: HesScale adds nothing, as the generic rule's zero diagonal) and
  is, jointly over ``(a, b)``, ``H = [[0, M], [M^T, 0]]`` with ``M[(i,k),(k',j)] = delta_kk' g_ij``.
  With the SVD ``g = sum_r sigma_r u_r v_r^T``, ``M (v_r (x) e_k) = sigma_r u_r (x) e_k`` and
  ``M^T (u_r (x) e_k) = sigma_r v_r (x) e_k``, so ``H`` has the eigenpairs
  ``+-sigma_r, (u_r (x) e_k ; +-v_r (x) e_k) / sqrt 2`` and is zero on their complement:
  ``residual_sqrt`` gives the columns ``sqrt(sigma_r / 2) (u_r (x) e_k ; +-v_r (x) e_k)`` with signs
  ``+-1``, ``2 R K`` per block (``R = min(I, J)``), zero outside their block ``l`` -- the generic rule's
  joint layout (``parts = (S_a [C, N, *a], S_b [C, N, *b])``, ``sign [C, N]``) with ``C = L 2 R K``
  columns instead of the generic ``L (I K + K J)``.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from ..node_info import INPUT, ancestors
from .registry import Match, define_op, example


def matmul(a, b):
    return torch.matmul(a, b)


op = define_op("matmul", "bilinear", matmul, inputs=("a", "b"))

_aten = torch.ops.aten


# ---- canonicalization ------------------------------------------------------------------------------

def computed_from_input(value: Any) -> bool:
    """Whether a traced value carries the batch: an fx node computed from the model input ``x``; a
    stand-in that is not an fx node but carries a floating-point example value (the rule tests' traced
    values) counts as one. Parameters (``get_attr``), constants and numbers do not."""
    if not isinstance(value, fx.Node):
        val = example(value)
        return val is not None and not isinstance(value, torch.Tensor) and val.is_floating_point()
    return any(n.op == "placeholder" and n.name == INPUT for n in ancestors(value))


def _canonical(a: Any, b: Any) -> Match | None:
    """``{"a": a, "b": b}`` where both are batched activations of the same leading dims ``[N, *L]``
    (``L`` possibly empty, at least one matrix axis pair), floating point, of one dtype; ``None`` (the
    generic rule) for anything else."""
    va, vb = example(a), example(b)
    if a is b:
        # a @ a: the generic rule takes it as one call of one input, whose HesScale diagonal keeps the cross
        # terms between the two uses; the hand op would pass them as two uses summed (a fan-out).
        return None
    if va is None or vb is None or not (computed_from_input(a) and computed_from_input(b)):
        return None
    if va.dim() < 3 or va.dim() != vb.dim() or va.shape[:-2] != vb.shape[:-2] or va.shape[-1] != vb.shape[-2]:
        return None
    if not (va.is_floating_point() and va.dtype == vb.dtype):
        return None
    return Match({"a": a, "b": b})


@op.function(operator.matmul, torch.matmul, torch.bmm)
def _from_function(node, a):
    return _canonical(a(0, "input"), a(1, "other" if node.target is not torch.bmm else "mat2"))


@op.function(_aten.matmul.default)
def _from_aten_matmul(node, a):
    return _canonical(a(0, "self"), a(1, "other"))


@op.function(_aten.bmm.default)
def _from_aten_bmm(node, a):
    return _canonical(a(0, "self"), a(1, "mat2"))


@op.method("matmul", "__matmul__")
def _from_method(node, a):
    return _canonical(a(0, "self"), a(1, "other"))


@op.method("bmm")
def _from_method_bmm(node, a):
    return _canonical(a(0, "self"), a(1, "mat2"))


@op.method("__rmatmul__")
def _from_method_r(node, a):
    return _canonical(a(1, "other"), a(0, "self"))  # x.__rmatmul__(y) = y @ x


def _diagonal(t: torch.Tensor, a0: int, a1: int, b0: int, b1: int) -> torch.Tensor:
    """A writable view of ``t``'s entries with equal indices on axes ``(a0, a1)`` and then on ``(b0, b1)``
    (axis numbers of the view after the first diagonal, whose axis is appended last)."""
    return torch.diagonal(torch.diagonal(t, dim1=a0, dim2=a1), dim1=b0, dim2=b1)


# ---- message rules ---------------------------------------------------------------------------------

@op.jac_t("a")
def matmul_jac_t_a(v, b):
    """``J_a^T v = v b^T`` for every column of ``v [*lead, N, *L, I, J]``."""
    return v @ b.transpose(-1, -2)


@op.jac_t("b")
def matmul_jac_t_b(v, a):
    """``J_b^T v = a^T v``."""
    return a.transpose(-1, -2) @ v


@op.diag("a")
def matmul_diag_a(d, b):
    """HesScale eq. 8: ``(d_a)_ik = sum_j d_ij b_kj^2``, ``d (b o b)^T``."""
    return d @ (b * b).transpose(-1, -2)


@op.diag("b")
def matmul_diag_b(d, a):
    """HesScale eq. 8: ``(d_b)_kj = sum_i a_ik^2 d_ij``, ``(a o a)^T d``."""
    return (a * a).transpose(-1, -2) @ d


@op.residual_sqrt("a", "b")
def matmul_residual_sqrt(g, a, b):
    """The joint signed factor of ``H = [[0, M], [M^T, 0]]``, ``M = g (x) I_K``, from the SVD of ``g``
    per sample and leading index: columns ``sqrt(sigma_r / 2) (u_r (x) e_k ; +-v_r (x) e_k)``, signs ``+-1``;
    column order ``(l, r, k, +-)``."""
    n, i_dim, k_dim, j_dim = a.shape[0], a.shape[-2], a.shape[-1], b.shape[-1]
    lead = tuple(a.shape[1:-2])
    blocks = 1
    for s in lead:
        blocks *= s
    u, sigma, vh = torch.linalg.svd(g.reshape(n, blocks, i_dim, j_dim), full_matrices=False)
    rank = sigma.shape[-1]
    scale = (sigma / 2).sqrt().unsqueeze(-2)  # [N, L, 1, R]
    su = u * scale  # [N, L, I, R]
    sv = vh.transpose(-1, -2) * scale  # [N, L, J, R]
    cols = blocks * rank * k_dim * 2
    # part_a[l, r, k, +-, n, l', i, k'] = delta_ll' delta_kk' su[n, l, i, r]; part_b likewise with +-sv: zeros
    # with the two Kronecker deltas' diagonals filled in place (no product with identity matrices).
    part_a = g.new_zeros(blocks, rank, k_dim, 2, n, blocks, i_dim, k_dim)
    part_b = g.new_zeros(blocks, rank, k_dim, 2, n, blocks, k_dim, j_dim)
    # diagonal over (l, l') then over (k, k'): [R, +-, N, I, L, K] and [R, +-, N, J, L, K]
    _diagonal(part_a, 0, 5, 1, 5).copy_(su.permute(3, 0, 2, 1).reshape(rank, 1, n, i_dim, blocks, 1))
    _diagonal(part_b, 0, 5, 1, 4).copy_(sv.permute(3, 0, 2, 1).reshape(rank, 1, n, j_dim, blocks, 1))
    part_b[:, :, :, 1].neg_()
    part_a = part_a.reshape((cols, n) + lead + (i_dim, k_dim))
    part_b = part_b.reshape((cols, n) + lead + (k_dim, j_dim))
    plus_minus = torch.tensor([1.0, -1.0], dtype=g.dtype, device=g.device)
    sign = plus_minus.repeat(cols // 2).unsqueeze(1).expand(cols, n).contiguous()
    return (part_a, part_b), sign
