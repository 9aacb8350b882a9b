"""BackPACK's front: a result written onto the parameters under BackPACK's attribute names.

Code written for BackPACK reads its quantities from the parameters after ``loss.backward()`` inside
``with backpack(...)``: ``p.grad``, ``p.diag_ggn_exact``, ``p.grad_batch``, ``p.kflr``, ... With
fxcurv the call ``out = engine(x, y)`` computes them, and :func:`write` puts them where that code looks:

    before                                            after
    model, lossfunc = extend(model), extend(lossfunc)   engine = fxcurv.compile(model, lossfunc,
    loss = lossfunc(model(x), y)                                    quantities=("diag_ggn", "batch_grad"))
    with backpack(DiagGGNExact(), BatchGrad()):         out = engine(x, y); loss = out.loss
        loss.backward()                                 fxcurv.backpack.write(model, out)

Or, changing only the imports, :func:`extend` and :func:`backpack` with the extensions of the table below
(``from fxcurv.backpack import backpack, extend, DiagGGNExact, BatchGrad``) run that code as written: the
block's end computes and writes the attributes (see "the drop-in front" below).

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

import contextlib
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

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
    values = attributes(out)
    if "grad" in out:
        params = match_parameters(model, out.grad)
        for name, p in params.items():
            check_like(out.grad[name], p, name, "the gradient")
    elif grad:
        raise InputError("the result has no gradient (its engine was compiled with grad=False): "
                         "write(model, out, grad=False) writes its other quantities")
    elif values:
        params = match_parameters(model, next(iter(values.values())))
    else:
        raise InputError(f"the result has nothing to write: no gradient and no per-parameter quantity ({list(out)})")
    if grad:
        write_grad(model, out.grad)
    for attr, per_param in values.items():
        for name, value in per_param.items():
            setattr(params[name], attr, value)


# ---- the drop-in front: extend(...) and with backpack(...) ----------------------------------------------
#
# BackPACK code changes its imports only:
#
#     from fxcurv.backpack import backpack, extend, BatchGrad, DiagGGNExact   # was: from backpack import ...
#     model, lossfunc = extend(model), extend(lossfunc)
#     loss = lossfunc(model(x), y)
#     with backpack(DiagGGNExact(), BatchGrad()):
#         loss.backward()                     # autograd's p.grad, as before
#     p.diag_ggn_exact, p.grad_batch          # written when the block ends, by a compiled engine
#
# ``extend`` records each call of the module (its inputs and output) in a short history; when the block ends,
# the last call of an extended module whose first input is the output of another extended module's call is
# the loss, that other call the model: the engine compiled for (model, loss, quantities) runs on its ``x``
# and ``y`` and :func:`write` sets the attributes (not ``p.grad``, which ``backward`` wrote). The engine
# recomputes the forward pass: a model must give the same output again (eval-mode dropout, no state that
# a forward changes). Monte Carlo extensions draw from fxcurv's generator, not BackPACK's: their values
# are other samples of the same estimator. Extend the whole model, as BackPACK's examples do (not its
# layers one by one).


class Extension:
    """A BackPACK extension: the fxcurv quantity it asks for; ``mc_samples`` for the Monte Carlo ones."""

    quantity: ClassVar[str]

    def __init__(self, mc_samples: int = 1):
        if not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}")
        self.mc_samples = mc_samples

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class BatchGrad(Extension):
    quantity = "batch_grad"


class BatchL2Grad(Extension):
    quantity = "batch_l2_grad"


class SumGradSquared(Extension):
    quantity = "sum_grad_squared"


class Variance(Extension):
    quantity = "variance"


class DiagGGNExact(Extension):
    quantity = "diag_ggn"


class DiagGGNMC(Extension):
    quantity = "diag_ggn_mc"


class DiagHessian(Extension):
    quantity = "diag_hessian"


class BatchDiagGGNExact(Extension):
    quantity = "batch_diag_ggn"


class BatchDiagGGNMC(Extension):
    quantity = "batch_diag_ggn_mc"


class SqrtGGNExact(Extension):
    quantity = "sqrt_ggn"


class SqrtGGNMC(Extension):
    quantity = "sqrt_ggn_mc"


class KFAC(Extension):
    quantity = "kfac"


class KFLR(Extension):
    quantity = "kflr"


class KFRA(Extension):
    quantity = "kfra"


@dataclass(frozen=True)
class _Call:
    """One call of an extended module: the module and its output held weakly (an output nobody keeps is
    not kept alive here), its inputs as they were passed."""

    module: weakref.ReferenceType[nn.Module]
    args: tuple[Any, ...]
    output: Callable[[], Any]


# The last calls of extended modules (model and loss of the last forward pass at least).
_HISTORY_LENGTH = 8
_calls: deque[_Call] = deque(maxlen=_HISTORY_LENGTH)
_engines: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], Any]] = weakref.WeakKeyDictionary()
_EXTENDED = "_fxcurv_backpack_extended"


def _record(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
    held: Callable[[], Any] = weakref.ref(output) if isinstance(output, torch.Tensor) else (lambda: None)
    _calls.append(_Call(weakref.ref(module), tuple(args), held))


def extend(module: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
    """BackPACK's ``extend``: the module itself, its calls recorded for :func:`backpack` (BackPACK's options,
    such as ``use_converter``, are accepted and have nothing to do here)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"extend takes a torch.nn.Module (the model or the loss), got {type(module).__name__}")
    if not getattr(module, _EXTENDED, False):
        module.register_forward_hook(_record)
        setattr(module, _EXTENDED, True)
    return module


