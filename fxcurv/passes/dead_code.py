"""Dead-code elimination: drop every node no output depends on.

The builder sends messages wherever they might be needed -- a mixed-term column towards every
parameter upstream, a derivative for a stream that ends at a constant -- and lets this pass remove
what no quantity reads. Placeholders stay: they are the program's signature.
"""

from __future__ import annotations

import torch.fx as fx


def eliminate_dead_code(graph: fx.Graph) -> fx.Graph:
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph.nodes)):
            if node.op in ("placeholder", "output") or node.users:
                continue
            graph.erase_node(node)
            changed = True
    return graph
