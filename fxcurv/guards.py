"""Guards: what a compiled program was built from, checked at every call.

A program is a trace of the model and loss as they were: their module tree, which parameter object
sits where (and which are the same object, a tied weight), ``requires_grad`` flags, ``training``
flags, and every plain attribute a forward may read (a LeakyReLU's slope, a loss's
``label_smoothing``, a dropout's ``p``). :func:`fingerprint` summarizes all of that; the engine
compares it at every call with the one its programs were built from and traces anew when it
differs, so a replaced parameter, a swapped module, an appended layer, ``model.train()`` or a changed
hyperparameter never runs a stale program. In-place updates of parameter values (optimizer steps,
``load_state_dict`` without ``assign``, ``p.data = ...`` of the same shape) do not change it: programs
read parameter values at every call.

Object identities are part of the fingerprint; they stay valid because the engine keeps the traced
objects alive, so a new object can never reuse an old one's id while a program built from it exists.
Not guarded: Python globals and closures over mutable objects that a forward reads (trace-time
constants, as in torch.fx itself).
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# nn.Module bookkeeping that is not a hyperparameter (hooks, registries) or is guarded separately.
_MODULE_INTERNALS = frozenset({
    "training", "_parameters", "_buffers", "_non_persistent_buffers_set", "_modules", "_backward_pre_hooks",
    "_backward_hooks", "_is_full_backward_hook", "_forward_hooks", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_state_dict_hooks",
    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
})
_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, enum.Enum)


def _plain(value: Any) -> bool:
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (tuple, frozenset)):
        return all(_plain(v) for v in value)
    return False


def _state(obj: Any) -> tuple[Any, ...]:
    """The plain attributes of an object (hyperparameters), and the identity of tensor attributes."""
    items: list[tuple[Any, ...]] = []
    for key, value in vars(obj).items():
        if key in _MODULE_INTERNALS:
            continue
        if _plain(value):
            items.append((key, value))
        elif isinstance(value, list) and all(_plain(v) for v in value):
            items.append((key, tuple(value)))
        elif isinstance(value, torch.Tensor):
            items.append((key, id(value), tuple(value.shape), value.dtype, value.device))
    return tuple(items)


def module_fingerprint(model: nn.Module) -> tuple[Any, ...]:
    modules = tuple((name, id(m), type(m), m.training, _state(m))
                    for name, m in model.named_modules(remove_duplicate=False))
    params = tuple((name, id(p), p.requires_grad, tuple(p.shape), p.dtype, p.device)
                   for name, p in model.named_parameters(remove_duplicate=False))
    buffers = tuple((name, id(b), tuple(b.shape), b.dtype) for name, b in model.named_buffers(remove_duplicate=False))
    return modules, params, buffers


def callable_fingerprint(fn: Callable[..., Any]) -> tuple[Any, ...]:
    """A loss given as a module, a function (its code, defaults and plain closure values), a
    ``functools.partial`` or a callable object."""
    if isinstance(fn, nn.Module):
        return ("module",) + module_fingerprint(fn)
    if isinstance(fn, functools.partial):
        return ("partial", callable_fingerprint(fn.func), tuple(a if _plain(a) else id(a) for a in fn.args),
                tuple((k, v if _plain(v) else id(v)) for k, v in fn.keywords.items()))
    code = getattr(fn, "__code__", None)
    if code is not None:
        cells = tuple(_cell(c) for c in (getattr(fn, "__closure__", None) or ()))
        defaults = getattr(fn, "__defaults__", None) or ()
        return ("function", id(fn), code, cells, tuple(d if _plain(d) else id(d) for d in defaults))
    return ("object", id(fn), type(fn), _state(fn) if hasattr(fn, "__dict__") else ())


def _cell(cell: Any) -> Any:
    try:
        value = cell.cell_contents
    except ValueError:  # a cell not yet filled
        return None
    return value if _plain(value) else id(value)


def fingerprint(model: nn.Module, loss_fn: Callable[..., Any]) -> tuple[Any, ...]:
    """Everything a trace of ``loss_fn(model(x), y)`` depends on besides parameter values."""
    return module_fingerprint(model), callable_fingerprint(loss_fn)
