"""The messages of the curvature program, as typed streams.

Backpropagation sends *messages* from each op's output to its inputs. Which messages exist is the
union of what the requested quantities need (:class:`Needs`):

* the **gradient** ``g [N, ...]`` -- where a quantity reads it (:attr:`Needs.gradient`: the gradient
  itself, the per-sample gradients, the Hessian's residual terms) or nothing else would carry the
  backward walk; a curvature-only program (``compile(..., grad=False)``) of GGN quantities has none;
* **square-root factor columns** ``S [K, N, ...]`` (with signs where the curvature is indefinite),
  grouped by :class:`Origin`: where they start and what second-order term they carry
  (:class:`FactorSource`). ``sum_k sign_k S_k S_k^T`` is one origin's share of the per-sample curvature
  at a node (HBP eq. S.6-S.9); the origins' shares add up. Columns of one origin are summed where
  paths meet (a fan-out in the forward graph), columns of different origins never mix;
* **HesScale diagonals** ``d [N, ...]`` (:class:`DiagonalStream`), one stream per variant;
* **batch-averaged matrices** ``M [D, D]`` (:class:`DenseStream`): KFRA's and HBP's recursion
  ``M_x = E_n[J_n^T M_z J_n] + diag(sum_n phi''(x_n) g_n)`` (Botev eq. 29-31, HBP Sec. 3.2, S.11), one
  stream per treatment of the residual term.

The gradient and the columns that start at the loss (exact and Monte Carlo) pass every op alike, so
they travel stacked as one *bundle* ``[g; S_loss; S_mc]`` (:class:`BundleLayout` says which rows are
which; without the gradient ``[S_loss; S_mc]``): one ``W^T [...]`` product per linear layer moves all
of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch.fx as fx


class FactorSource(Enum):
    """What a group of square-root factor columns carries."""

    LOSS = "loss"  # the loss Hessian's exact factor, seeded at the loss (GGN)
    MC = "mc"  # a Monte Carlo factor of the loss Hessian, sampled at the loss
    RESIDUAL = "residual"  # an activation's residual diag(phi''(x) g) (HBP eq. S.9, second term)
    MIXED = "mixed"  # unit columns for the mixed second derivative of a weight used twice

    @property
    def starts_at_loss(self) -> bool:
        return self in (FactorSource.LOSS, FactorSource.MC)


@dataclass(frozen=True)
class Origin:
    """Where a group of factor columns starts: the source, the forward node (``""``: the loss) and,
    for a mixed term, the weight (its parameter name) whose second derivative it carries."""

    source: FactorSource
    at: str = ""
    weight: str = ""

    @property
    def label(self) -> str:
        return self.source.value if not self.at else f"{self.source.value}:{self.at}"


LOSS = Origin(FactorSource.LOSS)
MC = Origin(FactorSource.MC)


@dataclass(frozen=True)
class DiagonalStream:
    """A HesScale diagonal message (HesScale eq. 4, 8): with the activations' ``phi''(x) g`` terms
    (``hesscale``) or without (``hesscale_gn``)."""

    residual: bool

    @property
    def label(self) -> str:
        return "hesscale" if self.residual else "hesscale_gn"


class Residual(Enum):
    """What a batch-averaged matrix does with an activation's residual ``sum_n phi''(x_n) g_n``: drop it
    (the GGN: KFRA), keep it (HBP's Hessian), or keep its absolute value or positive part (EA-CG's
    positive-curvature Hessian, eq. 8b with gamma = -1 and gamma = 0)."""

    NONE = "ggn"
    SIGNED = "hessian"
    ABS = "pch_abs"
    CLIP = "pch_clip"


@dataclass(frozen=True)
class DenseStream:
    """A batch-averaged matrix message and the residual treatment it carries."""

    residual: Residual

    @property
    def label(self) -> str:
        return f"dense:{self.residual.value}"


@dataclass(frozen=True)
class Needs:
    """The message streams a quantity needs (the program carries the union over quantities)."""

    factors: frozenset[FactorSource] = frozenset()
    diagonals: frozenset[DiagonalStream] = frozenset()
    dense: frozenset[DenseStream] = frozenset()
    # (source, fraction): that source's columns are wanted on the first ceil(fraction N) samples only
    # (ggn_eigen's subsample=, ViViT B.1). Where no other quantity needs the source on the whole batch
    # and all ask for one fraction, the seed starts the columns on that prefix alone, outside the bundle
    # (see fxcurv.curvature.seed.prefix_samples); otherwise the source is carried on the whole batch.
    prefix: frozenset[tuple[FactorSource, float]] = frozenset()
    # The quantity reads the gradient message g at its parameters' uses (ParamUse.g).
    gradient: bool = False

    def __or__(self, other: Needs) -> Needs:
        return Needs(self.factors | other.factors, self.diagonals | other.diagonals, self.dense | other.dense,
                     self.prefix | other.prefix, self.gradient or other.gradient)

    @property
    def carries_gradient(self) -> bool:
        """Whether the program backpropagates ``g``: a quantity reads it, or a second-order residual
        (``phi''(x) g``: the Hessian's factor columns, HesScale's diagonal, HBP's matrices) or a tied
        weight's mixed term (``d2z/(dx dw)`` paired with ``g``) is built from it."""
        return (self.gradient or bool({FactorSource.RESIDUAL, FactorSource.MIXED} & self.factors)
                or any(s.residual for s in self.diagonals)
                or any(s.residual is not Residual.NONE for s in self.dense))

    def wants(self, source: FactorSource) -> bool:
        """Whether some quantity needs ``source``'s columns, on the whole batch or on a prefix of it."""
        return source in self.factors or any(s is source for s, _ in self.prefix)


@dataclass
class Columns:
    """One origin's columns at a node: dense ``S [K, N, ...]`` with ``sign [K, N]`` (``None``: all +1),
    or a diagonal source ``r [N, ...]`` standing for ``diag(r)`` (only at the node where it starts).
    ``samples``: the columns cover the batch's first ``samples`` samples only (``S [K, samples, ...]``,
    propagated with the ops' inputs and outputs restricted to them); ``None``: the whole batch."""

    origin: Origin
    value: fx.Node
    sign: fx.Node | None = None
    diagonal: bool = False
    samples: int | None = None


@dataclass(frozen=True)
class BundleLayout:
    """Rows of the bundle ``[g; S_loss; S_mc]``: row 0 is the gradient where it is carried
    (``gradient``); ``rows[origin]`` the slice of an origin's columns, ``signs[origin]`` their sign
    node (``None`` where positive)."""

    rows: dict[Origin, tuple[int, int]] = field(default_factory=dict)
    signs: dict[Origin, fx.Node | None] = field(default_factory=dict)
    gradient: bool = True

    @property
    def width(self) -> int:
        return int(self.gradient) + sum(stop - start for start, stop in self.rows.values())


@dataclass
class Inbox:
    """Messages sent to one forward node's output by its consumers, summed when it is visited."""

    bundles: list[fx.Node] = field(default_factory=list)
    diagonals: dict[DiagonalStream, list[fx.Node]] = field(default_factory=dict)
    columns: dict[Origin, list[Columns]] = field(default_factory=dict)
    dense: dict[DenseStream, list[fx.Node]] = field(default_factory=dict)


@dataclass
class Messages:
    """The summed messages at one forward node's output."""

    bundle: fx.Node
    gradient: fx.Node | None  # None: the program does not carry g (Needs.carries_gradient)
    diagonals: dict[DiagonalStream, fx.Node]
    columns: dict[Origin, Columns]
    dense: dict[DenseStream, fx.Node] = field(default_factory=dict)

    @property
    def g(self) -> fx.Node:
        """The gradient message; a quantity or rule reading it must say so (``Needs(gradient=True)``):
        an error at build time, never a factor column read as the gradient."""
        if self.gradient is None:
            raise RuntimeError("the gradient message g is read, but this program does not carry it: the quantity "
                               "reading it must declare Needs(gradient=True)")
        return self.gradient
