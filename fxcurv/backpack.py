"""BackPACK's front: a result written onto the parameters under BackPACK's attribute names.

Code written for BackPACK reads its quantities from the parameters after ``loss.backward()`` inside
``with backpack(...)``: ``p.grad``, ``p.diag_ggn_exact``, ``p.grad_batch``, ``p.kflr``, ... With
fxcurv the call ``out = engine(x, y)`` computes them, and :func:`write` puts them where that code looks:

    before                                            after
    model, lossfunc = extend(model), extend(lossfunc)   engine = fxcurv.compile(model, lossfunc,
    loss = lossfunc(model(x), y)                                    quantities=("diag_ggn", "batch_grad"))
    with backpack(DiagGGNExact(), BatchGrad()):         out = engine(x, y); loss = out.loss
        loss.backward()                                 fxcurv.backpack.write(model, out)

``write`` accumulates the gradient into ``p.grad`` as ``loss.backward()`` does
(:meth:`fxcurv.Result.write_grad`) and sets each other per-parameter quantity as an attribute,
replacing a previous value, as BackPACK's ``setattr`` does. The names and stored types, read from
BackPACK 1.7.1's ``savefield`` of each extension (``backpack/extensions/``), are :data:`FIELDS`:

| fxcurv | BackPACK extension | attribute | stored |
| --- | --- | --- | --- |
| ``batch_grad`` | BatchGrad | ``grad_batch`` | ``[N, *param]`` |
| ``batch_l2_grad`` | BatchL2Grad | ``batch_l2`` | ``[N]`` |
| ``sum_grad_squared`` | SumGradSquared | ``sum_grad_squared`` | like the parameter |
| ``variance`` | Variance | ``variance`` | like the parameter |
| ``diag_ggn`` | DiagGGNExact | ``diag_ggn_exact`` | like the parameter |
| ``diag_ggn_mc`` | DiagGGNMC | ``diag_ggn_mc`` | like the parameter |
| ``diag_hessian`` | DiagHessian | ``diag_h`` | like the parameter |
| ``batch_diag_ggn`` | BatchDiagGGNExact | ``diag_ggn_exact_batch`` | ``[N, *param]`` |
| ``batch_diag_ggn_mc`` | BatchDiagGGNMC | ``diag_ggn_mc_batch`` | ``[N, *param]`` |
| ``sqrt_ggn`` | SqrtGGNExact | ``sqrt_ggn_exact`` | ``[K, N, *param]`` |
| ``sqrt_ggn_mc`` | SqrtGGNMC | ``sqrt_ggn_mc`` | ``[M, N, *param]`` |
| ``kfac`` | KFAC | ``kfac`` | list of factors: ``[G, A]`` (weight), ``[G]`` (bias) |
| ``kflr`` | KFLR | ``kflr`` | the same |
| ``kfra`` | KFRA | ``kfra`` | the same |
| ``hbp_hessian``, ``hbp_pch_abs``, ``hbp_pch_clip`` | HBP | ``hbp`` | the same |

Kronecker blocks are stored as BackPACK stores them, a list of the factors in its order and scaling
(:class:`fxcurv.Kronecker` keeps the same factors). Differences: ``sqrt_ggn_exact`` has ``K = C - 1``
columns per sample for cross-entropy where BackPACK's has ``C`` (the factors differ, ``V V^T`` per
sample agrees); the HBP variants share BackPACK's one attribute, so a result with two of them is
refused. A per-parameter quantity BackPACK does not have (``hesscale``, ``hesscale_gn``,
``block_ggn``, ``block_hessian``, a user's own) is written under fxcurv's name. Whole-network
quantities (``ggn_eigen``) belong to no parameter and stay in the result.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .api import Result
from .errors import InputError
from .operators import Kronecker
from .writeback import check_like, match_parameters, write_grad


def _as_is(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else value


def _factor_list(value: Any) -> list[torch.Tensor]:
    """A Kronecker block as BackPACK stores it: the list ``[G, A]`` or ``[G]``."""
    if not isinstance(value, Kronecker):
        raise TypeError(f"expected a fxcurv.Kronecker block, got {type(value).__name__}")
    return list(value.factors)


@dataclass(frozen=True)
class Field:
    """Where BackPACK keeps a quantity: its extension, the parameter attribute (``savefield``) and
    how fxcurv's per-parameter value becomes what BackPACK stores there."""

    quantity: str  # fxcurv's name
    extension: str  # BackPACK's extension class
    attribute: str  # BackPACK's savefield
    stored: Callable[[Any], Any] = _as_is


