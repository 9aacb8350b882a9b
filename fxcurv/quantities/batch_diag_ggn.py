"""``batch_diag_ggn``: each sample's share of the exact GGN diagonal, ``sum_k (J_n^T S_kn)^2``,
``[N, *param]`` (BackPACK's BatchDiagGGNExact; they sum to ``diag_ggn``), from the loss Hessian's exact
square-root factor (the reduction's scale inside): ``(sum_k S_kn^2)(x_n^2)^T`` for a linear layer on
``[N, in]`` inputs, no per-sample Jacobian (HBP eq. S.8c per sample)."""

from __future__ import annotations

from ..curvature.messages import FactorSource
from .base import register
from .per_sample import BatchFactorDiagonal

BATCH_DIAG_GGN = register(BatchFactorDiagonal(
    "batch_diag_ggn", "per-sample exact GGN diagonals [N, *param]", "BackPACK BatchDiagGGNExact; HBP eq. S.6-S.8",
    frozenset({FactorSource.LOSS})))
