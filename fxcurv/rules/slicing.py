"""Basic indexing of the per-sample axes: ``x[:, 2:5]``, ``x[:, 0]``, ``x[..., ::2]``, ``x[:, None]``,
``narrow``, ``select``, and the outputs of ``chunk`` / ``split`` / ``unbind`` / ``tensor_split`` picked one
at a time (``q, k, v = h.chunk(3, -1)``); ATen ``aten.slice.Tensor``, ``aten.select.int``,
``aten.narrow.default`` and ``aten.split.Tensor`` / ``aten.split_with_sizes.default`` / ``aten.chunk.default``
/ ``aten.unbind.int`` / ``aten.tensor_split.*`` with ``getitem``. ``unsqueeze`` / ``squeeze`` of per-sample
axes are reshapes (:mod:`fxcurv.rules.reshape`).

One canonical op, ``index``, holds a typed description of the index: a tuple with one :class:`Span`
(``start:stop:step``) or :class:`Take` (an integer: the axis disappears) per per-sample axis of ``x``, and
:class:`NewAxis` entries (``None``) where the output gains an axis of size one; the batch axis is always
taken whole. Written ``S`` for the 0/1 selection matrix of one sample, ``z_n = S x_n``: every output entry
reads exactly one input entry and every input entry is read at most once (basic indexing never repeats an
entry), so (HBP Sec. D.2, the transpose of padding)

* ``J^T v = S^T v``: ``v`` scattered into zeros of the input's per-sample shape at the selected positions;
* HesScale eq. 8, ``(J o J)^T d = (S o S)^T d = S^T d``: ``S`` is binary, so the diagonal is scattered alike;
* no second-order term: ``z`` is linear in ``x`` (``d2 z / dx2 = 0``), so the op has no residual rule.

A second op, ``index_select``, takes one constant integer vector along a per-sample axis (``x[:, idx]``,
``x.index_select(d, idx)``, ATen ``aten.index_select.default`` / ``aten.index.Tensor``): ``S`` has one 1 per row,
and a column per repetition of an input row, so ``J^T v = S^T v`` adds the picked slices back (an index-add)
and, ``S`` being binary, the HesScale diagonal alike.

An index that touches the batch axis (``x[0]``, ``x[1:]``), a step that is not positive, a boolean index, an
index tensor computed from the input or several index tensors are left to the generic rule (``None``), which
refuses what mixes samples.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.fx as fx

from . import identity as identity_rules
from . import reshape as reshape_rules
from .bilinear import computed_from_input
from .registry import Match, define_op, example

_aten = torch.ops.aten


class Span(NamedTuple):
    """``start:stop:step`` of one per-sample axis, normalized against its size (``0 <= start``, ``step >= 1``,
    as ``slice.indices`` gives them). (A named tuple: torch.fx writes it into a program's code as its
    constructor call.)"""

    start: int
    stop: int
    step: int

    def torch_index(self) -> slice:
        return slice(self.start, self.stop, self.step)

    def __repr__(self) -> str:  # how program listings show it
        return f"{self.start}:{self.stop}" + (f":{self.step}" if self.step != 1 else "")


class Take(NamedTuple):
    """An integer index of one per-sample axis (``select``): the axis disappears; ``position >= 0``."""

    position: int

    def torch_index(self) -> int:
        return self.position

    def __repr__(self) -> str:
        return str(self.position)


class NewAxis(NamedTuple):
    """``None`` in an index: a new axis of size one in the output; reads no axis of ``x``."""

    def torch_index(self) -> None:
        return None

    def __repr__(self) -> str:
        return "None"


Entry = Span | Take | NewAxis


def _torch_index(index: Sequence[Entry]) -> tuple[Any, ...]:
    """The index of ``[..., *per-sample axes]`` that ``index`` stands for (``Ellipsis`` covers the batch and
    any leading message axes; every per-sample axis of ``x`` has its entry)."""
    return (Ellipsis,) + tuple(e.torch_index() for e in index)


def index(x, index, in_shape):
    return x[_torch_index(index)]


op = define_op("index", "slicing", index, inputs=("x",))


# ---- canonicalization ------------------------------------------------------------------------------

def _entries(x: Any, key: Any) -> Match | None:
    """``x[key]`` as an ``index`` match: ``key``'s first entry takes the batch axis whole (``:``), every
    other entry is a slice with a positive step, an integer, ``None`` or one ``Ellipsis``; ``None`` (the
    generic rule) for anything else."""
    val = example(x)
    if val is None or val.dim() == 0 or not computed_from_input(x):
        return None
    items = list(key) if isinstance(key, tuple) else [key]
    if any(isinstance(k, bool) for k in items) or sum(1 for k in items if k is Ellipsis) > 1:
        return None  # x[:, True] is a boolean mask; two Ellipses are an error torch reports
    reads = sum(1 for k in items if k is not None and k is not Ellipsis)
    fill = [slice(None)] * max(val.dim() - reads, 0)
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items[at: at + 1] = fill
    else:
        items += fill
    if not items or not isinstance(items[0], slice) or items[0] != slice(None):
        return None  # the batch axis indexed (x[0], x[1:]) or a new axis before it (x[None])
    rest = items[1:]
    shape = tuple(val.shape[1:])
    out: list[Entry] = []
    axis = 0
    for k in rest:
        if k is None:
            out.append(NewAxis())
            continue
        if axis >= len(shape):
            return None
        size = shape[axis]
        if isinstance(k, slice):
            if not all(v is None or isinstance(v, int) for v in (k.start, k.stop, k.step)):
                return None
            if k.step is not None and k.step <= 0:
                return None
            out.append(Span(*k.indices(size)))
        elif isinstance(k, int):
            if not -size <= k < size:
                return None  # torch raises; the generic rule reports it
            out.append(Take(k % size))
        else:
            return None  # a tensor, a list: advanced indexing
        axis += 1
    if axis != len(shape):
        return None
    return Match({"x": x}, {"index": tuple(out), "in_shape": shape})


def _along(x: Any, dim: Any, entry: Any) -> Match | None:
    """``entry`` (a slice or an integer) at axis ``dim`` of ``x``, every other axis whole; ``None`` where
    ``dim`` is the batch axis or not a known integer."""
    val = example(x)
    if val is None or not isinstance(dim, int) or val.dim() == 0:
        return None
    axis = dim % val.dim() if -val.dim() <= dim < val.dim() else None
    if axis is None or axis == 0:
        return None
    key = (slice(None),) * axis + (entry,)
    return _entries(x, key)


def _getitem(x: Any, key: Any) -> Match | None:
    """``x[key]``: basic indexing (:func:`_entries`), or one constant index vector at a per-sample axis with
    every other axis whole (``x[:, idx]``: :func:`_select_rows`)."""
    items = key if isinstance(key, tuple) else (key,)
    tensors = [i for i, k in enumerate(items) if example(k) is not None]
    if not tensors:
        return _entries(x, key)
    if len(tensors) != 1 or Ellipsis in items or None in items:
        return None
    at = tensors[0]
    if any(not isinstance(k, slice) or k != slice(None) for i, k in enumerate(items) if i != at):
        return None
    return _select_rows(x, at, items[at])


@op.function(operator.getitem)
def _from_getitem(node, a):
    return _getitem(a(0, "a"), a(1, "b"))


@op.method("__getitem__")
def _from_getitem_method(node, a):
    return _getitem(a(0, "self"), a(1, "key"))


def _narrow(x: Any, dim: Any, start: Any, length: Any) -> Match | None:
    if not (isinstance(start, int) and isinstance(length, int)):
        return None
    val = example(x)
    if val is None or not isinstance(dim, int) or not -val.dim() <= dim < val.dim():
        return None
    begin = start % val.shape[dim] if start < 0 else start
    return _along(x, dim, slice(begin, begin + length))


@op.function(torch.narrow)
def _from_narrow(node, a):
    return _narrow(a(0, "input"), a(1, "dim"), a(2, "start"), a(3, "length"))


@op.function(_aten.narrow.default)
def _from_aten_narrow(node, a):
    return _narrow(a(0, "self"), a(1, "dim"), a(2, "start"), a(3, "length"))


@op.method("narrow")
def _from_narrow_method(node, a):
    return _narrow(a(0, "self"), a(1, "dim"), a(2, "start"), a(3, "length"))


def _select(x: Any, dim: Any, position: Any) -> Match | None:
    return _along(x, dim, position) if isinstance(position, int) and not isinstance(position, bool) else None


@op.function(torch.select)
def _from_select(node, a):
    return _select(a(0, "input"), a(1, "dim"), a(2, "index"))


@op.function(_aten.select.int)
def _from_aten_select(node, a):
    return _select(a(0, "self"), a(1, "dim"), a(2, "index"))


@op.method("select")
def _from_select_method(node, a):
    return _select(a(0, "self"), a(1, "dim"), a(2, "index"))


@op.function(_aten.slice.Tensor)
def _from_aten_slice(node, a):
    """``aten.slice.Tensor(x, dim, start, end, step)`` (``end`` may be ``2**63 - 1``: to the end)."""
    x, dim = a(0, "self"), a(1, "dim", 0)
    start, end, step = a(2, "start", None), a(3, "end", None), a(4, "step", 1)
    if not all(v is None or isinstance(v, int) for v in (start, end, step)):
        return None
    val = example(x)
    whole = start in (None, 0) and step in (None, 1) and (end is None or (val is not None and end >= val.shape[0]))
    if dim == 0 and val is not None and whole:
        return Match({"x": x}, op=identity_rules.op)  # x[:] of the batch axis, as export writes ``x[:, 2:]``
    return _along(x, dim, slice(start, end, step))


# ---- a constant index vector along one per-sample axis (advanced indexing) -------------------------------

def _select_rows(x: Any, dim: Any, idx: Any) -> Match | None:
    """``x.index_select(dim, idx)`` as an ``index_select`` match: ``idx`` a one-dimensional integer tensor that
    is a constant (a buffer, a frozen or literal tensor; not computed from the input), ``dim`` a per-sample
    axis; ``None`` (the generic rule) otherwise."""
    val, ival = example(x), example(idx)
    if val is None or ival is None or not computed_from_input(x) or computed_from_input(idx):
        return None
    if isinstance(idx, fx.Node) and idx.op != "get_attr":
        return None  # computed in forward (from a parameter, a shape): the generic rule decides
    if ival.dim() != 1 or ival.dtype not in (torch.int64, torch.int32) or not isinstance(dim, int):
        return None
    if not -val.dim() <= dim < val.dim() or dim % val.dim() == 0:
        return None
    axis = dim % val.dim()
    return Match({"x": x, "idx": idx}, {"dim": axis - val.dim(), "in_size": int(val.shape[axis])},
                 op=select_rows)


def index_select(x, idx, dim, in_size):
    return x.index_select(dim % x.dim(), idx)


select_rows = define_op("index_select", "slicing", index_select, inputs=("x", "idx"), constants=("idx",))


@select_rows.function(torch.index_select, _aten.index_select.default)
def _from_index_select(node, a):
    return _select_rows(a(0, "input" if node.target is torch.index_select else "self"), a(1, "dim"),
                        a(2, "index"))


@select_rows.method("index_select")
def _from_index_select_method(node, a):
    return _select_rows(a(0, "self"), a(1, "dim"), a(2, "index"))


@select_rows.function(_aten.index.Tensor)
def _from_aten_index(node, a):
    """``aten.index.Tensor(x, [None, ..., idx])``: export's ``x[:, idx]``."""
    indices = a(1, "indices")
    if not isinstance(indices, (tuple, list)) or not indices or indices[-1] is None:
        return None
    if any(i is not None for i in indices[:-1]):
        return None
    return _select_rows(a(0, "self"), len(indices) - 1, indices[-1])


