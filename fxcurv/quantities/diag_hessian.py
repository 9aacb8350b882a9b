"""``diag_hessian``: the exact Hessian diagonal. The GGN's loss factor plus, for every activation, the
signed residual columns ``diag(phi''(x) g)`` of HBP eq. S.9, and for every weight used more than once
the mixed second derivative of its bilinear op (HBP eq. S.6, second term): exact on residual and
weight-tied networks."""

from __future__ import annotations

from ..curvature.messages import FactorSource
from .base import register
from .factor_diagonal import FactorDiagonal

DIAG_HESSIAN = register(FactorDiagonal(
    "diag_hessian", "exact Hessian diagonal", "HBP eq. S.6, S.9",
    frozenset({FactorSource.LOSS, FactorSource.RESIDUAL, FactorSource.MIXED})))
