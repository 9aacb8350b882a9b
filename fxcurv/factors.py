"""Square-root factors: the curvature matrices fxcurv propagates, as signed columns.

A curvature matrix at a node is held as ``sum_k sign[k] S[k] S[k]^T`` per sample, with
``S [K, N, *shape]`` and ``sign [K, N]`` (``None``: all +1). Columns from one *origin* (the loss, one
activation's residual term, ...) are pushed back through the transposed Jacobian (HBP eq. S.6-S.9)
and summed where two paths meet. A *diagonal* source ``diag(r)`` -- the residual ``phi''(x) * g`` of
HBP eq. S.9 -- is kept as ``r [N, *shape]`` until it must pass through an op; its first parameter
contribution needs no columns at all (HesScale eq. 5 is exact for a diagonal source).

These helpers are graph-node targets; each is a small pure function on tensors.
"""

from __future__ import annotations

import torch

from .targets import target


@target()
def signed_square_sum(per_sample: torch.Tensor, sign: torch.Tensor | None, lead: int) -> torch.Tensor:
    """``sum_{k,n} sign[k, n] * per_sample[k, n, ...]**2`` over the ``lead + 1`` leading dimensions.

    The diagonal of ``sum_k s_k v_k v_k^T`` is ``sum_k s_k v_k**2``.
    """
    sq = per_sample * per_sample
    if sign is not None:
        sq = sq * sign.reshape(sign.shape + (1,) * (sq.dim() - sign.dim()))
    return sq.sum(dim=tuple(range(lead + 1)))


