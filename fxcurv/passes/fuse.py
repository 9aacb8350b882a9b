"""Fusion: regions of the curvature program replaced by fused nodes that run kernels.

Three kinds of region, found with networkx on the program's dataflow graph:

1. **Pointwise regions** -- connected sets of elementwise rules (``phi'(x)``, ``v * phi'(x)``,
   ``phi''(x) g``, HesScale's ``d phi'(x)^2 + r``, message sums) whose intermediate values are read only
   inside the region. One generated kernel computes the region's outputs; a derivative of a smaller
   shape used only inside the region (``phi'(x) [N, D]`` against a bundle ``[K, N, D]``) is recomputed
   inline instead of materialized.
2. **Matmul epilogues** -- a pointwise region fed by a ``message @ weight`` product that nothing else
   reads becomes that product with the region as its epilogue: the activation+linear composite of
   HBP B.4 / Botev eq. 29, ``(W^T [g; S]) * phi'(x)``, and HesScale's ``((W o W)^T d) phi'(x)^2 + r``.
3. **Parameter reductions** -- rules that declare a :class:`~fxcurv.targets.Reduction` over their op's
   ``[N, I]`` input, such as a linear layer's gradient ``g^T x``, GGN diagonal ``(sum_k S_k^2)^T x^2``
   and HesScale's ``d^T x^2`` (and its bias's sums), read the same ``x``: one fused node squares the
   factor columns once and runs the products together.
4. **Per-sample reductions** -- rules that declare a :class:`~fxcurv.targets.SampleReduction` of their
   op's per-sample parameter products of one message, such as a convolution's gradient, its
   ``sum_n (J_n^T g_n)^2`` and its ``|J_n^T g_n|^2``: one fused node forms the products once.

What may be fused is what the rules declare (:class:`~fxcurv.targets.Fusion`), never a name. Fused
nodes record the labels of the rules they replaced (``NodeInfo.contains``), so ``print(engine.graph)``
shows what each contains. The pass reads the value shapes that ``record_shapes`` put on every node.
"""

from __future__ import annotations

import heapq
import inspect
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
import torch.fx as fx

from .. import kernels
from ..curvature.emit import item
from ..kernels.runtime import is_suffix
from ..node_info import Kind, copy_info, info, set_info
from ..targets import LabeledTarget, Left, Reduction, SampleReduction, TargetInfo, target, target_info

# ---- analysis ---------------------------------------------------------------------------------------

def _shape(node: Any) -> tuple[int, ...] | None:
    if isinstance(node, fx.Node):
        return info(node).shape
    return ()  # Python scalars broadcast everywhere


def _tensor_inputs(node: fx.Node) -> list:
    return [a for a in node.all_input_nodes if a.op != "get_attr"]


def is_pointwise(node: fx.Node) -> bool:
    record = info(node)
    return (node.op == "call_function" and target_info(node.target).fusion.pointwise
            and record.shape is not None and (record.dtype or torch.float32).is_floating_point)


def dataflow(graph: fx.Graph) -> nx.DiGraph:
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node)
        for a in node.all_input_nodes:
            g.add_edge(a, node)
    return g