def _scatter_rows(v: torch.Tensor, idx: torch.Tensor, dim: int, in_size: int) -> torch.Tensor:
    """``S^T v`` for ``z = x.index_select(dim, idx)``: the slices of ``v [*lead, N, *z]`` along ``dim``
    (negative) added into zeros at rows ``idx`` (a row picked twice receives both)."""
    shape = list(v.shape)
    shape[dim] = in_size
    return v.new_zeros(shape).index_add_(dim % v.dim(), idx, v)


@select_rows.jac_t("x", fresh=True)
def index_select_jac_t(v, idx, dim, in_size):
    """HBP Sec. D.2 for the selection ``S`` (one 1 per row, columns repeated where ``idx`` repeats):
    ``J^T v = S^T v``, an index-add."""
    return _scatter_rows(v, idx, dim, in_size)


@select_rows.diag("x", fresh=True)
def index_select_diag(d, idx, dim, in_size):
    """HesScale eq. 8: ``S`` is binary, so ``(S o S)^T d = S^T d`` (a row picked twice receives both
    diagonals)."""
    return _scatter_rows(d, idx, dim, in_size)


# ---- unsqueeze / squeeze: reshapes of the per-sample axes -------------------------------------------

def _as_reshape(node: Any, x: Any, dims: Sequence[int] | None) -> Match | None:
    """``unsqueeze`` / ``squeeze`` at ``dims`` (axes of the output / input; ``None``: every axis of size one)
    as a ``reshape`` match, where none of them is the batch axis; ``None`` otherwise."""
    val, out = example(x), example(node)
    if val is None or out is None or not computed_from_input(x) or out.dim() == 0:
        return None
    if dims is None:
        if val.shape[0] == 1:
            return None  # squeeze() would drop the batch axis of a batch of one
    else:
        ndim = out.dim() if out.dim() > val.dim() else val.dim()
        if not all(isinstance(d, int) and -ndim <= d < ndim for d in dims) or any(d % ndim == 0 for d in dims):
            return None
    if out.shape[0] != val.shape[0]:
        return None
    match = reshape_rules._canonical(node, x)
    return Match(match.inputs, match.attrs, op=reshape_rules.op)


