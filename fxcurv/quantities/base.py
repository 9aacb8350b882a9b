"""What a quantity is: the messages it needs, what it collects per parameter, how it finishes.

A :class:`Quantity` is declared once (one file in this package) and the compiler treats every
quantity alike: it carries the union of the message streams the requested quantities need
(:class:`~fxcurv.curvature.messages.Needs`), hands each quantity every use of every trainable
parameter (:class:`~fxcurv.curvature.accumulate.ParamUse`), and asks it for the parameter's result
after the last use (:class:`~fxcurv.curvature.accumulate.ParamEnd`). The program returns that result
per parameter; :meth:`Quantity.wrap` turns it into what the user gets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import torch
import torch.fx as fx

from ..curvature.accumulate import ParamEnd, ParamUse
from ..curvature.messages import Needs
from .combine import Accumulator, WeightedSum, refuse


class Quantity:
    """Base class of the quantities. Subclasses set ``name``, ``description``, ``reference`` and
    ``needs``, and implement :meth:`collect` and :meth:`finalize`; :meth:`accumulator` says how
    their values combine over the batches of a data set (``engine.accumulate``)."""

    name: str
    description: str
    reference: str = ""  # the equations that define it
    needs: Needs = Needs()
    # The result per parameter is a tensor shaped like the parameter (the default); other quantities
    # say what they return in their description and implement wrap().
    shaped_like_parameter: ClassVar[bool] = True
    # A whole-network quantity (per_parameter = False) still collects and finalizes per parameter,
    # but the user gets one object: wrap_network() combines the parameters' results.
    per_parameter: ClassVar[bool] = True

    def start(self) -> Any:
        """The empty per-parameter state (default: a list of contributions)."""
        return []

    def specialize(self, trial: Callable[[Quantity], Any], x: torch.Tensor, y: Any) -> Quantity:
        """The quantity to compile for inputs like ``(x, y)`` (default: itself). A quantity whose
        settings depend on the inputs (``GGNEigen(memory_budget=...)`` picks an approximation that fits)
        returns a configured copy with the same name; ``trial(candidate)`` builds the program with
        ``candidate`` in its place, without running it, and returns the ``fxcurv.passes.pipeline.Build``
        (its graph and memory estimate)."""
        return self

    def start_network(self) -> Any:
        """State shared by every parameter of one program (default: none), handed to
        :meth:`finalize` as ``end.network[self.name]``: a whole-network quantity accumulates across
        parameters in it (``ggn_eigen`` sums the parameters' Gram matrices in the program)."""
        return None

    def collect(self, use: ParamUse, state: Any) -> None:
        raise NotImplementedError

    def finalize(self, end: ParamEnd, state: Any) -> fx.Node:
        raise NotImplementedError

    def wrap(self, value: Any, param: torch.Tensor, static: Any = None) -> Any:
        """What the user gets for one parameter from the program's result (default: as it is);
        ``static`` is what :meth:`finalize` returned besides the graph nodes (see ``Finalized``)."""
        return value

    def wrap_network(self, values: dict[str, Any], params: dict[str, torch.Tensor], statics: dict[str, Any]) -> Any:
        """What the user gets for a whole-network quantity: one object from every trainable
        parameter's result (``values`` and ``statics`` keyed by parameter name, in
        ``named_parameters()`` order)."""
        raise NotImplementedError(f"{self.name} is per parameter (per_parameter = True)")

    def accumulator(self) -> Accumulator[Any]:
        """How this quantity's per-batch values (one parameter's, or the whole-network value) combine into
        its value on the concatenated data set (``engine.accumulate``, :mod:`fxcurv.quantities.combine`).

        Default: for a result shaped like the parameter, the weighted sum ``sum_b w_b Q_b`` -- exact for a
        sum over samples of per-sample terms linear in the loss (HBP eq. S.8: the loss's scale enters
        every term once). Others must say how they combine, or refuse (raise the error of
        :func:`~fxcurv.quantities.combine.refuse`, naming why)."""
        if self.shaped_like_parameter and self.per_parameter:
            return WeightedSum(1.0)
        raise refuse(self.name, "the quantity declares no combination over batches (Quantity.accumulator)")

    def __repr__(self) -> str:
        return f"<quantity {self.name}: {self.description}>"


QUANTITIES: dict[str, Quantity] = {}

Q = TypeVar("Q", bound=Quantity)


def register(quantity: Q) -> Q:
    """Make ``quantity`` available by its name (a name is refused twice)."""
    if quantity.name in QUANTITIES:
        raise ValueError(f"quantity {quantity.name!r} is registered twice")
    QUANTITIES[quantity.name] = quantity
    return quantity


def sum_or_zeros(end: ParamEnd, parts: list[fx.Node], message: str) -> fx.Node:
    """The sum of a parameter's contributions; zeros shaped like it where there are none."""
    return end.sum(parts, message=message) if parts else end.zeros(message)
