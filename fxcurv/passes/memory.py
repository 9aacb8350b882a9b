"""Memory: the program's peak, estimated from shapes and liveness before it runs.

Each value of the program holds ``numel * itemsize`` bytes from the node that computes it until its
last use; a view (a column range, a crop, a reshape, a pick of a tuple) holds nothing of its own but
keeps the value it views alive until its own last use. The estimate walks the scheduled program and
reports the largest sum of live values and the node where it occurs. The program's inputs (the
batch, the parameters) are counted apart: they exist before the call. Temporaries inside one node
(a GEMM's workspace, a block of the conv weight diagonal) are not counted; the estimate is of the
values the program keeps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..node_info import info
from ..targets import target_info


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of the program's values at its peak (``peak_bytes``, reached at node ``at``), of its
    inputs (``input_bytes``: batch, targets and parameters, alive throughout) and of what it returns
    (``output_bytes``: the values alive at its end)."""

    peak_bytes: int
    at: str
    at_description: str
    input_bytes: int
    output_bytes: int = 0

    def __str__(self) -> str:
        return (f"{self.peak_bytes / 2**20:.1f} MiB of values at node '{self.at}' ({self.at_description}), "
                f"plus {self.input_bytes / 2**20:.1f} MiB of inputs and parameters")


def _bytes(node: fx.Node) -> int:
    record = info(node)
    if record.shape is None or record.dtype is None:
        return 0
    n = 1
    for s in record.shape:
        n *= s
    return n * torch.empty((), dtype=record.dtype).element_size()


def _viewed(node: fx.Node) -> fx.Node | None:
    """The value ``node`` is a view of, if it is one."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if target_info(node.target).fusion.view:
        return node.args[0]
    return None


def estimate_memory(graph: fx.Graph) -> MemoryEstimate:
    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    base: dict[fx.Node, fx.Node] = {}
    for n in nodes:
        v = _viewed(n)
        base[n] = base[v] if v is not None else n
    # A value (with its views) lives from its node to the last use of it or of any view of it.
    last: dict[fx.Node, int] = {}
    for n in nodes:
        for a in n.all_input_nodes:
            b = base[a]
            last[b] = max(last.get(b, order[b]), order[n])
    size: dict[fx.Node, int] = {}
    for n in nodes:
        if base[n] is not n or n.op in ("placeholder", "get_attr", "output"):
            continue
        own = _bytes(n)
        if own == 0:  # a tuple of values: count its picked parts here
            own = sum(_bytes(u) for u in n.users if _viewed(u) is n)
        size[n] = own
    inputs = sum(_bytes(n) for n in nodes if n.op in ("placeholder", "get_attr"))
    freed_at: dict[int, int] = {}
    for b, nbytes in size.items():
        end = last.get(b, order[b])
        freed_at[end] = freed_at.get(end, 0) + nbytes
    # What the program returns: the values whose last use is its output node.
    outputs = freed_at.get(order[nodes[-1]], 0) if nodes and nodes[-1].op == "output" else 0
    live, peak = 0, 0
    peak_at: fx.Node | None = None
    for n in nodes:
        live += size.get(n, 0)
        if live > peak:
            peak, peak_at = live, n
        live -= freed_at.get(order[n], 0)
    if peak_at is None:
        return MemoryEstimate(0, "", "", inputs, outputs)
    record = info(peak_at)
    what = record.message or record.op or peak_at.op
    return MemoryEstimate(peak, peak_at.name, f"{record.kind.value} {what}".strip(), inputs, outputs)
