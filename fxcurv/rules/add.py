"""The sum of two branches, ``z = a + b`` (residual connections): HBP Sec. B.3.

Both Jacobians are identities, so every message passes unchanged to both summands. Where the
branches meet again upstream (the fan-out of the residual block), the compiler sums the messages
arriving from each branch: exact for gradients and for square-root factor columns of one origin
(they are pushed through the *total* Jacobian, path by path), an approximation for the HesScale
diagonal (the cross terms between the two branches are dropped, as within a layer in HesScale eq. 4).
"""

from __future__ import annotations

import operator

import torch

from .registry import Match, define_op, example


def add(a, b):
    return a + b


op = define_op("add", "add", add, inputs=("a", "b"))


def _canonical(node, a, b):
    """The sum of two traced branches of equal shape; anything else (a constant, a broadcast, a
    parameter) is left to the generic rule (``None``)."""
    va, vb = example(a), example(b)
    if va is None or vb is None or isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return None
    if va.shape != vb.shape:
        return None
    return Match({"a": a, "b": b})


@op.function(operator.add, operator.iadd, torch.add)
def _from_function(node, a):
    if a(2, "alpha", 1) != 1:
        return None
    return _canonical(node, a(0, "input"), a(1, "other"))


@op.method("add", "add_", "__add__", "__iadd__")
def _from_method(node, a):
    if a(2, "alpha", 1) != 1:
        return None
    return _canonical(node, a(0, "self"), a(1, "other"))


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
