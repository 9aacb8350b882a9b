"""Accumulation: what each parameter collects, handed to the quantities.

Every time the backward walk reaches an op whose input is a trainable parameter, each requested
quantity sees a :class:`ParamUse` -- the op node, which input the parameter is, the messages at the
op's output, whether the parameter is used more than once -- and emits its contributions with the
op's parameter rules. After the parameter's last use (or, for a parameter the loss never reaches,
at the end), each quantity finalizes its result from a :class:`ParamEnd`. The quantities decide
everything quantity-specific; this module only routes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from .. import factors
from ..node_info import Kind, info
from ..operators.kronecker import KroneckerLayout
from ..rules import registry
from ..rules.registry import RuleKind
from ..targets import LabeledTarget, TargetInfo
from .emit import Emitter
from .messages import Columns, DiagonalStream, Messages, Origin
from .propagate import MixedTerm

if TYPE_CHECKING:
    from ..quantities.base import Quantity


@dataclass(frozen=True)
class MixedColumns(LabeledTarget):
    """``b_i = B^T e_i`` for op ``op``'s bilinear (data, ``param``) pair: the per-sample parameter VJP
    of the op with the data input replaced by the unit vector ``e_i`` and the output gradient ``g`` --
    the columns of the mixed second derivative ``B = sum_k g_k d2z_k / (dx dW)``."""

    op: str
    param: str

    @property
    def info(self) -> TargetInfo:  # type: ignore[override]
        return TargetInfo(f"{self.op}.mixed[{self.param}]")

    def __call__(self, g: torch.Tensor, basis: torch.Tensor, **ctx: Any) -> torch.Tensor:
        rule = registry.PER_SAMPLE[(self.op, self.param)]
        data = next(d for d, p in registry.OPS[self.op].bilinear if p == self.param)
        d = basis.shape[0]
        ctx[data] = factors.fold_lead(basis)
        return factors.unfold_lead(rule.fn(factors.expand_columns(g, d), **ctx), d)


@dataclass
class ParamUse:
    """One use of a parameter: input ``input`` of op node ``node``, with the messages at its output."""

    emit: Emitter
    node: fx.Node
    input: str
    param: fx.Node
    shared: bool
    messages: Messages

    @property
    def name(self) -> str:
        """The parameter's name in ``named_parameters()``."""
        return info(self.param).param or self.param.name

    @property
    def g(self) -> fx.Node:
        return self.messages.g

    @property
    def columns(self) -> dict[Origin, Columns]:
        return self.messages.columns

    @property
    def diagonals(self) -> dict[DiagonalStream, fx.Node]:
        return self.messages.diagonals

    @property
    def shape(self) -> tuple[int, ...] | None:
        return info(self.param).shape

    def rule(self, kind: RuleKind, *messages: Any, message: str, stream: str = "", shaped: bool = True) -> fx.Node:
        """The op's ``kind`` rule for this parameter input, applied to ``messages``."""
        rule = self.emit.find_rule(kind, self.node, self.input)
        return self.emit.rule(rule, messages, self.node, kind=Kind.PARAM, message=message, stream=stream,
                              shape=self.shape if shaped else None, at=self.param)

    def dense(self, columns: Columns) -> tuple[fx.Node, fx.Node | None]:
        return self.emit.dense(columns, self.node)

    def has_rule(self, kind: RuleKind) -> bool:
        return registry.lookup(self.emit.op_of(self.node), kind, self.input, self.node) is not None

    def where(self) -> str:
        """The use, for error messages: the parameter, the node and what the user wrote."""
        return f"parameter {self.name} at node '{self.node.name}' ({info(self.node).source or info(self.node).op})"


