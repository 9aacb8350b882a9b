"""``batch_grad``: the per-sample gradients ``J_n^T g_n``, ``[N, *param]`` (BackPACK's BatchGrad): each
sample's share of the gradient, the loss's reduction included (with a mean they carry its ``1/N``), so
that they sum to the gradient; summed over the uses of a parameter used more than once (HBP eq. S.8)."""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from ..curvature.accumulate import ParamEnd, ParamUse
from ..curvature.messages import Needs
from .base import Quantity, register
from .combine import Accumulator, Concatenated
from .per_sample import per_sample_vjp, summed, zeros


class BatchGrad(Quantity):
    name = "batch_grad"
    description = "per-sample gradients [N, *param] (they sum to the gradient)"
    reference = "BackPACK BatchGrad; HBP eq. S.8 per sample"
    needs = Needs(gradient=True)  # reads g at each use
    shaped_like_parameter = False

    def accumulator(self) -> Accumulator[Any]:
        """Each sample's gradient carries ``1/W`` in the data set, ``1/W_b`` in its batch: the batches'
        ``[N_b, *param]`` scaled by ``w_b`` and concatenated along the samples."""
        return Concatenated(1.0, 0)

    def collect(self, use: ParamUse, state: list[fx.Node]) -> None:
        state.append(per_sample_vjp(use, use.g, self.name))

    def finalize(self, end: ParamEnd, state: list[fx.Node]) -> fx.Node:
        return summed(end, state, self.name) if state else zeros(end, self.name)


BATCH_GRAD = register(BatchGrad())
