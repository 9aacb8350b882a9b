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
  time (:func:`blocked_gram_into`);
* add, instead of into a square total, into a :class:`PackedGram`: the upper triangle alone, row by row
  (``M (M + 1) / 2`` entries, LAPACK's packed storage), half the square matrix's memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import is_fake

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

# Samples per block at or below which gram_into forms the Gram matrix as one product ``A @ A.T``: with few
# samples per column index (ViViT's subsampled settings: 16 of 128 samples x 9 columns) the blocked loop's
# 2 K small products and copies cost more than the flops that multiplying only the upper blocks saves
# (measured on 2 CPU cores: K = 9, N = 16, D = 1000: 1.03 ms blocked, 0.57 ms as one product; K = 4,
# N = 128: 3.4 ms blocked, 3.6 ms as one product).
ONE_PRODUCT_SAMPLES = 64

Weight = torch.Tensor | Callable[[int, int], torch.Tensor] | None


def packed_numel(m: int) -> int:
    """Entries of an ``[m, m]`` symmetric matrix's packed storage, ``m (m + 1) / 2``."""
    return m * (m + 1) // 2


def packed_offset(row: int, m: int) -> int:
    """Where row ``row`` of the upper triangle of an ``[m, m]`` matrix starts in packed storage: rows
    ``0..row-1`` hold ``m, m - 1, ...`` entries, ``row m - row (row - 1) / 2`` in all."""
    return row * m - row * (row - 1) // 2


@dataclass
class PackedGram:
    """A symmetric ``[size, size]`` matrix by its upper triangle, row by row: ``data[packed_offset(i) + j
    - i] = G[i, j]`` for ``i <= j``, ``size (size + 1) / 2`` entries. Read column-major, the same
    entries are the lower triangle column by column: LAPACK's packed storage with ``uplo = 'L'``
    (``?spevd``)."""

    data: torch.Tensor
    size: int

    @classmethod
    def zeros(cls, m: int, like: torch.Tensor) -> PackedGram:
        return cls(like.new_zeros(packed_numel(m)), m)

    @classmethod
    def of(cls, data: torch.Tensor) -> PackedGram:
        """The packed matrix whose storage is ``data`` (1-D, ``m (m + 1) / 2`` entries)."""
        m = (math.isqrt(8 * data.numel() + 1) - 1) // 2
        if data.dim() != 1 or packed_numel(m) != data.numel():
            raise ValueError(f"PackedGram: {tuple(data.shape)} is not the packed storage of a square matrix")
        return cls(data, m)

    def add_(self, row: int, col: int, block: torch.Tensor) -> None:
        """``G[row + i, col + j] += block[i, j]`` for the entries on or above the diagonal (``row + i <=
        col + j``); the others (mirror images of upper ones) are not stored. One row at a time: no
        temporary besides the views."""
        if is_fake(self.data) or self.data.is_meta:  # shapes only (the program's fake-tensor propagation)
            return
        m = self.size
        for i in range(block.shape[0]):
            r = row + i
            first = max(r - col, 0)  # the block's first column on or above the diagonal
            if first >= block.shape[1]:
                continue
            start = packed_offset(r, m) + col + first - r
            self.data[start:start + block.shape[1] - first] += block[i, first:]

    def full(self) -> torch.Tensor:
        """The ``[size, size]`` matrix (both triangles), fresh."""
        m = self.size
        out = self.data.new_empty(m, m)
        for r in range(m):
            row = self.data[packed_offset(r, m):packed_offset(r + 1, m)]
            out[r, r:] = row
            out[r:, r] = row
        return out


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
    once for all ``k``). A packed ``total`` (1-D, :class:`PackedGram`'s storage) takes the block rows'
    entries on and above the diagonal (nothing mirrored).
    """
    m = a.shape[0]
    n = m // k
    if total is not None and total.dim() == 1:
        return _packed_gram_into(a, PackedGram(total, m), k, weight).data
    if k > 1 and n <= ONE_PRODUCT_SAMPLES and m * m <= GRAM_ROW_ELEMENTS:
        return _one_product_gram_into(a, total, k, weight)
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


def _one_product_gram_into(a: torch.Tensor, total: torch.Tensor | None, k: int, weight: Weight) -> torch.Tensor:
    """:func:`gram_into` as one product ``(A A^T) o W`` (``W`` tiled over the ``K x K`` column blocks), for
    Gram matrices of few samples per block (:data:`ONE_PRODUCT_SAMPLES`)."""
    m = a.shape[0]
    n = m // k
    block = a @ a.T
    if weight is not None:
        w = weight if isinstance(weight, torch.Tensor) else weight(0, n)
        block.view(k, n, k, n).mul_(w[None, :, None, :])
    return block if total is None else total.add_(block)


def _packed_gram_into(a: torch.Tensor, total: PackedGram, k: int, weight: Weight) -> PackedGram:
    """:func:`gram_into` into packed storage: each chunk of a block row (``[c, (K - i) N]`` from column
    ``i N``) added on and above the diagonal."""
    m = a.shape[0]
    n = m // k
    step = gram_rows(m, n)
    for start in range(0, n, step):
        stop = min(n, start + step)
        w = None if weight is None else (weight[start:stop] if isinstance(weight, torch.Tensor)
                                         else weight(start, stop))
        for i in range(k):
            block = a[i * n + start:i * n + stop] @ a[i * n:].T  # [c, (K - i) N]
            if w is not None:
                block.view(stop - start, k - i, n).mul_(w[:, None, :])
            total.add_(i * n + start, i * n, block)
    return total


def blocked_gram_into(factors: Callable[[int, int], torch.Tensor], total: torch.Tensor | None, k: int, n: int,
                      row_elements: int) -> torch.Tensor:
    """``total + A A^T`` (fresh where ``total`` is ``None``) for per-sample factors produced a block of
    samples at a time: ``factors(start, stop)`` returns the rows of samples ``start:stop``,
    ``[K (stop - start), D]`` (``k``-major), ``row_elements = K D`` entries per sample.

    Blocks hold at most :data:`GRAM_BLOCK_ELEMENTS` entries; the block pairs ``(i, j >= i)`` are
    multiplied (block ``j`` recomputed for each ``i``) and mirrored, so at most two blocks exist at once.
    A packed ``total`` (1-D) takes each pair's sub-blocks and their mirror images on and above the
    diagonal (:func:`add_sample_blocks`).
    """
    per_block = max(1, GRAM_BLOCK_ELEMENTS // max(1, row_elements))
    if per_block >= n:
        return gram_into(factors(0, n), total, k)
    if total is not None and total.dim() == 1:
        return _packed_blocked_gram_into(factors, PackedGram(total, k * n), k, n, per_block).data
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


def _packed_blocked_gram_into(factors: Callable[[int, int], torch.Tensor], total: PackedGram, k: int, n: int,
                              per_block: int) -> PackedGram:
    """:func:`blocked_gram_into` into packed storage."""
    for i in range(0, n, per_block):
        i_stop = min(n, i + per_block)
        a_i = factors(i, i_stop)
        for j in range(i, n, per_block):
            j_stop = min(n, j + per_block)
            product = a_i @ (a_i if j == i else factors(j, j_stop)).T
            add_sample_blocks(total, product.view(k, i_stop - i, k, j_stop - j), k, n, i, j)
    return total


def add_sample_blocks(total: PackedGram, block: torch.Tensor, k: int, n: int, i: int, j: int) -> None:
    """Add ``block [K, b_i, K, b_j]``, the Gram entries of the samples ``i..i + b_i`` against ``j..j +
    b_j`` (``j >= i``; ``G[k1 N + i + a, k2 N + j + b] = block[k1, a, k2, b]``), and for ``j > i`` its
    mirror image ``G[k2 N + j + b, k1 N + i + a]``, into packed storage (on and above the diagonal)."""
    for k1 in range(k):
        for k2 in range(k):
            sub = block[k1, :, k2, :]
            total.add_(k1 * n + i, k2 * n + j, sub)
            if j != i:
                total.add_(k2 * n + j, k1 * n + i, sub.T)


def add_square(total: torch.Tensor, square: torch.Tensor) -> torch.Tensor:
    """``total += square`` for a symmetric ``square [M, M]``: in place, into a square or a packed (1-D)
    ``total``."""
    if total.dim() == 1:
        PackedGram(total, square.shape[0]).add_(0, 0, square)
        return total
    return total.add_(square)
