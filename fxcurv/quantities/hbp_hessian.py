"""``hbp_hessian``: HBP's batch-averaged Hessian blocks (HBP Sec. 3.2, eq. S.11): KFRA's recursion with
each activation's residual ``diag(sum_n phi''(x_n) g_n)`` added (Botev eq. 31's ``D``); BackPACK's
``HBP(curv_type="hessian", loss_hessian_strategy="sum", backprop_strategy="batch-average")``. Exact
(the Hessian block) for one sample; may be indefinite."""

from __future__ import annotations

from ..curvature.messages import DenseStream, Residual
from .base import register
from .kronecker import DenseKronecker

HBP_HESSIAN = register(DenseKronecker(
    "hbp_hessian", "batch-averaged Hessian blocks, Kronecker-factored (HBP)", "HBP eq. S.11, Sec. 3.2",
    DenseStream(Residual.SIGNED)))
