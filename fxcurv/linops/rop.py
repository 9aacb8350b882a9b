"""One GGN-type product ``J^T M J v`` of a batch by the canonical program's own ops, without autograd.

Where every forward op between the parameters and the loss is one this module knows -- an affine layer
(``linear``), an activation with a diagonal Jacobian (the ``elementwise`` family, ``phi'(x)`` its derived
``d1``) or a reshape -- the product runs as three sweeps over the program's forward nodes:

1. **forward with tangents** (the R-operator of Pearlmutter 1994, as KFRA's Algorithm 1 uses it for
   ``v = J delta``): each node's value ``z`` and its directional derivative ``R{z} = dz/dtheta v``:

   * ``z = x W^T + b``:    ``R{z} = R{x} W^T + x V_W^T + V_b`` (two GEMMs into one buffer, ``addmm``);
   * ``z = phi(x)``:        ``R{z} = phi'(x) * R{x}``;
   * ``z = reshape(x)``:    ``R{z} = reshape(R{x})``;

2. **the middle** at the output ``f``: ``u = w_b M_b R{f}`` (the loss's Hessian, or the empirical or Monte
   Carlo Fisher's factor, :mod:`fxcurv.linops.curvature`);
3. **backward** (HBP eq. S.8, S.9): ``u`` passes every node in reverse through its transposed Jacobian
   (``u W``, ``phi'(x) * u``, the reshape back), and each parameter's share ``J_theta^T u`` is written
   straight into its slice of the result ``[P]``: ``dW = u^T x`` as one GEMM into the slice (``out=``; a
   second use of the weight or a later batch adds with ``addmm_``), ``db = sum_n u_n``.

Nothing is differentiated by torch: no autograd graph, no dual tensors, no per-parameter gradients to
concatenate. The arithmetic is the GEMM floor of the product: per linear layer one forward GEMM, one or
two tangent GEMMs and two backward GEMMs (KFRA appendix, after Schraudolph 2002: a Gauss-Newton product
costs about twice a backward pass). Measured on the MNIST MLP (N = 128, one thread, a shared and loaded
machine, ``benchmarks/linops.py``): 1.6-1.8x a plain forward+backward, where torch.func's ``jvp`` inside
``vjp`` took 2.1-2.3x; the same sweeps written out by hand for that net, 1.45x.

Any other op (convolutions, pooling, generic nodes, residual additions) makes :func:`plan` return
``None``; the operator then takes the autograd path (:func:`fxcurv.linops.curvature.jacobian_sandwich`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
import torch.fx as fx

from ..api import Program
from ..node_info import INPUT, Kind, ancestors, has_info, info
from ..rules import linear as linear_rules
from ..rules import registry
from ..rules import reshape as reshape_rules
from ..rules.registry import OpDef, RuleKind, Unresolved


class StepKind(Enum):
    """How a forward node passes tangents forward and messages back."""

    AFFINE = "affine"  # z = x W^T + b
    DIAGONAL = "diagonal"  # z = phi(x), Jacobian diag(phi'(x))
    RESHAPE = "reshape"  # z = reshape(x)


@dataclass(frozen=True)
class Step:
    """One forward node: its kind, op, input nodes by name (``None`` for an absent bias), attributes."""

    node: str
    kind: StepKind
    op: OpDef
    inputs: dict[str, str | None]
    attrs: dict[str, Any]


@dataclass(frozen=True)
class Plan:
    """The forward nodes of a program from its placeholders to the loss, in order, as steps; the
    parameter each parameter placeholder holds; the loss's model output node."""

    steps: tuple[Step, ...]
    params: dict[str, str]  # placeholder -> parameter name
    constants: dict[str, str]  # get_attr node -> its attribute path in the program
    input: str
    output: str


def _step_kind(op: OpDef) -> StepKind | None:
    if op is linear_rules.op:
        return StepKind.AFFINE
    if op is reshape_rules.op:
        return StepKind.RESHAPE
    if op.family == "elementwise" and (op.name, "d1") in registry.DERIVED and (op.name, "x") in registry.JAC_T:
        return StepKind.DIAGONAL
    return None


