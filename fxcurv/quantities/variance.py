"""``variance``: the variance over the batch of the per-sample gradients ``g_n = J_n^T g``,
``(1/N) sum_n g_n^2 - ((1/N) sum_n g_n)^2``, shaped like the parameter -- BackPACK's Variance exactly,
with its scaling: ``g_n`` carries the loss's reduction (with a mean, ``1/N``). Computed from the gradient
and ``sum_grad_squared``; no ``[N, *param]`` for a parameter one linear or conv layer uses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from ..curvature.accumulate import ParamEnd, ParamUse
from ..curvature.messages import Needs
from ..node_info import info
from ..rules.registry import RuleKind
from .base import Quantity, register, sum_or_zeros
from .combine import Accumulator, VarianceFromMoments
from .per_sample import variance_from
from .sum_grad_squared import SUM_GRAD_SQUARED


@dataclass
class _State:
    grad: list[fx.Node] = field(default_factory=list)
    squares: Any = field(default_factory=SUM_GRAD_SQUARED.start)
    n: int | None = None


class Variance(Quantity):
    name = "variance"
    description = "variance of the per-sample gradients over the batch"
    reference = "BackPACK Variance"
    needs = Needs(gradient=True)  # reads g at each use

    def start(self) -> _State:
        return _State()

    def accumulator(self) -> Accumulator[Any]:
        """Recomputed from the data set's first and second moments of ``g_n`` (each batch's come back from
        its variance and gradient): :class:`~fxcurv.quantities.combine.VarianceFromMoments`."""
        return VarianceFromMoments()

    def collect(self, use: ParamUse, state: _State) -> None:
        shape = info(use.g).shape
        assert shape is not None, "the gradient message has a recorded shape"
        state.n = shape[0]
        state.grad.append(use.rule(RuleKind.GRAD, use.g, message="grad"))
        SUM_GRAD_SQUARED.collect(use, state.squares)

    def finalize(self, end: ParamEnd, state: _State) -> fx.Node:
        if state.n is None:  # the loss does not reach the parameter
            return end.zeros(self.name)
        grad = sum_or_zeros(end, state.grad, "grad")
        squares = SUM_GRAD_SQUARED.finalize(end, state.squares)
        return end.node(variance_from, (grad, squares, state.n), message=self.name)


VARIANCE = register(Variance())
