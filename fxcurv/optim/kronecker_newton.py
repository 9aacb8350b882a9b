"""``KroneckerNewton``: block-diagonal Gauss-Newton steps with Kronecker-factored blocks (Botev et al.,
"Practical Gauss-Newton Optimisation for Deep Learning", App. B.1-B.2).

Each parameter's block of the curvature is the ``curvature`` quantity's Kronecker product ``kron(G, A)``
(KFLR, KFRA or KFAC; BackPACK's factor conventions, :mod:`fxcurv.operators.kronecker`). With the L2
regularization ``eta / 2 |theta|^2`` (``weight_decay = eta``) and the damping ``gamma``, the damped block
is ``C = kron(G, A) + k I`` with ``k = gamma + eta`` (eq. 35), inverted by Botev's factored
approximation (eq. 36-38)::

    C^-1 ~ kron(G + pi sqrt(k) I, A + sqrt(k) / pi I)^-1,   pi = sqrt((tr G / O) / (tr A / I))

and the step direction is ``delta = C^-1 (g + eta theta)`` (eq. 33-34), block by block.

Parameters with a one-factor block. fxcurv keeps a bias in its own block ``G`` (BackPACK's convention;
Botev et al. do not treat biases separately in the appendix): there is nothing to split, and the block is
damped and inverted exactly, ``(G + k I)^-1`` (what :meth:`fxcurv.Kronecker.inverse_factored` gives for one
factor). The same holds for any parameter whose op has no input-side factor. A two-factor block with a
zero factor (a layer the loss's curvature does not reach) is the zero matrix: its damped inverse is
exactly ``I / k``, used instead of eq. 38's ``pi``, which is undefined there.

Step size (``step_size``):

* ``"fixed"``: ``theta <- theta - lr delta``;
* ``"quadratic"`` (App. B.2, eq. 39-41): the step along ``-delta`` that minimizes the quadratic model of
  the full damped Gauss-Newton matrix ``C_bar = G_bar + (tau + eta) I``:
  ``alpha = (delta^T grad) / (delta^T G_bar delta + (tau + eta) delta^T delta)`` and
  ``theta <- theta - lr alpha delta`` (``lr = 1`` is Botev's update). ``delta^T G_bar delta`` is one
  GGN-vector product on the batch (:class:`fxcurv.linops.GGN`, the R-operator's product, without forming
  ``G_bar``); ``delta`` and ``grad`` here are over all trainable parameters. Botev et al. adapt ``tau`` and
  ``gamma`` by Levenberg-Marquardt and greedy rules (B.3); those are not implemented: both stay as given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..api import Engine, Result
from ..linops import GGN
from ..operators import Kronecker, SingularOperatorError
from .base import CurvatureOptimizer, check_choice, check_number

KRONECKER = ("kflr", "kfra", "kfac")
STEP_SIZES = ("fixed", "quadratic")


def damped_inverse_product(block: Kronecker, vector: torch.Tensor, damping: float, pi: float | str) -> torch.Tensor:
    """Botev eq. 36-38's ``kron(G + pi sqrt(k) I, A + sqrt(k) / pi I)^-1 v`` for a two-factor block,
    ``(G + k I)^-1 v`` for a one-factor block, and ``v / k`` for a block with a zero factor (the zero
    matrix, whose damped inverse is exactly ``I / k``); ``v`` shaped like the parameter."""
    if len(block.factors) == 2 and any(f.diagonal().sum().item() == 0 for f in block.factors):
        return vector / damping
    return block.inverse_factored(damping, pi=pi) @ vector


def quadratic_step_size(direction: torch.Tensor, grad: torch.Tensor, ggn_direction: torch.Tensor,
                        damping: float) -> torch.Tensor:
    """Botev eq. 40-41 for the step ``-alpha delta``: ``alpha = (delta . g) / (delta . G_bar delta +
    damping delta . delta)`` (all flat over the parameters); ``0`` for a zero direction (a zero
    gradient). The denominator is the curvature along ``delta``: refused unless positive."""
    curvature = direction @ ggn_direction + damping * (direction @ direction)
    if not direction.any():
        return torch.zeros((), dtype=direction.dtype, device=direction.device)
    if not curvature > 0:
        raise SingularOperatorError(
            f"KroneckerNewton(step_size='quadratic'): the damped GGN's curvature along the step direction is "
            f"{curvature.item():.3e}, not positive, so eq. 40's step size is undefined; use tau > 0")
    return direction @ grad / curvature


class KroneckerNewton(CurvatureOptimizer):
    """Botev et al.'s Kronecker-factored Gauss-Newton step (see the module docstring).

    ``curvature``: ``"kflr"`` (default), ``"kfra"`` or ``"kfac"``. ``damping`` (``gamma``), ``weight_decay``
    (``eta``) and ``lr`` per parameter group, ``gamma + eta > 0``; ``pi``: ``"optimal"`` (eq. 38) or a
    positive number. ``step_size``: ``"fixed"`` or ``"quadratic"`` (eq. 39-41, with ``tau``).
    ``engine``/``compile_options``: see :mod:`fxcurv.optim.base`."""

    def __init__(self, model: nn.Module, loss_fn: Callable[..., Any], *, lr: float, damping: float = 1e-3,
                 weight_decay: float = 0.0, curvature: str = "kflr", pi: float | str = "optimal",
                 step_size: str = "fixed", tau: float = 0.0, params: Iterable[Any] | None = None,
                 engine: Engine | None = None, compile_options: Mapping[str, Any] | None = None):
        check_choice(curvature, KRONECKER, "KroneckerNewton: curvature")
        self.step_size = check_choice(step_size, STEP_SIZES, "KroneckerNewton: step_size")
        self.tau = check_number(tau, "KroneckerNewton: tau")
        defaults = dict(lr=lr, damping=damping, weight_decay=weight_decay, pi=pi)
        super().__init__(model, loss_fn, defaults, curvature, engine=engine, compile_options=compile_options,
                         params=params)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        if group["pi"] != "optimal":
            group["pi"] = check_number(group["pi"], "KroneckerNewton: pi ('optimal' or a number)", positive=True)
        gamma = group["damping"] = check_number(group["damping"], "KroneckerNewton: damping")
        eta = group["weight_decay"] = check_number(group["weight_decay"], "KroneckerNewton: weight_decay")
        if gamma + eta == 0:
            raise ValueError("KroneckerNewton: damping + weight_decay must be > 0 (the factored inverse of eq. 36 "
                             "needs k = gamma + eta > 0 to be defined for singular factors)")

    def _updates(self, out: Result, x: Any, y: Any) -> dict[str, torch.Tensor]:
        blocks = out[self.curvature_name]
        groups: dict[str, dict[str, Any]] = {}
        directions: dict[str, torch.Tensor] = {}
        grads: dict[str, torch.Tensor] = {}
        for group, name, p in self._trainable():
            eta = group["weight_decay"]
            groups[name] = group
            grads[name] = out.grad[name] + eta * p.detach() if eta else out.grad[name]
            directions[name] = damped_inverse_product(blocks[name], grads[name], group["damping"] + eta, group["pi"])
        if self.step_size == "fixed":
            return {name: d * -groups[name]["lr"] for name, d in directions.items()}
        alpha = self._quadratic_alpha(directions, grads, groups, (x, y))
        return {name: d * (-groups[name]["lr"] * alpha) for name, d in directions.items()}

    def _quadratic_alpha(self, directions: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
                         groups: dict[str, dict[str, Any]], batch: tuple[Any, Any]) -> torch.Tensor:
        """Botev eq. 40-41's ``alpha`` over all trainable parameters, ``G_bar`` from one GGN-vector
        product on the batch."""
        etas = {g["weight_decay"] for g in groups.values()}
        if len(etas) != 1:
            raise ValueError("KroneckerNewton(step_size='quadratic'): eq. 41 damps the full GGN with tau + eta, one "
                             f"weight_decay for all parameters; the parameter groups have {sorted(etas)}")
        ggn = GGN(self.engine, [batch], params=list(directions))
        flat = torch.cat([d.reshape(-1) for d in directions.values()])
        g = torch.cat([grads[n].reshape(-1) for n in directions])
        return quadratic_step_size(flat, g, ggn @ flat, self.tau + etas.pop())
