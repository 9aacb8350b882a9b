"""``diag_ggn``: the exact diagonal of the generalized Gauss-Newton matrix ``J^T H_loss J`` (BackPACK's
DiagGGNExact), from the loss Hessian's exact square-root factor (rank ``C - 1`` for cross-entropy)
backpropagated through every op."""

from __future__ import annotations

from ..curvature.messages import FactorSource
from .base import register
from .factor_diagonal import FactorDiagonal

DIAG_GGN = register(FactorDiagonal(
    "diag_ggn", "exact diagonal of the generalized Gauss-Newton matrix", "HBP eq. S.6-S.8, Sec. C",
    frozenset({FactorSource.LOSS})))
