"""Readable views of a curvature program: a listing (one line per node) and a DOT graph."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from .node_info import Kind, info
from .targets import target_info

_KIND_COLORS = {
    "forward": "#dddddd", "input": "#ffffff", "derived": "#fff2cc", "grad": "#cfe2f3",
    "sqrt": "#d9ead3", "diag": "#fce5cd", "residual": "#f4cccc", "param": "#d9d2e9",
    "fused": "#b6d7a8", "output": "#ffffff",
}


def _label(target: Any) -> str:
    return target_info(target).label


def _fmt(value: Any) -> str:
    if isinstance(value, fx.Node):
        return "%" + value.name
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return repr(value)  # a typed attribute (a named tuple: a norm's layout, an index entry) says what it is
    if isinstance(value, (tuple, list)):
        inner = ", ".join(_fmt(v) for v in value)
        if isinstance(value, tuple):
            return f"({inner},)" if len(value) == 1 else f"({inner})"
        return f"[{inner}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) + "}"
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    return repr(value)


def _shape(node: fx.Node) -> str:
    return info(node).describe_value()


def node_line(node: fx.Node, name_width: int = 18, shape_width: int = 20) -> str:
    name = "%" + node.name
    shape = _shape(node)
    if node.op == "placeholder":
        rhs = "input"
    elif node.op == "get_attr":
        rhs = f"attr {node.target}"
    elif node.op == "output":
        keys = list(node.args[0]) if isinstance(node.args[0], dict) else []
        return f"return {{{', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''}}}  ({len(keys)} results)"
    else:
        args = [_fmt(a) for a in node.args] + [f"{k}={_fmt(v)}" for k, v in node.kwargs.items()]
        rhs = f"{_label(node.target)}({', '.join(args)})"
    record = info(node)
    notes = []
    if record.kind.is_backward:
        notes.append(f"{record.kind.value} {record.message}".strip())
        if record.stream:
            notes.append(record.stream)
        if record.of:
            notes.append(f"of {record.of}")
    elif record.source:
        notes.append(record.source)
    if record.contains:
        notes.append("fuses: " + " -> ".join(record.contains))
    comment = f"  # {'; '.join(notes)}" if notes else ""
    return f"{name:<{name_width}} {shape:<{shape_width}} = {rhs}{comment}"


def listing(graph: fx.Graph) -> str:
    nodes = list(graph.nodes)
    width = min(28, max((len(n.name) + 1 for n in nodes), default=8))
    shape_width = min(24, max((len(_shape(n)) for n in nodes), default=4))
    lines = []
    section = None
    for node in nodes:
        kind = info(node).kind
        new_section = "output" if kind is Kind.OUTPUT else "backward" if kind.is_backward else "forward"
        if new_section != section:
            lines.append({"forward": "# forward", "backward": "# backward: gradient and curvature messages",
                          "output": "# results"}[new_section])
            section = new_section
        lines.append("  " + node_line(node, width, shape_width))
    return "\n".join(lines)


def to_dot(graph: fx.Graph, name: str = "curvature_program") -> str:
    """The program as a graphviz DOT digraph, nodes colored by kind."""
    lines = [f"digraph {name} {{", "  rankdir=TB;", '  node [shape=box, style="rounded,filled", fontname="monospace"];']
    for node in graph.nodes:
        kind = info(node).kind.value
        if node.op == "output":
            label = "results"
        else:
            label = f"{node.name}\\n{_label(node.target) if node.op == 'call_function' else node.op} {_shape(node)}"
            if info(node).contains:
                label += "\\n[" + ", ".join(info(node).contains) + "]"
        color = _KIND_COLORS.get(kind, "#ffffff")
        lines.append(f'  "{node.name}" [label="{label}", fillcolor="{color}"];')
    for node in graph.nodes:
        for a in node.all_input_nodes:
            lines.append(f'  "{a.name}" -> "{node.name}";')
    lines.append("}")
    return "\n".join(lines)


class ProgramView:
    """What ``engine.graph`` returns: prints as the listing, behaves as the ``torch.fx.Graph``."""

    def __init__(self, graph: fx.Graph):
        self.fx_graph = graph

    def __str__(self) -> str:
        return listing(self.fx_graph)

    def __repr__(self) -> str:
        return f"<curvature program: {len(self.fx_graph.nodes)} nodes>"

    def __getattr__(self, name):
        return getattr(self.fx_graph, name)

    def to_dot(self) -> str:
        return to_dot(self.fx_graph)
