"""A brute-force HesScale / HesScaleGN, written from the paper's *defining* equations.

Independent of fxcurv's rule tables: nothing here is imported from ``fxcurv``. The network is an
``nn.Sequential`` walked layer by layer; every layer is either

* an **elementwise activation** (``Tanh``, ``Sigmoid``, ``ReLU``, ``ELU``, ``Softplus``, ``SiLU``,
  ``GELU``, ``LeakyReLU``): ``phi'`` and ``phi''`` come from ``torch.func.grad`` of the *scalar*
  activation (no closed forms), and HesScale eq. 4 reads

      d_in = phi'(x)^2 * d_out + phi''(x) * g_out          (HesScaleGN drops the phi'' term)

* or a **layer that is linear in its input** (``Linear``, ``Flatten``, ``Conv2d``, ``MaxPool2d``
  (piecewise), ``AvgPool2d``, ``ZeroPad2d``, ...): its explicit per-sample Jacobian ``J_n``
  (``torch.func.jacrev``) gives, with the off-diagonal terms dropped (HesScale eq. 4 / 8),

      d_in[n] = (J_n o J_n)^T d_out[n],      g_in[n] = J_n^T g_out[n],

  and every parameter ``P`` of the layer gets (eq. 5 / 9), with its explicit per-sample Jacobian
  ``J_P,n = d out[n] / d P``,

      diag_P += sum_n (J_P,n o J_P,n)^T d_out[n];

* or a **normalization nonlinear in its input** (``LayerNorm``, ``RMSNorm``, ``GroupNorm``, linear in
  its affine parameters): as a linear layer, plus eq. 4's second term for a general op, the diagonal of
  the per-sample Hessian of ``g_out[n] . layer(x_n)`` (``torch.func.jacrev`` twice; HesScaleGN drops it).

The backward pass starts at the model output from the **exact** diagonal of the loss Hessian
(HesScale Sec. 3 / App. A.1: ``p - p^2`` for softmax cross-entropy, ``2`` for squared error, each
times the reduction's per-sample scale; for any other loss the diagonal of its full torch.func
Hessian) and the exact output gradient (``torch.func.grad``).

Everything is float64 and per sample; only for small networks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, jacrev

ELEMENTWISE = (nn.Tanh, nn.Sigmoid, nn.ReLU, nn.ELU, nn.Softplus, nn.SiLU, nn.GELU, nn.LeakyReLU)
NONLINEAR_NORMS = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)


# ---- the loss: exact output Hessian diagonal and gradient -------------------------------------

def loss_hessian_diag(loss_fn: Callable, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The exact diagonal of ``d2L/df2`` (per sample; ``[N, *f]``) for CE and MSE, in closed form.

    * ``nn.CrossEntropyLoss`` (class indices, no weight/ignore/smoothing): ``s (p - p^2)`` with
      ``s = 1/N`` for ``"mean"``, ``1`` for ``"sum"`` (HesScale App. A.1, ``q - q o q``);
    * ``nn.MSELoss``: ``2 s`` with ``s = 1/numel`` for ``"mean"``, ``1`` for ``"sum"``.
    """
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        assert loss_fn.weight is None and loss_fn.label_smoothing == 0.0 and f.dim() == 2
        assert not y.is_floating_point() and bool((y != loss_fn.ignore_index).all())
        scale = 1.0 / f.shape[0] if loss_fn.reduction == "mean" else 1.0
        p = torch.softmax(f, dim=1)
        return scale * (p - p * p)
    if isinstance(loss_fn, nn.MSELoss):
        scale = 1.0 / f.numel() if loss_fn.reduction == "mean" else 1.0
        return torch.full_like(f, 2.0 * scale)
    raise NotImplementedError(f"no closed-form Hessian diagonal for {loss_fn!r}")


