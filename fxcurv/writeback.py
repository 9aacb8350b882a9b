"""Writing a result back onto the model's parameters, where optimizers and other libraries look.

:func:`write_grad` puts the gradient into ``p.grad`` the way ``loss.backward()`` does: a parameter
without a gradient gets a fresh tensor, one with a gradient gets it added in place,

    p.grad <- g                if p.grad is None,
    p.grad <- p.grad + g       otherwise (in place: the same tensor object, as autograd accumulates),

so that ``optimizer.zero_grad(); engine(x, y).write_grad(model); optimizer.step()`` takes the step
``loss.backward()`` would have given, and gradients of several calls accumulate without
``zero_grad`` as they do with autograd. :func:`match_parameters` checks that a result belongs to the
model before anything is written (:mod:`fxcurv.backpack` writes the other quantities the same way).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .errors import InputError


def match_parameters(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Parameter]:
    """The model's parameters under the result's ``names`` (``model.named_parameters()`` names), in
    the result's order.

    Raises :class:`~fxcurv.errors.InputError` where the result is not the model's: a name the model
    lacks, or a trainable parameter of the model the result lacks (a result of another model, or of
    this one before a parameter was unfrozen)."""
    if not isinstance(model, nn.Module):
        raise InputError(f"write needs the nn.Module the result was computed for, got {type(model).__name__}")
    params = dict(model.named_parameters())
    names = list(names)
    missing = [n for n in names if n not in params]
    if missing:
        raise InputError(f"the result has parameters {missing} that {type(model).__name__} does not have "
                         f"(its parameters: {list(params)}): it was computed for another model")
    unseen = [n for n, p in params.items() if p.requires_grad and n not in names]
    if unseen:
        raise InputError(f"{type(model).__name__} has trainable parameters {unseen} the result does not have: it "
                         "was computed for another model, or before they were unfrozen; call the engine again")
    return {n: params[n] for n in names}


def check_like(value: torch.Tensor, param: nn.Parameter, name: str, what: str) -> None:
    """Refuse a per-parameter tensor whose shape, dtype or device differs from its parameter's."""
    if value.shape != param.shape or value.dtype != param.dtype or value.device != param.device:
        raise InputError(f"{what} of {name!r} is {tuple(value.shape)} {value.dtype} on {value.device}, but the "
                         f"parameter is {tuple(param.shape)} {param.dtype} on {param.device}: the result was "
                         "computed for a model of other shapes, dtype or device")


def write_grad(model: nn.Module, grads: Mapping[str, torch.Tensor]) -> None:
    """Accumulate ``grads`` (parameter name -> gradient) into the parameters' ``.grad`` as
    ``loss.backward()`` does (module docstring). Every check runs before the first write, so a refused
    result leaves every ``.grad`` as it was."""
    params = match_parameters(model, grads)
    for name, p in params.items():
        check_like(grads[name], p, name, "the gradient")
    for name, p in params.items():
        g = grads[name].detach()
        if p.grad is None:
            p.grad = g.clone()  # a copy: the result's tensor and p.grad stay independent
        else:
            p.grad.add_(g)