def _dims(dim: Any) -> tuple[int, ...] | None:
    if dim is None:
        return None
    return tuple(dim) if isinstance(dim, (tuple, list)) else (dim,)


@op.function(torch.unsqueeze, _aten.unsqueeze.default)
def _from_unsqueeze(node, a):
    return _as_reshape(node, a(0, "input" if node.target is torch.unsqueeze else "self"), _dims(a(1, "dim")))


@op.method("unsqueeze")
def _from_unsqueeze_method(node, a):
    return _as_reshape(node, a(0, "self"), _dims(a(1, "dim")))


@op.function(torch.squeeze, _aten.squeeze.dim, _aten.squeeze.dims)
def _from_squeeze(node, a):
    return _as_reshape(node, a(0, "input" if node.target is torch.squeeze else "self"), _dims(a(1, "dim", None)))


@op.method("squeeze")
def _from_squeeze_method(node, a):
    return _as_reshape(node, a(0, "self"), _dims(a(1, "dim", None)))


# ---- the outputs of chunk / split / unbind / tensor_split, one pick at a time ------------------------

def _bounds(size: int, sections: Any) -> list[tuple[int, int]] | None:
    """``[(start, stop), ...]`` of the parts ``tensor_split`` makes of an axis of ``size``: ``sections`` an
    integer (that many parts, the first ``size % sections`` one longer) or the split indices."""
    if isinstance(sections, int) and not isinstance(sections, bool):
        if sections < 1:
            return None
        q, r = divmod(size, sections)
        edges = [i * q + min(i, r) for i in range(sections + 1)]
    elif isinstance(sections, (tuple, list)) and all(isinstance(i, int) for i in sections):
        edges = [0] + [min(max(i % size if i < 0 else i, 0), size) for i in sections] + [size]
    else:
        return None
    return [(edges[i], max(edges[i], edges[i + 1])) for i in range(len(edges) - 1)]


