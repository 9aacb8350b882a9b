"""``DampedNewton``: damped Newton steps in the GGN's top eigenspace (ViViT, Dangel et al., eq. 9, App. B.3,
C.2), from the engine's ``ggn_eigen`` result.

Per step, with the GGN's nonzero eigenpairs ``(lambda_k, e_k)`` (after ``top_k``) and the mini-batch
gradient ``g``::

    theta <- theta + lr s,   s = -sum_k (g . e_k) / (lambda_k + delta_k) e_k      (ViViT eq. 9, 1st term)

* ``damping`` a number: ``delta_k = damping`` for every direction;
* ``damping="bootstrap"``: one ``delta_k`` per direction by ViViT B.3's bootstrap
  (:meth:`fxcurv.operators.GramEigen.bootstrap_damping`: the grid's damping that maximizes the 5th
  percentile of the quadratic model's reduction over resampled directional derivatives), with its
  ``grid``, ``resamples``, ``percentile`` and a ``generator`` for the resampling as options;
* ``restrict=False`` (a number ``damping > 0``): ``s = -(G + damping I)^-1 g`` on the whole parameter space
  by the matrix inversion lemma (ViViT eq. S.25), one solve with the damped Gram matrix.

The approximation is the ``curvature`` quantity's (:class:`fxcurv.quantities.GGNEigen`):
``"ggn_eigen"`` (exact), ``"ggn_eigen_mc"`` (Monte Carlo), or a configured ``GGNEigen(top_k=...,
groups=..., mc=..., subsample=...)``. With ``groups=`` the GGN is block-diagonal and every block is solved
on its own (ViViT C.2); with ``"bootstrap"`` each block gets its own per-direction dampings. Parameters in
no group are left unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..api import Engine, Result
from ..operators import BlockDiagonalEigen, GramEigen
from ..operators.gram_eigen import BOOTSTRAP_PERCENTILE, BOOTSTRAP_RESAMPLES
from ..quantities import QUANTITIES, GGNEigen, Quantity
from .base import CurvatureOptimizer, check_number

EIGEN_NAMES = ("ggn_eigen", "ggn_eigen_mc")
BOOTSTRAP = "bootstrap"


def bootstrap_dampings(eigen: GramEigen | BlockDiagonalEigen, **options: Any) -> torch.Tensor | dict[str, torch.Tensor]:
    """ViViT B.3's per-direction dampings of one block, or of every block by group."""
    if isinstance(eigen, BlockDiagonalEigen):
        return {g: block.bootstrap_damping(**options) for g, block in eigen.items()}
    return eigen.bootstrap_damping(**options)


def _check_curvature(curvature: Any, engine: Engine | None) -> None:
    """A ``ggn_eigen`` quantity that keeps what Newton steps need (with ``engine=``: the engine's quantity
    of that name; the base class refuses an engine without it)."""
    quantity: Quantity
    if isinstance(curvature, str) and curvature in EIGEN_NAMES:
        quantity = QUANTITIES[curvature]
    elif isinstance(curvature, GGNEigen):
        quantity = curvature
    else:
        raise ValueError(f"DampedNewton: curvature must be one of {', '.join(map(repr, EIGEN_NAMES))} or a "
                         f"fxcurv.quantities.GGNEigen(...) (top_k=, groups=, mc=, subsample=); got {curvature!r}")
    if engine is not None:
        quantity = next((q for q in engine.quantities if q.name == quantity.name), quantity)
        if not isinstance(quantity, GGNEigen):
            raise ValueError(f"DampedNewton: the engine's quantity {quantity.name!r} is not a GGNEigen")
    if not isinstance(quantity, GGNEigen) or not quantity.vectors:
        raise ValueError("DampedNewton: the GGNEigen quantity was configured with vectors=False (eigenvalues only); "
                         "Newton steps need vectors=True")


class DampedNewton(CurvatureOptimizer):
    """ViViT's damped Newton step (see the module docstring). ``lr`` per parameter group; ``damping`` (a
    number ``>= 0``, ``> 0`` with ``restrict=False``, or ``"bootstrap"``), ``restrict`` and the bootstrap's
    ``grid``/``resamples``/``percentile``/``generator`` for the whole network (the eigenspace is the
    network's or its blocks'). ``last_damping``: the damping of the latest step (with ``"bootstrap"`` the
    per-direction tensor, by group with ``groups=``). ``engine``/``compile_options``: see
    :mod:`fxcurv.optim.base` (``compile_options={"mc_samples": 4, "seed": 0}`` for Monte Carlo columns)."""

    def __init__(self, model: nn.Module, loss_fn: Callable[..., Any], *, lr: float,
                 damping: float | str = 1.0, restrict: bool = True, curvature: str | GGNEigen = "ggn_eigen",
                 grid: torch.Tensor | None = None, resamples: int = BOOTSTRAP_RESAMPLES,
                 percentile: float = BOOTSTRAP_PERCENTILE, generator: torch.Generator | None = None,
                 params: Iterable[Any] | None = None, engine: Engine | None = None,
                 compile_options: Mapping[str, Any] | None = None):
        _check_curvature(curvature, engine)
        if not isinstance(restrict, bool):
            raise TypeError(f"DampedNewton: restrict must be True or False, got {restrict!r}")
        if isinstance(damping, str):
            if damping != BOOTSTRAP:
                raise ValueError(f"DampedNewton: damping must be a number or 'bootstrap', got {damping!r}")
            if not restrict:
                raise ValueError("DampedNewton: damping='bootstrap' chooses one damping per eigendirection, which "
                                 "needs restrict=True (the step in the eigenspace)")
            self.damping: float | str = BOOTSTRAP
        else:
            self.damping = check_number(damping, "DampedNewton: damping", positive=not restrict)
        if not (isinstance(resamples, int) and not isinstance(resamples, bool) and resamples >= 1):
            raise ValueError(f"DampedNewton: resamples must be a positive integer, got {resamples!r}")
        if not 0 <= check_number(percentile, "DampedNewton: percentile") <= 100:
            raise ValueError(f"DampedNewton: percentile must be in [0, 100], got {percentile!r}")
        self.restrict = restrict
        self.bootstrap_options = dict(grid=grid, resamples=resamples, percentile=float(percentile), generator=generator)
        self.last_damping: float | torch.Tensor | dict[str, torch.Tensor] | None = None
        super().__init__(model, loss_fn, dict(lr=lr), curvature, engine=engine, compile_options=compile_options,
                         params=params)

    def _updates(self, out: Result, x: Any, y: Any) -> dict[str, torch.Tensor]:
        eigen = out[self.curvature_name]
        damping: Any = (bootstrap_dampings(eigen, **self.bootstrap_options) if self.damping == BOOTSTRAP
                        else self.damping)
        self.last_damping = damping  # what the step used (per direction with "bootstrap")
        steps = eigen.newton_step(damping, restrict=self.restrict)
        return {name: steps[name] * group["lr"] for group, name, _ in self._trainable() if name in steps}
