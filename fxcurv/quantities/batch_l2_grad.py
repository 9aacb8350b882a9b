"""``batch_l2_grad``: the squared norm of each sample's gradient, ``|J_n^T g_n|^2``, ``[N]`` (BackPACK's
BatchL2Grad; Goodfellow's per-example gradient norms). A parameter one op uses gets the op's ``batch_l2``
rule, which never forms ``[N, *param]`` for linear and conv layers (rank one for ``[N, in]`` inputs,
Gram matrices over positions otherwise); a parameter used by several ops sums its per-sample gradients
over the uses first (the cross terms belong to the norm), through ``[N, *param]``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from ..curvature.accumulate import ParamEnd, ParamUse
from ..curvature.messages import Needs
from ..rules.registry import RuleKind
from .base import Quantity, register
from .combine import Accumulator, Concatenated
from .per_sample import per_sample_vjp, square_norms, summed, zeros


@dataclass
class _State:
    norms: list[fx.Node] = field(default_factory=list)
    per_sample: list[fx.Node] = field(default_factory=list)


class BatchL2Grad(Quantity):
    name = "batch_l2_grad"
    description = "squared norms of the per-sample gradients [N]"
    reference = "BackPACK BatchL2Grad; Goodfellow (2015), per-example gradient norms"
    needs = Needs(gradient=True)  # reads g at each use
    shaped_like_parameter = False

    def start(self) -> _State:
        return _State()

    def accumulator(self) -> Accumulator[Any]:
        """Squared norms of gradients scaled by ``w_b``: the batches' ``[N_b]`` scaled by ``w_b^2`` and
        concatenated."""
        return Concatenated(2.0, 0)

    def collect(self, use: ParamUse, state: _State) -> None:
        if use.shared or not use.has_rule(RuleKind.BATCH_L2):
            state.per_sample.append(per_sample_vjp(use, use.g, "batch_grad"))
        else:
            state.norms.append(use.rule(RuleKind.BATCH_L2, use.g, message=self.name, shaped=False))

    def finalize(self, end: ParamEnd, state: _State) -> fx.Node:
        parts = list(state.norms)
        if state.per_sample:
            total = summed(end, state.per_sample, "batch_grad")
            parts.append(end.node(square_norms, (total,), message=self.name, shaped=False))
        return end.sum(parts, message=self.name, shaped=False) if parts else zeros(end, self.name, with_param=False)


BATCH_L2_GRAD = register(BatchL2Grad())
