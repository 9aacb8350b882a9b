"""Affine layers ``z = x W^T + b`` (``nn.Linear``, ``F.linear``): HBP eq. S.8, HesScale eq. 1-5.

Inputs may carry extra dimensions between the batch and the feature axis (``[N, *mid, in]``); a
sample's parameter Jacobian then sums over ``mid``, so square-root factors must be summed over
``mid`` *before* squaring -- the cheap product forms below apply to ``[N, in]`` inputs only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..buffers import fresh
from ..factors import product_square_norms, signed_column_squares, signed_square_sum
from ..gram import blocked_gram_into, gram_into
from ..targets import Left, Reduction
from .registry import Match, define_op


def linear(x, weight, bias=None):
    return F.linear(x, weight, bias)


op = define_op(
    "linear", "linear", linear,
    inputs=("x", "weight", "bias"), params=("weight", "bias"),
    bilinear=(("x", "weight"),),
)


@op.module(nn.Linear)
def _from_module(node, mod):
    return Match({"x": node.args[0], "weight": mod.weight, "bias": mod.bias})


@op.function(F.linear, torch.ops.aten.linear.default)
def _from_function(node, a):
    return Match({"x": a(0, "input"), "weight": a(1, "weight"), "bias": a(2, "bias", None)})


@op.derived("x_sq", pointwise=True)
def linear_x_sq(x):
    return x * x


@op.derived("weight_sq", pointwise=True, squares="weight")
def linear_weight_sq(weight):
    return weight * weight


def _flat(t: torch.Tensor, lead: int) -> torch.Tensor:
    """``[*lead, N, *mid, f] -> [*lead, N, M, f]``."""
    return t.reshape(t.shape[: lead + 1] + (-1, t.shape[-1]))


@op.jac_t("x", matmul="weight")
def linear_jac_t_x(v, weight):
    """HBP eq. S.8a: ``J_x^T v = W^T v`` for every column of ``v``."""
    return v @ weight


@op.diag("x", matmul="weight_sq")
def linear_diag_x(d, weight_sq):
    """HesScale eq. 4 (first sum): ``d_x = (W o W)^T d``, off-diagonal terms dropped."""
    return d @ weight_sq


@op.grad("weight", reduction=Reduction(Left.MESSAGE, "x"))
def linear_grad_weight(g, x):
    """HesScale eq. 2: ``dL/dW = g^T x`` summed over samples (and ``mid``)."""
    return g.reshape(-1, g.shape[-1]).T @ x.reshape(-1, x.shape[-1])


@op.grad("bias", reduction=Reduction(Left.MESSAGE, None))
def linear_grad_bias(g):
    return g.reshape(-1, g.shape[-1]).sum(0)


@op.diag_sqrt("weight", reduction=Reduction(Left.SIGNED_SQUARES, "x_sq"))
def linear_diag_sqrt_weight(S, sign, x, x_sq):
    """``diag(sum_k sign_k J_W^T S_k S_k^T J_W)`` from HBP eq. S.8c, ``H_W = x x^T (x) H_z``.

    For ``[N, in]`` inputs the diagonal of ``x x^T (x) S S^T`` is ``(sum_k sign_k S_k^2)^T x^2``: one
    GEMM, no per-sample Jacobian.
    """
    if x.dim() == 2:
        sq = S * S
        if sign is not None:
            sq = sq * sign.unsqueeze(-1)
        return sq.sum(0).T @ x_sq
    return signed_square_sum(linear_per_sample_weight(S, x), sign, S.dim() - x.dim())


@op.diag_sqrt("bias", reduction=Reduction(Left.SIGNED_SQUARES, None))
def linear_diag_sqrt_bias(S, sign, x):
    """HBP eq. S.8b, ``H_b = H_z``: the signed column squares summed over columns and samples (for
    ``[N, *mid, in]`` inputs, over ``mid`` before squaring)."""
    lead = S.dim() - x.dim()
    if x.dim() == 2:
        return signed_square_sum(S, sign, lead)
    return signed_square_sum(linear_per_sample_bias(S, x), sign, lead)


@op.diag_diag("weight", reduction=Reduction(Left.MESSAGE, "x_sq"))
def linear_diag_diag_weight(d, x_sq):
    """HesScale eq. 5: ``d_W = d^T x^2`` summed over samples (exact for a diagonal ``H_z``)."""
    return d.reshape(-1, d.shape[-1]).T @ x_sq.reshape(-1, x_sq.shape[-1])


@op.diag_diag("bias", reduction=Reduction(Left.MESSAGE, None))
def linear_diag_diag_bias(d):
    return d.reshape(-1, d.shape[-1]).sum(0)


@op.per_sample("weight")
def linear_per_sample_weight(v, x):
    """Per-sample ``J_W^T v``: ``[*lead, N, out, in]``, ``v_n^T x_n`` summed over ``mid`` (for ``[N, in]``
    inputs the outer products ``v_n x_n^T``), written into one fresh buffer (:func:`fxcurv.buffers.fresh`:
    the result is large, ``N`` weight matrices, and writing it costs more than computing it)."""
    lead = v.dim() - x.dim()
    vf, xf = _flat(v, lead), _flat(x, 0)
    out = fresh(vf.shape[:-2] + (vf.shape[-1], xf.shape[-1]), torch.result_type(vf, xf), vf.device)
    if xf.shape[-2] == 1:  # one position: outer products
        return torch.mul(vf.squeeze(-2).unsqueeze(-1), xf.squeeze(-2).unsqueeze(-2), out=out)
    return torch.matmul(vf.transpose(-1, -2), xf, out=out)


@op.per_sample("bias")
def linear_per_sample_bias(v, x):
    lead = v.dim() - x.dim()
    return _flat(v, lead).sum(-2)


# ---- per-sample reductions (BackPACK's first-order and per-sample quantities) -------------------

@op.batch_l2("weight")
def linear_batch_l2_weight(g, x):
    """``|J_W,n^T g_n|^2 = |sum_m g_nm x_nm^T|_F^2`` per sample. For ``[N, in]`` inputs the per-sample
    gradient has rank one, ``|g_n|^2 |x_n|^2`` (Goodfellow's trick, no ``[N, out, in]``); over positions
    ``mid`` the Gram form ``sum_{m,m'} (g_m . g_m')(x_m . x_m')`` or the product, whichever is cheaper."""
    if x.dim() == 2:
        return (g * g).sum(-1) * (x * x).sum(-1)
    return product_square_norms(_flat(g, 0).transpose(1, 2), _flat(x, 0).transpose(1, 2))


@op.batch_l2("bias")
def linear_batch_l2_bias(g, x):
    """``|J_b,n^T g_n|^2 = |sum_m g_nm|^2`` per sample (HBP eq. S.8b's ``J_b = I``)."""
    per_sample = g if x.dim() == 2 else linear_per_sample_bias(g, x)
    return (per_sample * per_sample).sum(-1)


@op.batch_diag_sqrt("weight")
def linear_batch_diag_sqrt_weight(S, sign, x, x_sq):
    """``sum_k sign_k (J_W,n^T S_kn)^2`` per sample: for ``[N, in]`` inputs the outer product
    ``(sum_k sign_k S_kn^2) (x_n^2)^T`` (HBP eq. S.8c per sample, no per-sample Jacobian); over ``mid``
    the per-sample products are summed before squaring."""
    if x.dim() == 2:
        return signed_column_squares(S, sign).unsqueeze(-1) * x_sq.unsqueeze(-2)
    return signed_column_squares(linear_per_sample_weight(S, x), sign)


@op.batch_diag_sqrt("bias")
def linear_batch_diag_sqrt_bias(S, sign, x):
    """``sum_k sign_k (J_b,n^T S_kn)^2`` per sample (HBP eq. S.8b), ``mid`` summed before squaring."""
    return signed_column_squares(S if x.dim() == 2 else linear_per_sample_bias(S, x), sign)
# ---- ViViT's Gram matrix --------------------------------------------------------------------------

@op.gram("weight", "bias")
def linear_gram(S, x, include=("weight", "bias"), total=None):
    """ViViT C.1 (eq. S.24 and the lines after it): the weight's share of the Gram matrix is
    ``(S S^T) o (x x^T)``, the columns' Gram times the inputs' Gram (expanded over the ``K`` columns),
    without forming a per-sample factor; the bias's (``J_b = I``) is ``S S^T``. Weight and bias together
    are ``(S S^T) o (x x^T + 1)``: one product of the columns for both. With positions ``[N, *mid, I]`` a
    sample's weight factor sums over ``mid`` (``sum_m S_m x_m^T``) and is formed a block of samples at a
    time, the bias's sums the columns over ``mid``. ``include``: the parameters whose shares are summed;
    ``total``: a running Gram matrix to add them into (in place)."""
    k, n = S.shape[0], S.shape[1]
    if x.dim() == 2:
        weight = None
        if "weight" in include:
            shift = 1.0 if "bias" in include else 0.0

            def weight(start, stop):  # rows start:stop of x x^T (+ 1 with the bias)
                rows = x[start:stop] @ x.T
                return rows.add_(shift) if shift else rows

        return gram_into(S.reshape(k * n, S.shape[-1]), total, k, weight)
    if "weight" in include:
        def rows(start, stop):
            return linear_per_sample_weight(S[:, start:stop], x[start:stop]).reshape(k * (stop - start), -1)

        total = blocked_gram_into(rows, total, k, n, k * S.shape[-1] * x.shape[-1])
    if "bias" in include:
        total = gram_into(_positions_summed(S, x).reshape(k * n, -1), total, k)
    return total


# ---- the batch-averaged and Kronecker-factored family -------------------------------------------

def _positions_summed(S: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``[*lead, N, *mid, O] -> [*lead, N, O]``: factor columns summed over the positions ``mid``."""
    lead = S.dim() - x.dim()
    return _flat(S, lead).sum(-2)


def _signed_gram(s: torch.Tensor, sign: torch.Tensor | None) -> torch.Tensor:
    """``sum_{k,n} sign_kn s_kn s_kn^T`` for ``s [K, N, O]``."""
    w = s if sign is None else s * sign.unsqueeze(-1).to(s.dtype)
    return torch.einsum("kno,knp->op", w, s)


@op.kron_out("weight", "bias")
def linear_kron_out(S, sign, x):
    """KFLR / KFAC output factor of weight and bias (BackPACK's convention): ``sum_{k,n} sign (sum_m S)
    (sum_m S)^T``, the exact GGN of the bias (HBP eq. S.8b); positions ``mid`` of ``[N, *mid, in]``
    inputs are summed first, as a convolution's (Grosse & Martens' KFC with BackPACK's scaling)."""
    return _signed_gram(_positions_summed(S, x), sign)


@op.kron_in("weight")
def linear_kron_in_weight(x):
    """KFAC / KFLR / KFRA input factor: ``(1/N) sum_{n,m} x x^T`` (HBP eq. S.8c's ``x x^T``, batch averaged)."""
    flat = _flat(x, 0)
    return torch.einsum("nmi,nmj->ij", flat, flat) / x.shape[0]


@op.dense("x")
def linear_dense_x(m, x, weight):
    """HBP eq. S.8a on a batch-averaged matrix: ``E_n[W^T M W] = W^T M W`` (every sample has the same
    Jacobian), block by block over the positions ``mid`` of ``[N, *mid, in]`` inputs."""
    out, inp = weight.shape
    p = m.shape[0] // out
    if p == 1:
        return weight.T @ m @ weight
    blocks = m.reshape(p, out, p, out)
    return torch.einsum("aobp,oi,pj->aibj", blocks, weight, weight).reshape(p * inp, p * inp)


@op.kron_dense("weight", "bias")
def linear_kron_dense(m, weight):
    """KFRA / HBP output factor of weight and bias: the batch-averaged matrix at the output (Botev eq.
    29), summed over the position blocks of ``[N, *mid, in]`` inputs."""
    out = weight.shape[0]
    p = m.shape[0] // out
    return m.reshape(p, out, p, out).sum((0, 2))