FIELDS: dict[str, Field] = {}


def _field(quantity: str, extension: str, attribute: str, stored: Callable[[Any], Any] = _as_is) -> None:
    if quantity in FIELDS:
        raise ValueError(f"quantity {quantity!r} has a BackPACK field already: {FIELDS[quantity]}")
    if hasattr(nn.Parameter, attribute):
        raise ValueError(f"BackPACK field {attribute!r} of {quantity!r} would hide torch.nn.Parameter.{attribute}")
    FIELDS[quantity] = Field(quantity, extension, attribute, stored)


_field("batch_grad", "BatchGrad", "grad_batch")
_field("batch_l2_grad", "BatchL2Grad", "batch_l2")
_field("sum_grad_squared", "SumGradSquared", "sum_grad_squared")
_field("variance", "Variance", "variance")
_field("diag_ggn", "DiagGGNExact", "diag_ggn_exact")
_field("diag_ggn_mc", "DiagGGNMC", "diag_ggn_mc")
_field("diag_hessian", "DiagHessian", "diag_h")
_field("batch_diag_ggn", "BatchDiagGGNExact", "diag_ggn_exact_batch")
_field("batch_diag_ggn_mc", "BatchDiagGGNMC", "diag_ggn_mc_batch")
_field("sqrt_ggn", "SqrtGGNExact", "sqrt_ggn_exact")
_field("sqrt_ggn_mc", "SqrtGGNMC", "sqrt_ggn_mc")
_field("kfac", "KFAC", "kfac", _factor_list)
_field("kflr", "KFLR", "kflr", _factor_list)
_field("kfra", "KFRA", "kfra", _factor_list)
for _q in ("hbp_hessian", "hbp_pch_abs", "hbp_pch_clip"):
    _field(_q, "HBP", "hbp", _factor_list)


def attribute_of(quantity: str) -> str:
    """The parameter attribute ``quantity`` is written to: BackPACK's name, else fxcurv's own."""
    field = FIELDS.get(quantity)
    return field.attribute if field is not None else quantity


def attributes(out: Result) -> dict[str, dict[str, Any]]:
    """``{attribute: {parameter name: value}}``: what :func:`write` sets, for every per-parameter
    quantity of ``out`` except the gradient (see the module docstring for names and types).

    Raises :class:`~fxcurv.errors.InputError` where two quantities would share one attribute (two HBP
    variants) or an attribute would hide one of ``torch.nn.Parameter``'s own (a user's quantity named
    like one)."""
    by_attribute: dict[str, dict[str, Any]] = {}
    source: dict[str, str] = {}
    for quantity in out:
        values = out[quantity]
        if quantity == "grad" or not isinstance(values, Mapping):  # whole-network: no parameter holds it
            continue
        attr = attribute_of(quantity)
        if attr in source:
            raise InputError(f"{source[attr]!r} and {quantity!r} would both be written to the attribute {attr!r} "
                             "(BackPACK keeps one HBP variant per parameter): compute them in separate calls")
        if hasattr(nn.Parameter, attr):
            raise InputError(f"quantity {quantity!r} would be written to {attr!r}, which would hide "
                             f"torch.nn.Parameter.{attr}: rename the quantity")
        stored = FIELDS[quantity].stored if quantity in FIELDS else _as_is
        source[attr] = quantity
        by_attribute[attr] = {name: stored(v) for name, v in values.items()}
    return by_attribute


def write(model: nn.Module, out: Result, *, grad: bool = True) -> None:
    """Write ``out`` onto ``model``'s parameters as ``loss.backward()`` inside ``with backpack(...)``
    would: the gradient accumulated into ``p.grad`` (unless ``grad=False``), every other per-parameter
    quantity set as the attribute BackPACK uses (:data:`FIELDS`; fxcurv's name where BackPACK has
    none), replacing what was there.

    ``model`` is the module the engine was compiled for; every check (that the result is this model's,
    shapes, shared attributes) runs before the first write, so a refused result changes nothing."""
    if not isinstance(out, Result):
        raise InputError(f"write takes the engine's result (fxcurv.Result), got {type(out).__name__}")
    params = match_parameters(model, out.grad)
    for name, p in params.items():
        check_like(out.grad[name], p, name, "the gradient")
    values = attributes(out)
    if grad:
        write_grad(model, out.grad)
    for attr, per_param in values.items():
        for name, value in per_param.items():
            setattr(params[name], attr, value)


__all__ = ["FIELDS", "Field", "attribute_of", "attributes", "write"]
