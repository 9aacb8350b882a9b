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
3. **Parameter reductions** -- the gradient ``g^T x``, the GGN diagonal ``(sum_k S_k^2)^T x^2`` and
   HesScale's ``d^T x^2`` of one linear layer (and its bias) read the same input ``x``: one fused node
   squares ``x`` and the factor columns once and runs the products together.

Fused nodes keep ``meta['contains']``, the labels of the rules they replaced, so ``print(engine.graph)``
shows what each contains. The pass needs the value shapes recorded by a first run of the program.
"""

from __future__ import annotations

from typing import Any, Optional

import networkx as nx
import torch
import torch.fx as fx

from .. import kernels
from ..rules import registry


# ---- analysis ---------------------------------------------------------------------------------------

def _shape(node: Any) -> Optional[tuple]:
    if isinstance(node, fx.Node):
        return node.meta.get("shape")
    return ()  # Python scalars broadcast everywhere


def _is_suffix(small: tuple, big: tuple) -> bool:
    """``small`` broadcasts against ``big`` by trailing alignment with equal dims (or is a scalar)."""
    return len(small) <= len(big) and tuple(big[len(big) - len(small):]) == tuple(small)


def _tensor_inputs(node: fx.Node) -> list:
    return [a for a in node.all_input_nodes if a.op != "get_attr"]


def is_pointwise(node: fx.Node) -> bool:
    return (node.op == "call_function" and getattr(node.target, "pointwise", False)
            and node.meta.get("shape") is not None
            and node.meta.get("dtype", torch.float32).is_floating_point)


def dataflow(graph: fx.Graph) -> nx.DiGraph:
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node)
        for a in node.all_input_nodes:
            g.add_edge(a, node)
    return g


def _numel(shape: tuple) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def pointwise_regions(graph: fx.Graph) -> list[dict]:
    """Maximal fusible pointwise regions: ``{"nodes", "shape", "outputs", "inputs"}`` each.

    A region's iteration space is its largest output shape. A member of another shape must be read
    only inside the region (it is then recomputed inline), and every tensor a member reads from
    outside must broadcast against the iteration space by trailing alignment. Members that break a
    rule leave the region and are clustered anew, so a component mixing a bundle ``[K, N, D]`` with
    HesScale's ``[N, D]`` diagonals yields one region per iteration space.
    """
    dfg = dataflow(graph)
    candidates = [n for n in graph.nodes if is_pointwise(n)]
    pending = [set(c) for c in nx.weakly_connected_components(dfg.subgraph(candidates))]
    regions = []
    while pending:
        members = pending.pop()
        shape = tuple(max((n.meta["shape"] for n in members), key=_numel))
        drop = set()
        for n in members:
            if tuple(n.meta["shape"]) != shape and not all(u in members for u in n.users):
                drop.add(n)
            elif any(a not in members and not _is_suffix(tuple(_shape(a) or (None,)), shape)
                     for a in _tensor_inputs(n)):
                drop.add(n)
        if not drop and not _acyclic_after_contraction(members, dfg):
            drop = {max(members, key=lambda n: len(nx.ancestors(dfg, n)))}
        if drop:
            for part in (members - drop, drop):
                pending.extend(set(c) for c in nx.weakly_connected_components(dfg.subgraph(part)))
            continue
        outputs = [n for n in members if any(u not in members for u in n.users)]
        inputs = []
        for n in members:
            for a in _tensor_inputs(n):
                if a not in members and a not in inputs:
                    inputs.append(a)
        regions.append({"nodes": members, "shape": shape, "outputs": outputs, "inputs": inputs})
    order = {n: i for i, n in enumerate(graph.nodes)}
    return sorted(regions, key=lambda r: min(order[n] for n in r["nodes"]))


def _acyclic_after_contraction(members: set, dfg: nx.DiGraph) -> bool:
    """Replacing ``members`` by one node is valid iff no path leaves the region and comes back."""
    outside_desc = set()
    for n in members:
        for u in dfg.successors(n):
            if u not in members:
                outside_desc.add(u)
                outside_desc |= nx.descendants(dfg, u)
    return not any(m in outside_desc for m in members)


def matmul_prologue(region: dict) -> Optional[fx.Node]:
    """An input of ``region`` that is a ``message @ weight`` rule read only by the region, with the
    region's shape: the product whose epilogue the region becomes."""
    for a in region["inputs"]:
        if (a.op == "call_function" and getattr(a.target, "matmul", None)
                and tuple(a.meta.get("shape") or ()) == region["shape"]
                and all(u in region["nodes"] for u in a.users)):
            return a
    return None


