"""Whole data sets: ``engine.accumulate(loader)`` runs the engine on every batch and combines the
results into one :class:`~fxcurv.api.Result` for the concatenated data set.

Weighting (:mod:`fxcurv.data`). A mean-reduced loss over the data set is ``L = sum_b (W_b / W) L_b``,
``W = sum_b W_b`` (samples, output entries or non-ignored targets per batch); a summed one is
``L = sum_b L_b``. Every quantity declares how its values combine under these weights
(:meth:`fxcurv.quantities.Quantity.accumulator`, :mod:`fxcurv.quantities.combine`); this module only
runs the loop: it reads each batch's loss scale (``engine.loss_scale``), runs the engine, hands every
value with the batch's unnormalized weight ``u_b`` (``W_b``, or ``1`` for a sum) to its accumulator,
and divides by ``Z`` (``W``, or ``1``) at the end -- one pass, so a loader may be any iterable of
``(x, y)`` pairs, read once.

Distributed. Where ``torch.distributed`` is initialized (or ``distributed=True``), each process
accumulates its own shard of the data set, then the totals ``W`` and ``N`` and every accumulator's
partial sums are all-reduced and per-sample values gathered in rank order (process 0's samples first),
so that every process gets the result of the whole data set: the same as one process running the
concatenation of the shards in rank order. Matrix-free blocks (``block_ggn``, ``block_hessian``) are
refused there: their products need the tensors of every process.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .data import LossReduction, LossScale, unnormalized_weight
from .errors import InputError, NotCombinableError
from .quantities.combine import Accumulator, BatchShare, DataSetTotal, WeightedSum

if TYPE_CHECKING:
    from .api import Engine, Result

# progress=None shows a bar for loaders of at least this many batches, when stderr is a terminal.
PROGRESS_MIN_BATCHES = 20


@dataclass
class _Totals:
    """What the batches seen so far add up to: the reduction, ``Z`` (sum of ``W_b``), ``N``, batches."""

    reduction: LossReduction | None = None
    weight: float = 0.0
    samples: int = 0
    batches: int = 0

    def add(self, scale: LossScale, samples: int, index: int) -> float:
        """Count batch ``index``; its unnormalized weight ``u_b``."""
        if self.reduction is not None and scale.reduction is not self.reduction:
            raise InputError(f"batch {index}'s loss reduces by {scale.reduction.value!r}, the batches before it by "
                             f"{self.reduction.value!r}: one data set takes one reduction")
        self.reduction = scale.reduction
        self.samples += samples
        self.batches += 1
        u = unnormalized_weight(scale)
        self.weight += u
        return u

    def total(self) -> DataSetTotal:
        if self.reduction is LossReduction.SUM:
            return DataSetTotal(1.0, self.samples)
        if not self.weight > 0:
            raise InputError("the mean-reduced loss averages over nothing in the whole data set (every target "
                             "ignored, or empty batches)")
        return DataSetTotal(self.weight, self.samples)


class TorchCollective:
    """:class:`~fxcurv.quantities.combine.Collective` over a ``torch.distributed`` process group."""

    def __init__(self, group: Any = None):
        import torch.distributed as dist

        self.dist = dist
        self.group = group
        self.world = dist.get_world_size(group)

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        out = t.clone(memory_format=torch.contiguous_format)
        self.dist.all_reduce(out, op=self.dist.ReduceOp.SUM, group=self.group)
        return out

    def all_cat(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """All-gather of tensors whose sizes along ``dim`` differ: padded to the largest, gathered, trimmed."""
        size = torch.tensor([t.shape[dim]], dtype=torch.int64, device=t.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world)]
        self.dist.all_gather(sizes, size, group=self.group)
        counts = [int(s.item()) for s in sizes]
        pad_shape = list(t.shape)
        pad_shape[dim] = max(counts) - t.shape[dim]
        padded = torch.cat([t, t.new_zeros(pad_shape)], dim).contiguous()
        gathered = [torch.empty_like(padded) for _ in range(self.world)]
        self.dist.all_gather(gathered, padded, group=self.group)
        return torch.cat([g.narrow(dim, 0, c) for g, c in zip(gathered, counts)], dim)


def _distributed(distributed: bool | None) -> bool:
    """Whether to combine across processes: ``None`` where ``torch.distributed`` is initialized."""
    available = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed is None:
        return available
    if distributed and not available:
        raise InputError("distributed=True but torch.distributed is not initialized "
                         "(torch.distributed.init_process_group)")
    return bool(distributed)


def _length(loader: Iterable[Any]) -> int | None:
    """The loader's number of batches where it has one (a DataLoader over an iterable-style data set may not)."""
    if not isinstance(loader, Sized):
        return None
    try:
        return len(loader)
    except TypeError:  # __len__ defined but unknown (DataLoader over an IterableDataset without one)
        return None


