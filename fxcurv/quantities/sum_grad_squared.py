"""``sum_grad_squared``: ``sum_n (J_n^T g_n)^2``, the per-sample gradients squared and summed, shaped like
the parameter (BackPACK's SumGradSquared; the second moment of Adam-like methods from one batch). A
parameter one op uses gets the op's ``diag_sqrt`` rule applied to the gradient as one factor column
``[g]`` -- ``(g^2)^T x^2`` for a linear layer, no ``[N, *param]`` (HBP eq. S.8c with ``S = g``); a
parameter used by several ops sums its per-sample gradients over the uses before squaring."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from ..curvature.accumulate import ParamEnd, ParamUse
from ..curvature.messages import Needs
from ..node_info import Kind
from ..rules.registry import RuleKind
from .base import Quantity, register, sum_or_zeros
from .combine import Accumulator, WeightedSum
from .per_sample import as_column, per_sample_vjp, square_sum, summed


@dataclass
class _State:
    parts: list[fx.Node] = field(default_factory=list)
    per_sample: list[fx.Node] = field(default_factory=list)


class SumGradSquared(Quantity):
    name = "sum_grad_squared"
    description = "sum over samples of the squared per-sample gradients"
    reference = "BackPACK SumGradSquared; HBP eq. S.8c with the gradient as the factor column"
    needs = Needs(gradient=True)  # reads g at each use

    def start(self) -> _State:
        return _State()

    def accumulator(self) -> Accumulator[Any]:
        """``sum_n g_n^2`` with ``g_n`` scaled by ``1/W`` instead of the batch's ``1/W_b``: each batch's
        sum weighs ``w_b^2`` (a weight of ``w_b`` would be off by ``w_b`` per batch)."""
        return WeightedSum(2.0)

    def collect(self, use: ParamUse, state: _State) -> None:
        if use.shared or not use.has_rule(RuleKind.DIAG_SQRT):
            state.per_sample.append(per_sample_vjp(use, use.g, "batch_grad"))
            return
        column = use.emit.node(as_column, (use.g,), kind=Kind.GRAD, of=use.node, message="[g]", at=use.node)
        state.parts.append(use.rule(RuleKind.DIAG_SQRT, column, None, message=self.name))

    def finalize(self, end: ParamEnd, state: _State) -> fx.Node:
        parts = list(state.parts)
        if state.per_sample:
            total = summed(end, state.per_sample, "batch_grad")
            parts.append(end.node(square_sum, (total,), message=self.name))
        return sum_or_zeros(end, parts, self.name)


SUM_GRAD_SQUARED = register(SumGradSquared())