def _split_bounds(size: int, split: Any) -> list[tuple[int, int]] | None:
    """The parts ``torch.split`` makes: ``split`` a part size (the last part shorter) or the part sizes."""
    if isinstance(split, int) and not isinstance(split, bool):
        if split < 1:
            return None
        return [(s, min(s + split, size)) for s in range(0, size, split)] or [(0, 0)]
    if isinstance(split, (tuple, list)) and all(isinstance(i, int) for i in split) and sum(split) == size:
        edges = [sum(split[:i]) for i in range(len(split) + 1)]
        return [(edges[i], edges[i + 1]) for i in range(len(split))]
    return None


def _chunk_bounds(size: int, chunks: Any) -> list[tuple[int, int]] | None:
    """The parts ``torch.chunk`` makes: parts of ``ceil(size / chunks)``, the last shorter (maybe fewer)."""
    if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1:
        return None
    return _split_bounds(size, -(-size // chunks) if size else 1)


def _part(x: Any, dim: Any, bounds: list[tuple[int, int]] | None, pick: int) -> Match | None:
    val = example(x)
    if bounds is None or val is None or not -len(bounds) <= pick < len(bounds):
        return None
    start, stop = bounds[pick]
    return _along(x, dim, slice(start, stop))


def _axis_size(x: Any, dim: Any) -> int | None:
    val = example(x)
    if val is None or not isinstance(dim, int) or not -val.dim() <= dim < val.dim():
        return None
    return int(val.shape[dim])


def _split(x: Any, split: Any, dim: Any, pick: int, how: Any) -> Match | None:
    size = _axis_size(x, dim)
    return None if size is None else _part(x, dim, how(size, split), pick)


@op.output_function(torch.split, _aten.split.Tensor, _aten.split_with_sizes.default)
def _pick_split(node, a, pick):
    x = a(0, "tensor" if node.target is torch.split else "self")
    name = {torch.split: "split_size_or_sections", _aten.split.Tensor: "split_size"}.get(node.target, "split_sizes")
    return _split(x, a(1, name), a(2, "dim", 0), pick, _split_bounds)


@op.output_method("split", "split_with_sizes")
def _pick_split_method(node, a, pick):
    name = "split_size" if node.target == "split" else "split_sizes"
    return _split(a(0, "self"), a(1, name), a(2, "dim", 0), pick, _split_bounds)


@op.output_function(torch.chunk, _aten.chunk.default)
def _pick_chunk(node, a, pick):
    return _split(a(0, "input" if node.target is torch.chunk else "self"), a(1, "chunks"), a(2, "dim", 0), pick,
                  _chunk_bounds)


@op.output_method("chunk")
def _pick_chunk_method(node, a, pick):
    return _split(a(0, "self"), a(1, "chunks"), a(2, "dim", 0), pick, _chunk_bounds)


@op.output_function(torch.tensor_split, _aten.tensor_split.sections, _aten.tensor_split.indices)
def _pick_tensor_split(node, a, pick):
    x = a(0, "input" if node.target is torch.tensor_split else "self")
    sections = a(1, "indices_or_sections" if node.target is torch.tensor_split else
                 "sections" if node.target is _aten.tensor_split.sections else "indices")
    return _split(x, sections, a(2, "dim", 0), pick, _bounds)


@op.output_method("tensor_split")
def _pick_tensor_split_method(node, a, pick):
    return _split(a(0, "self"), a(1, "indices_or_sections"), a(2, "dim", 0), pick, _bounds)


@op.output_function(torch.unbind, _aten.unbind.int)
def _pick_unbind(node, a, pick):
    return _select(a(0, "input" if node.target is torch.unbind else "self"), a(1, "dim", 0), pick)


@op.output_method("unbind")
def _pick_unbind_method(node, a, pick):
    return _select(a(0, "self"), a(1, "dim", 0), pick)


# ---- rules -----------------------------------------------------------------------------------------

def _scatter(v: torch.Tensor, index: tuple[Entry, ...], in_shape: tuple[int, ...]) -> torch.Tensor:
    """``S^T v``: ``v [*lead, N, *z]`` written into zeros ``[*lead, N, *in_shape]`` at the selected entries."""
    lead = v.dim() - (len(index) - sum(isinstance(e, Take) for e in index))
    out = v.new_zeros(tuple(v.shape[:lead]) + tuple(in_shape))
    out[_torch_index(index)] = v
    return out


@op.jac_t("x", fresh=True)
def index_jac_t(v, index, in_shape):
    """HBP Sec. D.2 (an index selection ``S``): ``J^T v = S^T v``, scattered into zeros."""
    return _scatter(v, index, in_shape)


@op.diag("x", fresh=True)
def index_diag(d, index, in_shape):
    """HesScale eq. 8 with a binary ``S`` that reads each entry at most once: ``(S o S)^T d = S^T d``."""
    return _scatter(d, index, in_shape)