def _batches(loader: Iterable[Any], progress: bool | None, show: bool) -> Iterator[Any]:
    """The loader's items, through a tqdm bar where asked (``progress=None``: for loaders with a length of
    at least :data:`PROGRESS_MIN_BATCHES` when stderr is a terminal)."""
    length = _length(loader)
    asked = progress is True
    if progress is None:
        progress = length is not None and length >= PROGRESS_MIN_BATCHES and sys.stderr.isatty()
    if not (progress and show):
        return iter(loader)
    try:
        from tqdm.auto import tqdm
    except ImportError as err:
        if not asked:  # the default bar is a convenience: none without tqdm
            return iter(loader)
        raise ImportError("engine.accumulate(progress=True) shows a tqdm bar: pip install tqdm") from err
    return iter(tqdm(loader, total=length, desc="fxcurv.accumulate", unit="batch"))


def _pair(batch: Any, index: int) -> tuple[torch.Tensor, Any]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        what = f"a {type(batch).__name__}" + (f" of {len(batch)} items" if isinstance(batch, (tuple, list)) else "")
        raise InputError(f"batch {index} of the loader is {what}; accumulate takes an iterable of (x, y) pairs")
    return batch[0], batch[1]


def accumulate(engine: Engine, loader: Iterable[Any], *, reduction: str | None = None, progress: bool | None = None,
               distributed: bool | None = None, group: Any = None,
               generator: torch.Generator | None = None) -> Result:
    """The loss, gradient and every quantity of ``engine`` on the data set made of ``loader``'s batches
    (see the module docstring and ``Engine.accumulate``)."""
    from .api import Result

    across = _distributed(distributed)
    kinds: dict[str, Accumulator[Any]] = {q.name: q.accumulator() for q in engine.quantities}  # refusals raise here
    for name, kind in kinds.items():
        missing = [r for r in kind.reads if r not in engine.quantity_names]
        if missing:
            raise NotCombinableError(f"{name} over a data set combines each batch's value with the batch's "
                                     f"{', '.join(missing)}, which this engine does not compute (grad=False): "
                                     "compile it with grad=True")
    if across:
        local = [name for name, acc in kinds.items() if not acc.distributable]
        if local:
            raise NotCombinableError(f"{', '.join(local)} cannot be accumulated across processes: a matrix-free "
                                     "block's products need every process's tensors; accumulate in one process")
    show = not across or torch.distributed.get_rank(group) == 0
    totals = _Totals()
    loss = WeightedSum(1.0)
    values: dict[str, dict[str, Accumulator[Any]] | Accumulator[Any]] = {}
    for index, batch in enumerate(_batches(loader, progress, show)):
        x, y = _pair(batch, index)
        u = totals.add(engine.loss_scale(x, y, reduction), int(x.shape[0]), index)
        out = engine(x, y, generator=generator)
        loss.add(out.loss, BatchShare(u, int(x.shape[0]), out))
        for q in engine.quantities:
            if not q.per_parameter:
                acc = values.setdefault(q.name, kinds[q.name])
                assert isinstance(acc, Accumulator)
                acc.add(out[q.name], BatchShare(u, int(x.shape[0]), out))
                continue
            per_param = values.setdefault(q.name, {})
            assert isinstance(per_param, dict)
            for name, value in out[q.name].items():
                if name not in per_param:
                    per_param[name] = q.accumulator()
                per_param[name].add(value, BatchShare(u, int(x.shape[0]), out, name))
    if across:
        _reduce(totals, loss, values, TorchCollective(group), engine)
    if totals.batches == 0:
        raise InputError("the loader gave no batches: a data set needs at least one (x, y) batch")
    total = totals.total()
    result: dict[str, Any] = {}
    for name, acc in values.items():
        result[name] = ({p: a.result(total) for p, a in acc.items()} if isinstance(acc, dict)
                        else acc.result(total))
    return Result(loss.result(total), result)


def _reduce(totals: _Totals, loss: Accumulator[Any], values: dict[str, Any], collective: TorchCollective,
            engine: Engine) -> None:
    """Every process's totals and partial sums combined (in place), the same on every process. The first
    all-reduce checks that every process has batches and that they agree on the reduction, so that all
    raise together instead of waiting in mismatched collectives."""
    device = next(iter(engine.model.parameters())).device
    mean = totals.reduction is LossReduction.MEAN
    summed = totals.reduction is LossReduction.SUM
    counts = torch.tensor([float(totals.batches == 0), float(mean), float(summed), totals.weight,
                           float(totals.samples), float(totals.batches)], dtype=torch.float64, device=device)
    counts = collective.all_sum(counts)
    empty, means, sums, weight, samples, batches = counts.tolist()
    if empty:
        raise InputError(f"{int(empty)} of {collective.world} processes got no batches: every process must "
                         "accumulate a non-empty shard")
    if means and sums:
        raise InputError("the processes' losses reduce differently ('mean' and 'sum'): one data set takes one "
                         "reduction")
    totals.weight, totals.samples, totals.batches = weight, int(samples), int(batches)
    loss.reduce(collective)
    for acc in values.values():
        for a in (acc.values() if isinstance(acc, dict) else (acc,)):
            a.reduce(collective)
