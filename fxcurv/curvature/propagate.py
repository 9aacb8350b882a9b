"""Propagation: the messages an op sends to its data inputs.

At each op the messages its consumers sent are summed (a fan-out in the forward graph is a sum in
the backward graph) and passed on to every input that depends on a parameter:

* the bundle ``[g; S_loss; S_mc]`` and every other origin's columns by the op's transposed Jacobian
  (``jac_t``, HBP eq. S.6-S.8);
* each HesScale diagonal by the op's ``diag`` rule (HesScale eq. 4, 8), plus for ``hesscale`` the op's
  residual ``phi''(x) g``;
* where the residual factor stream is carried, the op's residual ``diag(phi''(x) g)`` starts an origin
  of its own at the input (HBP eq. S.9, second term), kept as a diagonal until it must pass an op;
* each batch-averaged matrix by the op's ``dense`` rule, ``E_n[J_n^T M J_n]`` (or, for an op without
  one, its exact expectation from the ``jac_t`` rule applied twice, :class:`DenseFromJacT`), plus the
  op's batch-summed residual for the streams that keep it; a node reached by two such matrices (a
  fan-out) is refused: their sum would drop the cross terms between the branches;
* where mixed terms are carried and the op is bilinear in a data input and a weight that is also
  used upstream of that input, unit columns start at the data input: pushed back to the weight they
  give ``J_x^T e_i``, which pairs with the op's mixed derivative ``B^T e_i`` (HBP eq. S.6, second term;
  see :func:`fxcurv.factors.mixed_contribution`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from .. import factors
from ..errors import UnsupportedOpError
from ..node_info import Kind, info
from ..rules import registry
from ..rules.registry import OpDef, RuleKind
from ..targets import LabeledTarget, TargetInfo
from .emit import Emitter
from .messages import (
    BundleLayout,
    Columns,
    DenseStream,
    DiagonalStream,
    FactorSource,
    Inbox,
    Messages,
    Needs,
    Origin,
    Residual,
)

# A batch-averaged matrix is [D, D] per node: beyond this many bytes it is the wrong tool (the c3d3's
# first convolution output would need 11.6 GB); the Kronecker factors from columns (kflr, kfac) and
# the exact diagonals scale with the layer instead.
DENSE_LIMIT_BYTES = 1 << 30


@dataclass(frozen=True)
class DenseFromJacT(LabeledTarget):
    """``E_n[J_n^T M J_n]`` for an op without a ``dense`` rule, from its ``jac_t`` rule: ``M``'s
    columns passed back for every sample give ``J_n^T M``, whose columns passed back again give
    ``J_n^T M J_n`` (``M`` is symmetric); averaged over the batch. Exact, ``O(N D_in D_out)`` products."""

    op: str
    input: str

    @property
    def info(self) -> TargetInfo:  # type: ignore[override]
        return TargetInfo(f"{self.op}.dense[{self.input}]")

    def __call__(self, m: torch.Tensor, out: torch.Tensor, **ctx: Any) -> torch.Tensor:
        jac_t = registry.JAC_T[(self.op, self.input)].fn
        n, shape_out = out.shape[0], tuple(out.shape[1:])
        d_out = m.shape[0]
        first = jac_t(m.reshape((d_out, 1) + shape_out).expand((d_out, n) + shape_out), **ctx)  # [D_out, N, *in]
        d_in = first[0, 0].numel()
        rows = first.reshape(d_out, n, d_in).permute(2, 1, 0).reshape((d_in, n) + shape_out)
        second = jac_t(rows, **ctx)  # [D_in, N, *in]
        return second.reshape(d_in, n, d_in).mean(1)


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
        self.joint: dict[fx.Node, tuple[fx.Node, fx.Node]] = {}

    def post(self, target: fx.Node, *, bundle: fx.Node | None = None,
             diagonals: dict[DiagonalStream, fx.Node] | None = None, columns: Columns | None = None,
             dense: dict[DenseStream, fx.Node] | None = None) -> None:
        box = self.inboxes.setdefault(target, Inbox())
        for dense_stream, m in (dense or {}).items():
            box.dense.setdefault(dense_stream, []).append(m)
        if bundle is not None:
            box.bundles.append(bundle)
        for stream, d in (diagonals or {}).items():
            box.diagonals.setdefault(stream, []).append(d)
        if columns is not None:
            box.columns.setdefault(columns.origin, []).append(columns)

    def post_inbox(self, target: fx.Node, inbox: Inbox) -> None:
        self.inboxes[target] = inbox

    def collect(self, node: fx.Node) -> Messages | None:
        """The summed messages at ``node``'s output (``None`` if nothing reached it)."""
        box = self.inboxes.pop(node, None)
        if box is None or not box.bundles:
            return None
        emit, shape = self.emit, info(node).shape
        bundle = emit.sum(box.bundles, kind=Kind.BUNDLE, of=node, message="[g; S]", at=node)
        g = (emit.node(factors.gradient_column, (bundle,), kind=Kind.GRAD, of=node, message="g", shape=shape,
                       at=node) if self.layout.gradient else None)
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
            assert len({c.samples for c in group}) == 1, "an origin's columns cover one set of samples"
            columns[origin] = Columns(origin, total, group[0].sign, samples=group[0].samples)
        dense = {}
        for stream, ms in box.dense.items():
            if len(ms) > 1:
                raise UnsupportedOpError(
                    f"node '{node.name}' ({info(node).source or info(node).op}) is read by {len(ms)} ops (a fan-out, "
                    f"e.g. a residual connection): a batch-averaged matrix ({stream.label.split(':')[1]}: KFRA / HBP "
                    "blocks) cannot pass it exactly, the sum of the branches' matrices drops their cross terms. "
                    "Supported: networks without fan-out; kflr, kfac and the exact diagonals take residual networks")
            dense[stream] = ms[0]
        return Messages(bundle, g, diagonals, columns, dense)

    def through(self, node: fx.Node, name: str, target: fx.Node, msgs: Messages) -> None:
        """Send ``msgs`` at op ``node``'s output to its data input ``name`` (value ``target``)."""
        emit = self.emit
        op = emit.op_of(node)
        if name in op.params:
            raise UnsupportedOpError(
                f"node '{node.name}' ({info(node).source or op.name}): its {name} '{target.name}' is computed "
                "from parameters; fxcurv takes parameters used directly as an op's weight or bias")
        if name in op.constants or name in op.indices:
            raise UnsupportedOpError(
                f"node '{node.name}' ({info(node).source or op.name}): its input '{name}' ('{target.name}') is "
                f"computed from trainable parameters, but {op.name} has no derivative with respect to it "
                f"({'integer indices' if name in op.indices else 'a constant of the op'})")
        jac_t = emit.find_rule(RuleKind.JAC_T, node, name)
        shape = info(target).shape
        self.post(target, bundle=emit.rule(jac_t, (msgs.bundle,), node, kind=Kind.BUNDLE, message="[g; S]",
                                           at=target))
        for origin, cols in msgs.columns.items():
            if origin in self.layout.rows:
                continue  # travels in the bundle
            s, sign = emit.dense(cols, node)
            out = emit.rule(jac_t, (s,), node, samples=cols.samples, kind=Kind.SQRT, message="S",
                            stream=origin.label, at=target)
            self.post(target, columns=Columns(origin, out, sign, samples=cols.samples))
        diagonals = {}
        for stream, d in msgs.diagonals.items():
            diagonals[stream] = emit.rule(emit.find_rule(RuleKind.DIAG, node, name), (d,), node, kind=Kind.DIAG,
                                          message="d", stream=stream.label, shape=shape, at=target)
        self._residual(node, op, name, target, msgs, diagonals)
        self.post(target, diagonals=diagonals, dense=self._dense(node, op, name, target, msgs))
        if FactorSource.MIXED in self.needs.factors:
            self._mixed(node, op, name, target, msgs)

    def _residual(self, node: fx.Node, op: OpDef, name: str, target: fx.Node, msgs: Messages,
                  diagonals: dict[DiagonalStream, fx.Node]) -> None:
        """The op's own second-order term at input ``name``: its diagonal ``r`` added to the HesScale
        streams that keep it; for the residual factor stream, a new origin of columns -- ``diag(r)``
        where the term is a diagonal (elementwise ops), or the part of the op's joint signed factor that
        belongs to this input (an op whose term couples features or inputs, the generic rule)."""
        with_residual = [s for s in diagonals if s.residual]
        carried = FactorSource.RESIDUAL in self.needs.factors
        if not (with_residual or carried):
            return
        emit, shape = self.emit, info(target).shape
        rule = registry.lookup(op, RuleKind.RESIDUAL, name, node)
        joint = registry.lookup(op, RuleKind.RESIDUAL_SQRT, name, node) if carried else None
        r = None
        if rule is not None and (with_residual or joint is None):
            r = emit.rule(rule, (msgs.g,), node, kind=Kind.RESIDUAL, message="r", shape=shape, at=target)
            for stream in with_residual:
                diagonals[stream] = emit.node(factors.add_all, (diagonals[stream], r), kind=Kind.DIAG, of=node,
                                              message="d", stream=stream.label, shape=shape, at=target)
        if not carried:
            return
        origin = Origin(FactorSource.RESIDUAL, node.name)
        if joint is not None:
            parts, sign = self._joint_residual(node, joint, msgs, origin)
            s = emit.pick(parts, op.inputs.index(name), kind=Kind.SQRT, of=node, message="S", stream=origin.label,
                          at=target)
            self.post(target, columns=Columns(origin, s, sign))
        elif r is not None:
            self.post(target, columns=Columns(origin, r, None, diagonal=True))

    def _joint_residual(self, node: fx.Node, rule: registry.Rule, msgs: Messages,
                        origin: Origin) -> tuple[fx.Node, fx.Node]:
        """The op's joint factor ``(parts, sign)`` of its second-order term, emitted once per node and
        shared by its inputs: one origin whose columns meet again where the inputs' paths do."""
        if node not in self.joint:
            emit = self.emit
            both = emit.rule(rule, (msgs.g,), node, kind=Kind.SQRT, message="(S, sign)", stream=origin.label,
                             name=f"residual_factor_{node.name}")
            parts = emit.pick(both, 0, kind=Kind.SQRT, of=node, message="S", stream=origin.label,
                              name=f"residual_parts_{node.name}")
            sign = emit.pick(both, 1, kind=Kind.SQRT, of=node, message="sign", stream=origin.label,
                             name=f"residual_sign_{node.name}")
            self.joint[node] = (parts, sign)
        return self.joint[node]

    def _dense(self, node: fx.Node, op: OpDef, name: str, target: fx.Node,
               msgs: Messages) -> dict[DenseStream, fx.Node]:
        if not msgs.dense:
            return {}
        emit = self.emit
        check_dense_size(target)
        rule = registry.lookup(op, RuleKind.DENSE, name, node)
        out: dict[DenseStream, fx.Node] = {}
        residual = registry.lookup(op, RuleKind.RESIDUAL, name, node)
        if registry.lookup(op, RuleKind.RESIDUAL_SQRT, name, node) is not None and any(
                stream.residual is not Residual.NONE for stream in msgs.dense):
            raise UnsupportedOpError(
                f"node '{node.name}' ({info(node).source or op.name}): its second derivative couples features, "
                "which the batch-averaged Hessian recursions (hbp_hessian, hbp_pch_*) do not carry; kfra (the "
                "GGN) and the exact diagonals do")
        r = None
        for stream, m in msgs.dense.items():
            label = stream.label
            if rule is not None:
                passed = emit.rule(rule, (m,), node, kind=Kind.SQRT, message="M", stream=label, at=target)
            else:
                jac_t = emit.find_rule(RuleKind.JAC_T, node, name)
                ctx = registry.bind(jac_t, lambda n: emit.resolve(node, n), 1)
                passed = emit.node(DenseFromJacT(op.name, name), (m, emit.env[node]), ctx, of=node, kind=Kind.SQRT,
                                   message="M", stream=label, at=target)
            if residual is not None and stream.residual is not Residual.NONE:
                if r is None:
                    r = emit.rule(residual, (msgs.g,), node, kind=Kind.RESIDUAL, message="r", shape=info(target).shape,
                                  at=target)
                passed = emit.node(_WITH_RESIDUAL[stream.residual], (passed, r), of=node, kind=Kind.SQRT, message="M",
                                   stream=label, at=target)
            out[stream] = passed
        return out

    def _mixed(self, node: fx.Node, op: OpDef, name: str, target: fx.Node, msgs: Messages) -> None:
        inputs = self.emit.inputs_of(node)
        if op.variadic:
            for value in inputs.values():
                if isinstance(value, fx.Node) and info(value).param and target in self.descendants.get(value, ()):
                    raise UnsupportedOpError(
                        f"node '{node.name}' ({info(node).source}): parameter {info(value).param} is an input of this "
                        "generic op and also computes its data input; the mixed second derivative this needs for "
                        "the Hessian (diag_hessian, block_hessian) is not supported through a generic op. The GGN "
                        "quantities are exact here")
        for data, param in op.mixed_without_rule:
            weight = inputs.get(param)
            if data == name and isinstance(weight, fx.Node) and target in self.descendants.get(weight, ()):
                shared = info(weight).param or weight.name
                raise UnsupportedOpError(
                    f"node '{node.name}' ({info(node).source or op.name}): parameter {shared} is its {param} and "
                    f"also computes its input '{name}'; the mixed second derivative d2z/(d{name} d{param}) this "
                    f"needs for the Hessian (diag_hessian, block_hessian) has no rule for {op.name}. The GGN "
                    "quantities are exact here")
        for data, param in op.bilinear:
            weight = inputs.get(param)
            if data != name or not isinstance(weight, fx.Node) or target not in self.descendants.get(weight, ()):
                continue
            origin = Origin(FactorSource.MIXED, node.name, info(weight).param or weight.name)
            basis = self.emit.node(factors.unit_columns, (self.emit.env[target],), kind=Kind.SQRT, of=node,
                                   message="E", stream=origin.label, at=target)
            self.post(target, columns=Columns(origin, basis))
            self.mixed[origin] = MixedTerm(node, param, basis, msgs.g)


_WITH_RESIDUAL = {Residual.SIGNED: factors.with_residual, Residual.ABS: factors.with_abs_residual,
                  Residual.CLIP: factors.with_clipped_residual}


def check_dense_size(node: fx.Node) -> None:
    """Refuse a batch-averaged matrix at ``node`` beyond :data:`DENSE_LIMIT_BYTES`, naming the figure."""
    record = info(node)
    assert record.shape is not None and record.dtype is not None
    d = 1
    for s in record.shape[1:]:
        d *= s
    nbytes = d * d * torch.empty((), dtype=record.dtype).element_size()
    if nbytes > DENSE_LIMIT_BYTES:
        raise UnsupportedOpError(
            f"node '{node.name}' ({record.source or record.op}): a batch-averaged matrix (KFRA / HBP blocks) of its "
            f"{d} features per sample would be [{d}, {d}], {nbytes / 2**30:.1f} GiB, above the "
            f"{DENSE_LIMIT_BYTES / 2**30:.0f} GiB fxcurv allows for one. Use kflr or kfac (Kronecker factors from "
            "columns) for this network, or the exact diagonals")
