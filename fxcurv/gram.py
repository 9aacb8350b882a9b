"""Gram matrices of factor rows, the products behind ViViT's Gram matrix ``V^T V`` (ViViT eq. S.23).

A parameter's share of the Gram matrix is ``A A^T`` for its per-sample factors ``A [K N, D]`` (row
``k N + n`` is ``vec(J_n^T S_kn)``, ``k``-major like ``S.flatten(0, 1)``). The helpers here

* multiply block rows only with the columns at and right of their diagonal block and mirror the rest
  (the result is symmetric: about half the flops of ``A @ A.T``);
* add into a running total (a block's Gram matrix sums many parameters) instead of allocating: no
  ``[K N, K N]`` temporary exists besides the total, only a chunk of at most
  :data:`GRAM_ROW_ELEMENTS` entries of one block row at a time;
* apply a per-sample-pair weight ``w [N, N]`` on the way (a linear layer's ``x x^T``, ViViT C.1), given
  as a function of its rows so that it too exists a chunk of rows at a time;
* form large per-sample factors (a convolution's ``K N x C_out C_in k1 k2``) a block of samples at a
  time (:func:`blocked_gram_into`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Entries of one block of per-sample factors in blocked_gram_into: two blocks (64 MiB each in float32)
# are alive at a time. A convolution's per-sample factors are far larger than the columns they come
# from (the c3d3's third convolution: 110,592 entries per column and sample against 4,608 at its
# output), so holding them all (as ViViT's implementation does) would set the peak memory; blocks of
# this size still make products large enough to run near the machine's peak.
GRAM_BLOCK_ELEMENTS = 1 << 24

# Entries of one chunk of a block row in gram_into (4 MiB in float32): the rows of one chunk times all
# columns right of the diagonal block. A whole block row would be N x K N (ViViT C.1's product for
# one column index): beside the Gram matrix it was the largest temporary of the Monte Carlo setting
# (K = 1: N^2, with the weight x x^T another N^2).
GRAM_ROW_ELEMENTS = 1 << 20

Weight = torch.Tensor | Callable[[int, int], torch.Tensor] | None


def gram_rows(m: int, n: int) -> int:
    """Rows per chunk of :func:`gram_into` for ``m`` columns and ``n`` samples."""
    return max(1, min(n, GRAM_ROW_ELEMENTS // max(1, m)))


def _put(total: torch.Tensor | None, rows: slice, cols: slice, value: torch.Tensor, out: torch.Tensor) -> None:
    """``out[rows, cols] (+)= value``: added where accumulating into a total, written where fresh."""
    if total is None:
        out[rows, cols] = value
    else:
        out[rows, cols] += value


def gram_into(a: torch.Tensor, total: torch.Tensor | None, k: int, weight: Weight = None) -> torch.Tensor:
    """``total + (a a^T) o W`` for factor rows ``a [K N, D]`` (``k``-major), with ``W[kn, k'n'] =
    weight[n, n']`` (``None``: 1; a tensor ``[N, N]`` or a function ``(start, stop)`` giving its rows
    ``start:stop``); a fresh matrix where ``total`` is ``None``, else ``total`` updated in place and
    returned.

    The rows of one column index ``k`` (``N`` consecutive rows) form a block row; it is multiplied with
    the rows of ``k' >= k`` only, weighted by ``weight`` broadcast over ``k'``, and mirrored into the
    block column; a chunk of :func:`gram_rows` samples at a time (the weight's rows of a chunk formed
    once for all ``k``).
    """
    m = a.shape[0]
    n = m // k
    out = total if total is not None else a.new_empty(m, m)
    step = gram_rows(m, n)
    for start in range(0, n, step):
        stop = min(n, start + step)
        w = None if weight is None else (weight[start:stop] if isinstance(weight, torch.Tensor)
                                         else weight(start, stop))
        for i in range(k):
            r = slice(i * n + start, i * n + stop)
            block = a[r] @ a[i * n:].T  # [c, (K - i) N]
            if w is not None:
                block.view(stop - start, k - i, n).mul_(w[:, None, :])
            _put(total, r, slice(i * n, m), block, out)
            if i + 1 < k:
                _put(total, slice((i + 1) * n, m), r, block[:, n:].T, out)
    return out


def blocked_gram_into(factors: Callable[[int, int], torch.Tensor], total: torch.Tensor | None, k: int, n: int,
                      row_elements: int) -> torch.Tensor:
    """``total + A A^T`` (fresh where ``total`` is ``None``) for per-sample factors produced a block of
    samples at a time: ``factors(start, stop)`` returns the rows of samples ``start:stop``,
    ``[K (stop - start), D]`` (``k``-major), ``row_elements = K D`` entries per sample.

    Blocks hold at most :data:`GRAM_BLOCK_ELEMENTS` entries; the block pairs ``(i, j >= i)`` are
    multiplied (block ``j`` recomputed for each ``i``) and mirrored, so at most two blocks exist at once.
    """
    per_block = max(1, GRAM_BLOCK_ELEMENTS // max(1, row_elements))
    if per_block >= n:
        return gram_into(factors(0, n), total, k)
    out = total.view(k, n, k, n) if total is not None else None
    for i in range(0, n, per_block):
        i_stop = min(n, i + per_block)
        a_i = factors(i, i_stop)
        if out is None:
            out = a_i.new_empty(k, n, k, n)
        b_i = i_stop - i
        for j in range(i, n, per_block):
            j_stop = min(n, j + per_block)
            b_j = j_stop - j
            # The diagonal block is symmetric itself: its upper block rows only (gram_into).
            product = gram_into(a_i, None, k) if j == i else a_i @ factors(j, j_stop).T
            block = product.reshape(k, b_i, k, b_j)
            if total is None:
                out[:, i:i_stop, :, j:j_stop] = block
                if j != i:
                    out[:, j:j_stop, :, i:i_stop] = block.permute(2, 3, 0, 1)
            else:
                out[:, i:i_stop, :, j:j_stop] += block
                if j != i:
                    out[:, j:j_stop, :, i:i_stop] += block.permute(2, 3, 0, 1)
    assert out is not None
    return total if total is not None else out.reshape(k * n, k * n)
