"""The quantities users request, one file each; importing this package registers them all.

| name | what | defined by |
| --- | --- | --- |
| ``grad`` | gradient (always returned) | |
| ``diag_ggn`` | exact GGN diagonal | HBP eq. S.6-S.8 |
| ``diag_ggn_mc`` | Monte Carlo GGN diagonal | HBP Sec. C |
| ``diag_hessian`` | exact Hessian diagonal | HBP eq. S.6, S.9 |
| ``hesscale``, ``hesscale_gn`` | HesScale(GN) diagonal backpropagation | HesScale eq. 4-5, 8-9 |
| ``batch_grad``, ``batch_l2_grad`` | per-sample gradients, their squared norms | BackPACK's BatchGrad, BatchL2Grad |
| ``sum_grad_squared``, ``variance`` | their second moment, their variance | BackPACK's SumGradSquared, Variance |
| ``batch_diag_ggn(_mc)`` | per-sample GGN diagonals | BackPACK's BatchDiagGGNExact / MC |
| ``sqrt_ggn(_mc)`` | per-sample square-root factors of the GGN | BackPACK's SqrtGGNExact / MC |
| ``ggn_eigen``, ``ggn_eigen_mc`` | GGN eigenpairs from the Gram matrix (:class:`GGNEigen`) | ViViT A.1-A.2, C.1-C.2 |

and the Kronecker and block quantities, one file each (``fxcurv.QUANTITIES`` has them all).

Adding a quantity is adding one file here that defines a :class:`~fxcurv.quantities.base.Quantity`
and passes it to :func:`~fxcurv.quantities.base.register`, and its tests. Users name quantities by
string or pass the objects themselves.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable

from .base import QUANTITIES, Quantity, register

# Every quantity file registers itself; a new quantity is a new file here, nothing else.
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    importlib.import_module(f"{__name__}.{_info.name}")

GRAD = QUANTITIES["grad"]

from .ggn_eigen import GGNEigen  # noqa: E402  (the class, for options: GGNEigen(top_k=5, groups="layer"))


def resolve(quantities: str | Quantity | Iterable[str | Quantity], *, grad: bool = True) -> tuple[Quantity, ...]:
    """The requested quantities as objects, each once, in the order given, ``grad`` first -- unless
    ``grad=False`` (curvature without the gradient: the program then has no weight-gradient products)."""
    if isinstance(quantities, (str, Quantity)):
        quantities = (quantities,)
    out: list[Quantity] = [GRAD] if grad else []
    for q in quantities:
        if isinstance(q, str):
            if q not in QUANTITIES:
                raise ValueError(f"unknown quantity {q!r}; fxcurv computes: {', '.join(QUANTITIES)}")
            q = QUANTITIES[q]
        elif not isinstance(q, Quantity):
            raise TypeError(f"a quantity is a name or a fxcurv.quantities.Quantity, got {type(q).__name__}")
        if q is GRAD and not grad:
            raise ValueError("quantities include 'grad' but grad=False: request the gradient or drop it, not both")
        if all(q.name != seen.name for seen in out):
            out.append(q)
    if not out:
        raise ValueError("nothing to compute: grad=False and no quantity requested; "
                         f"fxcurv computes: {', '.join(n for n in QUANTITIES if n != 'grad')}")
    return tuple(out)


__all__ = ["QUANTITIES", "Quantity", "register", "resolve", "GGNEigen"]
