"""``block_ggn``: the exact GGN block of each parameter, ``sum_n J_n^T H_n J_n`` restricted to it, as a
matrix-free operator (``b @ v``, ``b.to_dense()`` for small layers): exact on residual networks and for
weights used more than once, where Kronecker factorizations are not (HBP eq. S.6-S.8)."""

from __future__ import annotations

from ..curvature.messages import FactorSource
from .base import register
from .block import ExactBlock

BLOCK_GGN = register(ExactBlock(
    "block_ggn", "exact GGN block per parameter, matrix-free", "HBP eq. S.6-S.8", frozenset({FactorSource.LOSS})))