def pointwise_regions(graph: fx.Graph) -> list[dict]:
    """Maximal fusible pointwise regions: ``{"nodes", "shape", "outputs", "inputs", "prologue"}`` each.

    A region's iteration space is its largest output shape. A member of another shape must be read
    only inside the region (it is then recomputed inline), and every tensor a member reads from
    outside must broadcast against the iteration space by trailing alignment. Members that break a
    rule leave the region and are clustered anew, so a component mixing a bundle ``[K, N, D]`` with
    HesScale's ``[N, D]`` diagonals yields one region per iteration space.

    Replacing a region by one node must leave the program acyclic *together with every region
    accepted before it*: two regions can each be acyclic alone and still feed each other (a bundle
    region reads ``phi'(x)`` from a HesScale region that reads ``g`` from the bundle region). So
    regions are accepted one at a time, in program order, and each is checked against the dataflow
    graph in which the regions accepted so far -- with the matmul prologue each will absorb -- are
    already contracted.

    Deterministic: components, members, ties between shapes of equal size and the node dropped to
    break a cycle are all taken in program order, never in the iteration order of a set of nodes
    (whose hashes are object ids).
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    dfg = dataflow(graph)
    contracted = dfg.copy()  # accepted regions contracted to one node each

    def in_order(nodes: Iterable[fx.Node]) -> list[fx.Node]:
        return sorted(nodes, key=order.__getitem__)

    def components(nodes: Iterable[fx.Node]) -> list[list[fx.Node]]:
        return [in_order(c) for c in nx.weakly_connected_components(dfg.subgraph(nodes))]

    candidates = [n for n in graph.nodes if is_pointwise(n)]
    # A heap keyed by each part's first position: parts are taken in program order.
    pending = [(order[c[0]], c) for c in components(candidates)]
    heapq.heapify(pending)
    regions: list[dict] = []
    while pending:
        _, members_list = heapq.heappop(pending)
        members = set(members_list)
        # The largest shape; among equally large ones the one of highest rank (``[N, D]`` broadcasts
        # against ``[1, N, D]``, not the reverse), then the first in program order.
        shape: tuple[int, ...] = max((_shape(n) or () for n in members_list), key=lambda s: (math.prod(s), len(s)))
        drop: set[fx.Node] = set()
        for n in members_list:
            if _shape(n) != shape and not all(u in members for u in n.users):
                drop.add(n)
            elif any(a not in members and not _broadcasts(a, shape) for a in _tensor_inputs(n)):
                drop.add(n)
        if not drop:
            region = _region(members_list, shape)
            merged = members | ({region["prologue"]} if region["prologue"] is not None else set())
            if not _acyclic_after_contraction(merged, contracted):
                # Drop the member with the most ancestors (the first in program order among equals).
                drop = {max(members_list, key=lambda n: len(nx.ancestors(dfg, n)))}
        if drop:
            if drop == members:
                if len(members_list) == 1:
                    continue  # fusible with nothing, not even alone
                parts = [[n] for n in members_list]  # progress: every part is smaller
            else:
                parts = components(members - drop) + components(drop)
            for c in parts:
                heapq.heappush(pending, (order[c[0]], c))
            continue
        _contract(contracted, in_order(merged), len(regions))
        regions.append(region)
    return sorted(regions, key=lambda r: min(order[n] for n in r["nodes"]))


def _region(members: list[fx.Node], shape: tuple[int, ...]) -> dict[str, Any]:
    """The region of ``members`` (in program order): outputs, outside inputs, matmul prologue."""
    inside = set(members)
    outputs = [n for n in members if any(u not in inside for u in n.users)]
    inputs: list[fx.Node] = []
    for n in members:
        for a in _tensor_inputs(n):
            if a not in inside and a not in inputs:
                inputs.append(a)
    region: dict[str, Any] = {"nodes": inside, "shape": shape, "outputs": outputs, "inputs": inputs}
    region["prologue"] = matmul_prologue(region)
    return region


def _acyclic_after_contraction(members: set[fx.Node], dfg: nx.DiGraph) -> bool:
    """Replacing ``members`` by one node is valid iff no path leaves the region and comes back."""
    seen: set[Any] = set()
    stack = [u for n in members for u in dfg.successors(n) if u not in members]
    while stack:
        u = stack.pop()
        if u in seen:
            continue
        seen.add(u)
        for v in dfg.successors(u):
            if v in members:
                return False
            stack.append(v)
    return True


def _contract(dfg: nx.DiGraph, members: list[fx.Node], index: int) -> None:
    """Replace ``members`` by one node ``("region", index)`` in ``dfg``, keeping outside edges."""
    node, inside = ("region", index), set(members)
    preds = dict.fromkeys(p for n in members for p in dfg.predecessors(n) if p not in inside)
    succs = dict.fromkeys(s for n in members for s in dfg.successors(n) if s not in inside)
    dfg.remove_nodes_from(members)
    dfg.add_node(node)
    dfg.add_edges_from((p, node) for p in preds)
    dfg.add_edges_from((node, s) for s in succs)


def matmul_prologue(region: dict) -> fx.Node | None:
    """An input of ``region`` that is a ``message @ weight`` rule read only by the region, with the
    region's shape: the product whose epilogue the region becomes."""
    for a in region["inputs"]:
        if (a.op == "call_function" and target_info(a.target).fusion.matmul is not None
                and _shape(a) == region["shape"]
                and all(u in region["nodes"] for u in a.users)):
            return a
    return None


