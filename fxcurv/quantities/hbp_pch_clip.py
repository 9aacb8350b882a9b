"""``hbp_pch_clip``: the positive-curvature Hessian of EA-CG (Chen et al. eq. 8b, gamma = 0) in HBP's
batch-averaged recursion: the residual ``diag(sum_n phi''(x_n) g_n)`` replaced by its positive part;
positive semi-definite. BackPACK's ``HBP(curv_type="pch-clip", ...)``."""

from __future__ import annotations

from ..curvature.messages import DenseStream, Residual
from .base import register
from .kronecker import DenseKronecker

HBP_PCH_CLIP = register(DenseKronecker(
    "hbp_pch_clip", "positive-curvature Hessian blocks, clipped residuals (EA-CG, HBP)", "EA-CG eq. 8b; HBP S.11",
    DenseStream(Residual.CLIP)))
