"""Independent per-sample references with torch.func (float64): nothing here uses fxcurv.

The loss must be a sum or a mean of per-sample terms (``nn.CrossEntropyLoss`` / ``nn.MSELoss`` with
``reduction="mean"`` or ``"sum"``): ``L = sum_n l_n`` with ``l_n = loss_fn(f(x_n), y_n) / s``, ``s = N`` for
a mean and 1 for a sum (``loss_fn`` on one sample already averages over its own output entries). Per
sample ``n`` (``theta`` all trainable parameters, flattened):

* ``g_n = d l_n / d theta`` by ``vmap(grad)`` over the samples (BackPACK's BatchGrad scaling: they sum to
  the gradient, which :func:`per_sample_grads` checks against ``torch.func.grad`` of ``L``);
* ``G_n = J_n^T (d2 l_n / df_n2) J_n`` with ``J_n = df_n / dtheta`` (``jacrev``) and the loss Hessian
  w.r.t. the sample's output (``hessian``): sample ``n``'s GGN, ``sum_n G_n`` the GGN.

Results are keyed by ``model.named_parameters()`` names (``reference.trainable``).
"""

from __future__ import annotations

import reference
import torch
from torch.func import grad, hessian, jacrev, vmap


def _per_sample_loss(model, loss_fn, n_samples: int):
    scale = float(n_samples) if loss_fn.reduction == "mean" else 1.0
    frozen = reference._frozen(model)
    layout = [(name, p.shape) for name, p in reference.trainable(model).items()]

    def output(theta: torch.Tensor, xn: torch.Tensor) -> torch.Tensor:
        return reference._call(model, {**reference._unflat(theta, layout), **frozen}, xn[None])[0]

    def loss(f: torch.Tensor, yn: torch.Tensor) -> torch.Tensor:
        return loss_fn(f[None], yn[None]) / scale

    return output, loss, layout


def per_sample_grads(model, loss_fn, x, y) -> dict[str, torch.Tensor]:
    """``g_n`` for every parameter, ``[N, *param]``."""
    output, loss, layout = _per_sample_loss(model, loss_fn, x.shape[0])
    theta = torch.cat([p.reshape(-1) for p in reference.trainable(model).values()])
    flat = vmap(grad(lambda t, xn, yn: loss(output(t, xn), yn)), in_dims=(None, 0, 0))(theta, x, y)  # [N, P]
    total = reference.grad(model, loss_fn, x, y)
    summed = reference._unflat(flat.sum(0), layout)
    for name, g in total.items():  # the scaling: per-sample gradients sum to the gradient
        assert (summed[name] - g).abs().max() <= 1e-12 * max(1.0, g.abs().max().item()), name
    return _per_param(flat, layout, lead=1)


def per_sample_ggns(model, loss_fn, x, y) -> torch.Tensor:
    """``G_n`` for every sample, ``[N, P, P]`` over all trainable parameters."""
    output, loss, _ = _per_sample_loss(model, loss_fn, x.shape[0])
    theta = torch.cat([p.reshape(-1) for p in reference.trainable(model).values()])

    def ggn(xn: torch.Tensor, yn: torch.Tensor) -> torch.Tensor:
        f = output(theta, xn)
        j = jacrev(output)(theta, xn).reshape(f.numel(), -1)  # [D, P]
        h = hessian(loss)(f, yn).reshape(f.numel(), f.numel())
        return j.T @ h @ j

    return vmap(ggn)(x, y)


def _per_param(flat: torch.Tensor, layout, lead: int) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for name, shape in layout:
        n = shape.numel()
        out[name] = flat[..., i:i + n].reshape(flat.shape[:lead] + tuple(shape))
        i += n
    return out


def first_order(model, loss_fn, x, y) -> dict[str, dict[str, torch.Tensor]]:
    """``batch_grad``, ``batch_l2_grad``, ``sum_grad_squared`` and ``variance`` (BackPACK's definition,
    ``(1/N) sum_n g_n^2 - ((1/N) sum_n g_n)^2``) from the per-sample gradients."""
    g = per_sample_grads(model, loss_fn, x, y)
    n = x.shape[0]
    return {
        "batch_grad": g,
        "batch_l2_grad": {k: v.flatten(1).square().sum(1) for k, v in g.items()},
        "sum_grad_squared": {k: v.square().sum(0) for k, v in g.items()},
        "variance": {k: v.square().sum(0) / n - (v.sum(0) / n) ** 2 for k, v in g.items()},
    }


def batch_diag_ggn(model, loss_fn, x, y) -> dict[str, torch.Tensor]:
    """The diagonals of ``G_n`` per parameter, ``[N, *param]``."""
    params = reference.trainable(model)
    return {name: torch.diagonal(b, dim1=1, dim2=2).reshape((x.shape[0],) + params[name].shape)
            for name, b in reference.diagonal_blocks(per_sample_ggns(model, loss_fn, x, y), model).items()}
