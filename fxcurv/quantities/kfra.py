"""``kfra``: Kronecker-factored recursive approximation (Botev et al. eq. 29-31, Algorithm 1;
BackPACK's KFRA): the batch-averaged GGN of each layer's output, backpropagated as a dense matrix
``M_x = E_n[J_n^T M_z J_n]`` (an activation's ``E_n[phi' phi'^T] o M``), as ``G``; ``A`` from the layer
input. Exact for one sample; an approximation of an approximation beyond, by design."""

from __future__ import annotations

from ..curvature.messages import DenseStream, Residual
from .base import register
from .kronecker import DenseKronecker

KFRA = register(DenseKronecker(
    "kfra", "Kronecker-factored recursive GGN approximation (KFRA)", "Botev et al. eq. 29-31",
    DenseStream(Residual.NONE)))
