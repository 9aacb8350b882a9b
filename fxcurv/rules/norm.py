"""Batch normalization in evaluation mode (``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` after
``.eval()``, ``F.batch_norm`` with ``training=False``): a fixed affine map per channel.

With the running statistics ``mu_c``, ``sigma2_c`` (module buffers, constants of the op) and
``x [N, C, *spatial]`` (``[N, C]`` for ``BatchNorm1d`` on features), channel ``c`` of the output is

    z = w_c x_hat + b_c,   x_hat = (x - mu_c) / sqrt(sigma2_c + eps),

so every sample is mapped alone and the op is linear in ``x`` (no residual term, HBP eq. S.6), in
``w`` and in ``b``. Its Jacobians are diagonal:

* ``J_x = diag(w_c / sqrt(sigma2_c + eps))`` broadcast over the channel's entries: ``J_x^T v = s o v``
  and HesScale eq. 8's ``(J_x o J_x)^T d = s^2 o d`` with ``s_c = w_c / sqrt(sigma2_c + eps)``;
* ``dz / dw_c = x_hat`` and ``dz / db_c = 1`` on the channel's entries: a sample's transposed Jacobian
  sums a message times ``x_hat`` (times 1) over the channel's spatial positions, so square-root
  factors are summed over the positions *before* they are squared (HBP eq. S.8b-c per sample); the
  HesScale diagonal (eq. 5, 9) squares the Jacobian first: ``sum_{n,p} d x_hat^2``.

In training mode batch normalization divides by the batch's own statistics: every output depends on
every sample of the batch, which no per-sample curvature rule (nor BackPACK's per-sample quantities)
can express. Such a node is refused with a request to call ``model.eval()``; so is a ``BatchNorm``
without running statistics (``track_running_stats=False``), which uses batch statistics in evaluation
mode as well.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedOpError
from ..factors import signed_column_squares, signed_square_sum
from ..gram import gram_into
from .registry import Match, define_op

# SyncBatchNorm synchronizes batch statistics across processes in training mode only; in evaluation
# mode it is the same affine map.
_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def batch_norm_eval(x, weight, bias, running_mean, running_var, eps):
    return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)


op = define_op("batch_norm_eval", "norm", batch_norm_eval,
               inputs=("x", "weight", "bias", "running_mean", "running_var"), params=("weight", "bias"),
               constants=("running_mean", "running_var"))

_EVAL_HINT = ("fxcurv computes per-sample curvature, which needs each sample mapped alone: call model.eval() "
              "before compiling (batch normalization then uses its running statistics, a fixed affine map "
              "per channel)")


def _canonical(x, weight, bias, running_mean, running_var, eps, training):
    if training:
        raise UnsupportedOpError(
            "batch normalization in training mode normalizes with the statistics of the batch, which couples "
            f"the samples (every output depends on every sample); {_EVAL_HINT}")
    if running_mean is None or running_var is None:
        raise UnsupportedOpError(
            "batch normalization without running statistics (track_running_stats=False) uses the statistics "
            f"of the batch even in evaluation mode, which couples the samples; {_EVAL_HINT}, with "
            "track_running_stats=True")
    return Match({"x": x, "weight": weight, "bias": bias, "running_mean": running_mean,
                  "running_var": running_var}, {"eps": float(eps)})


@op.module(*_MODULES)
def _from_module(node, mod):
    # torch's _BatchNorm.forward: batch statistics in training mode, or wherever there are no running ones.
    return _canonical(node.args[0], mod.weight, mod.bias, mod.running_mean, mod.running_var, mod.eps,
                      mod.training)


@op.function(F.batch_norm)
def _from_function(node, a):
    return _canonical(a(0, "input"), a(3, "weight", None), a(4, "bias", None), a(1, "running_mean"),
                      a(2, "running_var"), a(7, "eps", 1e-5), a(5, "training", False))


@op.function(torch.ops.aten.batch_norm.default)
def _from_aten(node, a):
    """``aten.batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn)``."""
    return _canonical(a(0, "input"), a(1, "weight"), a(2, "bias"), a(3, "running_mean"), a(4, "running_var"),
                      a(7, "eps"), a(5, "training"))


# ---- helpers ------------------------------------------------------------------------------------

def _channel(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``[C] -> [C, 1, ..., 1]``: broadcast against ``[..., N, C, *spatial]`` (``x`` is ``[N, C, *spatial]``)."""
    return t.reshape((-1,) + (1,) * (x.dim() - 2))


def _scale(weight: torch.Tensor | None, running_var: torch.Tensor, eps: float) -> torch.Tensor:
    """``s_c = w_c / sqrt(sigma2_c + eps)`` (``w = 1`` without affine parameters), ``[C]``."""
    inv_std = torch.rsqrt(running_var + eps)
    return inv_std if weight is None else weight * inv_std


