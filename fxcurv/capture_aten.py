"""The operator-level front end: the model captured as ATen ops by ``torch.export`` (``capture="aten"``).

:func:`capture` exports the model on an example input with a symbolic batch size (``Dim("batch")`` on
dim 0) and returns the ``.module()`` graph in ATen *training IR* (``aten.linear.default``,
``aten.conv2d.default``, ``aten.view.default``, ``aten.sym_size.int``, ...): module forwards with Python
logic on shapes, ``nn.MultiheadAttention`` and tensor methods all arrive as ops of one vocabulary, whose
parameters are the model's own ``nn.Parameter`` objects (``get_attr`` nodes).

**Sample structure** (issue 9, item 2). The symbolic batch size ``s`` in every node's fake value says
where the batch is. A value's :class:`Layout` is ``LEADING`` where its dim 0 is ``s`` and no other dim
involves ``s`` (``[s, T, d]``), ``MOVED`` where the batch left dim 0 or is folded with other axes
(``[T, s, d]``, ``[s*H, T, hd]``) -- or where a value computed from the input has no batch at all (a
reduction over the batch) -- and ``NONE`` for values without the batch (parameters and what is computed
from them alone). Each maximal connected run of ``MOVED`` nodes, with the nodes where the batch is back
at dim 0 (its exits), becomes ONE call of a small :class:`Region` graph: the compiler sees a single
op that maps batches ``[N, ...]`` to batches ``[N, ...]``, which the generic rule proves per sample
(:func:`~fxcurv.rules.generic.check_samples_independent`) and differentiates exactly. Batch sizes the
region computes on (``view(x, [s*H, T, hd])``) are recomputed inside it from its inputs, so the region
is correct on any batch, also on the batch of one sample the generic rule runs it on. A multi-head
attention on ``[T, N, E]`` is one region; a batch-first attention written with ``q @ k.transpose(-2, -1)``
on ``[N, H, T, d]`` stays op by op.

Errors of the capture -- data-dependent control flow, a batch size the forward fixes, train-mode batch
normalization -- are :class:`~fxcurv.errors.TraceError` / :class:`~fxcurv.errors.UnsupportedOpError`
naming the user's file and line.
"""

from __future__ import annotations

import functools
import logging
import operator
import os
import sysconfig
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch._dynamo.exc import Unsupported, UserError
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from .errors import TraceError, UnsupportedOpError
from .trace import UNKNOWN_LOCATION, frame_text, user_frame, user_location

# The meta key of a node's :class:`Layout` (and of a SymInt's :class:`SymLayout`), set by :func:`capture`.
LAYOUT = "fxcurv_layout"
_TORCH_DIR = os.path.dirname(torch.__file__)
_FXCURV_DIR = os.path.dirname(os.path.abspath(__file__))
_aten = torch.ops.aten
# Nodes of an exported graph that check shapes at run time and compute nothing.
_ASSERTIONS = frozenset({
    _aten._assert_scalar.default, _aten._assert_tensor_metadata.default,
    _aten.sym_constrain_range_for_size.default, _aten.sym_constrain_range.default,
})
# Shape queries of the exported graph (folded into constants per input signature).
SHAPE_QUERIES = frozenset({_aten.sym_size.int, _aten.sym_numel.default, _aten.sym_stride.int})
_BATCH_NORMS = frozenset({_aten.batch_norm.default, _aten._native_batch_norm_legit_functional.default,
                          _aten._native_batch_norm_legit.default, _aten.native_batch_norm.default,
                          _aten.cudnn_batch_norm.default, _aten._batch_norm_with_update.default})
# Integer arithmetic on batch sizes that a region recomputes from its inputs.
_INT_OPS = frozenset({operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod, operator.neg,
                      torch.sym_int, torch.sym_max, torch.sym_min})


class Layout(Enum):
    """Where a tensor value holds the batch."""

    LEADING = "leading"  # dim 0 is the batch, alone
    MOVED = "moved"  # the batch is elsewhere, folded with other axes, or reduced away
    NONE = "none"  # no batch: parameters, constants and what is computed from them alone


class SymLayout(Enum):
    """What an integer value is in terms of the batch size ``s``."""

    STATIC = "static"  # a number
    BATCH = "batch"  # ``s`` itself
    DERIVED = "derived"  # an expression in ``s`` (``2 * s``)


