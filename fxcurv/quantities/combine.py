"""How a quantity's per-batch values combine into its value on the whole data set (``engine.accumulate``).

Notation (:mod:`fxcurv.data`). Batch ``b`` has ``N_b`` samples and a loss ``L_b`` reduced by ``"mean"``
over ``W_b`` terms (samples, output entries, non-ignored targets) or by ``"sum"``. The loss of the
concatenated data set is ``L = sum_b (u_b / Z) L_b`` with the *unnormalized* weight ``u_b = W_b`` and
``Z = sum_b W_b`` for a mean, ``u_b = Z = 1`` for a sum; ``w_b = u_b / Z`` is
:func:`fxcurv.data.batch_weights`' weight. Accumulators add ``u_b``-weighted values in one pass (a loader
may be a single-pass iterable) and divide by the power of ``Z`` at the end, when it is known.

A quantity whose per-sample terms carry the loss's scale to the power ``p`` combines exactly as

* ``p``-homogeneous sums over samples (shaped like the parameter): ``Q = sum_b u_b^p Q_b / Z^p``
  (:class:`WeightedSum`): ``p = 1`` for everything linear in the loss (gradient, GGN and Hessian
  diagonals, HesScale's backpropagated diagonals -- sums over samples of per-sample terms, each linear
  in the scale of ``g`` and of the loss Hessian); ``p = 2`` for ``sum_n g_n^2`` (each ``g_n`` carries
  ``1/W_b`` in the batch, ``1/W`` in the data set);
* per-sample values: concatenated along the sample axis, each batch's scaled by ``(u_b / Z)^p``
  (:class:`Concatenated`): ``p = 1`` for per-sample gradients and GGN diagonals, ``2`` for squared
  gradient norms, ``1/2`` for square-root factors ``J_n^T S_n`` (``S`` carries ``sqrt`` of the scale);
* Kronecker factors (:class:`KroneckerFactors`): ``G`` linear in the loss (``p = 1``); ``A = (1/N_b)
  sum_n x_n x_n^T`` is a mean over samples, whatever the loss: ``A = sum_b N_b A_b / sum_b N_b``;
* the variance of the per-sample gradients (:class:`VarianceFromMoments`), from the first and second
  moments: ``(1/N) sum_n g_n^2 - ((1/N) sum_n g_n)^2`` with ``N = sum_b N_b``;
* matrix-free blocks (:class:`OperatorSum`): ``K = sum_b (u_b / Z) K_b`` as products, in one process.

Across processes (``torch.distributed``), every accumulator's partial sums are all-reduced and its
per-sample parts gathered in rank order (:meth:`Accumulator.reduce`) before the division by ``Z``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import torch

from ..errors import NotCombinableError
from ..operators import BlockOperator, Kronecker, KroneckerLayout


@dataclass(frozen=True)
class BatchShare:
    """One batch's part in the data set: ``weight`` ``u_b`` (``W_b`` for a mean-reduced loss, ``1`` for a
    sum), ``samples`` ``N_b``, the batch's whole ``result`` (a quantity may combine with another one's
    value, as the variance with the gradient) and ``param``, the parameter the value belongs to (``None``
    for the loss and whole-network quantities)."""

    weight: float
    samples: int
    result: Mapping[str, Any]
    param: str | None = None


@dataclass(frozen=True)
class DataSetTotal:
    """The data set's normalizer ``Z`` (``sum_b W_b`` for a mean-reduced loss, ``1`` for a sum) and its
    number of samples ``N = sum_b N_b``."""

    weight: float
    samples: int


class Collective(Protocol):
    """The reductions across processes an accumulator's :meth:`Accumulator.reduce` may use."""

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the processes (every process gets the sum)."""
        ...

    def all_cat(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """The processes' ``t`` concatenated along ``dim`` in rank order (sizes along ``dim`` may differ)."""
        ...


def scaled(value: torch.Tensor, factor: float) -> torch.Tensor:
    """``factor * value``, and exact zeros for ``factor == 0`` (a batch whose every target is ignored
    weighs nothing, even where its own mean-reduced values are ``0/0``)."""
    if factor == 0:
        return torch.zeros_like(value)
    return value * factor


V = TypeVar("V")


class Accumulator(Generic[V]):
    """Combines one quantity's per-batch values (one parameter's, or a whole-network value) into its
    value on the data set: :meth:`add` per batch, :meth:`reduce` once across processes (distributed
    only), :meth:`result` at the end. ``distributable``: whether :meth:`reduce` exists."""

    distributable: ClassVar[bool] = True
    # Other quantities of the same result that add() reads (share.result[name]).
    reads: ClassVar[tuple[str, ...]] = ()

    def add(self, value: V, share: BatchShare) -> None:
        raise NotImplementedError

    def reduce(self, collective: Collective) -> None:
        raise NotImplementedError

    def result(self, total: DataSetTotal) -> V:
        raise NotImplementedError