def _per_channel(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``[*lead, N, C, *spatial] -> [*lead, N, C]``: summed over the spatial positions of a sample."""
    spatial = x.dim() - 2
    return t.sum(dim=tuple(range(-spatial, 0))) if spatial else t


def _over_samples(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``[N, C, *spatial] -> [C]``: summed over samples and positions."""
    return _per_channel(t, x).sum(0)


# ---- derived value ----------------------------------------------------------------------------

@op.derived("x_hat")
def batch_norm_eval_x_hat(x, running_mean, running_var, eps):
    """``x_hat = (x - mu_c) / sqrt(sigma2_c + eps)``: the normalized input, ``dz / dw_c`` on channel ``c``."""
    return (x - _channel(running_mean, x)) * _channel(torch.rsqrt(running_var + eps), x)


# ---- messages to x ------------------------------------------------------------------------------

@op.jac_t("x", fresh=True)
def batch_norm_eval_jac_t_x(v, x, weight, running_var, eps):
    """``J_x^T v = s o v`` with ``s_c = w_c / sqrt(sigma2_c + eps)`` (``J_x`` is diagonal)."""
    return v * _channel(_scale(weight, running_var, eps), x)


@op.diag("x", fresh=True)
def batch_norm_eval_diag_x(d, x, weight, running_var, eps):
    """HesScale eq. 8 with a diagonal Jacobian: ``d_x = s^2 o d`` (exact: ``J_x`` has no off-diagonal entries)."""
    s = _scale(weight, running_var, eps)
    return d * _channel(s * s, x)


# ---- parameters ---------------------------------------------------------------------------------

@op.grad("weight")
def batch_norm_eval_grad_weight(g, x, x_hat):
    """``dL/dw_c = sum_{n,p} g x_hat`` over the channel's entries."""
    return _over_samples(g * x_hat, x)


@op.grad("bias")
def batch_norm_eval_grad_bias(g, x):
    """``dL/db_c = sum_{n,p} g``."""
    return _over_samples(g, x)


@op.per_sample("weight")
def batch_norm_eval_per_sample_weight(v, x, x_hat):
    """Per-sample ``J_w^T v = sum_p v x_hat``, ``[*lead, N, C]``."""
    return _per_channel(v * x_hat, x)


@op.per_sample("bias")
def batch_norm_eval_per_sample_bias(v, x):
    """Per-sample ``J_b^T v = sum_p v``, ``[*lead, N, C]``."""
    return _per_channel(v, x)


@op.diag_sqrt("weight")
def batch_norm_eval_diag_sqrt_weight(S, sign, x, x_hat):
    """``sum_{k,n} sign (sum_p S_kn x_hat_n)^2``: the per-sample products, summed over positions, squared."""
    return signed_square_sum(batch_norm_eval_per_sample_weight(S, x, x_hat), sign, S.dim() - x.dim())


@op.diag_sqrt("bias")
def batch_norm_eval_diag_sqrt_bias(S, sign, x):
    """``sum_{k,n} sign (sum_p S_kn)^2``."""
    return signed_square_sum(batch_norm_eval_per_sample_bias(S, x), sign, S.dim() - x.dim())


@op.diag_diag("weight")
def batch_norm_eval_diag_diag_weight(d, x, x_hat):
    """HesScale eq. 5: ``sum_{n,p} d x_hat^2`` (the Jacobian's entries squared)."""
    return _over_samples(d * x_hat * x_hat, x)


@op.diag_diag("bias")
def batch_norm_eval_diag_diag_bias(d, x):
    """HesScale eq. 5 with ``dz / db_c = 1``: ``sum_{n,p} d``."""
    return _over_samples(d, x)


@op.batch_l2("weight")
def batch_norm_eval_batch_l2_weight(g, x, x_hat):
    """``|J_w,n^T g_n|^2 = sum_c (sum_p g x_hat)^2`` per sample, ``[N]``."""
    per_sample = batch_norm_eval_per_sample_weight(g, x, x_hat)
    return (per_sample * per_sample).sum(-1)


@op.batch_l2("bias")
def batch_norm_eval_batch_l2_bias(g, x):
    """``|J_b,n^T g_n|^2 = sum_c (sum_p g)^2`` per sample, ``[N]``."""
    per_sample = batch_norm_eval_per_sample_bias(g, x)
    return (per_sample * per_sample).sum(-1)


@op.batch_diag_sqrt("weight")
def batch_norm_eval_batch_diag_sqrt_weight(S, sign, x, x_hat):
    """``sum_k sign (sum_p S_kn x_hat_n)^2`` per sample, ``[N, C]``."""
    return signed_column_squares(batch_norm_eval_per_sample_weight(S, x, x_hat), sign)


@op.batch_diag_sqrt("bias")
def batch_norm_eval_batch_diag_sqrt_bias(S, sign, x):
    """``sum_k sign (sum_p S_kn)^2`` per sample, ``[N, C]``."""
    return signed_column_squares(batch_norm_eval_per_sample_bias(S, x), sign)


# ---- ViViT's Gram matrix --------------------------------------------------------------------------

@op.gram("weight", "bias")
def batch_norm_eval_gram(S, x, running_mean, running_var, eps, include=("weight", "bias"), total=None):
    """ViViT eq. S.23: the Gram matrix ``[K N, K N]`` of the per-sample factors ``a_kn = J_n^T S_kn`` of
    the parameters ``include``: the weight's ``sum_p S x_hat`` and the bias's ``sum_p S`` per channel
    (``[K, N, C]`` each, side by side for both), ``k``-major rows; added in place into ``total`` where
    given. Samples are read only through ``x`` (``x_hat`` is formed here from it, so that a subset of
    the batch's columns and inputs gives the subset's Gram matrix)."""
    k, n = S.shape[0], S.shape[1]
    parts = []
    if "weight" in include:
        x_hat = batch_norm_eval_x_hat(x, running_mean, running_var, eps)
        parts.append(batch_norm_eval_per_sample_weight(S, x, x_hat))
    if "bias" in include:
        parts.append(batch_norm_eval_per_sample_bias(S, x))
    factors = torch.cat(parts, -1).reshape(k * n, -1)
    return gram_into(factors, total, k)
