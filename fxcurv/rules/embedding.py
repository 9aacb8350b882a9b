"""Embeddings (``nn.Embedding``, ``F.embedding``): a row lookup ``z[n, t] = W[x[n, t]]``.

The input ``x [N, *positions]`` holds integer indices: data without a derivative, so no message is
passed to it; the weight ``W [V, D]`` is a parameter. Each output entry ``z[n, t, j]`` is one weight
entry ``W[x[n, t], j]``: the per-sample Jacobian ``J_n`` is a 0/1 selection, linear in ``W`` (no
residual term), and its transpose scatters a message into the rows it read,

    (J_n^T v_n)[r] = sum_{t : x[n, t] = r} v[n, t],

summing the positions of one sample that read the same row *before* anything is squared: a square-root
factor's contribution is ``sum_k sign_kn ((J_n^T S_kn)[r])^2`` (HBP eq. S.8b-c per sample), not the sum
of the squared messages. Because ``J_n`` is binary, HesScale's ``(J_n o J_n)^T d_n = J_n^T d_n`` (eq. 5).

torch's semantics are kept: the row ``padding_idx`` gets no gradient (its Jacobian is taken as zero, so
every quantity is zero there). ``max_norm`` renormalizes rows of the weight in place during the forward
and ``scale_grad_by_freq`` scales the gradient by how often a row occurs in the whole batch (coupling
the samples): both are refused.

The per-sample rules work on the distinct (sample, row) pairs of the batch, found by sorting the
indices: nothing of size ``N x V`` is formed except by ``per_sample`` and ``batch_diag_sqrt``,
whose results have that size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedOpError
from ..gram import add_square
from .registry import Match, define_op, example


def embedding(x, weight, padding_idx=None):
    return F.embedding(x, weight, padding_idx)


op = define_op("embedding", "embedding", embedding, inputs=("x", "weight"), params=("weight",),
               indices=("x",))


def _canonical(x, weight, padding_idx, max_norm, scale_grad_by_freq):
    if max_norm is not None:
        raise UnsupportedOpError(
            f"an embedding with max_norm={max_norm} renormalizes the rows it reads in place during the forward "
            "(the weight changes with the batch); supported: max_norm=None")
    if scale_grad_by_freq:
        raise UnsupportedOpError(
            "an embedding with scale_grad_by_freq=True divides each row's gradient by the row's count in the "
            "whole batch, which couples the samples; supported: scale_grad_by_freq=False")
    if padding_idx is not None and padding_idx < 0:  # F.embedding counts negative indices from the end
        val = example(weight)
        if val is None:
            raise UnsupportedOpError(f"an embedding with padding_idx={padding_idx}: the weight's shape is unknown")
        padding_idx += val.shape[0]
    return Match({"x": x, "weight": weight}, {"padding_idx": None if padding_idx is None else int(padding_idx)})


@op.module(nn.Embedding)
def _from_module(node, mod):
    # sparse=True only changes the format of autograd's gradient; fxcurv's results are dense.
    return _canonical(node.args[0], mod.weight, mod.padding_idx, mod.max_norm, mod.scale_grad_by_freq)


@op.function(F.embedding)
def _from_function(node, a):
    return _canonical(a(0, "input"), a(1, "weight"), a(2, "padding_idx", None), a(3, "max_norm", None),
                      a(5, "scale_grad_by_freq", False))


@op.function(torch.ops.aten.embedding.default)
def _from_aten(node, a):
    """``aten.embedding(weight, indices, padding_idx=-1, scale_grad_by_freq, sparse)``: the weight first,
    and ``-1`` for no padding row (``F.embedding`` resolves a negative ``padding_idx`` before calling it)."""
    padding_idx = a(2, "padding_idx", -1)
    return _canonical(a(1, "indices"), a(0, "weight"), None if padding_idx == -1 else padding_idx, None,
                      a(3, "scale_grad_by_freq", False))


# ---- helpers ------------------------------------------------------------------------------------

def _without_padding(t: torch.Tensor, padding_idx: int | None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """``t`` with the padding row's entries zeroed (torch gives that row no gradient), in place.
    ``rows``: the row of each entry along ``t``'s dim 0 where ``t`` is not indexed by row."""
    if padding_idx is None:
        return t
    if rows is None:
        t[..., padding_idx, :] = 0
    else:
        t[rows == padding_idx] = 0
    return t