# ---- rewriting ---------------------------------------------------------------------------------------

def _label(node: fx.Node) -> str:
    return getattr(node.target, "rule_label", None) or getattr(node.target, "__name__", str(node.target))


def _named(fn, name: str, label: str):
    fn.__name__ = fn.__qualname__ = name
    fn.rule_label = label
    return fn


def _pointwise_target(program: kernels.PointwiseProgram, owned: frozenset):
    def fused_pointwise(*inputs):
        return kernels.pointwise(program, inputs, owned=owned)

    return _named(fused_pointwise, "fused_pointwise", "fused.pointwise")


def _fresh(node: Any) -> bool:
    """Does ``node`` hold a buffer nothing else aliases? Rules tagged ``fresh`` allocate their result;
    a fused node's outputs are its own; a ``view`` rule (a crop) is fresh where its message was and
    nothing else reads that message."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    if node.target is _item:
        return node.args[0].meta.get("kind") == "fused"
    if getattr(node.target, "view", False):
        src = node.args[0]
        return isinstance(src, fx.Node) and len(src.users) == 1 and _fresh(src)
    return bool(getattr(node.target, "fresh", False))


def _owned(inputs: list, members: set, shape: tuple) -> frozenset:
    """Positions of region inputs a fused kernel may overwrite: fresh buffers of the region's shape
    that nothing outside the region reads (on the CPU, reusing them also saves the page faults of a
    fresh allocation, which cost more than the arithmetic of a large elementwise product)."""
    return frozenset(
        i for i, a in enumerate(inputs)
        if isinstance(a, fx.Node) and tuple(a.meta.get("shape") or ()) == shape
        and all(u in members for u in a.users) and _fresh(a))


def _matmul_target(program: kernels.PointwiseProgram, square_b: bool, n_outputs: int):
    def fused_matmul(a, b, *extras):
        out = kernels.matmul_epilogue(a, b, program, extras, square_b=square_b)
        return out if n_outputs > 1 else (out,)

    return _named(fused_matmul, "fused_matmul_epilogue", "fused.matmul_epilogue")


def _replace(graph: fx.Graph, members: list, outputs: list, target, args, contains: list, shape) -> None:
    """Insert one fused node computing ``outputs`` (a tuple) and drop ``members``."""
    last = max(members, key=lambda n: _position(graph)[n])
    with graph.inserting_after(last):
        fused = graph.call_function(target, tuple(args))
    fused.meta.update(kind="fused", contains=contains, shape=shape, of=outputs[0].meta.get("of", ""),
                      message=" + ".join(o.meta.get("message", "") or o.name for o in outputs))
    for i, out in enumerate(outputs):
        _pick(graph, fused, i, out)
    for n in sorted(members, key=lambda n: -_position(graph)[n]):
        if not n.users:
            graph.erase_node(n)


def _pick(graph: fx.Graph, fused: fx.Node, i: int, old: fx.Node) -> fx.Node:
    """Output ``i`` of ``fused`` takes the place, the name and the metadata of ``old``."""
    name = old.name
    old._rename(f"{name}_unfused")
    with graph.inserting_after(fused):
        pick = graph.create_node("call_function", _item, (fused, i), name=name)
    pick.meta.update({k: v for k, v in old.meta.items() if k not in ("frees", "live")})
    old.replace_all_uses_with(pick)
    return pick


def _item(values, i):
    return values[i]


_item.rule_label = "item"


def _position(graph: fx.Graph) -> dict:
    return {n: i for i, n in enumerate(graph.nodes)}


def fuse_pointwise(graph: fx.Graph) -> int:
    """Replace pointwise regions (with their matmul prologue, if any) by generated kernels."""
    count = 0
    for region in pointwise_regions(graph):
        prologue = matmul_prologue(region)
        if len(region["nodes"]) < 2 and prologue is None:
            continue  # one elementwise op gains nothing from a kernel of its own
        order = _position(graph)
        members = sorted(region["nodes"], key=order.get)
        outputs = sorted(region["outputs"], key=order.get)
        try:
            program, externals = kernels.program_from_nodes(
                members, outputs, leading=(prologue,) if prologue is not None else ())
        except kernels.NotFusible:
            continue
        contains = [_label(n) for n in members]
        if prologue is not None:
            a, b = prologue.args[0], prologue.kwargs[prologue.target.matmul]
            square_b = False
            # HesScale's (W o W): square the weight as the kernel loads it instead of materializing it.
            if (getattr(b.target, "rule_label", "").endswith("derived[weight_sq]") and len(b.users) == 1):
                b, square_b = b.kwargs["weight"], True
            target = _matmul_target(program, square_b, len(outputs))
            args = [a, b] + externals[1:]
            members = members + [prologue]
            contains = [_label(prologue)] + contains
        else:
            target = _pointwise_target(program, _owned(externals, region["nodes"], region["shape"]))
            args = externals
        _replace(graph, members, outputs, target, args, contains, region["shape"])
        count += 1
    return count


def linear_param_reductions(x, g, factors=(), diags=()):
    """What one linear layer's parameter quantities need from its messages, in one node.

    Returns ``(g^T x, sum g, c, sum c)`` where ``c = [c_1, c_2, ...]`` stacks, per square-root
    factor origin, ``sum_k sign_k S_k^2`` (the per-sample diagonal at the layer output, HBP eq.
    S.8b-c; each computed once, shared by weight and bias), then the HesScale diagonals ``d``
    (eq. 5). The messages die after this node, before :func:`linear_weight_diagonals` allocates the
    weight-shaped diagonals: only one of the two weight-sized outputs coexists with them.
    """
    lefts = [kernels.column_square_sum(S, sign) for S, sign in factors] + list(diags)
    c = None
    if lefts:
        c = lefts[0] if len(lefts) == 1 else torch.cat(lefts, dim=1)
    gram_g = None if g is None else g.reshape(-1, g.shape[-1]).T @ x
    return gram_g, None if g is None else g.sum(0), c, None if c is None else c.sum(0)


linear_param_reductions.rule_label = "fused.linear_param_reductions"


def linear_weight_diagonals(c, x, x_sq=None):
    """``c^T (x o x)`` split per origin: the weight diagonals (HBP eq. S.8c, HesScale eq. 5), one
    product for all origins."""
    _, gram_c = kernels.dual_gram(None, x, b=c, x_sq=x_sq)
    return gram_c


linear_weight_diagonals.rule_label = "fused.linear_weight_diagonals"


_LINEAR = {
    ("grad", "weight"): registry.GRAD.get(("linear", "weight")),
    ("grad", "bias"): registry.GRAD.get(("linear", "bias")),
    ("sqrt", "weight"): registry.DIAG_SQRT.get(("linear", "weight")),
    ("sqrt", "bias"): registry.DIAG_SQRT.get(("linear", "bias")),
    ("diag", "weight"): registry.DIAG_DIAG.get(("linear", "weight")),
    ("diag", "bias"): registry.DIAG_DIAG.get(("linear", "bias")),
}


def fuse_param_reductions(graph: fx.Graph) -> int:
    """Fuse the gradient and diagonal products of each linear layer with a ``[N, I]`` input."""
    kind_of = {fn: key for key, fn in _LINEAR.items() if fn is not None}
    groups: dict[str, list] = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target in kind_of:
            groups.setdefault(node.meta.get("of", ""), []).append(node)
    count = 0
    for _, nodes in groups.items():
        kinds = {n: kind_of[n.target] for n in nodes}
        x = next((n.kwargs["x"] for n in nodes if "x" in n.kwargs), None)
        if x is None or len(x.meta.get("shape") or ()) != 2:
            continue
        if not any(k[0] in ("sqrt", "diag") for k in kinds.values()):
            continue  # the gradient alone: nothing to share
        g_nodes = [n for n in nodes if kinds[n][0] == "grad"]
        g = g_nodes[0].args[0] if g_nodes else None
        if any(n.args[0] is not g for n in g_nodes):
            continue
        factors, diags = [], []
        for n in nodes:
            kind = kinds[n][0]
            if kind == "sqrt" and (n.args[0], n.args[1]) not in factors:
                factors.append((n.args[0], n.args[1]))
            elif kind == "diag" and n.args[0] not in diags:
                diags.append(n.args[0])
        x_sq = next((n.kwargs.get("x_sq") for n in nodes if n.kwargs.get("x_sq") is not None), None)
        order = _position(graph)
        last = max(nodes, key=order.get)
        with graph.inserting_after(last):
            fused = graph.call_function(linear_param_reductions, (x, g, tuple(factors), tuple(diags)))
        fused.meta.update(kind="fused", contains=[_label(n) for n in sorted(nodes, key=order.get)],
                          of=nodes[0].meta.get("of", ""), message="grad + sum_k S_k^2")
        lefts = factors + diags
        weight_diags = c_sum = None
        if lefts:
            with graph.inserting_after(fused):
                c = graph.call_function(_item, (fused, 2))
                c_sum = graph.call_function(_item, (fused, 3))
            with graph.inserting_after(c_sum):
                weight_diags = graph.call_function(linear_weight_diagonals, (c, x), {"x_sq": x_sq})
            weight_diags.meta.update(kind="fused", contains=["c^T x^2"], of=fused.meta["of"],
                                     message="weight diagonals")
        for n in nodes:
            kind, param = kinds[n]
            if kind == "grad":
                _pick(graph, fused, 0 if param == "weight" else 1, n)
            else:
                j = lefts.index((n.args[0], n.args[1]) if kind == "sqrt" else n.args[0])
                out_width = n.meta["shape"][0] if param == "weight" else n.meta["shape"][-1]
                source = weight_diags if param == "weight" else c_sum
                _pick_slice(graph, source, j, out_width, n)
            graph.erase_node(n)
        count += 1
    return count


def _rows(value, j, width):
    """Rows ``j * width : (j + 1) * width`` of a stacked result (a view)."""
    return value.narrow(0, j * width, width)


_rows.rule_label = "rows"


def _pick_slice(graph: fx.Graph, source: fx.Node, j: int, width: int, old: fx.Node) -> fx.Node:
    name = old.name
    old._rename(f"{name}_unfused")
    with graph.inserting_after(source):
        pick = graph.create_node("call_function", _rows, (source, j, width), name=name)
    pick.meta.update({k: v for k, v in old.meta.items() if k not in ("frees", "live")})
    old.replace_all_uses_with(pick)
    return pick


def stable_toposort(graph: fx.Graph) -> fx.Graph:
    """Reorder nodes topologically, keeping the current order wherever dependencies allow (a fused
    node replaces members spread over the program; its users may have stood between them)."""
    import heapq

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
    """Fuse parameter reductions, then pointwise regions and their matmul prologues."""
    fuse_param_reductions(graph)
    fuse_pointwise(graph)
    stable_toposort(graph)
    graph.lint()
    return graph
