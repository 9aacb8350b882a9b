"""The sum of two branches, ``z = a + b`` (residual connections): HBP Sec. B.3.

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

from .registry import Match, define_op, example
from .scalar import Arith, binary_match, is_traced


def add(a, b):
    return a + b


op = define_op("add", "add", add, inputs=("a", "b"))


def _canonical(a: Any, b: Any, alpha: Any = 1) -> Match | None:
    """``a + alpha b``: two traced tensors of equal shape (``alpha = 1``) are this op; a traced
    tensor and a number are ``scalar_affine`` (:func:`~fxcurv.rules.scalar.binary_match`); anything
    else -- a broadcasting sum, ``alpha != 1``, a tensor constant or buffer -- has no hand rule
    (``None``: the generic rule)."""
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