@target()
def diagonal_to_columns(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``diag(r)`` per sample as signed columns: ``S[j, n] = sqrt|r[n, j]| e_j``, ``sign[j, n] = sign r[n, j]``.

    ``r`` is ``[N, *shape]``; ``S`` is ``[D, N, *shape]`` with ``D = prod(shape)``.
    """
    n, shape = r.shape[0], r.shape[1:]
    flat = r.reshape(n, -1)
    d = flat.shape[1]
    cols = torch.diag_embed(flat.abs().sqrt())  # [N, D, D]: [n, i, j] = sqrt|r_nj| delta_ij
    return cols.permute(2, 0, 1).reshape((d, n) + shape), torch.sign(flat).T.contiguous()


@target()
def unit_columns(x: torch.Tensor) -> torch.Tensor:
    """The identity as columns, ``[D, N, *shape]`` for ``x [N, *shape]``: the x-side of a mixed term."""
    n, shape = x.shape[0], x.shape[1:]
    d = x[0].numel()
    eye = torch.eye(d, dtype=x.dtype, device=x.device).reshape((d, 1) + shape)
    return eye.expand((d, n) + shape)


@target()
def mixed_contribution(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``2 sum_{i,n} a[i, n] * b[i, n]``: the diagonal of ``J_x^T B + B^T J_x`` from column pairs.

    For an op bilinear in a data input ``x`` and a weight ``W`` whose value ``x`` itself depends on
    (a weight used twice), the op's second derivative couples ``x`` and ``W``:
    ``sum_k g_k d2z_k/(dx dW) = B``. Pushing the unit columns ``e_i`` at ``x`` back to the weight gives
    ``a_i = J_x^T e_i``; ``b_i = B^T e_i``; the diagonal of the symmetric cross term is ``2 sum_i a_i b_i``.
    """
    return 2 * (a * b).sum(dim=(0, 1))


@target(fresh=True)
def stack_columns(g: torch.Tensor, *factors: torch.Tensor) -> torch.Tensor:
    """The bundle ``[g; S_1; S_2; ...]``, ``[1 + K_1 + K_2 + ..., N, ...]``: the gradient as column 0.

    Gradient and loss factors start at the loss and pass every op alike; stacked, each op moves all
    of them with one product.
    """
    return torch.cat((g.unsqueeze(0),) + factors, dim=0)


@target(fresh=True)
def stack_factors(*factors: torch.Tensor) -> torch.Tensor:
    """The bundle ``[S_1; S_2; ...]`` of a program that does not carry the gradient (``compile(...,
    grad=False)`` with GGN quantities only): ``[K_1 + K_2 + ..., N, ...]``, one product per op for all."""
    return torch.cat(factors, dim=0)


@target()
def gradient_column(bundle: torch.Tensor) -> torch.Tensor:
    """``g``, column 0 of the bundle (a view)."""
    return bundle[0]


@target()
def column_range(bundle: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """The factor columns ``start:stop`` of the bundle (a view)."""
    return bundle[start:stop]


@target("samples", view=True)
def first_samples(t: torch.Tensor, stop: int, dim: int) -> torch.Tensor:
    """The first ``stop`` samples of ``t`` along its batch dimension ``dim`` (a view)."""
    return t.narrow(dim, 0, stop)


@target(pointwise=True, fresh=True)
def add_all(*values: torch.Tensor) -> torch.Tensor:
    """The sum of messages arriving from several consumers (a fan-out in the forward graph)."""
    total = values[0]
    for v in values[1:]:
        total = total + v
    return total



@target()
def zeros_like_param(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(p)


def fold_lead(t: torch.Tensor) -> torch.Tensor:
    """``[D, N, ...] -> [D * N, ...]``: columns as extra samples."""
    return t.reshape((-1,) + t.shape[2:])


def expand_columns(g: torch.Tensor, d: int) -> torch.Tensor:
    """``g [N, ...] -> [d * N, ...]``: the same message for each of ``d`` columns."""
    return g.unsqueeze(0).expand((d,) + g.shape).reshape((-1,) + g.shape[1:])


def unfold_lead(t: torch.Tensor, d: int) -> torch.Tensor:
    return t.reshape((d, -1) + t.shape[1:])


# ---- batch-averaged matrices (KFRA, HBP blocks) -------------------------------------------------

@target()
def dense_from_columns(S: torch.Tensor, sign: torch.Tensor | None) -> torch.Tensor:
    """``sum_{k,n} sign_kn vec(S_kn) vec(S_kn)^T``: ``[D, D]`` from columns ``S [K, N, *shape]`` -- the
    loss Hessian summed over the batch (BackPACK's loss-Hessian strategy "sum")."""
    flat = S.reshape(S.shape[0] * S.shape[1], -1)
    weighted = flat if sign is None else flat * sign.reshape(-1, 1).to(flat.dtype)
    return weighted.T @ flat


@target()
def dense_zeros(f: torch.Tensor) -> torch.Tensor:
    """``[D, D]`` zeros for an output ``f [N, *shape]``: a loss without curvature."""
    d = f[0].numel()
    return f.new_zeros((d, d))


def _residual_sum(r: torch.Tensor) -> torch.Tensor:
    """``sum_n r_n``, flattened: the residual ``phi''(x) g`` summed over the batch (the loss's
    reduction is inside ``g``)."""
    return r.reshape(r.shape[0], -1).sum(0)


@target("with_residual")
def with_residual(m: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``M + diag(sum_n phi''(x_n) g_n)``: HBP eq. S.9 / Botev eq. 31's ``D``, batch summed."""
    return m + torch.diag(_residual_sum(r))


@target("with_abs_residual")
def with_abs_residual(m: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """EA-CG's positive-curvature Hessian with gamma = -1 (eq. 8b): the residual's absolute value."""
    return m + torch.diag(_residual_sum(r).abs())


@target("with_clipped_residual")
def with_clipped_residual(m: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """EA-CG's positive-curvature Hessian with gamma = 0 (eq. 8b): the residual's positive part."""
    return m + torch.diag(_residual_sum(r).clamp(min=0))


# ---- per-sample reductions (BackPACK's first-order quantities) ----------------------------------

# Entries of one block of per-sample intermediates in :func:`product_square_norms`: bounds its memory
# like the exact conv diagonal's blocks (``fxcurv.rules.conv._BLOCK_ELEMENTS``).
PRODUCT_BLOCK_ELEMENTS = 1 << 22


def signed_column_squares(S: torch.Tensor, sign: torch.Tensor | None) -> torch.Tensor:
    """``sum_k sign[k, n] * S[k, n, ...]**2`` over the column axis only: ``[K, N, ...] -> [N, ...]``."""
    sq = S * S
    if sign is not None:
        sq = sq * sign.reshape(sign.shape + (1,) * (sq.dim() - sign.dim())).to(sq.dtype)
    return sq.sum(0)


def product_square_norms(a: torch.Tensor, b: torch.Tensor,
                         block_elements: int = PRODUCT_BLOCK_ELEMENTS) -> torch.Tensor:
    """``|a_r b_r^T|_F^2`` for every ``r``: ``a [R, O, P]``, ``b [R, I, P]`` -> ``[R]``, without ``[R, O, I]``.

    A per-sample parameter gradient that sums over ``P`` positions is such a product (``g [O, P]`` times
    the unfolded input ``[I, P]`` for a convolution). Its squared norm is, by the Gram matrices over the
    positions, ``sum_{p,q} (a^T a)_{pq} (b^T b)_{pq}`` (Goodfellow's per-example norm trick, ``P^2 (O + I)``
    operations per ``r``), or the product itself squared (``O I P``): the cheaper of the two runs, over
    blocks of ``r`` holding at most ``block_elements`` intermediate entries.
    """
    r, o, p = a.shape
    i = b.shape[1]
    gram = p * p * (o + i) < o * i * p
    per_r = 2 * p * p if gram else o * i
    block = max(1, block_elements // max(1, per_r))
    out = a.new_empty(r)
    for start in range(0, r, block):
        stop = min(r, start + block)
        if gram:
            ga = a[start:stop].transpose(1, 2) @ a[start:stop]  # [b, P, P]
            gb = b[start:stop].transpose(1, 2) @ b[start:stop]
            out[start:stop] = ga.mul_(gb).sum((1, 2))
        else:
            prod = a[start:stop] @ b[start:stop].transpose(1, 2)  # [b, O, I]
            out[start:stop] = prod.square_().sum((1, 2))
    return out
