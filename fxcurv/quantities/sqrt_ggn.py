"""``sqrt_ggn``: the GGN's square-root factor per parameter, ``V [K, N, *param]`` with ``V_kn = J_n^T S_kn``
(BackPACK's SqrtGGNExact): ``sum_k V_kn V_kn^T`` is sample ``n``'s GGN block and ``sum_{k,n} V_kn V_kn^T``
the parameter's (HBP eq. S.6-S.8). ``K`` is the number of exact loss factor columns: ``C - 1`` for
cross-entropy (fxcurv's rank ``C - 1`` factor), where BackPACK returns ``C`` -- the factors differ, their
``V V^T`` agree. A parameter the loss does not reach gets zeros ``[K, N, *param]``."""

from __future__ import annotations

from ..curvature.messages import FactorSource
from .base import register
from .per_sample import SqrtFactor

SQRT_GGN = register(SqrtFactor(
    "sqrt_ggn", "per-sample square-root factor of the GGN [K, N, *param]", "BackPACK SqrtGGNExact; HBP eq. S.6-S.8",
    FactorSource.LOSS))
