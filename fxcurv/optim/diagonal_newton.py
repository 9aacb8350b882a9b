"""``DiagonalNewton``: Newton's method with a diagonal curvature, ``theta <- theta - lr g / (|d| + damping)``.

``d`` is the curvature diagonal the engine computes for the batch (any of
:data:`fxcurv.optim.base.DIAGONALS`): the exact or Monte Carlo GGN diagonal (HBP eq. S.6-S.8; positive
semi-definite), the exact Hessian diagonal (HBP eq. S.9) or HesScale's approximations (HesScale eq. 4-5,
8-9). The step is the minimizer of the damped diagonal quadratic model
``g^T s + s^T (|D| + damping I) s / 2`` scaled by ``lr``.

Signs: the Hessian diagonal and HesScale's can be negative, where the quadratic model along that
coordinate has no minimum and ``g / d`` would step uphill. The magnitude ``|d|`` is used instead (as
EA-CG's positive-curvature Hessian takes eigenvalues' absolute values, its ``gamma = -1``), so every
coordinate steps against its gradient. For the GGN diagonals ``|d| = d``. ``damping`` must be positive: a
zero curvature entry (a parameter the loss does not reach through its curvature) would divide by zero.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..api import Engine, Result
from .base import DIAGONALS, CurvatureOptimizer, check_choice, check_number


def diagonal_newton_update(grad: torch.Tensor, diagonal: torch.Tensor, lr: float, damping: float) -> torch.Tensor:
    """``-lr g / (|d| + damping)``, elementwise."""
    return grad / (diagonal.abs() + damping) * -lr


class DiagonalNewton(CurvatureOptimizer):
    """``theta <- theta - lr g / (|d| + damping)`` with ``d`` the ``curvature`` diagonal (default
    ``"diag_ggn"``; see the module docstring for the choices and the sign rule).

    ``lr`` and ``damping`` (> 0) are per parameter group. ``engine``/``compile_options``: see
    :mod:`fxcurv.optim.base` (``compile_options={"mc_samples": 4, "seed": 0}`` for ``diag_ggn_mc``)."""

    def __init__(self, model: nn.Module, loss_fn: Callable[..., Any], *, lr: float, damping: float = 1e-4,
                 curvature: str = "diag_ggn", params: Iterable[Any] | None = None, engine: Engine | None = None,
                 compile_options: Mapping[str, Any] | None = None):
        check_choice(curvature, DIAGONALS, "DiagonalNewton: curvature")
        super().__init__(model, loss_fn, dict(lr=lr, damping=damping), curvature, engine=engine,
                         compile_options=compile_options, params=params)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        group["damping"] = check_number(group["damping"], "DiagonalNewton: damping", positive=True)

    def _updates(self, out: Result, x: Any, y: Any) -> dict[str, torch.Tensor]:
        diagonal = out[self.curvature_name]
        return {name: diagonal_newton_update(out.grad[name], diagonal[name], group["lr"], group["damping"])
                for group, name, _ in self._trainable()}