# ---- rewriting ---------------------------------------------------------------------------------------

def _label_of(node: fx.Node) -> str:
    return target_info(node.target).label


@dataclass(frozen=True)
class FusedPointwise(LabeledTarget):
    """A generated elementwise kernel computing a region's outputs; it may overwrite the inputs at
    positions ``owned`` (fresh buffers nothing else reads)."""

    program: kernels.PointwiseProgram
    owned: frozenset[int]

    @property
    def info(self) -> TargetInfo:  # type: ignore[override]
        return TargetInfo("fused.pointwise")

    def __call__(self, *inputs: Any) -> tuple[torch.Tensor, ...]:
        return kernels.pointwise(self.program, inputs, owned=self.owned)


@dataclass(frozen=True)
class FusedMatmul(LabeledTarget):
    """``epilogue(a @ b, *extras)`` in one kernel (HBP B.4 / Botev eq. 29), with ``b`` squared as it is
    loaded where ``square_b`` (HesScale's ``(W o W)``)."""

    program: kernels.PointwiseProgram
    square_b: bool
    n_outputs: int

    @property
    def info(self) -> TargetInfo:  # type: ignore[override]
        return TargetInfo("fused.matmul_epilogue")

    def __call__(self, a: torch.Tensor, b: torch.Tensor, *extras: Any) -> Any:
        out = kernels.matmul_epilogue(a, b, self.program, extras, square_b=self.square_b)
        return out if self.n_outputs > 1 else (out,)


def _broadcasts(a: fx.Node, shape: tuple[int, ...]) -> bool:
    """Does ``a`` (of known shape) broadcast against ``shape`` by trailing alignment?"""
    own = _shape(a)
    return own is not None and is_suffix(own, shape)


