"""Exact per-parameter curvature blocks available only through products (``block_ggn``,
``block_hessian``).

A :class:`BlockOperator` wraps a function ``matvec(V: [P, M]) -> [P, M]`` that multiplies the block
with columns (e.g. ``J^T S S^T J V`` over a batch, or a Hessian-vector product), so that the ``[P, P]``
block is never formed unless asked for, and then column chunk by column chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .base import DENSE_CHUNK_COLUMNS, CurvatureOperator

MatVec = Callable[[torch.Tensor], torch.Tensor]


class BlockOperator(CurvatureOperator):
    """One parameter's exact curvature block, known through ``matvec(V: [P, M]) -> [P, M]`` (columns
    over the row-major flattened parameter).

    ``diag`` (optional): a callable returning the block's exact diagonal (shaped like the parameter or
    flat), used by :meth:`diag` and :meth:`trace`; without it they extract the diagonal from products
    with identity columns, refused above :data:`~fxcurv.operators.base.DIAG_MAX_COLUMNS` entries.
    ``chunk_columns``: identity columns per product in :meth:`to_dense` and the column-wise diagonal
    (default :data:`~fxcurv.operators.base.DENSE_CHUNK_COLUMNS`).
    """

    kind = "matrix-free block"

    def __init__(self, matvec: MatVec, param_shape: Sequence[int], dtype: torch.dtype,
                 device: str | torch.device, *, diag: Callable[[], torch.Tensor] | None = None,
                 label: str = "", chunk_columns: int = DENSE_CHUNK_COLUMNS):
        if not callable(matvec):
            raise TypeError(f"BlockOperator: matvec must be callable V [P, M] -> [P, M]; got {type(matvec).__name__}")
        if diag is not None and not callable(diag):
            raise TypeError(f"BlockOperator: diag must be a callable returning the diagonal; got {type(diag).__name__}")
        if int(chunk_columns) < 1:
            raise ValueError(f"BlockOperator: chunk_columns must be >= 1; got {chunk_columns}")
        super().__init__(param_shape, dtype, device, label)
        self._matvec = matvec
        self._diag_fn = diag
        self.chunk_columns = int(chunk_columns)

    def _describe(self) -> str:
        source = "products and its own diagonal" if self._diag_fn is not None else "products only"
        return f"{self.kind} known through {source}"

    def _check_result(self, out: object, M: int, what: str) -> torch.Tensor:
        expected = (self.numel, M)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"{self._name()}: {what} returned {got}; it must return a tensor {list(expected)}")
        if out.dtype != self.dtype or out.device != self.device:
            raise TypeError(f"{self._name()}: {what} returned {out.dtype} on {out.device}; the operator is "
                            f"{self.dtype} on {self.device}")
        return out

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self._check_result(self._matvec(V), V.shape[1], f"matvec of a [{self.numel}, {V.shape[1]}] input")

    def _dense(self, chunk: int = DENSE_CHUNK_COLUMNS) -> torch.Tensor:
        """Products with the identity, :attr:`chunk_columns` columns at a time (``to_dense`` checks the
        size first)."""
        return super()._dense(self.chunk_columns)

    def diag(self, max_columns: int | None = None) -> torch.Tensor:
        """The diagonal shaped like the parameter: the ``diag`` callable's if given, else from ``P``
        products with identity columns (refused above ``max_columns``, default
        :data:`~fxcurv.operators.base.DIAG_MAX_COLUMNS`)."""
        if self._diag_fn is None:
            return self._diag_by_columns(max_columns, self.chunk_columns)
        d = self._diag_fn()
        if not isinstance(d, torch.Tensor) or d.numel() != self.numel:
            got = tuple(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__
            raise ValueError(f"{self._name()}: the diag callable returned {got}; it must return {self.numel} "
                             f"entries, shaped like the parameter {list(self.param_shape)} or flat")
        if d.dtype != self.dtype or d.device != self.device:
            raise TypeError(f"{self._name()}: the diag callable returned {d.dtype} on {d.device}; the operator "
                            f"is {self.dtype} on {self.device}")
        return d.reshape(self.param_shape)

    def trace(self, max_columns: int | None = None) -> torch.Tensor:
        """``tr(K)``: the sum of :meth:`diag`."""
        return self.diag(max_columns).sum()
