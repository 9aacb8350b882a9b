"""Propagation: the messages an op sends to its data inputs.

At each op the messages its consumers sent are summed (a fan-out in the forward graph is a sum in
the backward graph) and passed on to every input that depends on a parameter:

* the bundle ``[g; S_loss; S_mc]`` and every other origin's columns by the op's transposed Jacobian
  (``jac_t``, HBP eq. S.6-S.8);
* each HesScale diagonal by the op's ``diag`` rule (HesScale eq. 4, 8), plus for ``hesscale`` the op's
  residual ``phi''(x) g``;
* where the residual factor stream is carried, the op's residual ``diag(phi''(x) g)`` starts an origin
  of its own at the input (HBP eq. S.9, second term), kept as a diagonal until it must pass an op;
* where mixed terms are carried and the op is bilinear in a data input and a weight that is also
  used upstream of that input, unit columns start at the data input: pushed back to the weight they
  give ``J_x^T e_i``, which pairs with the op's mixed derivative ``B^T e_i`` (HBP eq. S.6, second term;
  see :func:`fxcurv.factors.mixed_contribution`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.fx as fx

from .. import factors
from ..errors import UnsupportedOpError
from ..node_info import Kind, info
from ..rules import registry
from ..rules.registry import OpDef, RuleKind
from .emit import Emitter
from .messages import BundleLayout, Columns, DiagonalStream, FactorSource, Inbox, Messages, Needs, Origin


@dataclass(frozen=True)
class MixedTerm:
    """Where a weight's mixed term starts: the bilinear op node, its parameter input, the unit
    columns ``E`` at the data input and the gradient ``g`` at the op's output."""

    node: fx.Node
    param_input: str
    basis: fx.Node
    g: fx.Node


class Propagator:
    """Collects the messages sent to each forward node and passes them through ops."""

    def __init__(self, emit: Emitter, needs: Needs, layout: BundleLayout, descendants: dict[fx.Node, set[fx.Node]]):
        self.emit = emit
        self.needs = needs
        self.layout = layout
        self.descendants = descendants  # parameter placeholder -> the nodes computed from it
        self.inboxes: dict[fx.Node, Inbox] = {}
        self.mixed: dict[Origin, MixedTerm] = {}

    def post(self, target: fx.Node, *, bundle: Optional[fx.Node] = None,
             diagonals: Optional[dict[DiagonalStream, fx.Node]] = None, columns: Optional[Columns] = None) -> None:
        box = self.inboxes.setdefault(target, Inbox())
        if bundle is not None:
            box.bundles.append(bundle)
        for stream, d in (diagonals or {}).items():
            box.diagonals.setdefault(stream, []).append(d)
        if columns is not None:
            box.columns.setdefault(columns.origin, []).append(columns)

    def post_inbox(self, target: fx.Node, inbox: Inbox) -> None:
        self.inboxes[target] = inbox

    def collect(self, node: fx.Node) -> Optional[Messages]:
        """The summed messages at ``node``'s output (``None`` if nothing reached it)."""
        box = self.inboxes.pop(node, None)
        if box is None or not box.bundles:
            return None
        emit, shape = self.emit, info(node).shape
        bundle = emit.sum(box.bundles, kind=Kind.BUNDLE, of=node, message="[g; S]", at=node)
        g = emit.node(factors.gradient_column, (bundle,), kind=Kind.GRAD, of=node, message="g", shape=shape,
                      at=node)
        diagonals = {s: emit.sum(v, kind=Kind.DIAG, of=node, message="d", stream=s.label, shape=shape, at=node)
                     for s, v in box.diagonals.items()}
        columns: dict[Origin, Columns] = {}
        for origin, (start, stop) in self.layout.rows.items():
            cols = emit.node(factors.column_range, (bundle, start, stop), kind=Kind.SQRT, of=node, message="S",
                             stream=origin.label, at=node)
            columns[origin] = Columns(origin, cols, self.layout.signs[origin])
        for origin, group in box.columns.items():
            if len(group) == 1:
                columns[origin] = group[0]
                continue
            assert not any(c.diagonal for c in group), "a diagonal source reached a node twice"
            total = emit.sum([c.value for c in group], kind=Kind.SQRT, of=node, message="S", stream=origin.label,
                             at=node)
            columns[origin] = Columns(origin, total, group[0].sign)
        return Messages(bundle, g, diagonals, columns)

    def through(self, node: fx.Node, name: str, target: fx.Node, msgs: Messages) -> None:
        """Send ``msgs`` at op ``node``'s output to its data input ``name`` (value ``target``)."""
        emit = self.emit
        op = emit.op_of(node)
        if name in op.params:
            raise UnsupportedOpError(
                f"node '{node.name}' ({info(node).source or op.name}): its {name} '{target.name}' is computed "
                "from parameters; fxcurv takes parameters used directly as an op's weight or bias")
        jac_t = emit.find_rule(RuleKind.JAC_T, node, name)
        shape = info(target).shape
        self.post(target, bundle=emit.rule(jac_t, (msgs.bundle,), node, kind=Kind.BUNDLE, message="[g; S]",
                                           at=target))
        for origin, cols in msgs.columns.items():
            if origin in self.layout.rows:
                continue  # travels in the bundle
            s, sign = emit.dense(cols, node)
            out = emit.rule(jac_t, (s,), node, kind=Kind.SQRT, message="S", stream=origin.label, at=target)
            self.post(target, columns=Columns(origin, out, sign))
        diagonals = {}
        for stream, d in msgs.diagonals.items():
            diagonals[stream] = emit.rule(emit.find_rule(RuleKind.DIAG, node, name), (d,), node, kind=Kind.DIAG,
                                          message="d", stream=stream.label, shape=shape, at=target)
        self._residual(node, op, name, target, msgs, diagonals)
        self.post(target, diagonals=diagonals)
        if FactorSource.MIXED in self.needs.factors:
            self._mixed(node, op, name, target, msgs)

    def _residual(self, node: fx.Node, op: OpDef, name: str, target: fx.Node, msgs: Messages,
                  diagonals: dict[DiagonalStream, fx.Node]) -> None:
        rule = registry.RESIDUAL.get((op.name, name))
        with_residual = [s for s in diagonals if s.residual]
        if rule is None or not (with_residual or FactorSource.RESIDUAL in self.needs.factors):
            return
        emit, shape = self.emit, info(target).shape
        r = emit.rule(rule, (msgs.g,), node, kind=Kind.RESIDUAL, message="r", shape=shape, at=target)
        for stream in with_residual:
            diagonals[stream] = emit.node(factors.add_all, (diagonals[stream], r), kind=Kind.DIAG, of=node,
                                          message="d", stream=stream.label, shape=shape, at=target)
        if FactorSource.RESIDUAL in self.needs.factors:
            self.post(target, columns=Columns(Origin(FactorSource.RESIDUAL, node.name), r, None, diagonal=True))

    def _mixed(self, node: fx.Node, op: OpDef, name: str, target: fx.Node, msgs: Messages) -> None:
        inputs = self.emit.inputs_of(node)
        for data, param in op.bilinear:
            weight = inputs.get(param)
            if data != name or not isinstance(weight, fx.Node) or target not in self.descendants.get(weight, ()):
                continue
            origin = Origin(FactorSource.MIXED, node.name, info(weight).param or weight.name)
            basis = self.emit.node(factors.unit_columns, (self.emit.env[target],), kind=Kind.SQRT, of=node,
                                   message="E", stream=origin.label, at=target)
            self.post(target, columns=Columns(origin, basis))
            self.mixed[origin] = MixedTerm(node, param, basis, msgs.g)