def _fresh(node: Any) -> bool:
    """Does ``node`` hold a buffer nothing else aliases? Rules declared ``fresh`` allocate their
    result; a fused node's outputs are its own; a ``view`` (a crop) is fresh where what it views was
    and nothing else reads that."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    if node.target is item:
        source = node.args[0]
        return isinstance(source, fx.Node) and info(source).kind is Kind.FUSED
    fusion = target_info(node.target).fusion
    if fusion.view:
        src = node.args[0]
        return isinstance(src, fx.Node) and len(src.users) == 1 and _fresh(src)
    return fusion.allocates


def _owned(inputs: list[fx.Node], members: set[fx.Node], shape: tuple[int, ...]) -> frozenset[int]:
    """Positions of region inputs a fused kernel may overwrite: fresh buffers of the region's shape
    that nothing outside the region reads (on the CPU, reusing them also saves the page faults of a
    fresh allocation, which cost more than the arithmetic of a large elementwise product)."""
    return frozenset(
        i for i, a in enumerate(inputs)
        if isinstance(a, fx.Node) and _shape(a) == shape
        and all(u in members for u in a.users) and _fresh(a))


def _replace(graph: fx.Graph, members: list[fx.Node], outputs: list[fx.Node], target_fn: Any, args: list[Any],
             contains: list[str], shape: tuple[int, ...]) -> None:
    """Insert one fused node computing ``outputs`` (a tuple) and drop ``members``."""
    last = max(members, key=lambda n: _position(graph)[n])
    with graph.inserting_after(last):
        fused = graph.call_function(target_fn, tuple(args))
    set_info(fused, kind=Kind.FUSED, contains=tuple(contains), shape=shape, of=info(outputs[0]).of,
             message=" + ".join(info(o).message or o.name for o in outputs))
    for i, out in enumerate(outputs):
        _pick(graph, fused, i, out)
    for n in sorted(members, key=lambda n: -_position(graph)[n]):
        if not n.users:
            graph.erase_node(n)


def _pick(graph: fx.Graph, fused: fx.Node, i: int, old: fx.Node) -> fx.Node:
    """Output ``i`` of ``fused`` takes the place, the name and the record of ``old``."""
    name = old.name
    old._rename(f"{name}_unfused")
    with graph.inserting_after(fused):
        pick = graph.create_node("call_function", item, (fused, i), name=name)
    copy_info(pick, old, frees=(), live=0)
    old.replace_all_uses_with(pick)
    return pick


def _position(graph: fx.Graph) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(graph.nodes)}


def fuse_pointwise(graph: fx.Graph) -> int:
    """Replace pointwise regions (with their matmul prologue, if any) by generated kernels."""
    count = 0
    for region in pointwise_regions(graph):
        prologue = region["prologue"]
        if len(region["nodes"]) < 2 and prologue is None:
            continue  # one elementwise op gains nothing from a kernel of its own
        order = _position(graph)
        members = sorted(region["nodes"], key=order.__getitem__)
        outputs = sorted(region["outputs"], key=order.__getitem__)
        try:
            program, externals = kernels.program_from_nodes(
                members, outputs, leading=(prologue,) if prologue is not None else ())
        except kernels.NotFusible:
            continue
        contains = [_label_of(n) for n in members]
        if prologue is not None:
            operand = target_info(prologue.target).fusion.matmul
            assert operand is not None
            a, b = prologue.args[0], prologue.kwargs[operand]
            square_b = False
            # HesScale's (W o W): square the weight as the kernel loads it instead of materializing it.
            squares = target_info(b.target).fusion.squares if isinstance(b, fx.Node) else None
            if squares is not None and len(b.users) == 1:
                b, square_b = b.kwargs[squares], True
            fused_target: Any = FusedMatmul(program, square_b, len(outputs))
            args = [a, b] + externals[1:]
            members = members + [prologue]
            contains = [_label_of(prologue)] + contains
        else:
            fused_target = FusedPointwise(program, _owned(externals, region["nodes"], region["shape"]))
            args = externals
        _replace(graph, members, outputs, fused_target, args, contains, region["shape"])
        count += 1
    return count


@dataclass(frozen=True)
class FusedReductions(LabeledTarget):
    """Stage one of an op's parameter reductions over its ``[N, I]`` input ``x`` (rules declaring a
    :class:`~fxcurv.targets.Reduction`): each distinct left operand ``L_j [N, O]`` -- a message (``g``,
    HesScale's ``d``) or the signed column squares ``sum_k sign_k S_k^2`` of a factor origin (HBP eq.
    S.8b-c), computed once and shared by weight and bias -- then ``[L_j]^T x`` for the lefts whose right
    operand is ``x`` (gradients, HesScale eq. 2), every ``sum_n L_j`` (biases), and the lefts whose right
    operand is ``x**2``, stacked for stage two. The messages die after this node, before
    :func:`weight_diagonals` allocates the weight-shaped diagonals."""

    squares: tuple[bool, ...]  # per left: signed column squares of (S, sign), or the message itself
    to_x: tuple[int, ...]
    to_x_sq: tuple[int, ...]

    @property
    def info(self) -> TargetInfo:  # type: ignore[override]
        return TargetInfo("fused.param_reductions")

    def __call__(self, x: torch.Tensor, *lefts: Any) -> tuple[Any, torch.Tensor, Any]:
        cols = [kernels.column_square_sum(*left) if sq else left for sq, left in zip(self.squares, lefts)]
        gram_x = None
        if self.to_x:
            a = torch.cat([cols[j] for j in self.to_x], dim=1) if len(self.to_x) > 1 else cols[self.to_x[0]]
            gram_x = a.reshape(-1, a.shape[-1]).T @ x
        sums = (torch.cat(cols, dim=1) if len(cols) > 1 else cols[0]).sum(0)
        c = None
        if self.to_x_sq:
            c = torch.cat([cols[j] for j in self.to_x_sq], dim=1) if len(self.to_x_sq) > 1 else cols[self.to_x_sq[0]]
        return gram_x, sums, c


@target("fused.weight_diagonals")
def weight_diagonals(c: torch.Tensor, x: torch.Tensor, x_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Stage two: ``c^T (x o x)`` for all stacked lefts at once (HBP eq. S.8c, HesScale eq. 5)."""
    _, gram_c = kernels.dual_gram(None, x, b=c, x_sq=x_sq)
    assert gram_c is not None
    return gram_c


