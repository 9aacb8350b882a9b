"""What the curvature operators of :mod:`fxcurv.linops` share: the parameter space they act on, the data
set they sum over, and the ``[P, P]`` operator itself.

The space is a list of trainable parameters ``theta_1, ..., theta_m`` (all of them, in
``named_parameters()`` order, or a subset in the order given), each flattened row-major and concatenated:
``v = [vec(v_1); ...; vec(v_m)]`` with ``P = sum_i numel(theta_i)`` entries, the layout of
``torch.nn.utils.parameters_to_vector``.

The data set is an iterable of batches ``(x_b, y_b)``; its loss is ``L = sum_b w_b L_b`` with the
weights of :func:`fxcurv.data.batch_weights` (``W_b / sum_b W_b`` for a mean-reduced loss, ``W_b`` the
number of samples, output entries or non-ignored targets the batch's loss averages over; ``1`` for a
summed loss). Every operator here is linear in the batch losses, so it is ``A = sum_b w_b A_b``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..api import Engine
from ..data import LossScale, batch_weights
from ..errors import InputError
from ..operators.base import CurvatureOperator
from ..trace import Traced

# Columns of a matrix ``V [P, K]`` multiplied in one vectorized pass over the data (torch.func.vmap over
# columns): each column carries its own activation-sized tangents and cotangents through the network, so
# memory grows with the chunk. Measured (benchmarks/linops.py --columns 16, one thread, N = 128): 16
# columns at once take 1.45x the time of 16 single products on the c3d3, at 6x the memory (1.46 GB
# against 0.24 GB: torch's vmap of a convolution with batched weight tangents); on the MNIST MLP 0.69x
# of torch.func's single products, and 0.79x of those by the program's own ops (fxcurv.linops.rop;
# measured on a loaded machine). Products column by column are the default; chunk=16 pays off a little
# on MLPs.
DEFAULT_CHUNK = 1

Batch = tuple[Any, Any]


def traced_of(engine: Engine, x: Any = None) -> Traced:
    """The trace of the engine's model and loss as they are now (traced anew where the guards say the
    model or loss changed, :mod:`fxcurv.guards`; ``capture="aten"`` captures on inputs like ``x``)."""
    return engine.traced(x)


@dataclass(frozen=True)
class ParameterSpace:
    """The parameters an operator acts on: ``names`` with their ``shapes``, flattened and concatenated in
    this order (``P = sum numel``)."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    dtype: torch.dtype
    device: torch.device

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(s.numel() for s in self.shapes)

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def split(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Vectors as rows ``[K, P]`` (the columns of ``V [P, K]`` transposed) as ``{name: [K, *shape]}``
        (views of ``rows``)."""
        out: dict[str, torch.Tensor] = {}
        start = 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes):
            out[name] = rows[:, start:start + size].reshape((rows.shape[0],) + tuple(shape))
            start += size
        return out

    def join(self, parts: dict[str, torch.Tensor], columns: int) -> torch.Tensor:
        """``{name: [K, *shape]}`` back to rows ``[K, P]``; a name without a part (a parameter the loss never
        reads) gives zeros."""
        blocks = []
        for name, size in zip(self.names, self.sizes):
            part = parts.get(name)
            if part is None:
                blocks.append(torch.zeros(columns, size, dtype=self.dtype, device=self.device))
            else:
                blocks.append(part.reshape(columns, size))
        return torch.cat(blocks, dim=1)

    def current(self, traced: Traced) -> dict[str, torch.Tensor]:
        """The parameters' values now, detached, checked against the space (a parameter replaced by one of
        another shape, dtype or device, or removed, is an InputError naming it)."""
        values: dict[str, torch.Tensor] = {}
        for name, shape in zip(self.names, self.shapes):
            p = traced.params.get(name)
            if p is None:
                raise InputError(f"parameter {name!r} of this operator is no longer a parameter of the model")
            if p.shape != shape or p.dtype != self.dtype or p.device != self.device:
                raise InputError(
                    f"parameter {name!r} is now {tuple(p.shape)} {p.dtype} on {p.device}; the operator was built "
                    f"for {tuple(shape)} {self.dtype} on {self.device}. Build a new operator")
            values[name] = p.detach()
        return values


def select_parameters(traced: Traced, params: Sequence[str] | None) -> ParameterSpace:
    """The trainable parameters (``requires_grad``) in ``named_parameters()`` order, or ``params`` (names, in
    the order given). Unknown, frozen and repeated names are ValueErrors naming them."""
    trainable = [name for name, p in traced.params.items() if p.requires_grad]
    if params is None:
        names = trainable
    else:
        if isinstance(params, str):
            raise TypeError(f"params= takes a list of parameter names, got the string {params!r}")
        names = list(params)
        unknown = [n for n in names if n not in traced.params]
        if unknown:
            raise ValueError(f"params=: {unknown} are not parameters of the model (a tied weight goes by its first "
                             f"name in named_parameters()); trainable parameters: {trainable}")
        frozen = [n for n in names if n not in trainable]
        if frozen:
            raise ValueError(f"params=: {frozen} do not require gradients; trainable parameters: {trainable}")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"params=: {repeated} named more than once")
    if not names:
        raise ValueError("the operator has no parameters: the model has no trainable parameters (or params=[])")
    values = [traced.params[n] for n in names]
    dtypes = {p.dtype for p in values}
    devices = {p.device for p in values}
    if len(dtypes) > 1 or len(devices) > 1:
        raise InputError(f"the parameters of one operator share a dtype and device; got {sorted(map(str, dtypes))} "
                         f"on {sorted(map(str, devices))}")
    return ParameterSpace(tuple(names), tuple(p.shape for p in values), values[0].dtype, values[0].device)


class DataSet:
    """The batches ``(x_b, y_b)`` of a data set and their weights ``w_b`` in its loss.

    ``data`` is iterated once per pass; a one-shot iterator is materialized into a list first. The weights
    come from the first pass (``engine.loss_scale`` of every batch, :func:`fxcurv.data.batch_weights`), so
    every later pass must yield as many batches with the same scales in the same order (a reshuffled
    loader with equal batches is fine: their weights are equal); otherwise a pass raises InputError."""

    def __init__(self, engine: Engine, data: Iterable[Batch], reduction: str | None):
        if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
            raise TypeError("data= is an iterable of (x, y) batches; for one batch pass [(x, y)]")
        self.data: Iterable[Batch] = list(data) if iter(data) is data else data
        self.scales: list[LossScale] = [engine.loss_scale(x, y, reduction) for x, y in self.data]
        self.weights = batch_weights(self.scales)

    def __iter__(self) -> Iterator[tuple[int, Batch, float, LossScale]]:
        """``(b, (x, y), w_b, scale_b)`` for every batch of one pass."""
        count = 0
        for b, (x, y) in enumerate(self.data):
            if b >= len(self.weights):
                raise self._changed(f"more than {len(self.weights)}")
            count += 1
            yield b, (x, y), self.weights[b], self.scales[b]
        if count != len(self.weights):
            raise self._changed(str(count))

    def _changed(self, count: str) -> InputError:
        return InputError(f"the data set yielded {count} batches in this pass but {len(self.weights)} when the "
                          "operator was built: it must yield the same batches at every product")


class LinearOperator(CurvatureOperator):
    """A symmetric ``[P, P]`` curvature matrix of a data set's loss over a parameter space, known through
    its products ``A @ v`` (``v`` ``[P]`` or columns ``[P, K]``).

    Subclasses implement :meth:`_batch_matmat`, one batch's ``A_b V`` for a chunk of columns; the sum
    ``sum_b w_b A_b V`` over the data set, the chunking of columns and the parameter bookkeeping live here.
    ``to_dense()``, ``diag()`` (by identity columns), ``damped()`` and ``asymmetry()`` come from
    :class:`fxcurv.operators.CurvatureOperator`; ``to_scipy()`` gives a SciPy ``LinearOperator``.
    """

    kind = "curvature operator"

    def __init__(self, engine: Engine, data: Iterable[Batch], *, params: Sequence[str] | None = None,
                 reduction: str | None = None, chunk: int = DEFAULT_CHUNK):
        if not isinstance(engine, Engine):
            raise TypeError(f"engine must be a compiled fxcurv engine (fxcurv.compile(model, loss_fn)), got "
                            f"{type(engine).__name__}")
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
        self.engine = engine
        self.data = DataSet(engine, data, reduction)
        self.space = select_parameters(traced_of(engine, self._example()), params)
        super().__init__((self.space.numel,), self.space.dtype, self.space.device, type(self).__name__)
        self.chunk = chunk

    def _example(self) -> Any:
        """The first batch's input (what ``capture="aten"`` captures the model on), ``None`` without data."""
        for x, _ in self.data.data:
            return x
        return None

    @property
    def names(self) -> tuple[str, ...]:
        """The parameters, in the order of the flattened vector."""
        return self.space.names

    def _describe(self) -> str:
        return f"{self.kind} over {len(self.space.names)} parameters, {len(self.data.weights)} batches"

    # ---- products -------------------------------------------------------------------------------
    def _begin_pass(self) -> None:
        """Called before every pass over the data (a Monte Carlo operator restarts its draws here)."""

    def _batch_matmat(self, model: nn.Module, loss: nn.Module, params: dict[str, torch.Tensor], x: Any, y: Any,
                      V: dict[str, torch.Tensor], weight: float, scale: LossScale) -> dict[str, torch.Tensor]:
        """One batch's ``w_b A_b V``: ``params`` the model's parameters (those of the space that ``model``
        reads), ``V`` their columns ``{name: [K, *shape]}``; returns the same layout. The weight ``w_b`` is
        applied where it is cheapest (to output-sized columns or the loss, not to ``[P, K]``)."""
        raise NotImplementedError

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``sum_b w_b A_b V`` for ``V [P, K]``, ``chunk`` columns per pass over the data."""
        traced = traced_of(self.engine, self._example())
        values = self.space.current(traced)
        model = traced.root.get_submodule("model")
        # The traced model's name of each parameter it reads (a tied weight has several; any one serves
        # torch.func.functional_call, which ties the others). Parameters it never reads have zero rows and
        # columns in every operator here.
        local: dict[int, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            local.setdefault(id(p), name)
        rename = {name: local[id(traced.params[name])] for name in values if id(traced.params[name]) in local}
        back = {v: k for k, v in rename.items()}
        params = {rename[name]: v for name, v in values.items() if name in rename}
        # The vectors as rows [K, P], each contiguous where the columns are taken a chunk at a time.
        rows = V.mT if self.chunk >= V.shape[1] else V.mT.contiguous()
        blocks = []
        for start in range(0, rows.shape[0], self.chunk):
            chunk = rows[start:start + self.chunk]
            tangents = {rename[name]: t for name, t in self.space.split(chunk).items() if name in rename}
            total: dict[str, torch.Tensor] = {}
            self._begin_pass()
            for _, (x, y), weight, scale in self.data:
                part = self._batch_matmat(model, traced.loss_gm, params, x, y, tangents, weight, scale)
                for name, value in part.items():
                    total[name] = total[name].add_(value) if name in total else value
            blocks.append(self.space.join({back[k]: v for k, v in total.items()}, chunk.shape[0]))
        return (blocks[0] if len(blocks) == 1 else torch.cat(blocks)).mT

    # ---- SciPy ------------------------------------------------------------------------------------
    def to_scipy(self) -> Any:
        """The operator as a ``scipy.sparse.linalg.LinearOperator`` on float64 NumPy arrays (``matvec``,
        ``matmat``; symmetric, so ``rmatvec`` is ``matvec``): each product converts to the operator's dtype
        and device, multiplies, and converts back. For ``eigsh``, ``cg``, ``minres``."""
        import numpy as np
        from scipy.sparse.linalg import LinearOperator as ScipyLinearOperator

        def matmat(X: Any) -> Any:
            V = torch.as_tensor(np.asarray(X, dtype=np.float64)).to(device=self.device, dtype=self.dtype)
            return (self @ V).detach().to(device="cpu", dtype=torch.float64).numpy()

        def matvec(x: Any) -> Any:
            return matmat(np.asarray(x).reshape(-1, 1)).reshape(-1)

        return ScipyLinearOperator(self.shape, matvec=matvec, rmatvec=matvec, matmat=matmat, rmatmat=matmat,
                                   dtype=np.float64)

