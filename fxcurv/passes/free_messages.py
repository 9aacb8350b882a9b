"""Free messages at their last use.

Python frees a value when its last reference goes; torch.fx's code generator (and its
``Interpreter``) drop each value right after its last user. What this pass controls is *when* that
user runs:

1. **Sink** nodes whose inputs live on anyway (forward values, parameters) to just before their first
   user, so that e.g. a zero result or ``x**2`` is not held across the whole backward walk. Nodes that
   read a message stay where they are: moving them later would keep the message alive longer.
2. **Annotate** liveness: ``NodeInfo.frees`` lists the values whose last use is the node, and
   ``NodeInfo.live`` counts the values alive after it.
"""

from __future__ import annotations

import torch.fx as fx

from ..node_info import Kind, info, set_info

_LONG_LIVED = {Kind.FORWARD, Kind.INPUT, Kind.CONSTANT}


def _long_lived(node: fx.Node) -> bool:
    return node.op in ("placeholder", "get_attr") or info(node).kind in _LONG_LIVED


def sink_nodes(graph: fx.Graph) -> fx.Graph:
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in reversed(list(graph.nodes)):
        if node.op != "call_function" or _long_lived(node) or not node.users:
            continue
        if not all(_long_lived(a) for a in node.all_input_nodes):
            continue
        first = min(node.users, key=lambda u: order[u])
        if first.op == "output" or order[first] == order[node] + 1:
            continue
        first.prepend(node)
        order = {n: i for i, n in enumerate(graph.nodes)}
    return graph


def annotate_liveness(graph: fx.Graph) -> fx.Graph:
    last_use: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        for a in node.all_input_nodes:
            last_use[a] = node
    frees: dict[fx.Node, list] = {}
    for value, user in last_use.items():
        if value.op not in ("placeholder", "get_attr"):
            frees.setdefault(user, []).append(value.name)
    live: set = set()
    for node in graph.nodes:
        freed = tuple(sorted(frees.get(node, [])))
        live -= set(freed)
        if node.op == "call_function" and node.users:
            live.add(node.name)
        set_info(node, frees=freed, live=len(live))
    return graph


def free_messages(graph: fx.Graph) -> fx.Graph:
    sink_nodes(graph)
    annotate_liveness(graph)
    return graph
