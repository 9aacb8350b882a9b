"""The pointwise op vocabulary: which torch calls a pointwise program may hold, and what each means.

A rule function reaches the compiler as whatever call its author wrote -- ``torch.mul``,
``operator.mul`` or the method ``Tensor.mul`` (a ``call_method`` node named ``"mul"``). The tables
below name each such target once, by kind and canonical meaning, and :func:`op_kind` is the one
lookup. The code generator (:mod:`.codegen`) writes Triton for every kind; the program builder
(:mod:`.program`) merges repeated calls only of the ops listed here, the ones known to be pure.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

__all__ = [
    "BINARY_OPS", "CAST_METHODS", "CLAMP_OPS", "COMPARISONS", "FILL_OPS", "LOGICAL_OPS", "MINMAX_OPS",
    "NOT_OPS", "POW_OPS", "UNARY_OPS", "WHERE_OPS", "is_hashable", "op_kind", "target_name",
]

# Arithmetic, as the infix operator it is.
BINARY_OPS: Mapping[Any, str] = {
    operator.add: "+", operator.sub: "-", operator.mul: "*", operator.truediv: "/",
    torch.add: "+", torch.sub: "-", torch.mul: "*", torch.div: "/", torch.true_divide: "/",
    torch.multiply: "*", torch.subtract: "-",
    "add": "+", "sub": "-", "mul": "*", "div": "/", "true_divide": "/",
}
COMPARISONS: Mapping[Any, str] = {
    operator.gt: ">", operator.lt: "<", operator.ge: ">=", operator.le: "<=", operator.eq: "==",
    operator.ne: "!=", torch.gt: ">", torch.lt: "<", torch.ge: ">=", torch.le: "<=", torch.eq: "==",
    torch.ne: "!=", "gt": ">", "lt": "<", "ge": ">=", "le": "<=", "eq": "==", "ne": "!=",
}
# Logical operations of boolean values, as the bitwise operator that computes them.
LOGICAL_OPS: Mapping[Any, str] = {
    operator.and_: "&", operator.or_: "|", operator.xor: "^", torch.logical_and: "&",
    torch.logical_or: "|", torch.logical_xor: "^", "logical_and": "&", "logical_or": "|",
    "logical_xor": "^",
}
_UNARY_NAMES = ("tanh", "sigmoid", "exp", "log", "sqrt", "rsqrt", "erf", "abs", "sign", "relu", "neg",
                "square", "reciprocal")
# One-operand functions, by their torch name.
UNARY_OPS: Mapping[Any, str] = {
    **{getattr(torch, n): n for n in _UNARY_NAMES},
    **{n: n for n in _UNARY_NAMES},
    operator.neg: "neg", operator.abs: "abs", F.relu: "relu", operator.pos: "pos",
    torch.Tensor.tanh: "tanh", torch.Tensor.sigmoid: "sigmoid", torch.Tensor.exp: "exp",
}
NOT_OPS: Mapping[Any, str] = {
    operator.invert: "~", torch.logical_not: "~", "logical_not": "~", "bitwise_not": "~",
}
# Tensors filled with one value, by that value (``None``: given as ``fill_value``).
FILL_OPS: Mapping[Any, float | None] = {torch.ones_like: 1.0, torch.zeros_like: 0.0, torch.full_like: None}
# Methods that only change the dtype.
CAST_METHODS = frozenset({"to", "float", "double", "half", "bfloat16", "type_as"})
# Elementwise maximum / minimum, as the comparison that keeps the first operand.
MINMAX_OPS: Mapping[Any, str] = {torch.maximum: ">", torch.minimum: "<", "maximum": ">", "minimum": "<"}
CLAMP_OPS: Mapping[Any, str] = {
    torch.clamp: "clamp", "clamp": "clamp", torch.clamp_min: "clamp_min", "clamp_min": "clamp_min",
    torch.clamp_max: "clamp_max", "clamp_max": "clamp_max",
}
POW_OPS = frozenset({operator.pow, torch.pow, "pow"})
WHERE_OPS = frozenset({torch.where})

# Kinds looked up in a table, in lookup order (a target is in at most one of them).
_TABLE_KINDS: tuple[tuple[str, Mapping[Any, Any]], ...] = (
    ("bin", BINARY_OPS), ("cmp", COMPARISONS), ("bool", LOGICAL_OPS), ("unary", UNARY_OPS),
    ("not", NOT_OPS), ("minmax", MINMAX_OPS), ("clamp", CLAMP_OPS),
)


def is_hashable(x: object) -> bool:
    """Whether ``x`` can be looked up in the tables (a target may be any callable)."""
    try:
        hash(x)
    except TypeError:
        return False
    return True


def op_kind(node: fx.Node) -> str | None:
    """The kind of ``node``'s op -- ``"bin"``, ``"cmp"``, ``"bool"``, ``"unary"``, ``"not"``,
    ``"minmax"``, ``"clamp"``, ``"fill"``, ``"where"``, ``"pow"``, ``"cast"`` or ``"getattr"`` (the
    ``.dtype`` of a value) -- or ``None`` when it is not in the vocabulary."""
    t = node.target
    if node.op == "call_function" and t is getattr:
        return "getattr"
    if not is_hashable(t):
        return None
    if node.op == "call_method":
        if t in CAST_METHODS:
            return "cast"
    elif node.op != "call_function":
        return None
    for kind, table in _TABLE_KINDS:
        if t in table:
            return kind
    if node.op == "call_function":
        if t in FILL_OPS:
            return "fill"
        if t in WHERE_OPS:
            return "where"
    if t in POW_OPS:
        return "pow"
    return None


def target_name(target: Any) -> str:
    """A readable, stable name of a call target: ``"torch.tanh"``, ``"_operator.mul"``, a method's
    name as it is."""
    if isinstance(target, str):
        return target
    mod = getattr(target, "__module__", None) or ""
    return f"{mod}.{getattr(target, '__qualname__', getattr(target, '__name__', repr(target)))}"