def _pairs(x: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distinct (sample, row) pairs read, in ``P = x.numel()`` slots (the most there can be; a
    static shape, as shape propagation needs): ``(sample [P], row [P], inverse [P])`` with ``inverse``
    the slot of each position of ``x`` (flattened sample-major). Slots beyond the distinct pairs hold
    ``(0, 0)`` and receive no message, so whatever is read from them is zero."""
    n = x.shape[0]
    keys = (torch.arange(n, device=x.device).unsqueeze(1) * vocab + x.reshape(n, -1)).reshape(-1)
    ordered, order = keys.sort()
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    slot = starts.cumsum(0) - 1  # the slot of each sorted position: equal keys share one
    inverse = torch.empty_like(slot).scatter_(0, order, slot)
    slot_key = torch.zeros_like(ordered).scatter_(0, slot, ordered)
    return torch.div(slot_key, vocab, rounding_mode="floor"), slot_key % vocab, inverse


def _pair_sums(v: torch.Tensor, x: torch.Tensor, inverse: torch.Tensor, pairs: int) -> torch.Tensor:
    """``(J_n^T v_n)[r]`` for every distinct pair ``(n, r)``: ``v [*lead, N, *positions, D] -> [L, U, D]``,
    the positions of a sample that read one row summed."""
    d = v.shape[-1]
    flat = v.reshape(-1, x.numel(), d)
    return flat.new_zeros((flat.shape[0], pairs, d)).index_add_(1, inverse, flat)


def _signed_pair_squares(S, sign, x, weight, padding_idx):
    """``sum_k sign_kn ((J_n^T S_kn)[r])^2`` per pair: ``([U, D], sample [U], row [U])``."""
    sample, row, inverse = _pairs(x, weight.shape[0])
    sums = _pair_sums(S, x, inverse, sample.shape[0])  # [K, U, D]
    sq = sums * sums
    if sign is not None:
        sq = sq * sign[:, sample].unsqueeze(-1).to(sq.dtype)
    return _without_padding(sq.sum(0), padding_idx, row), sample, row


def _scatter_rows(v: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, padding_idx: int | None) -> torch.Tensor:
    """``sum_n J_n^T v_n``: every position's message added into the row it read, ``[V, D]``."""
    d = v.shape[-1]
    out = v.new_zeros(weight.shape).index_add_(0, x.reshape(-1), v.reshape(-1, d))
    return _without_padding(out, padding_idx)


# ---- parameter rules ----------------------------------------------------------------------------

@op.grad("weight", fresh=True)
def embedding_grad_weight(g, x, weight, padding_idx):
    """``dL/dW[r] = sum_{n,t: x[n,t] = r} g[n, t]`` (torch's embedding backward), zero at ``padding_idx``."""
    return _scatter_rows(g, x, weight, padding_idx)


@op.diag_diag("weight", fresh=True)
def embedding_diag_diag_weight(d, x, weight, padding_idx):
    """HesScale eq. 5 with a 0/1 Jacobian: ``sum_n (J_n o J_n)^T d_n = sum_n J_n^T d_n``."""
    return _scatter_rows(d, x, weight, padding_idx)


@op.per_sample("weight", fresh=True)
def embedding_per_sample_weight(v, x, weight, padding_idx):
    """Per-sample ``J_n^T v_n``, ``[*lead, N, V, D]``: each sample's positions added into its rows."""
    n, (vocab, d) = x.shape[0], weight.shape
    lead = v.shape[: v.dim() - x.dim() - 1]
    flat = v.reshape(-1, x.numel(), d)
    keys = (torch.arange(n, device=x.device).unsqueeze(1) * vocab + x.reshape(n, -1)).reshape(-1)
    out = flat.new_zeros((flat.shape[0], n * vocab, d)).index_add_(1, keys, flat)
    return _without_padding(out.reshape(lead + (n, vocab, d)), padding_idx)


@op.diag_sqrt("weight", fresh=True)
def embedding_diag_sqrt_weight(S, sign, x, weight, padding_idx):
    """``sum_{k,n} sign_kn ((J_n^T S_kn)[r])^2``: positions of a sample reading row ``r`` summed, then
    squared, then added over the samples into row ``r``."""
    sq, _, row = _signed_pair_squares(S, sign, x, weight, padding_idx)
    return sq.new_zeros(weight.shape).index_add_(0, row, sq)


@op.batch_diag_sqrt("weight", fresh=True)
def embedding_batch_diag_sqrt_weight(S, sign, x, weight, padding_idx):
    """``sum_k sign_kn ((J_n^T S_kn)[r])^2`` per sample, ``[N, V, D]``."""
    sq, sample, row = _signed_pair_squares(S, sign, x, weight, padding_idx)
    n, (vocab, d) = x.shape[0], weight.shape
    return sq.new_zeros((n * vocab, d)).index_add_(0, sample * vocab + row, sq).reshape(n, vocab, d)


@op.batch_l2("weight", fresh=True)
def embedding_batch_l2_weight(g, x, weight, padding_idx):
    """``|J_n^T g_n|^2 = sum_r |sum_{t: x[n,t] = r} g[n, t]|^2`` per sample, ``[N]``."""
    sample, row, inverse = _pairs(x, weight.shape[0])
    sums = _pair_sums(g, x, inverse, sample.shape[0])[0]  # [U, D]
    norms = _without_padding((sums * sums).sum(-1), padding_idx, row)
    return norms.new_zeros(x.shape[0]).index_add_(0, sample, norms)


# ---- ViViT's Gram matrix --------------------------------------------------------------------------

@op.gram("weight")
def embedding_gram(S, x, weight, padding_idx, include=("weight",), total=None):
    """ViViT eq. S.23 without the ``[K, N, V, D]`` per-sample factors: ``a_kn = J_n^T S_kn`` has one row
    per distinct (sample, row) pair ``u`` of sample ``n``, ``sums[k, u]``, so

        a_kn . a_k'n' = sum_{u in n, u' in n', row_u = row_u'} sums[k, u] . sums[k', u'],

    the pairs' products masked to equal rows and summed over each sample's pairs (``[K N, K N]``,
    ``k``-major; added in place into ``total`` where given). Samples are read only through ``x``."""
    k, n = S.shape[0], x.shape[0]
    sample, row, inverse = _pairs(x, weight.shape[0])
    slots = sample.shape[0]
    sums = _pair_sums(S, x, inverse, slots)  # [K, P, D]
    if padding_idx is not None:
        sums = sums * (row != padding_idx).to(sums.dtype).unsqueeze(-1)
    flat = sums.reshape(k * slots, -1)
    same_row = (row.unsqueeze(1) == row.unsqueeze(0)).to(sums.dtype)  # [P, P]
    products = (flat @ flat.T).reshape(k, slots, k, slots) * same_row[None, :, None, :]
    of_sample = sums.new_zeros((slots, n)).scatter_(1, sample.unsqueeze(1), 1.0)  # [P, N]: each slot's sample
    gram = torch.einsum("apbq,pn,qm->anbm", products, of_sample, of_sample).reshape(k * n, k * n)
    if total is None:
        return gram
    return add_square(total, gram)
