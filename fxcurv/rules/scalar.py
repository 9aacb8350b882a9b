"""Arithmetic of one traced tensor with Python numbers: ``z = a x + c`` and ``z = x ** p``.

* ``scalar_affine``, ``z = a x + c`` with numbers ``a`` and ``c``: ``0.5 * x``, ``x / 4``, ``x + 1``,
  ``1 - x``, ``-x`` (``operator``, ``torch`` and ``Tensor`` spellings). Its Jacobian is ``a I``:

  * ``jac_t``:    ``J^T v = a v`` (gradients and square-root factor columns alike);
  * ``diag``:     ``d_x = a^2 d_z`` (HesScale eq. 4 for a diagonal Jacobian);
  * ``dense``:    ``J^T M J = a^2 M`` (Botev eq. 29 with ``J = a I``);
  * no residual: the map is linear in ``x`` (its Hessian vanishes).

* ``pow``, ``z = x ** p`` with a number ``p`` (``x ** 2``, ``x.pow(3)``, ``torch.square(x)``): an
  elementwise activation (:func:`~fxcurv.rules.elementwise.define_activation`) with
  ``phi' = p x^(p - 1)`` and ``phi'' = p (p - 1) x^(p - 2)``.

The sums and differences are spelled with the functions of the two-branch sum ``add``
(``operator.add``, ``torch.add``, ``Tensor.add``): its canonicalizer (:mod:`fxcurv.rules.add`) sends a
tensor and a number here through :func:`binary_match`. Every other combination -- the product or
quotient of two traced tensors, a number divided by a tensor, a tensor constant -- has no hand rule
here: the canonicalizers return ``None`` (the generic rule).
"""

from __future__ import annotations

import operator
from enum import Enum
from typing import Any

import torch

from .elementwise import define_activation
from .registry import Args, Match, define_op, example


def scalar_affine(x, scale=1.0, shift=0.0):
    return x * scale + shift


affine = define_op("scalar_affine", "scalar", scalar_affine, inputs=("x",))


class Arith(Enum):
    """The binary arithmetic a call spells; ``RSUB`` is ``torch.rsub(x, c) = c - x``."""

    MUL = "mul"
    DIV = "div"
    ADD = "add"
    SUB = "sub"
    RSUB = "rsub"


def is_number(v: Any) -> bool:
    """A real Python number (``bool`` included: ``True * x`` is ``x``)."""
    return isinstance(v, (int, float))


def is_traced(v: Any) -> bool:
    """A traced value with a floating-point tensor example (an fx node), not a constant tensor."""
    val = example(v)
    return val is not None and not isinstance(v, torch.Tensor) and val.is_floating_point()


def _affine(x: Any, scale: float, shift: float) -> Match:
    return Match({"x": x}, {"scale": float(scale), "shift": float(shift)}, op=affine)


def binary_match(kind: Arith, a: Any, b: Any, alpha: Any = 1) -> Match | None:
    """``a (kind) b`` (``a + alpha b`` and ``a - alpha b`` for ADD and SUB, as ``torch.add`` /
    ``torch.sub`` take ``alpha``) as a ``scalar_affine`` match where one side is a traced tensor and
    the other a number; ``None`` otherwise (two tensors are the caller's business)."""
    if not is_number(alpha):
        return None
    if is_traced(a) and is_number(b):
        if kind is Arith.MUL:
            return _affine(a, b, 0.0)
        if kind is Arith.DIV:
            return None if b == 0 else _affine(a, 1.0 / b, 0.0)
        if kind is Arith.ADD:
            return _affine(a, 1.0, alpha * b)
        if kind is Arith.SUB:
            return _affine(a, 1.0, -alpha * b)
        return _affine(a, -alpha, b)  # rsub(x, c) = c - alpha x
    if is_number(a) and is_traced(b):
        if kind is Arith.MUL:
            return _affine(b, a, 0.0)
        if kind is Arith.ADD:
            return _affine(b, alpha, a)
        if kind is Arith.SUB:
            return _affine(b, -alpha, a)
        return None  # c / x is not affine; rsub(c, x) is not a torch signature
    return None


_FUNCTIONS = {operator.mul: Arith.MUL, operator.imul: Arith.MUL, torch.mul: Arith.MUL,
              operator.truediv: Arith.DIV, operator.itruediv: Arith.DIV, torch.div: Arith.DIV,
              torch.true_divide: Arith.DIV, operator.sub: Arith.SUB, operator.isub: Arith.SUB,
              torch.sub: Arith.SUB, torch.rsub: Arith.RSUB,
              # The exported (ATen) spellings: ``alpha`` and ``rounding_mode`` keyword-only, as in torch.
              torch.ops.aten.mul.Tensor: Arith.MUL, torch.ops.aten.mul.Scalar: Arith.MUL,
              torch.ops.aten.div.Tensor: Arith.DIV, torch.ops.aten.div.Scalar: Arith.DIV,
              torch.ops.aten.div.Tensor_mode: Arith.DIV, torch.ops.aten.sub.Tensor: Arith.SUB,
              torch.ops.aten.sub.Scalar: Arith.SUB, torch.ops.aten.rsub.Scalar: Arith.RSUB}
