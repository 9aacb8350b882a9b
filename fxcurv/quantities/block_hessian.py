"""``block_hessian``: the exact Hessian block of each parameter as a matrix-free operator: the GGN's
loss columns plus every activation's signed residual columns (HBP eq. S.9) and, for a weight used more
than once, the mixed second derivative of its bilinear op (HBP eq. S.6, second term)."""

from __future__ import annotations

from ..curvature.messages import FactorSource
from .base import register
from .block import ExactBlock

BLOCK_HESSIAN = register(ExactBlock(
    "block_hessian", "exact Hessian block per parameter, matrix-free", "HBP eq. S.6, S.9",
    frozenset({FactorSource.LOSS, FactorSource.RESIDUAL, FactorSource.MIXED})))
