"""``batch_diag_ggn_mc``: ``batch_diag_ggn`` from ``mc_samples`` Monte Carlo columns of the loss Hessian
(BackPACK's BatchDiagGGNMC; they sum to ``diag_ggn_mc`` of the same draws)."""

from __future__ import annotations

from ..curvature.messages import FactorSource
from .base import register
from .per_sample import BatchFactorDiagonal

BATCH_DIAG_GGN_MC = register(BatchFactorDiagonal(
    "batch_diag_ggn_mc", "per-sample Monte Carlo GGN diagonals [N, *param]", "BackPACK BatchDiagGGNMC",
    frozenset({FactorSource.MC})))
