"""The quantities users request, by the names they type, and the messages each one needs.

| name           | what                                                  | message stream          |
| -------------- | ----------------------------------------------------- | ----------------------- |
| ``grad``       | gradient                                              | ``g``                   |
| ``diag_ggn``   | exact GGN diagonal                                    | loss factor ``S``       |
| ``diag_ggn_mc``| Monte Carlo GGN diagonal (``mc_samples`` columns)     | sampled factor ``S``    |
| ``diag_hessian`` | exact Hessian diagonal (HBP eq. S.9, signed residual columns) | loss ``S`` + residual columns |
| ``hesscale``   | HesScale Hessian-diagonal backprop (eq. 4-5, 8-9)     | diagonal ``d`` (+ ``phi'' g``) |
| ``hesscale_gn``| HesScaleGN: HesScale without ``phi''`` terms          | diagonal ``d``          |

``diag_ggn`` and ``diag_hessian`` share the loss factor's propagation: the Hessian diagonal is the
GGN diagonal plus the contributions of the residual columns.
"""

from __future__ import annotations

QUANTITIES: dict[str, str] = {
    "grad": "gradient",
    "diag_ggn": "exact diagonal of the generalized Gauss-Newton matrix",
    "diag_ggn_mc": "Monte Carlo estimate of the GGN diagonal",
    "diag_hessian": "exact Hessian diagonal",
    "hesscale": "HesScale approximation of the Hessian diagonal",
    "hesscale_gn": "HesScaleGN approximation of the GGN diagonal",
}

# Quantities carried by square-root factor columns, and by diagonal messages.
FACTOR_QUANTITIES = ("diag_ggn", "diag_ggn_mc", "diag_hessian")
DIAG_QUANTITIES = ("hesscale", "hesscale_gn")


def normalize(quantities) -> tuple[str, ...]:
    if isinstance(quantities, str):
        quantities = (quantities,)
    out = []
    for q in quantities:
        if q not in QUANTITIES:
            known = ", ".join(QUANTITIES)
            raise ValueError(f"unknown quantity {q!r}; fxcurv computes: {known}")
        if q not in out:
            out.append(q)
    return tuple(out)
