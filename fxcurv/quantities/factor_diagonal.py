"""The diagonal of a curvature matrix held as square-root factor columns (shared by ``diag_ggn``,
``diag_ggn_mc`` and ``diag_hessian``).

A parameter's block of ``sum_origins sum_k sign_k (J^T S_k)(J^T S_k)^T`` has the diagonal
``sum_{k,n} sign_k (J^T S_k)^2`` (HBP eq. S.8c for a linear layer). Per origin of columns:

* a parameter used once gets it from the op's ``diag_sqrt`` rule (one product per origin, e.g.
  ``(sum_k S_k^2)^T x^2``), or for a diagonal source ``diag(r)`` from ``diag_diag`` (HesScale eq. 5,
  exact for a diagonal);
* a parameter used more than once sums its per-sample ``J^T S`` (``per_sample`` rule) over all uses
  *before* squaring -- the cross terms between uses belong to the diagonal;
* an op nonlinear in the parameter (the generic rule) adds the diagonal of its own second derivative
  ``sum_n d2(g_n . z_n)/dp^2`` (``param_residual``) to the Hessian;
* the mixed-term columns of a weight used twice pair with the op's mixed derivative ``B^T E``:
  ``2 sum_i a_i b_i`` (:func:`fxcurv.factors.mixed_contribution`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from .. import factors
from ..curvature.accumulate import ParamEnd, ParamUse
from ..curvature.messages import FactorSource, Needs, Origin
from ..rules.registry import RuleKind
from .base import Quantity, sum_or_zeros


@dataclass
class _State:
    parts: list[fx.Node] = field(default_factory=list)
    per_sample: dict[Origin, list[tuple[fx.Node, fx.Node | None]]] = field(default_factory=dict)


class FactorDiagonal(Quantity):
    """The diagonal of the curvature carried by the factor columns of ``sources``."""

    def __init__(self, name: str, description: str, reference: str, sources: frozenset[FactorSource]):
        self.name = name
        self.description = description
        self.reference = reference
        self.sources = sources
        self.needs = Needs(factors=sources, gradient=FactorSource.RESIDUAL in sources)

    def start(self) -> _State:
        return _State()

    def collect(self, use: ParamUse, state: _State) -> None:
        if FactorSource.RESIDUAL in self.sources and use.has_rule(RuleKind.PARAM_RESIDUAL):
            # The op's own second derivative w.r.t. the parameter (an op nonlinear in it, the generic
            # rule): HBP eq. S.6's second term at the parameter itself.
            state.parts.append(use.rule(RuleKind.PARAM_RESIDUAL, use.g, message="diag", stream="residual"))
        for origin, cols in use.columns.items():
            if origin.source not in self.sources or (origin.weight and origin.weight != use.name):
                continue  # another stream, or a mixed term of another weight
            stream = origin.label
            if use.shared:
                s, sign = use.dense(cols)
                ps = use.rule(RuleKind.PER_SAMPLE, s, message="J^T S", stream=stream, shaped=False)
                state.per_sample.setdefault(origin, []).append((ps, sign))
            elif cols.diagonal:
                state.parts.append(use.rule(RuleKind.DIAG_DIAG, cols.value, message="diag", stream=stream))
            else:
                state.parts.append(use.rule(RuleKind.DIAG_SQRT, cols.value, cols.sign, message="diag",
                                            stream=stream))

    def finalize(self, end: ParamEnd, state: _State) -> fx.Node:
        parts = list(state.parts)
        for origin, uses in state.per_sample.items():
            stream = origin.label
            total = end.sum([ps for ps, _ in uses], message="J^T S", stream=stream, shaped=False)
            if origin.source is FactorSource.MIXED:
                partner = end.partner(origin)
                if partner is None:
                    continue
                parts.append(end.node(factors.mixed_contribution, (total, partner), message="diag", stream=stream))
            else:
                parts.append(end.node(factors.signed_square_sum, (total, uses[0][1], 1), message="diag",
                                      stream=stream))
        return sum_or_zeros(end, parts, self.name)
