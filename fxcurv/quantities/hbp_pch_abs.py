"""``hbp_pch_abs``: the positive-curvature Hessian of EA-CG (Chen et al. eq. 8b, gamma = -1) in HBP's
batch-averaged recursion: the residual ``diag(sum_n phi''(x_n) g_n)`` replaced by its absolute value;
positive semi-definite. BackPACK's ``HBP(curv_type="pch-abs", ...)``."""

from __future__ import annotations

from ..curvature.messages import DenseStream, Residual
from .base import register
from .kronecker import DenseKronecker

HBP_PCH_ABS = register(DenseKronecker(
    "hbp_pch_abs", "positive-curvature Hessian blocks, absolute residuals (EA-CG, HBP)", "EA-CG eq. 8b; HBP S.11",
    DenseStream(Residual.ABS)))
