"""``hesscale``: HesScale's Hessian-diagonal backpropagation (Elsayed & Mahmood, eq. 4-5 and 8-9):
the exact loss-output diagonal (App. A) passed back through each op keeping only diagonals,
``d_x = phi'(x)^2 (W o W)^T d + phi''(x) g``; a parameter's diagonal is ``d^T x^2`` (eq. 5), exact at
the last layer."""

from __future__ import annotations

import torch.fx as fx

from ..curvature.accumulate import ParamEnd, ParamUse
from ..curvature.messages import DiagonalStream, Needs
from ..rules.registry import RuleKind
from .base import Quantity, register, sum_or_zeros


class DiagonalBackprop(Quantity):
    """A HesScale-style diagonal stream collected with each op's ``diag_diag`` rule."""

    def __init__(self, name: str, description: str, reference: str, stream: DiagonalStream):
        self.name = name
        self.description = description
        self.reference = reference
        self.stream = stream
        self.needs = Needs(diagonals=frozenset({stream}), gradient=stream.residual)

    def collect(self, use: ParamUse, state: list[fx.Node]) -> None:
        state.append(use.rule(RuleKind.DIAG_DIAG, use.diagonals[self.stream], message="diag",
                              stream=self.stream.label))
        if self.stream.residual and use.has_rule(RuleKind.PARAM_RESIDUAL):
            # An op nonlinear in the parameter (the generic rule): its own second derivative's diagonal,
            # the parameter's counterpart of eq. 4's residual term.
            state.append(use.rule(RuleKind.PARAM_RESIDUAL, use.g, message="diag", stream=self.stream.label))

    def finalize(self, end: ParamEnd, state: list[fx.Node]) -> fx.Node:
        return sum_or_zeros(end, state, self.name)


HESSCALE = register(DiagonalBackprop("hesscale", "HesScale approximation of the Hessian diagonal",
                            "HesScale eq. 4-5, 8-9, App. A", DiagonalStream(residual=True)))
