"""Optimizers on top of the compiled curvature engine, one per file. Each is a ``torch.optim.Optimizer``
built as ``Optimizer(model, loss_fn, *, lr, curvature=..., ...)`` whose ``step(x, y)`` runs its engine on
the batch, updates the parameters in place and returns the :class:`fxcurv.Result` (the shared contract:
:mod:`fxcurv.optim.base`).

* :class:`DampedNewton`: the damped Newton step in the GGN's (top) eigenspace, constant or bootstrap
  damping, full network or block-diagonal, exact or Monte Carlo (ViViT eq. 9, S.25, B.3, C.2);
* :class:`KroneckerNewton`: KFLR/KFRA/KFAC block steps with Botev's factored damped inverse and,
  optionally, the step size from the GGN (Botev et al. eq. 33-41);
* :class:`AdaHesScale`: Adam with the squared HesScale(GN) diagonal in the second moment (HesScale
  Algorithm 2);
* :class:`DiagonalNewton`: ``theta -= lr g / (|d| + damping)`` for any curvature diagonal.
"""

from .adahesscale import AdaHesScale
from .base import DIAGONALS, CurvatureOptimizer
from .damped_newton import DampedNewton
from .diagonal_newton import DiagonalNewton
from .kronecker_newton import KroneckerNewton

__all__ = ["CurvatureOptimizer", "DampedNewton", "KroneckerNewton", "AdaHesScale", "DiagonalNewton", "DIAGONALS"]
