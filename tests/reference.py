"""Independent references: exact gradients, Hessian and GGN diagonals with torch.func (float64).

Nothing here uses fxcurv: the model is evaluated functionally with ``torch.func.functional_call``
and differentiated by torch.func, so the tests compare two unrelated computations.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, hessian, jacrev


def _flat(params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list]:
    names, shapes = list(params), [p.shape for p in params.values()]
    return torch.cat([p.reshape(-1) for p in params.values()]), list(zip(names, shapes))


def _unflat(vec: torch.Tensor, layout) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for name, shape in layout:
        n = shape.numel()
        out[name] = vec[i:i + n].reshape(shape)
        i += n
    return out


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _frozen(model) -> dict[str, torch.Tensor]:
    out = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    out.update({n: b for n, b in model.named_buffers()})
    return out


def _call(model, values: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The model on ``values``. ``tie_weights=False``: with a module registered under two names
    (``self.c = self.a``), torch's weight tying leaves plain tensors in place of the parameters after
    the call; the values, keyed by each parameter's first name, reach every use of the module anyway."""
    return functional_call(model, values, (x,), tie_weights=False)


def loss_of(model, loss_fn, x, y):
    params, frozen = trainable(model), _frozen(model)
    theta, layout = _flat(params)

    def f(vec):
        return loss_fn(_call(model, {**_unflat(vec, layout), **frozen}, x), y)

    return f, theta, layout


def grad(model, loss_fn, x, y) -> dict[str, torch.Tensor]:
    f, theta, layout = loss_of(model, loss_fn, x, y)
    return _unflat(torch.func.grad(f)(theta), layout)


def diag_hessian(model, loss_fn, x, y) -> dict[str, torch.Tensor]:
    f, theta, layout = loss_of(model, loss_fn, x, y)
    return _unflat(torch.diagonal(hessian(f)(theta)), layout)


def full_hessian(model, loss_fn, x, y) -> torch.Tensor:
    f, theta, _ = loss_of(model, loss_fn, x, y)
    return hessian(f)(theta)


def ggn(model, loss_fn, x, y) -> torch.Tensor:
    """``J^T (d2L/df2) J`` with the full Jacobian of the model output and the full loss Hessian."""
    params, frozen = trainable(model), _frozen(model)
    theta, layout = _flat(params)

    def out(vec):
        return _call(model, {**_unflat(vec, layout), **frozen}, x)

    fx = out(theta)
    jac = jacrev(out)(theta).reshape(fx.numel(), -1)
    h_out = hessian(lambda z: loss_fn(z.reshape(fx.shape), y))(fx.reshape(-1))
    return jac.T @ h_out @ jac


def diagonal_blocks(matrix: torch.Tensor, model) -> dict[str, torch.Tensor]:
    """The diagonal blocks of a ``[..., P, P]`` curvature matrix over the trainable parameters (in
    ``named_parameters()`` order, as :func:`ggn` and :func:`full_hessian` flatten them): each
    parameter's ``[..., p, p]`` block."""
    out, start = {}, 0
    for name, p in trainable(model).items():
        out[name] = matrix[..., start:start + p.numel(), start:start + p.numel()]
        start += p.numel()
    return out


def diag_ggn(model, loss_fn, x, y) -> dict[str, torch.Tensor]:
    _, layout = _flat(trainable(model))
    return _unflat(torch.diagonal(ggn(model, loss_fn, x, y)), layout)
