"""``grad``: the gradient of the loss, summed over every use of each parameter."""

from __future__ import annotations

import torch.fx as fx

from ..curvature.accumulate import ParamEnd, ParamUse
from ..curvature.messages import Needs
from ..rules.registry import RuleKind
from .base import Quantity, register, sum_or_zeros


class Gradient(Quantity):
    name = "grad"
    description = "gradient"
    reference = "HBP eq. S.8 (first order)"
    needs = Needs(gradient=True)  # reads g at each use

    def collect(self, use: ParamUse, state: list[fx.Node]) -> None:
        state.append(use.rule(RuleKind.GRAD, use.g, message="grad"))

    def finalize(self, end: ParamEnd, state: list[fx.Node]) -> fx.Node:
        return sum_or_zeros(end, state, "grad")


GRAD = register(Gradient())
