"""``diag_ggn_mc``: a Monte Carlo estimate of the GGN diagonal (BackPACK's DiagGGNMC): ``mc_samples``
columns sampled from the loss's likelihood at each call, with the exact loss Hessian as their
expected outer product; reproducible with ``seed=`` or ``generator=``."""

from __future__ import annotations

from ..curvature.messages import FactorSource
from .base import register
from .factor_diagonal import FactorDiagonal

DIAG_GGN_MC = register(FactorDiagonal(
    "diag_ggn_mc", "Monte Carlo estimate of the GGN diagonal", "HBP Sec. C; Botev et al. App. C",
    frozenset({FactorSource.MC})))