# No in-place methods (``h.mul_(2)``): they mutate ``h`` for every later user of ``h`` in eager
# PyTorch, while the traced graph's later users of ``h`` read the node before the call.
_METHODS = {"mul": Arith.MUL, "__mul__": Arith.MUL, "__rmul__": Arith.MUL,
            "div": Arith.DIV, "__truediv__": Arith.DIV, "true_divide": Arith.DIV,
            "sub": Arith.SUB, "__sub__": Arith.SUB, "__rsub__": Arith.RSUB}


def _rounding(kind: Arith, a: Args) -> bool:
    """``torch.div(..., rounding_mode="floor")`` is not affine (its derivative is zero)."""
    return kind is Arith.DIV and a(2, "rounding_mode", None) is not None


@affine.function(*_FUNCTIONS)
def _from_function(node, a: Args) -> Match | None:
    kind = _FUNCTIONS[node.target]
    if _rounding(kind, a):
        return None
    alpha = a(2, "alpha", 1) if kind in (Arith.SUB, Arith.RSUB) else 1
    return binary_match(kind, a(0, "input"), a(1, "other"), alpha)


@affine.method(*_METHODS)
def _from_method(node, a: Args) -> Match | None:
    kind = _METHODS[node.target]
    if _rounding(kind, a):
        return None
    alpha = a(2, "alpha", 1) if kind in (Arith.SUB, Arith.RSUB) else 1
    if node.target == "__rmul__":  # x.__rmul__(c) = c * x
        return binary_match(kind, a(1, "other"), a(0, "self"))
    return binary_match(kind, a(0, "self"), a(1, "other"), alpha)


@affine.function(operator.neg, torch.neg, torch.negative, torch.ops.aten.neg.default)
def _neg_from_function(node, a: Args) -> Match | None:
    x = a(0, "input")
    return _affine(x, -1.0, 0.0) if is_traced(x) else None


@affine.method("neg", "negative", "__neg__")
def _neg_from_method(node, a: Args) -> Match | None:
    x = a(0, "self")
    return _affine(x, -1.0, 0.0) if is_traced(x) else None


@affine.jac_t("x", pointwise=True)
def scalar_affine_jac_t(v, scale):
    """``J^T v = a v``."""
    return v * scale


@affine.diag("x", pointwise=True)
def scalar_affine_diag(d, scale):
    """HesScale eq. 4 with ``J = a I``: ``a^2 d``."""
    return d * (scale * scale)


@affine.dense("x")
def scalar_affine_dense(m, scale):
    """Botev eq. 29 with ``J = a I``: ``a^2 M``."""
    return m * (scale * scale)


# ---- powers ---------------------------------------------------------------------------------------

def power(x, exponent=1.0):
    return torch.pow(x, exponent)


def _power_d1(x, exponent):
    """``p x^(p - 1)``; ``0`` for ``p = 0`` (where the formula would give ``0 * inf`` at ``x = 0``)."""
    if exponent == 0:
        return torch.zeros_like(x)
    return exponent * torch.pow(x, exponent - 1)


def _power_d2(x, exponent):
    """``p (p - 1) x^(p - 2)``; ``0`` for ``p`` in ``{0, 1}``."""
    if exponent in (0, 1):
        return torch.zeros_like(x)
    return (exponent * (exponent - 1)) * torch.pow(x, exponent - 2)


pow_op = define_activation("pow", power, _power_d1, _power_d2)


def _power_match(x: Any, exponent: Any) -> Match | None:
    """``x ** p`` for a traced ``x`` and a number ``p``; ``None`` otherwise (``2 ** x``, a tensor
    exponent)."""
    if is_traced(x) and is_number(exponent):
        return Match({"x": x}, {"exponent": exponent})
    return None


@pow_op.function(operator.pow, operator.ipow, torch.pow, torch.ops.aten.pow.Tensor_Scalar)
def _pow_from_function(node, a: Args) -> Match | None:
    return _power_match(a(0, "input"), a(1, "exponent"))


@pow_op.method("pow", "__pow__")
def _pow_from_method(node, a: Args) -> Match | None:
    return _power_match(a(0, "self"), a(1, "exponent"))


@pow_op.function(torch.square, torch.ops.aten.square.default)
def _square_from_function(node, a: Args) -> Match | None:
    return _power_match(a(0, "input"), 2)


@pow_op.method("square")
def _square_from_method(node, a: Args) -> Match | None:
    return _power_match(a(0, "self"), 2)
