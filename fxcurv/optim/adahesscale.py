"""``AdaHesScale``: Adam with HesScale's Hessian diagonal in the second moment (HesScale Algorithm 2).

Per parameter, with the gradient ``F`` and the curvature diagonal ``S`` of the batch at step ``t``
(starting at ``t = 1``, with ``M = V = 0``)::

    M <- beta1 M + (1 - beta1) F
    V <- beta2 V + (1 - beta2) S^2           (S squared: the sign of S does not matter)
    M_hat = M / (1 - beta1^t),  V_hat = V / (1 - beta2^t)
    W <- W - lr M_hat / sqrt(V_hat + eps)    (eps inside the square root, as Algorithm 2 writes it)

``S`` is HesScale's diagonal (``curvature="hesscale"``, the paper's AdaHesScale) or HesScaleGN's
(``"hesscale_gn"``, the paper's AdaHesScaleGN); the other diagonals of
:data:`fxcurv.optim.base.DIAGONALS` are accepted too (``"diag_ggn"``: the same update with the exact GGN
diagonal). The state of each parameter is ``step`` (``t``), ``exp_avg`` (``M``) and ``exp_avg_sq`` (``V``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..api import Engine, Result
from .base import DIAGONALS, CurvatureOptimizer, check_choice, check_number

# HesScale Algorithm 2's "small number".
EPS = 1e-8


def adahesscale_update(state: dict[str, Any], grad: torch.Tensor, diagonal: torch.Tensor, lr: float,
                       betas: tuple[float, float], eps: float) -> torch.Tensor:
    """One step of HesScale Algorithm 2 for one parameter: advances ``state`` (``step``, ``exp_avg``,
    ``exp_avg_sq``, created at the first step) in place and returns ``-lr M_hat / sqrt(V_hat + eps)``."""
    beta1, beta2 = betas
    if not state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(grad)
        state["exp_avg_sq"] = torch.zeros_like(grad)
    state["step"] += 1
    t = state["step"]
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m.mul_(beta1).add_(grad, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(diagonal, diagonal, value=1 - beta2)
    m_hat = m / (1 - beta1**t)
    v_hat = v / (1 - beta2**t)
    return m_hat / (v_hat + eps).sqrt() * -lr


def _check_betas(betas: Any) -> tuple[float, float]:
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"AdaHesScale: betas must be a pair (beta1, beta2), got {betas!r}")
    checked = tuple(check_number(b, f"AdaHesScale: betas[{i}]") for i, b in enumerate(betas))
    if not all(b < 1 for b in checked):
        raise ValueError(f"AdaHesScale: the decay rates betas must be in [0, 1), got {betas!r}")
    return checked[0], checked[1]


class AdaHesScale(CurvatureOptimizer):
    """HesScale Algorithm 2 (see the module docstring): ``lr``, ``betas`` (in ``[0, 1)``) and ``eps``
    per parameter group; ``curvature`` ``"hesscale"`` (AdaHesScale, default) or ``"hesscale_gn"``
    (AdaHesScaleGN), or another diagonal. ``engine``/``compile_options``: see :mod:`fxcurv.optim.base`."""

    def __init__(self, model: nn.Module, loss_fn: Callable[..., Any], *, lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = EPS, curvature: str = "hesscale",
                 params: Iterable[Any] | None = None, engine: Engine | None = None,
                 compile_options: Mapping[str, Any] | None = None):
        check_choice(curvature, DIAGONALS, "AdaHesScale: curvature")
        super().__init__(model, loss_fn, dict(lr=lr, betas=betas, eps=eps), curvature, engine=engine,
                         compile_options=compile_options, params=params)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        group["betas"] = _check_betas(group["betas"])
        group["eps"] = check_number(group["eps"], "AdaHesScale: eps", positive=True)

    def _updates(self, out: Result, x: Any, y: Any) -> dict[str, torch.Tensor]:
        diagonal = out[self.curvature_name]
        return {name: adahesscale_update(self.state[p], out.grad[name], diagonal[name], group["lr"],
                                         group["betas"], group["eps"])
                for group, name, p in self._trainable()}