@dataclass(frozen=True)
class _Batch:
    """The batch symbol of one export."""

    symbol: Any

    def of_int(self, v: Any) -> SymLayout:
        if not isinstance(v, torch.SymInt):
            return SymLayout.STATIC
        expr = v.node.expr
        if expr == self.symbol:
            return SymLayout.BATCH
        return SymLayout.DERIVED if self.symbol in expr.free_symbols else SymLayout.STATIC

    def of_tensor(self, v: torch.Tensor, from_input: bool) -> Layout:
        kinds = [self.of_int(d) for d in v.shape]
        if kinds and kinds[0] is SymLayout.BATCH and all(k is SymLayout.STATIC for k in kinds[1:]):
            return Layout.LEADING
        if any(k is not SymLayout.STATIC for k in kinds) or from_input:
            return Layout.MOVED
        return Layout.NONE


class _GuardSites(logging.Handler):
    """Records, for every shape guard export adds (``[guard added]``, ``set_replacement``), the user's
    frame it was added from: the innermost frame outside torch, fxcurv and the standard library."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.sites: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "[guard added]" not in message and not message.startswith("set_replacement"):
            return
        skip = (_TORCH_DIR, _FXCURV_DIR, sysconfig.get_paths()["stdlib"])
        frames = [f for f in traceback.extract_stack() if not f.filename.startswith(skip)]
        if frames:
            self.sites.append((message, frame_text(frames[-1])))


def _where_batch_is_fixed(model: nn.Module, example: torch.Tensor, batch: Any) -> str:
    """Where the forward fixes the batch size (a constraint violation of export names no frame of the
    user's): export once more, recording the user's frame of every shape guard, and take the one that
    replaced the batch symbol by a number (else the last guard)."""
    logger = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    recorder = _GuardSites()
    level, propagate = logger.level, logger.propagate
    logger.addHandler(recorder)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # recorded, not printed
    try:
        torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    except UserError:
        pass  # the failure being located
    finally:
        logger.removeHandler(recorder)
        logger.setLevel(level)
        logger.propagate = propagate
    pinned = [site for message, site in recorder.sites if message.startswith("set_replacement")]
    sites = pinned or [site for _, site in recorder.sites]
    return sites[-1] if sites else UNKNOWN_LOCATION


def _export(model: nn.Module, x: torch.Tensor) -> Any:
    """``torch.export.export`` with the batch size symbolic; export failures become TraceError."""
    batch = torch.export.Dim("batch", min=1)
    # An example batch of one would specialize the batch size to 1: export on two copies of it.
    example = torch.cat([x, x]) if x.shape[0] == 1 else x
    try:
        return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    except GuardOnDataDependentSymNode as err:
        raise TraceError(
            f"cannot capture the model with torch.export at {user_frame(err)}: Python control flow on tensor "
            "values (if/while on x.sum() > 0, .item(), .tolist()) cannot be captured: the branch taken "
            "depends on the data. Rewrite it with tensor ops (torch.where) or use capture='fx'.") from err
    except UserError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        violations = [line[2:].split(" If you're")[0] for line in lines if line.startswith("- ")]
        detail = " ".join(violations) if violations else lines[0]
        where = user_frame(err)
        if where == UNKNOWN_LOCATION:
            where = _where_batch_is_fixed(model, example, batch)
        raise TraceError(
            f"cannot capture the model with torch.export at {where}: {detail} fxcurv exports with "
            "the batch size (dim 0 of x) symbolic; a forward that fixes it (view(8, -1)) or branches on "
            "tensor values cannot be captured.") from err
    except Unsupported as err:
        raise TraceError(f"cannot capture the model with torch.export at {user_frame(err)}: "
                         f"{str(err).splitlines()[0]}") from err


def location(node: fx.Node) -> str:
    """`` at file:line ...`` of the user's code that produced ``node`` (:func:`~fxcurv.trace.user_location`),
    else `` in module <path> (<type>)``: the innermost module whose forward produced it (export's
    ``nn_module_stack``), or ``""``."""
    found = user_location(node)
    stack = node.meta.get("nn_module_stack") or {}
    if found or not stack:
        return found
    path, kind = list(stack.values())[-1]
    return f" in module {path or '(the model)'} ({str(kind).rsplit('.', 1)[-1]})"


def _refuse_batch_norm_training(node: fx.Node) -> None:
    """Batch normalization in training mode (its ``training`` argument, 6th of every ATen spelling that
    has one; ``_batch_norm_with_update`` always trains) is refused by name."""
    if node.target not in _BATCH_NORMS:
        return
    flag = node.args[5] if len(node.args) > 5 else None
    if not isinstance(flag, bool) or flag:
        raise UnsupportedOpError(
            f"node '{node.name}' ({node.target}){location(node)}: batch normalization in training mode "
            "normalizes with the statistics of the batch, which couples the samples; call model.eval() before "
            "compiling (batch normalization then uses its running statistics)")


def capture(model: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    """The model's forward on inputs like ``x`` (any batch size) as an ATen graph, with the batch
    :class:`Layout` of every node in ``node.meta[LAYOUT]`` and every region of moved batches one call of
    a :class:`Region`."""
    ep = _export(model, x)
    if not ep.call_spec.out_spec.is_leaf():
        raise TraceError("the model must return a single tensor (the model output fed to the loss)")
    exported = ep.module()
    graph = exported.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":  # export's input checks
            graph.erase_node(node)
        elif node.op == "call_function" and node.target in _ASSERTIONS:
            graph.erase_node(node)
    out = graph.output_node()
    flat = out.args[0]
    if isinstance(flat, (tuple, list)):
        out.args = (flat[0],)
    # A plain forward(x) -> tensor (no pytree flattening, no input-checking hooks), on the model's own
    # parameter and buffer objects.
    graph._codegen = fx.graph.CodeGen()
    gm = fx.GraphModule(exported, graph, type(model).__name__)
    graph.eliminate_dead_code()
    for node in graph.nodes:
        if node.op == "call_function":
            _refuse_batch_norm_training(node)
    _mark_layouts(graph)
    _group_regions(gm)
    graph.lint()
    gm.recompile()
    return gm


def _mark_layouts(graph: fx.Graph) -> None:
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1 or not isinstance(placeholders[0].meta.get("val"), torch.Tensor):
        names = ", ".join(n.name for n in placeholders)
        raise TraceError(f"the model's forward takes {len(placeholders)} inputs ({names}); fxcurv supports "
                         "models with one input tensor x, forward(x)")
    x = placeholders[0]
    size = x.meta["val"].shape[0]
    assert isinstance(size, torch.SymInt), "export kept the batch size symbolic"
    batch = _Batch(size.node.expr)
    from_input: set[fx.Node] = {x}
    for node in graph.nodes:
        if any(a in from_input for a in node.all_input_nodes):
            from_input.add(node)
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            node.meta[LAYOUT] = batch.of_tensor(val, node in from_input and node.op != "placeholder")
            if node is x:
                node.meta[LAYOUT] = Layout.LEADING
        elif isinstance(val, (int, torch.SymInt)) and not isinstance(val, bool):
            node.meta[LAYOUT] = batch.of_int(val)


def layout(node: Any) -> Layout | SymLayout | None:
    """The :class:`Layout` (a tensor) or :class:`SymLayout` (an integer) :func:`capture` found for a node
    of the captured graph; ``None`` for other values and for nodes of other graphs."""
    return node.meta.get(LAYOUT) if isinstance(node, fx.Node) else None


# ---- regions ----------------------------------------------------------------------------------------

class Region:
    """A connected part of the model where the batch is not alone at dim 0, as one call: ``region(*inputs)``
    runs its graph (ATen ops) on the tensors it reads and returns the values its users read, each with
    the batch back at dim 0 (one tensor, or a tuple of several)."""

    def __init__(self, gm: fx.GraphModule, name: str, ops: tuple[str, ...]):
        self.gm = gm
        self.__name__ = name
        self.ops = ops

    def __call__(self, *inputs: torch.Tensor) -> Any:
        return self.gm(*inputs)

    def __repr__(self) -> str:
        return f"Region({self.__name__})"


def _in_region(node: fx.Node) -> bool:
    """A node that belongs to a region: its value has the batch moved, or it computes on a batch size
    folded with other axes."""
    if node.op != "call_function" or node.target in SHAPE_QUERIES or node.target in _INT_OPS:
        return False
    if layout(node) is Layout.MOVED:
        return True
    derived = []
    fx.map_arg((node.args, node.kwargs), lambda a: derived.append(layout(a) is SymLayout.DERIVED))
    return any(derived)


class _Sets:
    """Union-find over nodes."""

    def __init__(self) -> None:
        self.parent: dict[fx.Node, fx.Node] = {}

    def find(self, n: fx.Node) -> fx.Node:
        self.parent.setdefault(n, n)
        while self.parent[n] is not n:
            self.parent[n] = self.parent[self.parent[n]]
            n = self.parent[n]
        return n

    def union(self, a: fx.Node, b: fx.Node) -> None:
        self.parent[self.find(a)] = self.find(b)


def _regions(graph: fx.Graph) -> list[list[fx.Node]]:
    """The regions, each a convex set of nodes in graph order: the moved nodes connected through their
    uses, the nodes that read them (where the batch comes back to dim 0: the exits), and every node on a
    path between two nodes of a region."""
    sets = _Sets()
    moved = {n for n in graph.nodes if _in_region(n)}
    members: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op != "call_function" or node.target in SHAPE_QUERIES or node.target in _INT_OPS:
            continue
        read = [a for a in node.all_input_nodes if a in moved]
        if node in moved or read:
            members.add(node)
            if not isinstance(node.meta.get("val"), torch.Tensor):
                moved.add(node)  # several outputs (unbind, chunk): their picks join the region too
            sets.find(node)
            for a in read:
                sets.union(node, a)
    while True:
        groups: dict[fx.Node, list[fx.Node]] = {}
        for node in graph.nodes:
            if node in members:
                groups.setdefault(sets.find(node), []).append(node)
        grown = False
        for nodes in groups.values():
            for extra in _downstream(nodes, feeding_only=True):
                members.add(extra)
                sets.union(extra, nodes[0])
                grown = True
        if not grown:
            return list(groups.values())


def _downstream(nodes: list[fx.Node], feeding_only: bool = False) -> list[fx.Node]:
    """Nodes outside ``nodes``, between its first and last node, that read a value of ``nodes`` (directly
    or not); with ``feeding_only`` those of them that also feed ``nodes`` (which must join them)."""
    inside = set(nodes)
    order: list[fx.Node] = []
    node = nodes[0]
    while node is not nodes[-1]:
        node = node.next
        order.append(node)
    downstream: set[fx.Node] = set()
    for n in order:
        if n not in inside and any(a in inside or a in downstream for a in n.all_input_nodes):
            downstream.add(n)
    if not feeding_only:
        return [n for n in order if n in downstream]
    feeding: set[fx.Node] = set()
    for n in reversed(order):
        if n in downstream and any(u in inside or u in feeding for u in n.users):
            feeding.add(n)
    return [n for n in order if n in feeding]


_RESHAPES = frozenset({_aten.view.default, _aten.reshape.default, _aten._unsafe_view.default})


def _group_regions(gm: fx.GraphModule) -> None:
    graph = gm.graph
    index = 0
    for nodes in _regions(graph):
        if not _linear_on_folded_batch(graph, nodes):
            _replace_region(gm, nodes, index)
            index += 1


def _linear_on_folded_batch(graph: fx.Graph, nodes: list[fx.Node]) -> bool:
    """A region that is exactly ``reshape(x [N, *mid, d] -> [N*M, d])``, ``linear``, ``reshape(-> [N, *mid,
    k])`` -- a linear layer on a sequence written with the batch folded into the tokens -- becomes the
    hand-written linear op on ``x``: ``linear(x) [N, *mid, k]`` is the same function (the linear map acts
    on the last axis of every token alike), and the op takes extra per-sample axes."""
    tensors = [n for n in nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    if len(tensors) != len(nodes) or len(nodes) != 3:
        return False
    fold, lin, unfold = nodes
    if fold.target not in _RESHAPES or lin.target is not _aten.linear.default or unfold.target not in _RESHAPES:
        return False
    if lin.args[0] is not fold or unfold.args[0] is not lin or len(fold.users) != 1 or len(lin.users) != 1:
        return False
    x = fold.args[0]
    if not isinstance(x, fx.Node) or layout(x) is not Layout.LEADING or layout(unfold) is not Layout.LEADING:
        return False
    x_shape, out_shape = tuple(x.meta["val"].shape), tuple(unfold.meta["val"].shape)
    folded = tuple(fold.meta["val"].shape)
    if len(folded) != 2 or x_shape[-1] != folded[-1] or x_shape[:-1] != out_shape[:-1]:
        return False  # not [N, *mid, d] -> [N*M, d] -> [N, *mid, k]
    with graph.inserting_after(unfold):
        new = graph.call_function(_aten.linear.default, (x,) + tuple(lin.args[1:]), dict(lin.kwargs))
    new.meta.update(lin.meta)
    new.meta["val"], new.meta[LAYOUT] = unfold.meta["val"], Layout.LEADING
    unfold.replace_all_uses_with(new)
    for node in reversed(nodes):
        graph.erase_node(node)
    return True


def _replace_region(gm: fx.GraphModule, nodes: list[fx.Node], index: int) -> None:
    graph = gm.graph
    inside = set(nodes)
    sub = fx.Graph()
    env: dict[fx.Node, Any] = {}
    inputs: list[fx.Node] = []
    for node in nodes:
        for a in node.all_input_nodes:
            if a not in inside and a not in inputs and isinstance(a.meta.get("val"), torch.Tensor):
                inputs.append(a)
    where = f"the region of '{nodes[0].name}' ... '{nodes[-1].name}'{location(nodes[0])}"
    leading = [a for a in inputs if layout(a) is Layout.LEADING]
    if not leading:
        raise UnsupportedOpError(f"{where} reads no value with the batch at dim 0; fxcurv cannot tell its samples")
    for a in inputs:
        env[a] = sub.placeholder(a.name)
        env[a].meta = dict(a.meta)
    batch_size = sub.call_function(_aten.sym_size.int, (env[leading[0]], 0))

    def integer(a: fx.Node) -> Any:
        """An integer the region reads from outside, recomputed from its inputs."""
        if a in env:
            return env[a]
        kind = layout(a)
        val = a.meta.get("val")
        if kind is SymLayout.STATIC and isinstance(val, (int, torch.SymInt)):
            env[a] = int(val)
        elif a.op == "call_function" and a.target in SHAPE_QUERIES and a.args[0] in env:
            env[a] = sub.call_function(a.target, tuple(fx.map_arg(a.args, arg)), {})
        elif kind is SymLayout.BATCH:
            env[a] = batch_size
        elif a.op == "call_function" and a.target in _INT_OPS:
            env[a] = sub.call_function(a.target, tuple(fx.map_arg(a.args, integer)), {})
        else:
            raise UnsupportedOpError(f"{where} computes on the size {val} of node '{a.name}', which fxcurv "
                                     "cannot recompute per sample")
        return env[a]

    def arg(a: fx.Node) -> Any:
        return env[a] if a in env else integer(a)

    exits: list[fx.Node] = []
    for node in nodes:
        env[node] = sub.node_copy(node, arg)
        if any(u not in inside for u in node.users):
            exits.append(node)
    for e in exits:
        if layout(e) is not Layout.LEADING:
            raise UnsupportedOpError(
                f"{where}: node '{e.name}'{location(e)} is read outside the region but its value "
                f"{_shape(e)} does not hold the batch alone at dim 0")
    sub.output(env[exits[0]] if len(exits) == 1 else tuple(env[e] for e in exits))
    region_gm = fx.GraphModule(gm, sub, f"region_{index}")
    ops = tuple(dict.fromkeys(_op_name(n.target) for n in nodes))
    region = Region(region_gm, f"region_{index}[{', '.join(ops)}]", ops)
    later = _downstream(nodes)  # read the region's values, placed before its last node: moved after it
    with graph.inserting_after(nodes[-1]):
        call = graph.call_function(region, tuple(inputs))
    anchor = call
    call.meta["stack_trace"] = _first_user_trace(nodes)
    call.meta[LAYOUT] = Layout.LEADING
    if len(exits) == 1:
        call.meta["val"] = exits[0].meta.get("val")
        exits[0].replace_all_uses_with(call, delete_user_cb=functools.partial(_outside, inside))
    else:
        call.meta["val"] = tuple(e.meta.get("val") for e in exits)
        for i, e in enumerate(exits):
            with graph.inserting_after(anchor):
                pick = graph.call_function(operator.getitem, (call, i))
            anchor = pick
            pick.meta.update(val=e.meta.get("val"), stack_trace=e.meta.get("stack_trace"))
            pick.meta[LAYOUT] = Layout.LEADING
            e.replace_all_uses_with(pick, delete_user_cb=functools.partial(_outside, inside | {pick}))
    for n in later:
        anchor.append(n)
        anchor = n
    for node in reversed(nodes):
        graph.erase_node(node)


def _outside(inside: set[fx.Node], user: fx.Node) -> bool:
    return user not in inside


def _op_name(target: Any) -> str:
    """``linear`` for ``aten.linear.default``, ``getitem`` for ``operator.getitem``."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target).removeprefix("aten.").split(".")[0]
    return getattr(target, "__name__", str(target))


def _shape(node: fx.Node) -> Any:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else type(val).__name__


def _first_user_trace(nodes: Iterable[fx.Node]) -> str | None:
    """The stack trace of the first node traced from the user's code (the region's location)."""
    for n in nodes:
        if user_location(n):
            return n.meta.get("stack_trace")
    return None