class WeightedSum(Accumulator[torch.Tensor]):
    """``sum_b u_b^p Q_b / Z^p`` for values ``Q_b`` whose per-sample terms carry the loss's scale to the
    power ``degree`` ``p``."""

    def __init__(self, degree: float = 1.0):
        self.degree = degree
        self.total: torch.Tensor | None = None

    def add(self, value: torch.Tensor, share: BatchShare) -> None:
        part = scaled(value, share.weight ** self.degree)
        self.total = part if self.total is None else self.total + part

    def reduce(self, collective: Collective) -> None:
        assert self.total is not None, "reduce after at least one batch"
        self.total = collective.all_sum(self.total)

    def result(self, total: DataSetTotal) -> torch.Tensor:
        assert self.total is not None, "a result after at least one batch"
        return self.total / total.weight ** self.degree


class Concatenated(Accumulator[torch.Tensor]):
    """Per-sample values concatenated along the sample axis ``dim``, batch ``b``'s scaled by
    ``(u_b / Z)^p``: each sample's value of the concatenated data set."""

    def __init__(self, degree: float, dim: int):
        self.degree, self.dim = degree, dim
        self.parts: list[torch.Tensor] = []

    def add(self, value: torch.Tensor, share: BatchShare) -> None:
        self.parts.append(scaled(value, share.weight ** self.degree))

    def reduce(self, collective: Collective) -> None:
        self.parts = [collective.all_cat(torch.cat(self.parts, self.dim), self.dim)]

    def result(self, total: DataSetTotal) -> torch.Tensor:
        return torch.cat(self.parts, self.dim) / total.weight ** self.degree


class KroneckerFactors(Accumulator[Kronecker]):
    """``G = sum_b u_b G_b / Z`` (linear in the loss) and ``A = sum_b N_b A_b / N`` (a mean over samples,
    BackPACK's convention: ``docs/kronecker_conventions.md``): the factors of the concatenated data set."""

    def __init__(self) -> None:
        self.g = WeightedSum(1.0)
        self.a: torch.Tensor | None = None
        self.shape: torch.Size | None = None
        self.label = ""
        self.layout = KroneckerLayout.ROWS

    def add(self, value: Kronecker, share: BatchShare) -> None:
        self.shape, self.label, self.layout = value.param_shape, value.label, value.layout
        self.g.add(value.factors[0], share)
        if len(value.factors) == 2:
            part = value.factors[1] * share.samples
            self.a = part if self.a is None else self.a + part

    def reduce(self, collective: Collective) -> None:
        self.g.reduce(collective)
        if self.a is not None:
            self.a = collective.all_sum(self.a)

    def result(self, total: DataSetTotal) -> Kronecker:
        factors = (self.g.result(total),) + (() if self.a is None else (self.a / total.samples,))
        return Kronecker(factors, self.shape, label=self.label, layout=self.layout)


class VarianceFromMoments(Accumulator[torch.Tensor]):
    """The variance over the data set of the per-sample gradients ``g_n`` (BackPACK's Variance scaling: ``g_n``
    carries the loss's ``1/W``). Batch ``b``'s moments come back from its variance ``v_b`` and gradient
    ``G_b = sum_n g_n``: ``sum_n g_n^2 = N_b v_b + G_b^2 / N_b``; in the data set ``g_n`` is ``w_b`` times the
    batch's, so ``G = sum_b u_b G_b / Z``, ``S = sum_b u_b^2 (sum_n g_n^2)_b / Z^2`` and the variance is
    ``S / N - (G / N)^2``."""

    reads = ("grad",)

    def __init__(self) -> None:
        self.grad = WeightedSum(1.0)
        self.squares = WeightedSum(2.0)

    def add(self, value: torch.Tensor, share: BatchShare) -> None:
        assert share.param is not None, "the variance is per parameter"
        grad = share.result["grad"][share.param]
        n = share.samples
        self.grad.add(grad, share)
        self.squares.add(value * n + grad * grad / n, share)

    def reduce(self, collective: Collective) -> None:
        self.grad.reduce(collective)
        self.squares.reduce(collective)

    def result(self, total: DataSetTotal) -> torch.Tensor:
        mean = self.grad.result(total) / total.samples
        return self.squares.result(total) / total.samples - mean * mean


class OperatorSum(Accumulator[BlockOperator]):
    """``K = sum_b (u_b / Z) K_b`` for matrix-free blocks: products ``K V = sum_b w_b K_b V``, each batch's
    operator kept with the program's tensors it multiplies with (memory grows with the data set). Its
    products run in the process that holds them, so it is refused across processes."""

    distributable = False

    def __init__(self) -> None:
        self.parts: list[tuple[BlockOperator, float]] = []

    def add(self, value: BlockOperator, share: BatchShare) -> None:
        self.parts.append((value, share.weight))

    def reduce(self, collective: Collective) -> None:
        raise NotCombinableError("a matrix-free block cannot be combined across processes")

    def result(self, total: DataSetTotal) -> BlockOperator:
        first = self.parts[0][0]
        weighted = [(op, u / total.weight) for op, u in self.parts if u != 0]

        def matvec(V: torch.Tensor) -> torch.Tensor:
            out = torch.zeros_like(V)
            for op, w in weighted:
                out = out + w * op._matmat(V)
            return out

        return BlockOperator(matvec, first.param_shape, first.dtype, first.device, label=first.label,
                             chunk_columns=first.chunk_columns)


def refuse(quantity: str, why: str) -> NotCombinableError:
    """The error for a quantity with no exact combination over batches, naming it and why."""
    return NotCombinableError(f"{quantity} cannot be accumulated over a data set: {why}")
