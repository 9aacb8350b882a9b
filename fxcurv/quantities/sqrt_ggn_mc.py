"""``sqrt_ggn_mc``: ``sqrt_ggn`` from ``mc_samples`` Monte Carlo columns of the loss Hessian,
``V [mc_samples, N, *param]`` (BackPACK's SqrtGGNMC): ``sum_{k,n} V_kn V_kn^T`` is the GGN block in
expectation over the draws (reproducible with ``seed=`` or ``generator=``)."""

from __future__ import annotations

from ..curvature.messages import FactorSource
from .base import register
from .per_sample import SqrtFactor

SQRT_GGN_MC = register(SqrtFactor(
    "sqrt_ggn_mc", "per-sample Monte Carlo square-root factor of the GGN [mc_samples, N, *param]",
    "BackPACK SqrtGGNMC", FactorSource.MC))
