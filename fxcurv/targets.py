"""Graph-node targets: how the listing names each function in a program, and what fusion may do with it.

Every function the compiler puts into a curvature program -- a rule, a message sum, a column pick, a
fused kernel -- is declared here with a label (``linear.jac_t[x]``) and a :class:`Fusion`
declaration. The fusion pass, the product-sharing pass and the listing read these declarations;
none of them matches function names. This module imports nothing else of fxcurv, so that the rules
and the factor helpers below them can declare their functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any


class Left(Enum):
    """The left operand of a parameter :class:`Reduction`, made from the rule's message."""

    MESSAGE = "message"  # the message itself, [N, O] (a gradient g or a HesScale diagonal d)
    SIGNED_SQUARES = "signed_squares"  # sum_k sign_k S_k**2 of factor columns S [K, N, O]


@dataclass(frozen=True)
class Reduction:
    """A parameter rule that is ``left^T @ op[right]`` summed over samples (``right=None``: ``left``
    summed over samples), valid where the op's input ``x`` is ``[N, I]``. Rules of one op node that
    declare reductions over the same input share one fused node reading ``x`` once."""

    left: Left
    right: str | None


@dataclass(frozen=True)
class SampleReduction:
    """A parameter rule that reduces its op's per-sample parameter products ``J_n^T v_n`` of one message
    ``v [N, ...]``: ``"sum"`` over the samples (the gradient), ``"squares"`` (``sum_n (J_n^T v_n)^2``: a
    ``diag_sqrt`` of the one unsigned column ``[v]``) or ``"norms"`` (``|J_n^T v_n|^2`` per sample). Rules
    of one op node declaring reductions of the same message share one fused node,
    ``fused(v, reduces, **context)``, which forms each block of products once and returns the
    reductions ``reduces`` asks for, in its order."""

    reduce: str
    fused: Callable[..., tuple[Any, ...]]


@dataclass(frozen=True)
class Fusion:
    """What the fusion pass may do with a node.

    ``pointwise`` -- an elementwise function of its tensor arguments (broadcast over leading dims),
    fusible into generated kernels; ``matmul="weight"`` -- ``message @ weight``, the product an
    elementwise epilogue can join (HBP B.4); ``squares="weight"`` -- ``weight * weight``, which a
    product may square as it loads its operand instead; ``fresh`` -- returns a newly allocated tensor
    (implied by ``pointwise`` and ``matmul``) that a fused kernel reading it last may overwrite;
    ``view`` -- returns a view of its message (a crop), fresh if the message was; ``reduction`` -- see
    :class:`Reduction`; ``impure`` -- draws random numbers: never merged with an equal-looking node;
    ``sample_reduction`` -- see :class:`SampleReduction`; ``column`` -- returns its message as one factor
    column ``[1, N, ...]`` (a view), which a ``"squares"`` sample reduction reads through.
    """

    pointwise: bool = False
    matmul: str | None = None
    squares: str | None = None
    fresh: bool = False
    view: bool = False
    reduction: Reduction | None = None
    impure: bool = False
    sample_reduction: SampleReduction | None = None
    column: bool = False

    @property
    def allocates(self) -> bool:
        return self.fresh or self.pointwise or self.matmul is not None


@dataclass(frozen=True)
class TargetInfo:
    """How the listing names a graph-node target, and what fusion may do with it."""

    label: str
    fusion: Fusion = Fusion()


class LabeledTarget:
    """Base of callable objects used as graph-node targets (fused kernels): they carry their info."""

    info: TargetInfo

    @property
    def __name__(self) -> str:  # torch.fx's code generator names a target's global by it
        return self.info.label.replace(".", "_")


# Every declared function, with its label and fusion declaration.
TARGETS: dict[Callable[..., Any], TargetInfo] = {}


def declare_target(fn: Callable[..., Any], label: str | None = None, fusion: Fusion | None = None,
                   **tags: Any) -> Callable[..., Any]:
    """Declare a graph-node target: its listing label and fusion tags (refused twice)."""
    if fn in TARGETS:
        raise ValueError(f"graph-node target {fn!r} is declared twice")
    TARGETS[fn] = TargetInfo(label or fn.__name__, fusion if fusion is not None else Fusion(**tags))
    return fn


def target(label: str | None = None, **tags: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator form of :func:`declare_target`."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        return declare_target(fn, label, **tags)

    return deco


def target_info(target: Any) -> TargetInfo:
    """The label and fusion declaration of a node's target (torch functions: their name, no tags)."""
    if isinstance(target, LabeledTarget):
        return target.info
    found = TARGETS.get(target) if _hashable(target) else None
    if found is not None:
        return found
    return TargetInfo(getattr(target, "__name__", str(target)))


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True
