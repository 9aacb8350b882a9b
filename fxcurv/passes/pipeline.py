"""The compiler's pipeline, in order, in one place.

``build_program`` runs every pass of :data:`PIPELINE` on a :class:`Build` -- the traced model and
loss, the example inputs of one input signature, the requested quantities and options -- and
returns the finished :class:`~fxcurv.program.Program`. Nothing is rewritten later, at a call.

    canonicalize        traced graph  -> canonical forward graph (op vocabulary, params as inputs)
    insert_curvature    forward graph -> curvature program (gradient + curvature messages)
    share_products      merge identical products between quantities (CSE)
    eliminate_dead_code
    record_shapes       fake-tensor propagation: shape and dtype of every value
    fuse                (backend "fused") pointwise regions, matmul epilogues, parameter reductions
    eliminate_dead_code (backend "fused")
    free_messages       schedule for early frees, annotate liveness
    estimate_memory     the program's peak memory, before it ever runs

With ``check=True`` (the test suite sets :data:`CHECK`), :func:`lint` checks the program's
invariants after every pass, as torch.fx's PassManager does with its lint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from ..node_info import GENERATOR, INPUT, TARGET, Kind, has_info, info, param_placeholder
from ..quantities.base import Quantity
from ..trace import Traced
from .canonicalize import CanonicalGraph, canonicalize
from .dead_code import eliminate_dead_code
from .free_messages import free_messages
from .fuse import fuse
from .insert_curvature import insert_curvature
from .memory import MemoryEstimate, estimate_memory
from .shape_prop import record_shapes
from .share_products import share_products

BACKENDS = ("fused", "eager", "inductor")
# Lint the program after every pass (the test suite turns this on).
CHECK = False


@dataclass
class Build:
    """What the passes read and write while one program is built."""

    traced: Traced
    x: torch.Tensor
    y: Any
    params: dict[str, torch.Tensor]  # current parameter values, for shape propagation
    quantities: tuple[Quantity, ...]
    mc_samples: int
    backend: str
    canonical: CanonicalGraph | None = None
    graph: fx.Graph | None = None
    memory: MemoryEstimate | None = None
    statics: dict[tuple[str, str], Any] = field(default_factory=dict)  # what the quantities' wrap reads
    done: list[str] = field(default_factory=list)

    @property
    def program_graph(self) -> fx.Graph:
        assert self.graph is not None, "the curvature program is built by insert_curvature"
        return self.graph

    def example_args(self) -> list[Any]:
        """Example values for the program's placeholders, by name."""
        by_param = {param_placeholder(name): value for name, value in self.params.items()}
        values: dict[str, Any] = {INPUT: self.x, TARGET: self.y, GENERATOR: None, **by_param}
        return [values[n.name] for n in self.program_graph.nodes if n.op == "placeholder"]


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[Build], Any]
    backends: tuple[str, ...] = BACKENDS


def _canonicalize(b: Build) -> None:
    b.canonical = canonicalize(b.traced, b.x, b.y)


def _insert_curvature(b: Build) -> None:
    assert b.canonical is not None
    b.graph = insert_curvature(b.canonical, b.quantities, b.mc_samples, b.statics)


def _record_shapes(b: Build) -> None:
    assert b.canonical is not None
    record_shapes(fx.GraphModule(b.canonical.root, b.program_graph), b.example_args())


def _estimate_memory(b: Build) -> None:
    b.memory = estimate_memory(b.program_graph)


PIPELINE: tuple[Pass, ...] = (
    Pass("canonicalize", _canonicalize),
    Pass("insert_curvature", _insert_curvature),
    Pass("share_products", lambda b: share_products(b.program_graph)),
    Pass("eliminate_dead_code", lambda b: eliminate_dead_code(b.program_graph)),
    Pass("record_shapes", _record_shapes),
    Pass("fuse", lambda b: fuse(b.program_graph), backends=("fused",)),
    Pass("eliminate_dead_code", lambda b: eliminate_dead_code(b.program_graph), backends=("fused",)),
    Pass("free_messages", lambda b: free_messages(b.program_graph)),
    Pass("estimate_memory", _estimate_memory),
)


def run_pipeline(build: Build, check: bool | None = None) -> Build:
    check = CHECK if check is None else check
    for p in PIPELINE:
        if build.backend not in p.backends:
            continue
        p.run(build)
        build.done.append(p.name)
        if check:
            lint(build, p.name)
    return build


def lint(build: Build, after: str) -> None:
    """The program's invariants, checked after pass ``after``; an AssertionError names the pass."""
    if build.graph is None:
        assert build.canonical is not None, f"after {after}: no canonical graph"
        graph = build.canonical.graph
        graph.lint()
        for node in graph.nodes:
            if node.op == "call_function":
                assert info(node).op is not None, f"after {after}: canonical node '{node.name}' has no op"
        return
    graph = build.graph
    graph.lint()
    shapes_known = "record_shapes" in build.done
    # insert_curvature and fuse leave unread nodes behind for the next eliminate_dead_code.
    makers = [p for p in build.done if p in ("insert_curvature", "fuse", "eliminate_dead_code")]
    pruned = bool(makers) and makers[-1] == "eliminate_dead_code"
    names = set()
    for node in graph.nodes:
        assert has_info(node), f"after {after}: node '{node.name}' has no NodeInfo"
        record = info(node)
        assert node.name not in names
        names.add(node.name)
        if node.op == "placeholder":
            assert record.kind is Kind.INPUT, f"after {after}: placeholder '{node.name}' of kind {record.kind}"
            assert node.name in (INPUT, TARGET, GENERATOR) or record.param is not None, \
                f"after {after}: placeholder '{node.name}' is neither x, y, the generator nor a parameter"
        elif node.op == "call_function":
            assert node.users or not pruned, f"after {after}: node '{node.name}' computes a value nobody reads"
            if shapes_known and record.kind.is_backward and record.kind is not Kind.FUSED:
                assert record.shape is not None or record.dtype is None, \
                    f"after {after}: node '{node.name}' has a dtype but no shape"
        elif node.op == "output":
            results = node.args[0]
            assert isinstance(results, dict) and "loss" in results, f"after {after}: output is not a result dict"
            names_of = [q.name for q in build.quantities]
            assert list(results)[1:] == names_of, f"after {after}: results {list(results)} != {names_of}"
            trainable = [n for n, p in build.traced.params.items() if p.requires_grad]
            for q, per_param in results.items():
                if q != "loss":
                    assert list(per_param) == trainable, \
                        f"after {after}: {q} results {list(per_param)} not in named_parameters() order"
    if after == "free_messages":
        order = {n: i for i, n in enumerate(graph.nodes)}
        for node in graph.nodes:
            for a in node.all_input_nodes:
                assert order[a] < order[node], f"after {after}: '{a.name}' is used before it is computed"
