"""Insert the backward messages: canonical forward graph -> curvature program.

The program computes, in one call, the loss, the gradient and the requested quantities. After a copy
of the forward graph, messages are seeded at the loss (:mod:`fxcurv.curvature.seed`); the ops are
visited in reverse topological order, each summing what its consumers sent and passing it on to its
data inputs (:mod:`fxcurv.curvature.propagate`) or, at a parameter input, handing it to the
quantities (:mod:`fxcurv.curvature.accumulate`). Which messages exist is the union of what the
requested quantities declare they need; nothing here knows a quantity by name.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from ..curvature.accumulate import Accumulator
from ..curvature.emit import Emitter, item
from ..curvature.messages import FactorSource, Needs
from ..curvature.propagate import Propagator
from ..curvature.seed import seed
from ..node_info import GENERATOR, Kind, copy_info, info, set_info
from ..quantities.base import Quantity
from .canonicalize import CanonicalGraph


def _depends_on(graph: fx.Graph, sources: set[fx.Node]) -> set[fx.Node]:
    """The nodes whose value is computed from ``sources`` (the sources included) differentiably: an
    integer or boolean value (indices, masks) has zero derivative, so nothing passes through it."""
    found = set(sources)
    for node in graph.nodes:
        dtype = info(node).dtype
        if (node.op == "call_function" and any(a in found for a in node.all_input_nodes)
                and (dtype is None or dtype.is_floating_point or dtype.is_complex)):
            found.add(node)
    return found


def _descendants(graph: fx.Graph, params: list[fx.Node]) -> dict[fx.Node, set[fx.Node]]:
    return {p: _depends_on(graph, {p}) - {p} for p in params}


def copy_forward(emit: Emitter, canon: CanonicalGraph, needs_messages: set[fx.Node]) -> None:
    """The forward graph, with ops whose rules read saved tensors (argmax indices) saving them."""
    for node in canon.graph.nodes:
        if node.op == "output":
            continue
        if node.op == "placeholder":
            new = emit.graph.placeholder(node.name)
        elif node.op == "get_attr":
            new = emit.graph.get_attr(node.target)
        else:
            op = emit.op_of(node)
            args = fx.map_arg(node.args, lambda n: emit.env[n])
            kwargs = fx.map_arg(node.kwargs, lambda n: emit.env[n])
            if op.saved and op.forward_saving is not None and node in needs_messages:
                both = emit.graph.call_function(op.forward_saving, args, kwargs)
                set_info(both, kind=Kind.FORWARD, of=node.name, message="(out, saved)")
                new = emit.graph.call_function(item, (both, 0))
                emit.saved[node] = {}
                for i, name in enumerate(op.saved):
                    saved = emit.graph.call_function(item, (both, i + 1))
                    set_info(saved, kind=Kind.FORWARD, of=node.name, message=name)
                    emit.saved[node][name] = saved
            else:
                new = emit.graph.call_function(node.target, args, kwargs)
        copy_info(new, node, of=node.name)
        emit.env[node] = new


def insert_curvature(canon: CanonicalGraph, quantities: tuple[Quantity, ...], mc_samples: int = 1,
                     statics: dict[tuple[str, str], Any] | None = None) -> fx.Graph:
    """The curvature program for ``quantities`` (a ``torch.fx.Graph`` owned by ``canon.root``);
    ``statics`` receives the quantities' static data per (quantity, parameter name)."""
    needs = Needs()
    for q in quantities:
        needs = needs | q.needs
    graph = canon.graph
    trainable = [p for p in canon.params.values() if info(p).requires_grad]
    needs_messages = _depends_on(graph, set(trainable))

    emit = Emitter()
    copy_forward(emit, canon, needs_messages)
    generator = None
    if needs.wants(FactorSource.MC):
        generator = emit.graph.placeholder(GENERATOR)
        set_info(generator, kind=Kind.INPUT, source="torch.Generator for Monte Carlo samples")

    inbox, layout = seed(emit, canon.loss, needs, mc_samples, generator)
    propagator = Propagator(emit, needs, layout, _descendants(graph, trainable))
    propagator.post_inbox(canon.model_output, inbox)
    accumulator = Accumulator(emit, quantities, trainable, propagator.mixed)
    for node in reversed(list(graph.nodes)):
        if node.op != "call_function" or node is canon.loss or node not in needs_messages:
            continue
        messages = propagator.collect(node)
        if messages is None:
            continue
        for name, value in emit.inputs_of(node).items():
            if not isinstance(value, fx.Node) or value not in needs_messages:
                continue
            if value.op == "placeholder":
                accumulator.use(node, name, value, messages)
            else:
                propagator.through(node, name, value, messages)
    results: dict[str, Any] = {"loss": emit.env[canon.loss]}
    results.update(accumulator.finish())
    if statics is not None:
        statics.update(accumulator.statics)
    out = emit.graph.output(results)
    set_info(out, kind=Kind.OUTPUT)
    emit.graph.lint()
    return emit.graph
