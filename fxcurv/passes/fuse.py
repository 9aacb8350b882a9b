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


def fuse(graph: fx.Graph) -> fx.Graph:
    """Placeholder until the kernels land: analysis only."""
    return graph
