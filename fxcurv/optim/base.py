"""What the optimizers of :mod:`fxcurv.optim` share: a ``torch.optim.Optimizer`` over a model's trainable
parameters whose ``step(x, y)`` runs a compiled fxcurv engine on the batch and updates the parameters in
place.

Contract of every optimizer here:

* ``Optimizer(model, loss_fn, *, lr, curvature=..., params=None, engine=None, compile_options=None,
  ...)``: the parameters are ``model``'s trainable ones (``requires_grad``) in one group, or ``params``
  as torch optimizers take them (parameters, or groups ``{"params": [...], "lr": ...}`` with their own
  hyperparameters), which must be the model's; the others are left alone. Per-group hyperparameters
  (``lr`` and the optimizer's own) work with torch's LR schedulers and ``add_param_group``;
  ``state_dict()``/``load_state_dict()`` are torch's.
* The engine is ``fxcurv.compile(model, loss_fn, quantities=(curvature,), **compile_options)``, exposed
  as ``.engine``; an engine compiled elsewhere for the same model and loss and holding the curvature
  quantity may be passed as ``engine=`` instead (its programs are then shared).
* ``step(x, y)`` calls the engine once on the batch, computes every update from its result, then adds
  the updates to the parameters in place under ``torch.no_grad()`` and returns the engine's
  :class:`fxcurv.Result` (``.loss`` and ``.grad`` are those at the parameters before the step). A
  parameter whose ``requires_grad`` is off at the step is left alone. The in-place update changes no
  guard of the engine (:mod:`fxcurv.guards`: parameter values are read at every call), so every step
  on batches of one shape runs the same compiled program.
* A closure-style ``step()`` without data is a TypeError: the engine needs the batch itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..api import Engine, Result, compile
from ..quantities import Quantity

# The diagonal curvature quantities an elementwise optimizer can precondition with (each shaped like its
# parameter). diag_hessian and hesscale may have negative entries; the optimizers say how they treat them.
DIAGONALS = ("diag_ggn", "diag_ggn_mc", "hesscale", "hesscale_gn", "diag_hessian")

CLOSURE_ERROR = ("{cls}.step needs the batch: call step(x, y) with the inputs and targets. The engine computes "
                 "the loss, gradient and curvature itself in one pass, so a closure (step(closure)) or a step "
                 "without data is not supported")


def check_number(value: Any, what: str, *, positive: bool = False) -> float:
    """``value`` as a float, refused unless finite and ``> 0`` (``positive``) or ``>= 0``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ValueError(f"{what} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return v


def check_choice(value: Any, accepted: Sequence[str], what: str) -> str:
    """``value`` if it is one of ``accepted``, else a ValueError listing them."""
    if not isinstance(value, str) or value not in accepted:
        raise ValueError(f"{what} must be one of {', '.join(repr(a) for a in accepted)}; got {value!r}")
    return value


class CurvatureOptimizer(torch.optim.Optimizer):
    """Base class: the engine, the parameter names, and the in-place step (see the module docstring).

    Subclasses implement :meth:`_updates`, the additive update ``{name: delta}`` of every parameter they
    change (``theta <- theta + delta``) from the engine's result on the batch ``(x, y)``, reading their
    per-group hyperparameters from the group each parameter is in (:meth:`_trainable`), which
    :meth:`_check_group` validated when the group was added (the constructor's defaults included)."""

    def __init__(self, model: nn.Module, loss_fn: Callable[..., Any], defaults: dict[str, Any],
                 curvature: str | Quantity, *, engine: Engine | None, compile_options: Mapping[str, Any] | None,
                 params: Iterable[Any] | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__}: model must be a torch.nn.Module, got {type(model).__name__}")
        # Each parameter object by its first name (a tied weight has one entry in the engine's results).
        self._names: dict[int, str] = {}
        for n, p in model.named_parameters():
            self._names.setdefault(id(p), n)
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
            if not params:
                raise ValueError(f"{type(self).__name__}: the model has no trainable parameters (requires_grad=True)")
        super().__init__(params, defaults)
        self.model = model
        self.loss_fn = loss_fn
        self.curvature_name = curvature.name if isinstance(curvature, Quantity) else curvature
        self.engine = self._engine(curvature, engine, compile_options)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's, refusing parameters that are not the model's (the engine computes the model's only)."""
        params = param_group["params"]
        tensors = [params] if isinstance(params, torch.Tensor) else list(params)
        foreign = [tuple(p.shape) for p in tensors if id(p) not in self._names]
        if foreign:
            raise ValueError(f"{type(self).__name__}: parameters of shapes {foreign} are not parameters of the model "
                             "the engine is compiled for")
        super().add_param_group({**param_group, "params": tensors})
        self._check_group(self.param_groups[-1])

    def _check_group(self, group: dict[str, Any]) -> None:
        """Validate (and normalize in place) a new group's hyperparameters, the defaults filled in. The base
        checks ``lr``; subclasses add their own."""
        group["lr"] = check_number(group["lr"], f"{type(self).__name__}: lr")

    def _engine(self, curvature: str | Quantity, engine: Engine | None,
                compile_options: Mapping[str, Any] | None) -> Engine:
        cls = type(self).__name__
        if engine is None:
            return compile(self.model, self.loss_fn, quantities=(curvature,), **dict(compile_options or {}))
        if compile_options:
            raise ValueError(f"{cls}: compile_options= configure the engine compiled here; an engine passed as "
                             "engine= is used as it was compiled (pass one of them)")
        if not isinstance(engine, Engine):
            raise TypeError(f"{cls}: engine= must be a fxcurv engine (fxcurv.compile(...)), "
                            f"got {type(engine).__name__}")
        if engine.model is not self.model or engine.loss_fn is not self.loss_fn:
            raise ValueError(f"{cls}: engine= was compiled for another model or loss; it must be "
                             "fxcurv.compile(model, loss_fn, ...) with this optimizer's model and loss_fn")
        if self.curvature_name not in engine.quantity_names:
            raise ValueError(f"{cls}: engine= does not compute {self.curvature_name!r}; it computes "
                             f"{list(engine.quantity_names)}")
        return engine

    # ---- the step -----------------------------------------------------------------------------------
    def _trainable(self) -> Iterator[tuple[dict[str, Any], str, torch.Tensor]]:
        """``(group, name, parameter)`` for every parameter of every group that is trainable now."""
        for group in self.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                yield group, self._names[id(p)], p

    def _updates(self, out: Result, x: Any, y: Any) -> dict[str, torch.Tensor]:
        """The additive update of each parameter this step changes, ``{name: delta}``, from the engine's
        result ``out`` on the batch ``(x, y)``."""
        raise NotImplementedError

    def step(self, x: Any = None, y: Any = None) -> Result:  # type: ignore[override]
        """One step on the batch ``(x, y)``: the engine's result at the current parameters, then
        ``theta <- theta + delta`` in place for every trainable parameter. Returns the result."""
        if x is None or y is None or callable(x):
            raise TypeError(CLOSURE_ERROR.format(cls=type(self).__name__))
        out = self.engine(x, y)
        # Every update is computed before any parameter changes: lazy parts of the result (ggn_eigen's
        # eigenvectors, Newton steps) read the program's kept values at the current parameters.
        updates = self._updates(out, x, y)
        with torch.no_grad():
            for _, name, p in self._trainable():
                delta = updates.get(name)
                if delta is not None:
                    p.add_(delta.to(p.dtype))
        return out
