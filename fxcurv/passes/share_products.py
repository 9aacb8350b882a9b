"""Share products between quantities: one node for each distinct computation.

Quantities ask for the same products -- ``f'(x)`` for the gradient and for every square-root factor,
``x**2`` for HesScale's and the GGN's weight diagonals, a loss factor shared by ``diag_ggn`` and
``diag_hessian`` -- and the builder may emit them more than once. Common-subexpression elimination
merges nodes with the same target and arguments. Sampling nodes (anything taking a generator, or
declared impure) are never merged.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from ..targets import target_info


def _key(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return ("node", value)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _key(v)) for k, v in value.items())))
    if isinstance(value, slice):
        return ("slice", value.start, value.stop, value.step)
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    return ("const", type(value).__name__, value)


def _impure(node: fx.Node) -> bool:
    return "generator" in node.kwargs or target_info(node.target).fusion.impure


def share_products(graph: fx.Graph) -> fx.Graph:
    seen: dict[Any, fx.Node] = {}
    for node in list(graph.nodes):
        if node.op not in ("call_function", "call_method") or _impure(node):
            continue
        key = (node.op, node.target, _key(node.args), _key(node.kwargs))
        if key in seen:
            node.replace_all_uses_with(seen[key])
            graph.erase_node(node)
        else:
            seen[key] = node
    return graph