@target("rows", view=True)
def rows(value: torch.Tensor, j: int, width: int) -> torch.Tensor:
    """Rows ``j * width : (j + 1) * width`` of a stacked result (a view)."""
    return value.narrow(0, j * width, width)


def _reduction(node: fx.Node) -> Reduction | None:
    if node.op != "call_function":
        return None
    return target_info(node.target).fusion.reduction


def fuse_param_reductions(graph: fx.Graph) -> int:
    """Fuse the parameter reductions of each op node whose input ``x`` is ``[N, I]``."""
    groups: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if _reduction(node) is not None:
            groups.setdefault(info(node).of, []).append(node)
    count = 0
    for nodes in groups.values():
        x = next((n.kwargs["x"] for n in nodes if "x" in n.kwargs), None)
        if not isinstance(x, fx.Node) or len(info(x).shape or ()) != 2:
            continue
        reductions = {n: r for n in nodes if (r := _reduction(n)) is not None}
        if all(r.right == "x" for r in reductions.values()):
            continue  # gradients alone: nothing to share
        lefts: list[tuple[bool, tuple[Any, ...]]] = []
        place: dict[fx.Node, int] = {}
        for n in nodes:
            red = _reduction(n)
            assert red is not None
            left = (True, (n.args[0], n.args[1])) if red.left is Left.SIGNED_SQUARES else (False, (n.args[0],))
            if left not in lefts:
                lefts.append(left)
            place[n] = lefts.index(left)
        to_x = tuple(sorted({place[n] for n in nodes if reductions[n].right == "x"}))
        to_x_sq = tuple(sorted({place[n] for n in nodes if reductions[n].right == "x_sq"}))
        x_sq = next((n.kwargs.get("x_sq") for n in nodes if n.kwargs.get("x_sq") is not None), None)
        order = _position(graph)
        nodes = sorted(nodes, key=order.__getitem__)
        target_fn = FusedReductions(tuple(sq for sq, _ in lefts), to_x, to_x_sq)
        args = [x] + [vals if sq else vals[0] for sq, vals in lefts]
        with graph.inserting_after(nodes[-1]):
            fused = graph.call_function(target_fn, tuple(args))
        set_info(fused, kind=Kind.FUSED, contains=tuple(_label_of(n) for n in nodes), of=info(nodes[0]).of,
                 message="parameter reductions")
        picks = {}
        with graph.inserting_after(fused):
            for i, what in enumerate(("gram_x", "sums", "c")):
                picks[what] = graph.call_function(item, (fused, i))
                set_info(picks[what], kind=Kind.FUSED, of=info(fused).of, message=what)
        diagonals = None
        if to_x_sq:
            with graph.inserting_after(picks["c"]):
                diagonals = graph.call_function(weight_diagonals, (picks["c"], x), {"x_sq": x_sq})
            set_info(diagonals, kind=Kind.FUSED, contains=("c^T x^2",), of=info(fused).of,
                     message="weight diagonals")
        for n in nodes:
            red = _reduction(n)
            assert red is not None
            j = place[n]
            message = n.args[0]
            assert isinstance(message, fx.Node)
            message_shape = info(message).shape
            assert message_shape is not None
            width = message_shape[-1]
            if red.right == "x":
                _pick_rows(graph, picks["gram_x"], to_x.index(j), width, n)
            elif red.right == "x_sq":
                assert diagonals is not None
                _pick_rows(graph, diagonals, to_x_sq.index(j), width, n)
            else:
                _pick_rows(graph, picks["sums"], j, width, n)
            graph.erase_node(n)
        count += 1
    return count


def _pick_rows(graph: fx.Graph, source: fx.Node, j: int, width: int, old: fx.Node) -> fx.Node:
    name = old.name
    old._rename(f"{name}_unfused")
    with graph.inserting_after(source):
        pick = graph.create_node("call_function", rows, (source, j, width), name=name)
    copy_info(pick, old, frees=(), live=0)
    old.replace_all_uses_with(pick)
    return pick