def _model_and_loss() -> tuple[nn.Module, Any, nn.Module, Any]:
    """``(model, x, loss_fn, y)`` of the last recorded loss call (see the comment above)."""
    calls = list(_calls)
    for i in range(len(calls) - 1, -1, -1):
        loss = calls[i]
        if len(loss.args) < 2:
            continue
        for model in reversed(calls[:i]):
            if model.output() is loss.args[0] and len(model.args) == 1:
                m, fn = model.module(), loss.module()
                if m is not None and fn is not None:
                    return m, model.args[0], fn, loss.args[1]
    raise InputError("with backpack(...): no call of an extended loss on the output of an extended model was "
                     "recorded; extend both (model, lossfunc = extend(model), extend(lossfunc)) and compute "
                     "loss = lossfunc(model(x), y) before the block")


@contextlib.contextmanager
def backpack(*extensions: Extension, **options: Any) -> Iterator[None]:
    """BackPACK's ``with backpack(*extensions)``: when the block ends (after ``loss.backward()``), the
    quantities of ``extensions`` for the last ``lossfunc(model(x), y)`` of extended modules are computed
    by a compiled engine and written onto the parameters under BackPACK's names (:func:`write`)."""
    for ext in extensions:
        if not isinstance(ext, Extension):
            raise TypeError(f"backpack takes fxcurv.backpack extensions (BatchGrad(), DiagGGNExact(), ...), got "
                            f"{type(ext).__name__}")
    yield
    if not extensions:
        return
    from .api import Engine

    model, x, loss_fn, y = _model_and_loss()
    quantities = tuple(dict.fromkeys(ext.quantity for ext in extensions))
    mc_samples = max(ext.mc_samples for ext in extensions)
    key = (id(loss_fn), quantities, mc_samples)
    cache = _engines.setdefault(model, {})
    engine = cache.get(key)
    if engine is None:
        engine = cache[key] = Engine(model, loss_fn, quantities, mc_samples=mc_samples)
    out = engine(x.detach(), y.detach() if isinstance(y, torch.Tensor) else y)
    write(model, out, grad=False)


__all__ = ["FIELDS", "Field", "attribute_of", "attributes", "write", "extend", "backpack", "Extension",
           "BatchGrad", "BatchL2Grad", "SumGradSquared", "Variance", "DiagGGNExact", "DiagGGNMC", "DiagHessian",
           "BatchDiagGGNExact", "BatchDiagGGNMC", "SqrtGGNExact", "SqrtGGNMC", "KFAC", "KFLR", "KFRA"]
