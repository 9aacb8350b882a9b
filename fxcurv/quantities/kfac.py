"""``kfac``: Kronecker-factored approximate curvature (Martens & Grosse; BackPACK's KFAC): ``G`` from
``mc_samples`` Monte Carlo columns of the loss Hessian backpropagated to each layer's output, ``A``
from the layer input; in expectation over the samples, ``G`` is KFLR's."""

from __future__ import annotations

from ..curvature.messages import FactorSource
from .base import register
from .kronecker import ColumnKronecker

KFAC = register(ColumnKronecker(
    "kfac", "Kronecker-factored GGN blocks from a Monte Carlo loss factor (KFAC)", "Botev et al. App. C",
    FactorSource.MC))