def plan(prog: Program) -> Plan | None:
    """The program's forward nodes as steps, or ``None`` where one of them (or a constant) is outside the
    ops above, so that the product must take the autograd path."""
    nodes = list(prog.gm.graph.nodes)
    loss = next((n for n in nodes if has_info(n) and info(n).kind == Kind.FORWARD
                 and registry.OPS.get(info(n).op or "") is not None and registry.OPS[str(info(n).op)].is_loss), None)
    if loss is None or not isinstance(loss.args[0], fx.Node):
        return None
    needed = ancestors(loss.args[0])
    steps: list[Step] = []
    constants: dict[str, str] = {}
    for node in nodes:
        if node not in needed:
            continue
        if node.op == "placeholder":
            if node.name != INPUT and node.name not in prog.param_of:
                return None
            continue
        if node.op == "get_attr":
            constants[node.name] = str(node.target)
            continue
        op = registry.OPS.get(info(node).op or "") if has_info(node) else None
        kind = None if op is None or node.op != "call_function" else _step_kind(op)
        if op is None or kind is None:
            return None
        inputs: dict[str, str | None] = {}
        for name, arg in zip(op.inputs, node.args):
            if arg is not None and not isinstance(arg, fx.Node):
                return None
            inputs[name] = None if arg is None else arg.name
        if len(node.args) > len(op.inputs) or not _inputs_fit(op, inputs, prog.param_of, constants):
            return None
        steps.append(Step(node.name, kind, op, inputs, dict(node.kwargs)))
    return Plan(tuple(steps), dict(prog.param_of), constants, INPUT, loss.args[0].name)


def _inputs_fit(op: OpDef, inputs: dict[str, str | None], param_of: dict[str, str],
                constants: dict[str, str]) -> bool:
    """Whether the node's parameter inputs are parameters or constants and its data input is computed or
    the input ``x`` (a parameter used as data would need its share of the message)."""
    data = inputs.get("x")
    if data is None or data in param_of:
        return False
    return all(inputs.get(k) is None or inputs[k] in param_of or inputs[k] in constants for k in op.params)


