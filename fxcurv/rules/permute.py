"""Permutations of the per-sample axes (``x.transpose(1, 2)``, ``k.transpose(-2, -1)``, ``x.permute(0, 2, 1, 3)``,
``torch.transpose``, ``torch.permute``, ``swapaxes`` / ``swapdims``; ATen ``aten.transpose.int``,
``aten.permute.default``).

``z = x.permute(p)`` with ``p[0] = 0`` (the batch stays at dim 0) reorders each sample's entries: its
Jacobian is a permutation matrix ``P``, so (HBP Sec. D.1, as for a reshape) every message is permuted
back, ``J^T v = P^T v`` -- the inverse permutation ``p^{-1}`` of the message's trailing axes -- and HesScale
eq. 8's ``(P o P)^T d = P^T d`` likewise. The op is linear: no second-order term. A permutation that
moves the batch axis is left to the generic rule (``None``), which refuses what it cannot prove per sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .registry import Match, define_op, example


def permute(x, dims):
    return x.permute(dims)


op = define_op("permute", "permute", permute, inputs=("x",))

_aten = torch.ops.aten


# ---- canonicalization ------------------------------------------------------------------------------

def _match(x: Any, dims: Sequence[int] | None) -> Match | None:
    """``{"x": x}`` with the permutation ``dims`` (non-negative, over all axes of ``x``) where it keeps
    the batch at dim 0 and moves some other axis; ``None`` otherwise (the generic rule)."""
    if dims is None:
        return None
    perm = tuple(dims)
    if perm[0] != 0 or perm == tuple(range(len(perm))):
        return None
    return Match({"x": x}, {"dims": perm})


def _swap(x: Any, dim0: Any, dim1: Any) -> Match | None:
    """``x.transpose(dim0, dim1)`` as a permutation, or ``None`` where the shape is unknown."""
    val = example(x)
    if val is None or not (isinstance(dim0, int) and isinstance(dim1, int)) or val.dim() < 2:
        return None
    perm = list(range(val.dim()))
    a, b = dim0 % val.dim(), dim1 % val.dim()
    perm[a], perm[b] = perm[b], perm[a]
    return _match(x, perm)


def _reorder(x: Any, dims: Any) -> Match | None:
    """``x.permute(dims)`` with ``dims`` a sequence of (possibly negative) axes of ``x``."""
    val = example(x)
    if val is None or not all(isinstance(d, int) for d in dims) or len(dims) != val.dim():
        return None
    return _match(x, [d % val.dim() for d in dims])


@op.function(torch.transpose, torch.swapaxes, torch.swapdims)
def _from_swap_function(node, a):
    return _swap(a(0, "input"), a(1, "dim0"), a(2, "dim1"))


@op.function(_aten.transpose.int)
def _from_aten_transpose(node, a):
    return _swap(a(0, "self"), a(1, "dim0"), a(2, "dim1"))


@op.method("transpose", "swapaxes", "swapdims")
def _from_swap_method(node, a):
    return _swap(a(0, "self"), a(1, "dim0"), a(2, "dim1"))


@op.function(torch.permute, _aten.permute.default)
def _from_permute_function(node, a):
    return _reorder(a(0, "input" if node.target is torch.permute else "self"), a(1, "dims"))


@op.method("permute")
def _from_permute_method(node, a):
    # x.permute(0, 2, 1) or x.permute((0, 2, 1)) / x.permute(dims=(0, 2, 1))
    dims = a.args[1:] if len(a.args) > 2 else a(1, "dims")
    return _reorder(a(0, "self"), tuple(dims) if isinstance(dims, (tuple, list)) else (dims,))


# ---- rules -----------------------------------------------------------------------------------------

def _permute_back(v: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``v [*lead, N, *z]`` with its trailing ``len(dims)`` axes permuted by ``dims^{-1}``."""
    lead = v.dim() - len(dims)
    inverse = sorted(range(len(dims)), key=lambda i: dims[i])
    return v.permute(tuple(range(lead)) + tuple(lead + i for i in inverse))


@op.jac_t("x", view=True)
def permute_jac_t(v, dims):
    """``J^T v = P^T v``: every column permuted back."""
    return _permute_back(v, dims)


@op.diag("x", view=True)
def permute_diag(d, dims):
    """HesScale eq. 8 for a permutation matrix: ``(P o P)^T d = P^T d``."""
    return _permute_back(d, dims)
