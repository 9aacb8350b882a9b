"""What the compiler records on graph nodes, in one declared structure, and the names it gives inputs.

Every pass reads and writes a node's :class:`NodeInfo` (``info(node)``), never free-form
``node.meta`` keys: the canonical op it runs, its value's shape and dtype, what the user wrote, and
for the inserted nodes which message of which forward node they compute. torch.fx copies
``node.meta`` shallowly when it copies a node, so a copied node gets its own ``NodeInfo`` through
:func:`copy_info`, never a shared one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
import torch.fx as fx

# The program's placeholders, agreed here for the passes, the engine and the listing.
INPUT = "x"
TARGET = "y"
GENERATOR = "generator"
_PARAM_PREFIX = "p_"


def ancestors(node: fx.Node) -> set[fx.Node]:
    """``node`` and every node it is computed from."""
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def param_placeholder(name: str) -> str:
    """The placeholder of parameter ``name`` (``"1.weight"`` -> ``"p_1_weight"``)."""
    return _PARAM_PREFIX + name.replace(".", "_")


class Kind(str, Enum):
    """What a node of the curvature program computes."""

    INPUT = "input"  # a placeholder: x, y, a parameter, the generator
    CONSTANT = "constant"  # a get_attr: a buffer or tensor the model holds
    FORWARD = "forward"  # the model and loss, copied from the canonical graph
    DERIVED = "derived"  # a forward-side quantity of an op shared by its rules (phi'(x), x**2)
    GRAD = "grad"  # the gradient message g
    BUNDLE = "bundle"  # the stacked [g; S_loss; S_mc] columns
    SQRT = "sqrt"  # square-root factor columns S (and their signs)
    DIAG = "diag"  # a HesScale diagonal message d
    RESIDUAL = "residual"  # an op's second-order term phi''(x) g
    PARAM = "param"  # a parameter's share of a quantity, or its result
    FUSED = "fused"  # a fused node and the picks of its outputs
    OUTPUT = "output"

    @property
    def is_backward(self) -> bool:
        return self not in (Kind.INPUT, Kind.CONSTANT, Kind.FORWARD, Kind.OUTPUT)


@dataclass
class NodeInfo:
    """Everything fxcurv records on one node (``node.meta["fxcurv"]``)."""

    kind: Kind = Kind.FORWARD
    # Canonical graph: the op (``"linear"``), what the user wrote, the parameter a placeholder holds.
    op: str | None = None
    source: str = ""
    param: str | None = None
    requires_grad: bool = False
    # A generic node's call (fxcurv.rules.generic.GenericCall): what it runs and what its slots are.
    call: Any = None
    # Value: shape and dtype (``None`` where the value is not a tensor or not known yet).
    shape: tuple[int, ...] | None = None
    dtype: torch.dtype | None = None
    # Inserted nodes: the forward node whose messages they compute, which message, which stream.
    of: str = ""
    message: str = ""
    stream: str = ""
    # Fused nodes: the labels of the rules they replaced.
    contains: tuple[str, ...] = ()
    # Liveness (free_messages): values whose last use is this node; values alive after it.
    frees: tuple[str, ...] = ()
    live: int = 0

    def describe_value(self) -> str:
        return "" if self.shape is None else "[" + ", ".join(str(s) for s in self.shape) + "]"


_KEY = "fxcurv"


def info(node: fx.Node) -> NodeInfo:
    """The node's record, created empty on first access."""
    found = node.meta.get(_KEY)
    if found is None:
        found = node.meta[_KEY] = NodeInfo(kind=_default_kind(node))
    return found


def has_info(node: fx.Node) -> bool:
    return _KEY in node.meta


def set_info(node: fx.Node, **fields: Any) -> NodeInfo:
    """Set fields of the node's record; unknown field names are an error."""
    record = info(node)
    for name, value in fields.items():
        if not hasattr(record, name):
            raise AttributeError(f"NodeInfo has no field {name!r}")
        setattr(record, name, value)
    return record


def copy_info(new: fx.Node, old: fx.Node, **changes: Any) -> NodeInfo:
    """Give ``new`` its own copy of ``old``'s record, with ``changes``."""
    record = dataclasses.replace(info(old), **changes)
    new.meta[_KEY] = record
    return record


def set_value(node: fx.Node, value: Any) -> None:
    """Record shape and dtype of an example (or fake) value."""
    if isinstance(value, torch.Tensor):
        set_info(node, shape=tuple(value.shape), dtype=value.dtype)


def _default_kind(node: fx.Node) -> Kind:
    if node.op == "placeholder":
        return Kind.INPUT
    if node.op == "get_attr":
        return Kind.CONSTANT
    if node.op == "output":
        return Kind.OUTPUT
    return Kind.FORWARD