class ParamSlices:
    """The result ``[K, P]`` row of one column as views per parameter (``{name: [*shape]}``, those of the
    space), and which of them hold a value already: a first contribution is written, later ones added."""

    def __init__(self, row: dict[str, torch.Tensor]):
        self.views = row
        self.written: set[str] = set()

    def matmul(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """``slice (+)= a @ b``."""
        view = self.views[name]
        if name in self.written:
            view.addmm_(a, b)
        else:
            torch.mm(a, b, out=view)
            self.written.add(name)

    def row_sum(self, name: str, u: torch.Tensor) -> None:
        """``slice (+)= sum_n u_n``."""
        view = self.views[name]
        if name in self.written:
            view.add_(u.sum(0))
        else:
            torch.sum(u, 0, out=view)
            self.written.add(name)

    def zero_unwritten(self) -> None:
        for name, view in self.views.items():
            if name not in self.written:
                view.zero_()


def _bind(op: OpDef, kind: RuleKind, key: str, n_messages: int, values: dict[str, Any]) -> Callable[..., Any]:
    """The op's ``kind`` rule for ``key`` with its context arguments bound from ``values`` by name
    (:func:`fxcurv.rules.registry.bind`)."""
    rule = registry.TABLES[kind][(op.name, key)]

    def resolve(name: str) -> Any:
        if name in values:
            return values[name]
        raise Unresolved(name)

    kwargs = registry.bind(rule, resolve, n_messages)
    return lambda *messages: rule.fn(*messages, **kwargs)


def constant_values(p: Plan, prog: Program) -> dict[str, Any]:
    """The program's constants the plan reads, by node name."""
    values: dict[str, Any] = {}
    for node, target in p.constants.items():
        obj: Any = prog.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        values[node] = obj
    return values


def sandwich_into(p: Plan, x: torch.Tensor, params: dict[str, torch.Tensor], constants: dict[str, Any],
                  v: dict[str, torch.Tensor], middle: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  out: ParamSlices) -> None:
    """Add ``J^T middle(f, J v)`` of one batch into ``out`` (the module docstring's three sweeps).

    ``params`` holds every parameter's value by name, ``v`` the column's tangents of the space's
    parameters (absent: a zero tangent, and no entry in ``out``), ``constants`` the values of the
    program's other inputs by node name."""
    value: dict[str, Any] = dict(constants)
    tangent: dict[str, torch.Tensor | None] = {}
    value[p.input] = x
    tangent[p.input] = None
    for ph, name in p.params.items():
        value[ph] = params[name]
        tangent[ph] = v.get(name)
    saved: dict[str, Any] = {}
    with torch.no_grad():
        for step in p.steps:
            args = {k: (None if n is None else value[n]) for k, n in step.inputs.items()}
            tans = {k: (None if n is None else tangent.get(n)) for k, n in step.inputs.items()}
            z = value[step.node] = step.op.forward(*args.values(), **step.attrs)
            tangent[step.node] = _tangent(step, args, tans, z, saved)
        f, Jf = value[p.output], tangent[p.output]
        if Jf is None:  # the output does not depend on the space's parameters
            return
        # Which values carry a tangent (and so get a message back); the tangents themselves are dead.
        carrying = {name for name, t in tangent.items() if t is not None}
        tangent.clear()
        message: dict[str, torch.Tensor] = {p.output: middle(f, Jf.unsqueeze(0))[0]}
        del Jf
        for step in reversed(p.steps):
            u = message.pop(step.node, None)
            if u is None:
                continue
            _backward(step, {k: (None if n is None else value[n]) for k, n in step.inputs.items()},
                      {k: n is not None and n in carrying for k, n in step.inputs.items()},
                      u, saved, step.inputs, p.params, message, out)


def _tangent(step: Step, args: dict[str, Any], tans: dict[str, Any], z: torch.Tensor,
             saved: dict[str, Any]) -> torch.Tensor | None:
    if step.kind is StepKind.AFFINE:
        x, weight = args["x"], args["weight"]
        tx, tw, tb = tans["x"], tans["weight"], tans.get("bias")
        if tx is None and tw is None and tb is None:
            return None
        x2 = x.reshape(-1, x.shape[-1])
        rows, width = x2.shape[0], weight.shape[0]
        if tw is not None:  # x V_W^T (+ V_b)
            t = torch.mm(x2, tw.T) if tb is None else torch.addmm(tb, x2, tw.T)
        elif tb is not None:
            t = tb.expand(rows, width).clone()
        else:
            t = torch.zeros(rows, width, dtype=z.dtype, device=z.device)
        if tx is not None:  # + R{x} W^T
            t.addmm_(tx.reshape(-1, tx.shape[-1]), weight.T)
        return t.reshape(z.shape)
    if step.kind is StepKind.DIAGONAL:
        if tans["x"] is None:
            return None
        d1 = saved[step.node] = _bind(step.op, RuleKind.DERIVED, "d1", 0, {**args, **step.attrs, "out": z})()
        return tans["x"] * d1
    t = tans["x"]
    return None if t is None else step.op.forward(t, **step.attrs)


def _backward(step: Step, args: dict[str, Any], carries: dict[str, bool], u: torch.Tensor,
              saved: dict[str, Any], inputs: dict[str, str | None], param_of: dict[str, str],
              message: dict[str, torch.Tensor], out: ParamSlices) -> None:
    """Pass ``u`` at the step's output to its inputs: messages to data inputs that carry a tangent,
    parameter shares into ``out``."""
    to_x: torch.Tensor | None = None
    if step.kind is StepKind.AFFINE:
        u2 = u.reshape(-1, u.shape[-1])
        for key in ("weight", "bias"):
            name = param_of.get(inputs.get(key) or "")
            if name is None or name not in out.views:
                continue
            if key == "weight":
                out.matmul(name, u2.T, args["x"].reshape(-1, args["x"].shape[-1]))
            else:
                out.row_sum(name, u2)
        if carries["x"]:
            to_x = (u2 @ args["weight"]).reshape(args["x"].shape)
    elif step.kind is StepKind.DIAGONAL:
        if carries["x"]:
            to_x = u * saved[step.node]
    elif carries["x"]:
        to_x = _bind(step.op, RuleKind.JAC_T, "x", 1, dict(step.attrs))(u)
    source = inputs["x"]
    if to_x is None or source is None:
        return
    message[source] = message[source] + to_x if source in message else to_x


def row_views(rows: torch.Tensor, names: Sequence[str], shapes: Sequence[torch.Size]) -> list[dict[str, torch.Tensor]]:
    """Rows ``[K, P]`` as ``{name: [*shape]}`` views per row."""
    out = []
    for k in range(rows.shape[0]):
        views: dict[str, torch.Tensor] = {}
        start = 0
        for name, shape in zip(names, shapes):
            size = shape.numel()
            views[name] = rows[k, start:start + size].view(shape)
            start += size
        out.append(views)
    return out