def loss_hessian_diag_autodiff(loss_fn: Callable, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The same diagonal from the full ``torch.func.hessian`` of the loss (to check the closed form)."""
    h = torch.func.hessian(lambda z: loss_fn(z, y))(f)
    d = f.numel()
    return torch.diagonal(h.reshape(d, d)).reshape(f.shape)


def _closed_form_applies(loss_fn: Callable, f: torch.Tensor, y: torch.Tensor) -> bool:
    if isinstance(loss_fn, nn.MSELoss):
        return True
    return (isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.weight is None
            and loss_fn.label_smoothing == 0.0 and f.dim() == 2 and not y.is_floating_point()
            and bool((y != loss_fn.ignore_index).all()))


def output_hessian_diag(loss_fn: Callable, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The exact diagonal of ``d2L/df2`` the backward pass starts from: the closed form of
    :func:`loss_hessian_diag` where it applies, else the diagonal of torch.func's full loss Hessian
    (class weights, label smoothing, probability targets, ignored targets, any traced loss). Both
    are exact; the HesScale recursion after the loss is the same."""
    if _closed_form_applies(loss_fn, f, y):
        return loss_hessian_diag(loss_fn, f, y)
    return loss_hessian_diag_autodiff(loss_fn, f, y)


# ---- elementwise activations: phi' and phi'' by autodiff of the scalar function ---------------

def activation_derivatives(act: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``phi'(x)`` and ``phi''(x)`` entrywise, by ``torch.func.grad`` of the scalar ``phi``."""

    def phi(t):  # a 0-d tensor in, a 0-d tensor out
        return act(t.reshape(1)).reshape(())

    d1 = torch.func.grad(phi)
    d2 = torch.func.grad(d1)
    flat = x.reshape(-1)
    return torch.func.vmap(d1)(flat).reshape(x.shape), torch.func.vmap(d2)(flat).reshape(x.shape)


# ---- layers linear in their input: explicit per-sample Jacobians ------------------------------

def input_jacobian(layer: nn.Module, xn: torch.Tensor) -> torch.Tensor:
    """``[out_numel, in_numel]``: the Jacobian of ``layer`` at one sample ``xn`` (no batch axis)."""
    out = layer(xn.unsqueeze(0))[0]
    jac = jacrev(lambda t: layer(t.unsqueeze(0))[0])(xn)
    return jac.reshape(out.numel(), xn.numel())


def input_hessian_diag(layer: nn.Module, xn: torch.Tensor, g_out: torch.Tensor) -> torch.Tensor:
    """The diagonal of ``d2 (g_out . layer(x)) / dx^2`` at one sample ``xn`` (no batch axis), flat."""
    hess = jacrev(jacrev(lambda t: (g_out * layer(t.unsqueeze(0))[0].reshape(-1)).sum()))(xn)
    return torch.diagonal(hess.reshape(xn.numel(), xn.numel()))


def param_jacobians(layer: nn.Module, xn: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{name: [out_numel, P_numel]}``: per-sample Jacobians of the layer output w.r.t. its own
    parameters (``recurse=False``)."""
    params = {k: p.detach() for k, p in layer.named_parameters(recurse=False)}
    if not params:
        return {}
    out = layer(xn.unsqueeze(0))[0]

    def run(ps):
        return functional_call(layer, ps, (xn.unsqueeze(0),))[0]

    jacs = jacrev(run)(params)
    return {k: j.reshape(out.numel(), params[k].numel()) for k, j in jacs.items()}


# ---- the HesScale backward pass ---------------------------------------------------------------

def hesscale(model: nn.Sequential, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor,
             gn: bool = False) -> dict[str, torch.Tensor]:
    """HesScale (``gn=False``) or HesScaleGN (``gn=True``) diagonals of every trainable parameter of
    ``model``, named as in ``model.named_parameters()``."""
    assert isinstance(model, nn.Sequential)
    layers = list(model._modules.items())  # not named_children(): it skips repeated modules
    with torch.no_grad():
        inputs = []
        h = x
        for _, layer in layers:
            inputs.append(h)
            h = layer(h)
        f = h
    g = torch.func.grad(lambda z: loss_fn(z, y))(f)  # exact dL/df, [N, *f]
    d = output_hessian_diag(loss_fn, f, y)  # exact diag d2L/df2, [N, *f]
    n = x.shape[0]
    out: dict[str, torch.Tensor] = {}
    for (name, layer), xin in reversed(list(zip(layers, inputs))):
        if isinstance(layer, ELEMENTWISE):
            d1, d2 = activation_derivatives(layer, xin)
            new_d = d1 * d1 * d
            if not gn:
                new_d = new_d + d2 * g  # eq. 4, second term
            g, d = d1 * g, new_d
            continue
        # A layer linear in its input: explicit per-sample Jacobians.
        new_g, new_d = [], []
        for k, p in layer.named_parameters(recurse=False):
            if p.requires_grad:
                out[f"{name}.{k}"] = torch.zeros_like(p, dtype=d.dtype)
        for i in range(n):
            g_out, d_out = g[i].reshape(-1), d[i].reshape(-1)
            if xin.is_floating_point():  # integer inputs (embedding indices) have no derivative
                jac = input_jacobian(layer, xin[i])  # [out, in]
                new_g.append((jac.T @ g_out).reshape(xin[i].shape))
                d_in = (jac * jac).T @ d_out  # eq. 4 / 8: (J o J)^T d
                if isinstance(layer, NONLINEAR_NORMS) and not gn:
                    d_in = d_in + input_hessian_diag(layer, xin[i], g_out)  # eq. 4, second term
                new_d.append(d_in.reshape(xin[i].shape))
            for k, jp in param_jacobians(layer, xin[i]).items():
                key = f"{name}.{k}"
                if key in out:
                    out[key] += ((jp * jp).T @ d_out).reshape(out[key].shape)  # eq. 5 / 9
        if new_g:
            g, d = torch.stack(new_g), torch.stack(new_d)
    return {k: out[k] for k, p in model.named_parameters() if k in out}


def hesscale_gn(model: nn.Sequential, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor):
    return hesscale(model, loss_fn, x, y, gn=True)


__all__ = ["hesscale", "hesscale_gn", "loss_hessian_diag", "loss_hessian_diag_autodiff", "output_hessian_diag",
           "activation_derivatives", "input_jacobian", "input_hessian_diag", "param_jacobians", "ELEMENTWISE",
           "NONLINEAR_NORMS"]
