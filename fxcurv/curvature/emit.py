"""Writing the curvature program: nodes with their records and names, and rules bound to op nodes.

The :class:`Emitter` owns the program graph being built and the map from the canonical (forward)
graph's nodes to their copies in it. Everything the seeding, propagation and accumulation steps add
goes through :meth:`Emitter.node` (a node with its :class:`~fxcurv.node_info.NodeInfo` and a name in
the papers' vocabulary) or :meth:`Emitter.rule` (a rule bound by name to an op node's inputs,
attributes, output, saved and derived values, :func:`fxcurv.rules.registry.bind`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.fx as fx

from .. import factors
from ..errors import UnsupportedOpError
from ..node_info import Kind, info, set_info
from ..rules import registry
from ..rules.registry import OpDef, Rule, RuleKind, Unresolved
from ..targets import target
from .messages import Columns

# Node names say what a value is: `g_tanh` is the gradient w.r.t. tanh's output, `S_tanh` the loss
# factor there, `Smc_`/`Sr_`/`Se_` Monte Carlo, residual and mixed-term columns, `d_`/`dgn_` the
# HesScale(GN) diagonals, `r_` a residual phi''(x) g, and `diag_<origin>_p_...` a parameter's share.
_PREFIX = {
    (Kind.GRAD, "g"): "g", (Kind.BUNDLE, "[g; S]"): "gS", (Kind.SQRT, "S"): "S", (Kind.SQRT, "sign"): "sign",
    (Kind.SQRT, "E"): "E", (Kind.DIAG, "d"): "d", (Kind.RESIDUAL, "r"): "r", (Kind.PARAM, "grad"): "grad",
    (Kind.PARAM, "diag"): "diag_", (Kind.PARAM, "J^T S"): "JtS", (Kind.PARAM, "B^T E"): "BtE",
}
_MESSAGE_TAGS = {"loss": "", "mc": "mc", "residual": "r", "mixed": "e", "hesscale": "", "hesscale_gn": "gn"}
_PARAM_TAGS = {"loss": "ggn", "mc": "mc", "residual": "res", "mixed": "mix", "hesscale": "hs",
               "hesscale_gn": "hsgn"}


def _stream_tag(stream: str, kind: Kind) -> str:
    if not stream:
        return ""
    head = stream.split(":")[0]
    return (_PARAM_TAGS if kind is Kind.PARAM else _MESSAGE_TAGS).get(head, head)


@target("item", view=True)
def item(values: Any, i: int) -> Any:
    """Item ``i`` of a node returning several values (a view of that value)."""
    return values[i]


class Emitter:
    """The program graph under construction, and the canonical graph it is built from."""

    def __init__(self) -> None:
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}  # canonical node -> its copy in the program
        self.saved: dict[fx.Node, dict[str, fx.Node]] = {}  # op node -> tensors its forward saved
        self._derived: dict[tuple[fx.Node, str], fx.Node] = {}

    # ---- nodes ---------------------------------------------------------------------------------
    def node(self, fn: Callable[..., Any], args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None, *,
             kind: Kind, of: fx.Node | None = None, message: str = "", stream: str = "",
             shape: tuple[int, ...] | None = None, name: str | None = None,
             at: fx.Node | None = None) -> fx.Node:
        """A call of ``fn``; named after the message it computes and the node ``at`` which it is."""
        if name is None and at is not None:
            name = f"{_PREFIX.get((kind, message), message)}{_stream_tag(stream, kind)}_{at.name}"
        n = self.graph.create_node("call_function", fn, tuple(args), dict(kwargs or {}), name=name)
        set_info(n, kind=kind, of=of.name if of is not None else "", message=message, stream=stream,
                 shape=None if shape is None else tuple(shape))
        return n

    def sum(self, nodes: list[fx.Node], **kw: Any) -> fx.Node:
        """The sum of messages from several consumers (one node is returned as it is)."""
        return nodes[0] if len(nodes) == 1 else self.node(factors.add_all, tuple(nodes), **kw)

    def pick(self, both: fx.Node, i: int, **kw: Any) -> fx.Node:
        return self.node(item, (both, i), **kw)

    # ---- rules ---------------------------------------------------------------------------------
    @staticmethod
    def op_of(node: fx.Node) -> OpDef:
        name = info(node).op
        if name is None or name not in registry.OPS:
            raise UnsupportedOpError(f"node '{node.name}' is not an op of the canonical vocabulary")
        return registry.OPS[name]

    @staticmethod
    def inputs_of(node: fx.Node) -> dict[str, Any]:
        """The op node's tensor inputs by name (``None`` where absent)."""
        names = Emitter.op_of(node).inputs
        return {name: node.args[i] if i < len(node.args) else None for i, name in enumerate(names)}

    def resolve(self, node: fx.Node, name: str) -> Any:
        """The value a rule argument ``name`` refers to at op node ``node`` (a canonical node)."""
        op = self.op_of(node)
        if name in op.inputs:
            value = self.inputs_of(node)[name]
            return self.env[value] if isinstance(value, fx.Node) else value
        if name == "inputs" and op.variadic:
            return tuple(self.env[v] if isinstance(v, fx.Node) else v for v in node.args)
        if name in node.kwargs:
            value = node.kwargs[name]
            return self.env[value] if isinstance(value, fx.Node) else value
        if name == "out":
            return self.env[node]
        if name in op.saved:
            return self.saved[node][name]
        rule = registry.DERIVED.get((op.name, name))
        if rule is not None:
            key = (node, name)
            if key not in self._derived:
                self._derived[key] = self.node(rule.fn, (), registry.bind(rule, lambda n: self.resolve(node, n), 0),
                                               kind=Kind.DERIVED, of=node, message=name, name=f"{node.name}_{name}")
            return self._derived[key]
        raise Unresolved(name)

    def batched(self, node: fx.Node, name: str) -> bool:
        """Whether context value ``name`` of op node ``node`` has the batch as its dimension 0: the op's
        data inputs (not its parameters or constants), its output, saved values, and derived values computed from any
        of these; attributes, parameters and values derived from parameters alone have not."""
        op = self.op_of(node)
        if name in op.inputs:
            value = self.inputs_of(node)[name]
            return (op.is_batched(name) and isinstance(value, fx.Node) and value.op != "get_attr"
                    and not info(value).param)
        if name == "inputs" and op.variadic:
            raise UnsupportedOpError(
                f"node '{node.name}' ({info(node).source}): a generic op cannot take a subset of the batch's "
                "samples (ggn_eigen's subsample=) yet")
        if name in node.kwargs:
            return False
        if name == "out" or name in op.saved:
            return True
        rule = registry.DERIVED.get((op.name, name))
        if rule is None:
            raise Unresolved(name)
        return any(self.batched(node, n) for n in rule.context_names(0) if n != name)

    def resolve_samples(self, node: fx.Node, name: str, stop: int) -> Any:
        """:meth:`resolve` restricted to the batch's first ``stop`` samples: a view of the batch-carrying
        values (:meth:`batched`), the others as they are."""
        value = self.resolve(node, name)
        if not self.batched(node, name):
            return value
        key = (node, f"{name}[:{stop}]")
        if key not in self._derived:
            self._derived[key] = self.node(factors.first_samples, (value, stop, 0), kind=Kind.DERIVED, of=node,
                                           message=f"{name}[:{stop}]", name=f"{node.name}_{name}_samples")
        return self._derived[key]

    def rule(self, rule: Rule, messages: tuple[Any, ...], node: fx.Node, extra: dict[str, Any] | None = None,
             samples: int | None = None, **kw: Any) -> fx.Node:
        """``rule(*messages, **context)`` with the context bound at op node ``node``; ``extra`` names
        values that are not the op's (the Monte Carlo sample count, the generator). ``samples``: the
        messages cover the batch's first ``samples`` samples only, and so does the context
        (:meth:`resolve_samples`)."""
        extra = extra or {}

        def resolve(name: str) -> Any:
            if name in extra:
                return extra[name]
            return self.resolve(node, name) if samples is None else self.resolve_samples(node, name, samples)

        kwargs = registry.bind(rule, resolve, len(messages))
        return self.node(rule.fn, messages, kwargs, of=node, **kw)

    def find_rule(self, kind: RuleKind, node: fx.Node, key: str) -> Rule:
        """The op's ``kind`` rule for input ``key``; an error naming the node where it has none."""
        op = self.op_of(node)
        found = registry.lookup(op, kind, key, node)
        if found is None:
            have = sorted(k for (o, k) in registry.TABLES[kind] if o == op.name)
            raise UnsupportedOpError(
                f"node '{node.name}' ({info(node).source or op.name}): op {op.name} has no {kind.value} rule "
                f"for its input '{key}' (it has: {', '.join(have) or 'none'}); the requested quantities need it")
        return found

    # ---- columns -------------------------------------------------------------------------------
    def dense(self, columns: Columns, node: fx.Node) -> tuple[fx.Node, fx.Node | None]:
        """The columns ``(S, sign)``, a diagonal source ``diag(r)`` materialized where it must pass an op."""
        if not columns.diagonal:
            return columns.value, columns.sign
        stream = columns.origin.label
        both = self.node(factors.diagonal_to_columns, (columns.value,), kind=Kind.SQRT, of=node,
                         message="(S, sign)", stream=stream, name=f"columns_{node.name}")
        s = self.pick(both, 0, kind=Kind.SQRT, of=node, message="S", stream=stream, at=node)
        sign = self.pick(both, 1, kind=Kind.SQRT, of=node, message="sign", stream=stream, at=node)
        return s, sign
