"""Gram matrices of factor rows, the products behind ViViT's Gram matrix ``V^T V`` (ViViT eq. S.23).

A parameter's share of the Gram matrix is ``A A^T`` for its per-sample factors ``A [K N, D]`` (row
``k N + n`` is ``vec(J_n^T S_kn)``). The result is symmetric, so only the block rows' upper parts are
multiplied and mirrored (about half the flops of one ``A @ A.T``). Where ``A`` itself would be large (a
convolution's per-sample factors are ``K N x C_out C_in k1 k2``), :func:`blocked_gram` forms it a block of
samples at a time and never holds more than two blocks.

These helpers are pure functions of their inputs; the rules in :mod:`fxcurv.rules` build on them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Rows per block row of a symmetric product: about one eighth of the rows, so that the skipped lower
# blocks save 7/16 of the flops, but no fewer than 64 rows (a GEMM with fewer output rows runs well
# below the machine's peak on this CPU, and the per-block overhead of a call starts to show).
_MIN_BLOCK_ROWS = 64
_BLOCK_FRACTION = 8

# Entries of one block of per-sample factors in blocked_gram: two blocks (64 MiB each in float32) are
# alive at a time. A convolution's per-sample factors are far larger than the messages they come from
# (the c3d3's third convolution: 110,592 entries per column and sample against 4,608 in its output),
# so holding them all (as ViViT does) would set the peak; blocks of this size keep the products large
# enough to run near peak speed.
GRAM_BLOCK_ELEMENTS = 1 << 24


def _block_rows(m: int) -> int:
    return max(_MIN_BLOCK_ROWS, -(-m // _BLOCK_FRACTION))


def row_gram(a: torch.Tensor) -> torch.Tensor:
    """``a @ a.T`` for ``a [M, D]``, ``[M, M]``: block rows ``i`` multiply only the columns ``j >= i``
    and the lower blocks are mirrored from the upper ones."""
    m = a.shape[0]
    block = _block_rows(m)
    if m <= block:
        return a @ a.T
    out = a.new_empty(m, m)
    for i in range(0, m, block):
        stop = min(m, i + block)
        torch.mm(a[i:stop], a[i:].T, out=out[i:stop, i:])
        if stop < m:
            out[stop:, i:stop].copy_(out[i:stop, stop:].T)
    return out


def blocked_gram(factors: Callable[[int, int], torch.Tensor], k: int, n: int, row_elements: int) -> torch.Tensor:
    """The Gram matrix ``[K N, K N]`` (rows ``k``-major) of per-sample factors produced a block of
    samples at a time: ``factors(start, stop)`` returns the rows of samples ``start:stop``,
    ``[K (stop - start), D]`` (``k``-major), with ``row_elements = K D`` entries per sample.

    Blocks hold at most :data:`GRAM_BLOCK_ELEMENTS` entries; the block pairs ``(i, j >= i)`` are
    multiplied (block ``j`` recomputed for each ``i``) and mirrored, so at most two blocks exist at once.
    """
    per_block = max(1, GRAM_BLOCK_ELEMENTS // max(1, row_elements))
    if per_block >= n:
        return row_gram(factors(0, n))
    out = None
    for i in range(0, n, per_block):
        i_stop = min(n, i + per_block)
        a_i = factors(i, i_stop)
        if out is None:
            out = a_i.new_empty(k, n, k, n)
        b_i = i_stop - i
        out[:, i:i_stop, :, i:i_stop] = row_gram(a_i).reshape(k, b_i, k, b_i)
        for j in range(i_stop, n, per_block):
            j_stop = min(n, j + per_block)
            block = (a_i @ factors(j, j_stop).T).reshape(k, b_i, k, j_stop - j)
            out[:, i:i_stop, :, j:j_stop] = block
            out[:, j:j_stop, :, i:i_stop] = block.permute(2, 3, 0, 1)
    assert out is not None
    return out.reshape(k * n, k * n)