@dataclass(frozen=True)
class FusedSampleReductions(LabeledTarget):
    """The reductions ``reduces`` of an op's per-sample parameter products of one message, from one pass
    over the products (the op's ``SampleReduction.fused``)."""

    fn: Any
    reduces: tuple[str, ...]

    @property
    def info(self) -> TargetInfo:  # type: ignore[override]
        return TargetInfo("fused.sample_reductions")

    def __call__(self, v: torch.Tensor, **context: Any) -> tuple[Any, ...]:
        return self.fn(v, self.reduces, **context)


def _sample_reduction(node: fx.Node) -> SampleReduction | None:
    if node.op != "call_function":
        return None
    return target_info(node.target).fusion.sample_reduction


def _reduced_message(node: fx.Node, red: SampleReduction) -> fx.Node | None:
    """The message ``v`` whose per-sample products ``node`` reduces; ``None`` where it does not reduce one
    message's (a ``diag_sqrt`` of several or signed columns)."""
    v = node.args[0] if node.args else None
    if not isinstance(v, fx.Node):
        return None
    if red.reduce != "squares":
        return v
    column = v.op == "call_function" and target_info(v.target).fusion.column
    unsigned = len(node.args) > 1 and node.args[1] is None
    return v.args[0] if column and unsigned and isinstance(v.args[0], fx.Node) else None


def fuse_sample_reductions(graph: fx.Graph) -> int:
    """One fused node per op node and message for rules reducing the same per-sample products in
    different ways (a lone reduction keeps its rule: its own route is at least as fast)."""
    groups: dict[tuple[str, fx.Node, Any], list[fx.Node]] = {}
    for node in graph.nodes:
        red = _sample_reduction(node)
        v = None if red is None else _reduced_message(node, red)
        if red is not None and v is not None:
            groups.setdefault((info(node).of, v, red.fused), []).append(node)
    count = 0
    for (_, v, fn), nodes in groups.items():
        reduces = tuple(dict.fromkeys(r.reduce for r in map(_sample_reduction, nodes) if r is not None))
        if len(reduces) < 2:
            continue
        context: dict[str, Any] = {}
        for n in nodes:
            context.update(n.kwargs)
        params = list(inspect.signature(fn).parameters)[2:]
        if any(p not in context for p in params):
            continue
        order = _position(graph)
        nodes = sorted(nodes, key=lambda n: order[n])
        with graph.inserting_after(nodes[-1]):
            fused = graph.call_function(FusedSampleReductions(fn, reduces), (v,), {p: context[p] for p in params})
        set_info(fused, kind=Kind.FUSED, contains=tuple(_label_of(n) for n in nodes), of=info(nodes[0]).of,
                 message="per-sample reductions")
        for n in nodes:
            red = _sample_reduction(n)
            assert red is not None
            _pick(graph, fused, reduces.index(red.reduce), n)
            graph.erase_node(n)
        count += 1
    return count


def stable_toposort(graph: fx.Graph) -> fx.Graph:
    """Reorder nodes topologically, keeping the current order wherever dependencies allow (a fused
    node replaces members spread over the program; its users may have stood between them)."""
    order = _position(graph)
    indegree = {n: len(set(n.all_input_nodes)) for n in graph.nodes}
    ready = [(order[n], n.name, n) for n in graph.nodes if indegree[n] == 0]
    heapq.heapify(ready)
    result = []
    while ready:
        _, _, n = heapq.heappop(ready)
        result.append(n)
        for u in n.users:
            indegree[u] -= 1
            if indegree[u] == 0:
                heapq.heappush(ready, (order[u], u.name, u))
    assert len(result) == len(order), "the program has a cycle"
    cursor = graph._root
    for n in result:
        if cursor.next is not n:
            cursor.append(n)
        cursor = n
    return graph


def fuse(graph: fx.Graph) -> fx.Graph:
    """Fuse parameter reductions, per-sample reductions, then pointwise regions and their matmul
    prologues."""
    fuse_param_reductions(graph)
    fuse_sample_reductions(graph)
    fuse_pointwise(graph)
    stable_toposort(graph)
    graph.lint()
    return graph
