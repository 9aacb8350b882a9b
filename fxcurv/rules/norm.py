"""Normalization layers: batch normalization in evaluation mode (a fixed affine map per channel) and the
per-sample normalizations LayerNorm, RMSNorm and GroupNorm (nonlinear in their input).

Batch normalization in evaluation mode (``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` after
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

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedOpError
from ..factors import signed_column_squares, signed_square_sum
from ..gram import gram_into
from .registry import Match, OpDef, define_op, example

# SyncBatchNorm synchronizes batch statistics across processes in training mode only; in evaluation
# mode it is the same affine map.
_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def batch_norm_eval(x, weight, bias, running_mean, running_var, eps):
    return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)


# d2z / (dx dw_c) = 1 / sqrt(sigma2_c + eps) on the channel's entries: a weight that also computes x (one
# batch norm applied to its own output) needs a mixed term fxcurv has no rule for (refused).
op = define_op("batch_norm_eval", "norm", batch_norm_eval,
               inputs=("x", "weight", "bias", "running_mean", "running_var"), params=("weight", "bias"),
               constants=("running_mean", "running_var"), mixed_without_rule=(("x", "weight"),))

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


# =================================================================================================
# Per-sample normalizations: LayerNorm, RMSNorm, GroupNorm
# =================================================================================================
#
# A sample's entries, reshaped row-major to ``[M, D]``, form ``M`` groups of ``D`` entries that are
# standardized together (:class:`Trailing`: LayerNorm / RMSNorm over the trailing dims
# ``normalized_shape``, one group per token; :class:`ChannelGroups`: GroupNorm's groups of ``C / G``
# channels over all positions). Per group, with ``c = 1`` (LayerNorm, GroupNorm: centred) or ``c = 0``
# (RMSNorm), ``w``, ``b`` the affine parameters broadcast to the group's entries:
#
#     x_c = x - c mean(x),   sigma = sqrt(mean(x_c^2) + eps),   y = x_c / sigma,   z = w o y + b.
#
# Jacobian (``1^T y = 0`` where ``c = 1``): ``dy/dx = A = (I - (c/D) 1 1^T - (1/D) y y^T) / sigma``, symmetric,
# and ``J_x = diag(w) A``. Hence
#
# * ``jac_t``:  ``J^T v = A (w o v) = (u - c mean(u) - y mean(u o y)) / sigma`` with ``u = w o v``;
# * ``diag`` (HesScale eq. 8, exact for the non-diagonal ``J``): ``(J^T diag(d) J)_ii = sum_j e_j A_ji^2``
#   with ``e = w^2 o d``; squaring ``A_ji = (delta_ij - c/D - y_i y_j / D) / sigma`` and summing over ``j``,
#
#       (1/sigma^2) [ e_i (1 - 2 (c + y_i^2) / D) + (c S_0 + 2 c y_i S_1 + y_i^2 S_2) / D^2 ],
#
#   ``S_p = sum_j e_j y_j^p``: three reductions per group;
# * ``residual``: ``R = sum_k g_k d2 z_k / dx^2 = d2 (u . y) / dx^2`` with ``u = w o g`` (HBP eq. S.6, second
#   term). With ``t = C x``, ``C = I - (c/D) 1 1^T`` (symmetric, idempotent, ``C y = y``), ``s(t) =
#   sqrt(|t|^2 / D + eps)`` and ``f(t) = (u . t) / s``: ``grad f = u / s - (u . t) t / (D s^3)`` and
#   ``Hess f = (1 / (D s^2)) [-(u y^T + y u^T) - (u . y) I + 3 (u . y) y y^T / D]``. ``R = C (Hess f) C``:
#
#       R = (1/sigma^2) [ -(u~ y^T + y u~^T) / D - m C + 3 m y y^T / D ],   u~ = C u,  m = mean(u o y),
#
#   whose diagonal (the residual HesScale adds, eq. 4 second term) is
#   ``(1/sigma^2) [-2 u~_i y_i / D - m (1 - c/D) + 3 m y_i^2 / D]``;
# * ``residual_sqrt``: ``R`` is block diagonal over the groups; each ``[D, D]`` block is built in closed
#   form as above and eigen-decomposed (``torch.linalg.eigh``, batched over samples and groups) into signed
#   columns ``sqrt|l| u`` (HBP Sec. C, as the generic rule). A sample has ``M D`` columns: column
#   ``m D + j`` is eigenvector ``j`` of group ``m``'s block, zero on every other group;
# * parameters: ``z`` is linear in ``w`` and ``b`` (no parameter residual), ``dz_i / dw = y_i`` and
#   ``dz_i / db = 1`` on the parameter entry of ``i`` (LayerNorm/RMSNorm: its position in
#   ``normalized_shape``, shared by the tokens; GroupNorm: its channel, shared by the positions). A
#   sample's transposed Jacobian sums ``v o y`` (``v``) over the entries sharing a parameter before
#   squaring (HBP eq. S.8b-c); HesScale eq. 5 squares first: ``sum d y^2`` (``sum d``).


class Trailing(NamedTuple):
    """LayerNorm / RMSNorm: the trailing dims ``shape`` (``normalized_shape``) of a sample form a group;
    the sample's other dims index the groups (tokens). ``w``, ``b`` have the shape ``shape``. (A named tuple:
    torch.fx writes it into the generated code of a program as its constructor call.)"""

    shape: tuple[int, ...]

    def group_size(self, x: torch.Tensor) -> int:
        return math.prod(self.shape)

    def weight(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``w [*shape]`` broadcast against ``[..., N, *x[1:]]``."""
        return w

    def per_param(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``[*lead, N, *x[1:]] -> [*lead, N, *shape]``: summed over the groups (tokens) of a sample."""
        k = len(self.shape)
        dims = tuple(range(-(x.dim() - 1), -k))
        return t.sum(dim=dims) if dims else t


class ChannelGroups(NamedTuple):
    """GroupNorm over ``x [N, C, *spatial]``: ``groups`` groups of ``C / groups`` consecutive channels, each
    over all positions. ``w``, ``b`` are ``[C]``."""

    groups: int

    def group_size(self, x: torch.Tensor) -> int:
        return x[0].numel() // self.groups

    def weight(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``w [C] -> [C, 1, ..., 1]``, broadcast against ``[..., N, C, *spatial]``."""
        return _channel(w, x)

    def per_param(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``[*lead, N, C, *spatial] -> [*lead, N, C]``: summed over the positions of a sample."""
        return _per_channel(t, x)


Layout = Trailing | ChannelGroups


def _grouped(t: torch.Tensor, x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``[*lead, N, *x[1:]] -> [*lead, N, M, D]``: a sample's entries row-major as ``M`` groups of ``D``."""
    lead = t.dim() - x.dim()
    return t.reshape(tuple(t.shape[: lead + 1]) + (-1, layout.group_size(x)))


def _eps(eps: float | None, x: torch.Tensor) -> float:
    """RMSNorm's ``eps=None`` means the machine epsilon of the input's dtype (as in torch)."""
    return torch.finfo(x.dtype).eps if eps is None else eps


def _standardized(x: torch.Tensor, layout: Layout, eps: float | None, centered: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y [N, M, D], 1/sigma [N, M, 1])``: ``y = x_c / sigma``, ``x_c = x - c mean(x)``,
    ``sigma = sqrt(mean(x_c^2) + eps)`` per group (the biased variance for ``c = 1``)."""
    xg = _grouped(x, x, layout)
    xc = xg - xg.mean(-1, keepdim=True) if centered else xg
    inv_std = torch.rsqrt((xc * xc).mean(-1, keepdim=True) + _eps(eps, x))
    return xc * inv_std, inv_std


def _times_weight(t: torch.Tensor, weight: torch.Tensor | None, x: torch.Tensor, layout: Layout) -> torch.Tensor:
    return t if weight is None else t * layout.weight(weight, x)


def _norm_jac_t(v: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, layout: Layout,
                eps: float | None, centered: bool) -> torch.Tensor:
    """``J^T v = (u - c mean(u) - y mean(u o y)) / sigma`` per group, ``u = w o v``."""
    y, inv_std = _standardized(x, layout, eps, centered)
    u = _grouped(_times_weight(v, weight, x, layout), x, layout)
    out = u - (u * y).mean(-1, keepdim=True) * y
    if centered:
        out = out - u.mean(-1, keepdim=True)
    return (out * inv_std).reshape(v.shape)


def _norm_diag(d: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, layout: Layout,
               eps: float | None, centered: bool) -> torch.Tensor:
    """HesScale eq. 8: ``(1/sigma^2) [e (1 - 2 (c + y^2)/D) + (c S_0 + 2 c y S_1 + y^2 S_2)/D^2]``,
    ``e = w^2 o d``, ``S_p = sum_j e_j y_j^p`` per group."""
    y, inv_std = _standardized(x, layout, eps, centered)
    w2 = None if weight is None else weight * weight
    e = _grouped(_times_weight(d, w2, x, layout), x, layout)
    size = y.shape[-1]
    c = 1.0 if centered else 0.0
    y2 = y * y
    s1 = (e * y).sum(-1, keepdim=True)
    s2 = (e * y2).sum(-1, keepdim=True)
    cross = y2 * s2
    if centered:
        cross = cross + e.sum(-1, keepdim=True) + 2 * y * s1
    out = e * (1 - 2 * (c + y2) / size) + cross / (size * size)
    return (out * inv_std * inv_std).reshape(d.shape)


def _residual_terms(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, layout: Layout,
                    eps: float | None, centered: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, 1/sigma, u~ = C (w o g), m = mean(u o y))`` per group, ``[N, M, D]`` and ``[N, M, 1]``."""
    y, inv_std = _standardized(x, layout, eps, centered)
    u = _grouped(_times_weight(g, weight, x, layout), x, layout)
    m = (u * y).mean(-1, keepdim=True)
    u_c = u - u.mean(-1, keepdim=True) if centered else u
    return y, inv_std, u_c, m


def _norm_residual(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, layout: Layout,
                   eps: float | None, centered: bool) -> torch.Tensor:
    """The diagonal of ``R``: ``(1/sigma^2) [-2 u~ y / D - m (1 - c/D) + 3 m y^2 / D]`` per group."""
    y, inv_std, u_c, m = _residual_terms(g, x, weight, layout, eps, centered)
    size = y.shape[-1]
    c = 1.0 if centered else 0.0
    out = (-2 * u_c * y + 3 * m * y * y) / size - m * (1 - c / size)
    return (out * inv_std * inv_std).reshape(x.shape)


def _norm_residual_sqrt(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, layout: Layout,
                        eps: float | None, centered: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S [M D, N, *x[1:]], sign [M D, N])`` with ``sum_k sign_k s_k s_k^T = R_n``: the closed-form
    blocks ``R = (1/sigma^2) [-(u~ y^T + y u~^T)/D - m C + 3 m y y^T / D]`` eigen-decomposed per group,
    column ``m D + j`` = ``sqrt|l_j| u_j`` of group ``m``, zero elsewhere; ``sign`` = ``sign(l_j)``
    (``+1`` for ``l_j = 0``, as the generic rule)."""
    y, inv_std, u_c, m = _residual_terms(g, x, weight, layout, eps, centered)
    n, groups, size = y.shape
    eye = torch.eye(size, dtype=x.dtype, device=x.device)
    projector = eye - 1.0 / size if centered else eye
    outer = u_c.unsqueeze(-1) * y.unsqueeze(-2)  # [N, M, D, D]
    block = (-(outer + outer.transpose(-1, -2)) + 3 * m.unsqueeze(-1) * y.unsqueeze(-1) * y.unsqueeze(-2)) / size
    block = (block - m.unsqueeze(-1) * projector) * (inv_std * inv_std).unsqueeze(-1)
    eigenvalues, vectors = torch.linalg.eigh(block)  # [N, M, D], [N, M, D (entry), D (column)]
    scaled = vectors * eigenvalues.abs().sqrt().unsqueeze(-2)
    # columns[m, j, n, m', i] = delta_{m m'} scaled[n, m, i, j]
    columns = x.new_zeros((groups, size, n, groups, size))
    index = torch.arange(groups, device=x.device)
    columns[index, :, :, index, :] = scaled.permute(1, 3, 0, 2)
    sign = torch.where(eigenvalues >= 0, 1.0, -1.0).to(x.dtype)  # [N, M, D]
    return (columns.reshape((groups * size,) + tuple(x.shape)),
            sign.permute(1, 2, 0).reshape(groups * size, n))


def _norm_x_hat(x: torch.Tensor, layout: Layout, eps: float | None, centered: bool) -> torch.Tensor:
    """``y = x_c / sigma`` in the input's shape: ``dz / dw`` on each entry."""
    return _standardized(x, layout, eps, centered)[0].reshape(x.shape)


def _define_norm_rules(op: OpDef, centered: bool) -> None:
    """Register the rules of a per-sample normalization ``op`` (inputs ``x``, ``weight`` and, if the op has
    one, ``bias``; attributes ``layout``, ``eps``); ``centered``: whether the mean is subtracted."""
    has_bias = "bias" in op.inputs
    params = ("weight", "bias") if has_bias else ("weight",)

    @op.derived("x_hat")
    def norm_x_hat(x, layout, eps):
        """``y = x_c / sigma`` per group, shaped like ``x``."""
        return _norm_x_hat(x, layout, eps, centered)

    @op.jac_t("x", fresh=True)
    def norm_jac_t_x(v, x, weight, layout, eps):
        """``J^T v = (u - c mean(u) - y mean(u o y)) / sigma`` per group, ``u = w o v``."""
        return _norm_jac_t(v, x, weight, layout, eps, centered)

    @op.diag("x", fresh=True)
    def norm_diag_x(d, x, weight, layout, eps):
        """HesScale eq. 8 for the non-diagonal ``J_x``, in ``O(D)`` per group."""
        return _norm_diag(d, x, weight, layout, eps, centered)

    @op.residual("x", fresh=True)
    def norm_residual_x(g, x, weight, layout, eps):
        """The diagonal of ``R = d2 ((w o g) . y) / dx^2`` per group (HesScale eq. 4, second term)."""
        return _norm_residual(g, x, weight, layout, eps, centered)

    @op.residual_sqrt("x")
    def norm_residual_sqrt(g, x, weight, layout, eps):
        """The exact signed factor of ``R`` (block diagonal over the groups); ``x``'s part only."""
        columns, sign = _norm_residual_sqrt(g, x, weight, layout, eps, centered)
        return (columns,) + (None,) * (len(op.inputs) - 1), sign

    @op.grad("weight")
    def norm_grad_weight(g, x, x_hat, layout):
        """``dL/dw = sum_n sum_groups g o y``."""
        return layout.per_param(g * x_hat, x).sum(0)

    @op.per_sample("weight")
    def norm_per_sample_weight(v, x, x_hat, layout):
        """Per-sample ``J_w^T v = sum_groups v o y``, ``[*lead, N, *w]``."""
        return layout.per_param(v * x_hat, x)

    @op.diag_sqrt("weight")
    def norm_diag_sqrt_weight(S, sign, x, x_hat, layout):
        """``sum_{k,n} sign (sum_groups S_kn o y_n)^2``."""
        return signed_square_sum(layout.per_param(S * x_hat, x), sign, S.dim() - x.dim())

    @op.diag_diag("weight")
    def norm_diag_diag_weight(d, x, x_hat, layout):
        """HesScale eq. 5: ``sum_n sum_groups d o y^2``."""
        return layout.per_param(d * x_hat * x_hat, x).sum(0)

    @op.batch_l2("weight")
    def norm_batch_l2_weight(g, x, x_hat, layout):
        """``|J_w,n^T g_n|^2`` per sample, ``[N]``."""
        per_sample = layout.per_param(g * x_hat, x)
        return (per_sample * per_sample).reshape(per_sample.shape[0], -1).sum(1)

    @op.batch_diag_sqrt("weight")
    def norm_batch_diag_sqrt_weight(S, sign, x, x_hat, layout):
        """``sum_k sign (sum_groups S_kn o y_n)^2`` per sample, ``[N, *w]``."""
        return signed_column_squares(layout.per_param(S * x_hat, x), sign)

    if has_bias:
        @op.grad("bias")
        def norm_grad_bias(g, x, layout):
            """``dL/db = sum_n sum_groups g``."""
            return layout.per_param(g, x).sum(0)

        @op.per_sample("bias")
        def norm_per_sample_bias(v, x, layout):
            """Per-sample ``J_b^T v = sum_groups v``."""
            return layout.per_param(v, x)

        @op.diag_sqrt("bias")
        def norm_diag_sqrt_bias(S, sign, x, layout):
            """``sum_{k,n} sign (sum_groups S_kn)^2``."""
            return signed_square_sum(layout.per_param(S, x), sign, S.dim() - x.dim())

        @op.diag_diag("bias")
        def norm_diag_diag_bias(d, x, layout):
            """HesScale eq. 5 with ``dz / db = 1``: ``sum_n sum_groups d``."""
            return layout.per_param(d, x).sum(0)

        @op.batch_l2("bias")
        def norm_batch_l2_bias(g, x, layout):
            """``|J_b,n^T g_n|^2`` per sample, ``[N]``."""
            per_sample = layout.per_param(g, x)
            return (per_sample * per_sample).reshape(per_sample.shape[0], -1).sum(1)

        @op.batch_diag_sqrt("bias")
        def norm_batch_diag_sqrt_bias(S, sign, x, layout):
            """``sum_k sign (sum_groups S_kn)^2`` per sample, ``[N, *b]``."""
            return signed_column_squares(layout.per_param(S, x), sign)

    @op.gram(*params)
    def norm_gram(S, x, layout, eps, include=params, total=None):
        """ViViT eq. S.23: the Gram matrix ``[K N, K N]`` of the per-sample factors of the parameters
        ``include``: the weight's ``sum_groups S o y`` and the bias's ``sum_groups S`` (side by side),
        ``k``-major rows, added in place into ``total`` where given. Samples are read only through ``x``
        (``y`` is formed here from it), so a subset of the batch's columns and inputs gives its Gram matrix."""
        k, n = S.shape[0], S.shape[1]
        parts = []
        if "weight" in include:
            parts.append(layout.per_param(S * _norm_x_hat(x, layout, eps, centered), x).reshape(k, n, -1))
        if "bias" in include:
            parts.append(layout.per_param(S, x).reshape(k, n, -1))
        return gram_into(torch.cat(parts, -1).reshape(k * n, -1), total, k)


# ---- the ops and their sources ----------------------------------------------------------------------

def layer_norm(x, weight, bias, layout, eps):
    return F.layer_norm(x, layout.shape, weight, bias, eps)


def rms_norm(x, weight, layout, eps):
    return F.rms_norm(x, layout.shape, weight, eps)


def group_norm(x, weight, bias, layout, eps):
    return F.group_norm(x, layout.groups, weight, bias, eps)


# d2z / (dx dw) = d (g o y) / dx != 0: a weight that also computes x (one norm module applied to its own
# output) needs a mixed term fxcurv has no rule for (refused, as through the generic rule).
_MIXED = (("x", "weight"),)
layer_norm_op = define_op("layer_norm", "norm", layer_norm, inputs=("x", "weight", "bias"), params=("weight", "bias"),
                          mixed_without_rule=_MIXED)
rms_norm_op = define_op("rms_norm", "norm", rms_norm, inputs=("x", "weight"), params=("weight",),
                        mixed_without_rule=_MIXED)
group_norm_op = define_op("group_norm", "norm", group_norm, inputs=("x", "weight", "bias"), params=("weight", "bias"),
                          mixed_without_rule=_MIXED)
_define_norm_rules(layer_norm_op, centered=True)
_define_norm_rules(rms_norm_op, centered=False)
_define_norm_rules(group_norm_op, centered=True)


def _trailing(node: Any, x: Any, normalized_shape: Any, what: str) -> Trailing:
    """The layout of a LayerNorm / RMSNorm; refused where ``normalized_shape`` reaches the batch dim (the
    op would normalize across samples)."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(int(s) for s in normalized_shape)
    value = example(x)
    if value is not None and len(shape) >= value.dim():
        raise UnsupportedOpError(
            f"node '{getattr(node, 'name', node)}' ({what}): normalized_shape {shape} covers every dim of its "
            f"input {tuple(value.shape)}, the batch dim included, so it normalizes across samples; fxcurv "
            "defines curvature per sample and needs the batch as dim 0 outside normalized_shape")
    return Trailing(shape)


@layer_norm_op.module(nn.LayerNorm)
def _layer_norm_from_module(node, mod):
    x = node.args[0]
    return Match({"x": x, "weight": mod.weight, "bias": mod.bias},
                 {"layout": _trailing(node, x, mod.normalized_shape, "nn.LayerNorm"), "eps": float(mod.eps)})


@layer_norm_op.function(F.layer_norm, torch.ops.aten.layer_norm.default)
def _layer_norm_from_function(node, a):
    x = a(0, "input")
    return Match({"x": x, "weight": a(2, "weight", None), "bias": a(3, "bias", None)},
                 {"layout": _trailing(node, x, a(1, "normalized_shape"), "layer_norm"),
                  "eps": float(a(4, "eps", 1e-5))})


def _optional_eps(eps: Any) -> float | None:
    return None if eps is None else float(eps)


@rms_norm_op.module(nn.RMSNorm)
def _rms_norm_from_module(node, mod):
    x = node.args[0]
    return Match({"x": x, "weight": mod.weight},
                 {"layout": _trailing(node, x, mod.normalized_shape, "nn.RMSNorm"), "eps": _optional_eps(mod.eps)})


@rms_norm_op.function(F.rms_norm, torch.ops.aten.rms_norm.default)
def _rms_norm_from_function(node, a):
    x = a(0, "input")
    return Match({"x": x, "weight": a(2, "weight", None)},
                 {"layout": _trailing(node, x, a(1, "normalized_shape"), "rms_norm"),
                  "eps": _optional_eps(a(3, "eps", None))})


@group_norm_op.module(nn.GroupNorm)
def _group_norm_from_module(node, mod):
    return Match({"x": node.args[0], "weight": mod.weight, "bias": mod.bias},
                 {"layout": ChannelGroups(int(mod.num_groups)), "eps": float(mod.eps)})


@group_norm_op.function(F.group_norm, torch.ops.aten.group_norm.default)
def _group_norm_from_function(node, a):
    return Match({"x": a(0, "input"), "weight": a(2, "weight", None), "bias": a(3, "bias", None)},
                 {"layout": ChannelGroups(int(a(1, "num_groups"))), "eps": float(a(4, "eps", 1e-5))})
