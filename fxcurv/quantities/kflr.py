"""``kflr``: Kronecker-factored low-rank GGN blocks (Botev et al.; BackPACK's KFLR): ``G`` from the
loss Hessian's exact square-root factor backpropagated to each layer's output (rank ``C - 1`` for
cross-entropy), ``A`` from the layer input. Exact for one sample."""

from __future__ import annotations

from ..curvature.messages import FactorSource
from .base import register
from .kronecker import ColumnKronecker

KFLR = register(ColumnKronecker(
    "kflr", "Kronecker-factored GGN blocks from the exact loss factor (KFLR)", "Botev et al. Sec. 3, App. C",
    FactorSource.LOSS))