@dataclass
class ParamEnd:
    """A parameter after its last use: where quantities finalize their results."""

    emit: Emitter
    param: fx.Node
    mixed: dict[Origin, MixedTerm]
    # Each quantity's state shared by all parameters of the program (Quantity.start_network), by name.
    network: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return info(self.param).param or self.param.name

    @property
    def shape(self) -> tuple[int, ...] | None:
        return info(self.param).shape

    def node(self, fn: Any, args: tuple[Any, ...], *, message: str, stream: str = "", shaped: bool = True,
             kwargs: dict[str, Any] | None = None) -> fx.Node:
        return self.emit.node(fn, args, kwargs, kind=Kind.PARAM, of=self.param, message=message, stream=stream,
                              shape=self.shape if shaped else None, at=self.param)

    def sum(self, nodes: list[fx.Node], *, message: str, stream: str = "", shaped: bool = True) -> fx.Node:
        return self.emit.sum(nodes, kind=Kind.PARAM, of=self.param, message=message, stream=stream,
                             shape=self.shape if shaped else None, at=self.param)

    def kron_layouts(self) -> set[KroneckerLayout]:
        """The Kronecker layouts the ops taking this parameter as a parameter input declare
        (``OpDef.kron_layouts``), whether or not the loss reaches them: a parameter finalized without a
        use (one the loss never reaches) still has the arrangement its op gives it."""
        found = set()
        for user in self.param.users:
            name = info(user).op
            op = registry.OPS.get(name) if name is not None else None
            if op is None:
                continue
            found |= {op.kron_layout(key) for key, arg in zip(op.inputs, user.args)
                      if arg is self.param and key in op.params}
        return found

    def zeros(self, message: str) -> fx.Node:
        """Zeros shaped like the parameter: a parameter the loss does not reach has zero derivatives."""
        return self.node(factors.zeros_like_param, (self.emit.env[self.param],), message=message)

    def partner(self, origin: Origin) -> fx.Node | None:
        """``B^T E``, the mixed-derivative columns that pair with ``origin``'s columns at this weight."""
        term = self.mixed.get(origin)
        if term is None:
            return None
        op = self.emit.op_of(term.node)
        rule = registry.PER_SAMPLE[(op.name, term.param_input)]
        data = next(d for d, p in op.bilinear if p == term.param_input)
        kwargs = {k: v for k, v in registry.bind(rule, lambda n: self.emit.resolve(term.node, n), 1).items()
                  if k != data}
        return self.emit.node(MixedColumns(op.name, term.param_input), (term.g, term.basis), kwargs,
                              kind=Kind.PARAM, of=term.node, message="B^T E", stream=origin.label, at=self.param)


@dataclass(frozen=True)
class Finalized:
    """A quantity's result for one parameter: ``value`` (graph nodes, nested in tuples) the program
    returns, and ``static``, plain Python data the quantity's ``wrap`` needs besides (e.g. which op a
    use was), kept with the program."""

    value: Any
    static: Any = None


@dataclass
class _Slot:
    uses_left: int
    states: dict[str, Any] = field(default_factory=dict)


class Accumulator:
    """Routes each parameter use to the quantities and collects their finalized results."""

    def __init__(self, emit: Emitter, quantities: tuple[Quantity, ...], params: list[fx.Node],
                 mixed: dict[Origin, MixedTerm]):
        self.emit = emit
        self.quantities = quantities
        self.mixed = mixed
        self.uses = {p: sum(1 for u in p.users for a in u.args if a is p) for p in params}
        self.slots = {p: _Slot(self.uses[p], {q.name: q.start() for q in quantities}) for p in params}
        self.network = {q.name: q.start_network() for q in quantities}
        self.results: dict[fx.Node, dict[str, Any]] = {}
        self.statics: dict[tuple[str, str], Any] = {}  # (quantity, parameter name) -> static data

    def use(self, node: fx.Node, input: str, param: fx.Node, messages: Messages) -> None:
        slot = self.slots[param]
        use = ParamUse(self.emit, node, input, param, self.uses[param] > 1, messages)
        for q in self.quantities:
            q.collect(use, slot.states[q.name])
        slot.uses_left -= 1
        if slot.uses_left == 0:
            self._finalize(param)

    def _finalize(self, param: fx.Node) -> None:
        end = ParamEnd(self.emit, param, self.mixed, self.network)
        slot = self.slots[param]
        results = {}
        for q in self.quantities:
            out = q.finalize(end, slot.states[q.name])
            if isinstance(out, Finalized):
                self.statics[(q.name, end.name)] = out.static
                out = out.value
            results[q.name] = out
        self.results[param] = results

    def finish(self) -> dict[str, dict[str, Any]]:
        """Finalize parameters the loss never reaches; results per quantity, in parameter order."""
        for param, slot in self.slots.items():
            if param not in self.results:
                slot.uses_left = 0
                self._finalize(param)
        return {q.name: {info(p).param or p.name: self.results[p][q.name] for p in self.slots}
                for q in self.quantities}
