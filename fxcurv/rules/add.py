"""The sum of two branches, ``z = a + b`` (residual connections): HBP Sec. B.3; and ``z = x + p``, a
trainable parameter broadcast over the batch (learned positions, a bias written by hand).

Both Jacobians are identities, so every message passes unchanged to both summands. Where the
branches meet again upstream (the fan-out of the residual block), the compiler sums the messages
arriving from each branch: exact for gradients and for square-root factor columns of one origin
(they are pushed through the *total* Jacobian, path by path), an approximation for the HesScale
diagonal (the cross terms between the two branches are dropped, as within a layer in HesScale eq. 4).

The functions that spell a sum also spell ``x + 1``: their canonicalizer sends a tensor and a number
to ``scalar_affine`` (:mod:`fxcurv.rules.scalar`) and leaves other combinations to the generic rule.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import nn

from .registry import Match, define_op, example
from .scalar import Arith, binary_match, is_traced
from .selection import define_selection_parameter


def add(a, b):
    return a + b


op = define_op("add", "add", add, inputs=("a", "b"))


def _canonical(a: Any, b: Any, alpha: Any = 1) -> Match | None:
    """``a + alpha b``: two traced tensors of equal shape (``alpha = 1``) are this op; a traced
    tensor and a number are ``scalar_affine`` (:func:`~fxcurv.rules.scalar.binary_match`); anything
    else -- a broadcasting sum, ``alpha != 1``, a tensor constant or buffer -- has no hand rule
    (``None``: the generic rule)."""
    if is_traced(a) and is_parameter(b) and (found := _param_match(a, b, alpha)) is not None:
        return found
    if is_parameter(a) and is_traced(b) and (found := _param_match(b, a, alpha)) is not None:
        return found
    if is_traced(a) and is_traced(b):
        va, vb = example(a), example(b)
        if va is None or vb is None or va.shape != vb.shape or alpha != 1:
            return None
        return Match({"a": a, "b": b})
    return binary_match(Arith.ADD, a, b, alpha)


@op.function(operator.add, operator.iadd, torch.add, torch.ops.aten.add.Tensor, torch.ops.aten.add.Scalar)
def _from_function(node, a):
    return _canonical(a(0, "input"), a(1, "other"), a(2, "alpha", 1))


# Not the in-place ``Tensor.add_``: ``h.add_(g)`` changes ``h`` for every later user of ``h`` in
# eager PyTorch, while in the traced graph those users read ``h`` as it was (``h += g`` rebinds the
# name, ``operator.iadd``, and is fine).
@op.method("add", "__add__", "__iadd__", "__radd__")
def _from_method(node, a):
    if node.target == "__radd__":  # x.__radd__(c) = c + x
        return _canonical(a(1, "other"), a(0, "self"))
    return _canonical(a(0, "self"), a(1, "other"), a(2, "alpha", 1))


@op.jac_t("a")
def add_jac_t_a(v):
    return v


@op.jac_t("b")
def add_jac_t_b(v):
    return v


@op.diag("a")
def add_diag_a(d):
    return d


@op.diag("b")
def add_diag_b(d):
    return d


@op.dense("a")
def add_dense_a(m):
    """HBP Sec. B.3: both Jacobians are identities."""
    return m


@op.dense("b")
def add_dense_b(m):
    return m


# ---- a parameter broadcast over the batch ---------------------------------------------------------
#
# ``z = x + p`` with ``x [N, *s]`` and a trainable ``p`` that broadcasts to one sample's shape ``s``
# (``[1, T, E]`` learned positions, ``[E]`` a bias): ``J_x = I`` and, per sample, ``J_p`` is the 0/1 matrix
# that copies each entry of ``p`` to the positions it is broadcast over. So ``J_p^T v`` sums a message over
# those positions (HBP eq. S.8b with ``J_b = I`` per position); the GGN diagonal of ``p`` squares the
# per-sample sums of the factor columns, HesScale's (eq. 9) sums ``d`` over the positions (the diagonal of
# ``J_p^T diag(d) J_p``: each entry of ``p`` reaches a position once). The op is linear in ``x`` and ``p``.


def is_parameter(v: Any) -> bool:
    """A parameter of the model: an ``nn.Parameter`` or a traced ``get_attr`` whose value is one."""
    return isinstance(v, nn.Parameter) or isinstance(example(v), nn.Parameter)


def add_param(x, p):
    return x + p


param_op = define_op("add_param", "add", add_param, inputs=("x", "p"), params=("p",))


def _param_match(x: Any, p: Any, alpha: Any) -> Match | None:
    """``x + p`` where ``p`` broadcasts to one sample of ``x`` without reaching the batch axis (``p`` of at
    most ``x.dim()`` dims, its first of size 1 where it has as many); ``None`` (the generic rule) else."""
    vx, vp = example(x), example(p)
    if alpha != 1 or vx is None or vp is None or vx.dim() == 0 or vp.dim() > vx.dim():
        return None
    if vp.dim() == vx.dim() and vp.shape[0] != 1:
        return None  # a parameter with a batch axis of its own
    aligned = (1,) * (vx.dim() - 1 - _sample_dims(vp, vx)) + tuple(vp.shape[vp.dim() - _sample_dims(vp, vx):])
    if any(a not in (1, b) for a, b in zip(aligned, vx.shape[1:])):
        return None  # p does not broadcast to x (torch would broadcast x instead)
    return Match({"x": x, "p": p}, op=param_op)


def _sample_dims(vp: torch.Tensor, vx: torch.Tensor) -> int:
    """How many trailing dims of ``p`` align with one sample's dims (all but a leading batch axis of 1)."""
    return vp.dim() - 1 if vp.dim() == vx.dim() else vp.dim()


def add_param_per_sample_p(v: torch.Tensor, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``J_p^T v`` per sample, ``[*lead, N, *s] -> [*lead, N, *p.shape]``: a message summed over the positions
    ``p`` is broadcast over (HBP eq. S.8b with ``J_b = I`` per position)."""
    lead = v.dim() - x.dim()
    k = _sample_dims(p, x)
    aligned = (1,) * (x.dim() - 1 - k) + tuple(p.shape[p.dim() - k:])
    summed = v.sum_to_size(tuple(v.shape[: lead + 1]) + aligned)
    return summed.reshape(tuple(v.shape[: lead + 1]) + tuple(p.shape))


@param_op.jac_t("x", view=True)
def add_param_jac_t_x(v):
    """``J_x = I``."""
    return v


@param_op.diag("x")
def add_param_diag_x(d):
    return d


# grad, per_sample, diag_sqrt, diag_diag (``d`` summed over the positions: each entry of ``p`` reaches a
# position once), batch_l2, batch_diag_sqrt, gram.
define_selection_parameter(param_op, "p", add_param_per_sample_p)
