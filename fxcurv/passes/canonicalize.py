"""Canonicalization: the traced graph, rewritten into fxcurv's op vocabulary.

Every ``call_module`` (``nn.Linear``), ``call_function`` (``F.linear``) and ``call_method``
(``x.view``) becomes one ``call_function`` node whose target is the op's forward
(:mod:`fxcurv.rules`); parameters become graph inputs (``p_<name>`` placeholders, one per parameter
of ``named_parameters()``, in that order, used or not), so a weight used twice is one node with two
users; shape queries fold into constants, also where they are arguments of other calls; identities
(``nn.Identity``, dropout in eval mode) disappear. Each node's :class:`~fxcurv.node_info.NodeInfo`
holds its op, shape, dtype and source (what the user wrote). Anything outside the vocabulary is an
error naming the node, its source and what is supported; so is a trainable parameter used as data
(an input of an op that is not a weight or bias slot), which the compiler has no messages for.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..data import LossScale
from ..errors import InputError, TraceError, UnsupportedOpError
from ..node_info import INPUT, TARGET, info, param_placeholder, set_info, set_value
from ..rules import registry
from ..rules.losses import check_general_loss, general_loss
from ..trace import Traced
from .shape_prop import describe, propagate_shapes

_SHAPE_METHODS = {"size", "dim", "numel", "ndimension", "nelement"}
_SHAPE_ATTRS = {"shape", "ndim"}
_INT_FUNCTIONS = {operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv,
                  operator.mod, operator.neg, operator.truediv}


@dataclass
class CanonicalGraph:
    """The canonical graph of one input signature and what the compiler needs to know about it."""

    root: nn.Module  # owns `loss_fn` (general losses) and constants
    graph: fx.Graph
    loss: fx.Node
    model_output: fx.Node
    params: dict[str, fx.Node]  # parameter name -> placeholder, in named_parameters() order


def _is_shape_query(node: fx.Node, folded: dict[fx.Node, Any]) -> bool:
    if isinstance(node.meta.get("val"), torch.Tensor):
        return False
    if node.op == "call_method" and node.target in _SHAPE_METHODS:
        return True
    if node.op == "call_function" and node.target is getattr and node.args[1] in _SHAPE_ATTRS:
        return True
    if node.op == "call_function" and node.target in _INT_FUNCTIONS:
        return all(a in folded for a in node.all_input_nodes)
    return False


def _source(node: fx.Node, root: nn.Module) -> str:
    if node.op == "call_module":
        mod = root.get_submodule(str(node.target))
        return f"{str(node.target).split('.', 1)[-1]}: {mod!r}".replace("\n", " ")
    if node.op == "call_function":
        return describe(node).split("(", 1)[-1].rstrip(")")
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return node.op


def _is_constant(value: Any) -> bool:
    """A canonical input that no sample and no trainable parameter changes: absent, a lifted tensor
    (``get_attr``), or a frozen parameter's placeholder."""
    if not isinstance(value, fx.Node):
        return True
    if value.op == "get_attr":
        return True
    return value.op == "placeholder" and info(value).param is not None and not info(value).requires_grad


def _contains_node(value: Any) -> bool:
    found = []
    fx.map_arg(value, lambda n: found.append(n))
    return bool(found)


class _Builder:
    """Builds the canonical graph node by node from the traced, shape-propagated graph."""

    def __init__(self, traced: Traced, gm: fx.GraphModule):
        self.traced = traced
        self.gm = gm
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.env: dict[fx.Node, Any] = {}
        self.folded: dict[fx.Node, Any] = {}
        self.params: dict[str, fx.Node] = {}
        self.constants: dict[int, fx.Node] = {}

    def param(self, name: str, value: nn.Parameter) -> fx.Node:
        if name not in self.params:
            node = self.graph.placeholder(param_placeholder(name))
            set_info(node, param=name, shape=tuple(value.shape), dtype=value.dtype,
                     source=f"parameter {name}", requires_grad=value.requires_grad)
            self.params[name] = node
        return self.params[name]

    def lift(self, value: Any) -> Any:
        """A canonical input: nodes map through ``env``; parameters and tensors become graph inputs."""
        if isinstance(value, fx.Node):
            return self.env[value]
        if isinstance(value, nn.Parameter) and id(value) in self.traced.param_names:
            return self.param(self.traced.param_names[id(value)], value)
        if isinstance(value, torch.Tensor):
            if id(value) not in self.constants:
                attr = f"const_{len(self.constants)}"
                self.root.register_buffer(attr, value.detach(), persistent=False)
                with self.graph.inserting_before(None):
                    node = self.graph.get_attr(attr)
                set_info(node, shape=tuple(value.shape), dtype=value.dtype, source="constant")
                self.constants[id(value)] = node
            return self.constants[id(value)]
        return value

    def emit(self, op: registry.OpDef, match: registry.Match, old: fx.Node) -> Any:
        missing = [k for k in match.inputs if k not in op.inputs]
        assert not missing, f"canonicalizer of {op.name} returned unknown inputs {missing}"
        if _contains_node(match.attrs):
            raise UnsupportedOpError(
                f"node {describe(old, self.gm)}: an argument of {op.name} is computed from tensor values "
                "at run time; fxcurv takes attributes (sizes, strides, ...) that are known when it compiles")
        args = tuple(self.lift(match.inputs.get(k)) for k in op.inputs)
        for name, value in zip(op.inputs, args):
            if name in op.constants and not _is_constant(value):
                raise UnsupportedOpError(
                    f"node {describe(old, self.gm)}: input '{name}' of {op.name} is computed from the input or "
                    f"from a trainable parameter ({value}); fxcurv takes it as a constant of the op (a module "
                    "buffer or a frozen tensor), shared by all samples")
        if op.alias:
            return args[0]
        new = self.graph.call_function(op.forward, args, dict(match.attrs))
        set_value(new, old.meta.get("val"))
        set_info(new, op=op.name, source=_source(old, self.gm))
        return new

    def folded_args(self, node: fx.Node) -> registry.Args:
        """The call's arguments with shape queries replaced by their values (``h.shape[2:]``)."""
        def fold(n: fx.Node) -> Any:
            return self.folded.get(n, n)

        return registry.Args(fx.map_arg(node.args, fold), fx.map_arg(node.kwargs, fold))


def canonicalize(traced: Traced, x: torch.Tensor, y: Any) -> CanonicalGraph:
    """Rewrite ``traced`` for inputs like ``(x, y)`` into the canonical op vocabulary."""
    _check_inputs(traced, x)
    gm = traced.gm
    try:
        propagate_shapes(gm, x, y)
    except InputError as err:
        if err.node in set(traced.loss_nodes):
            # torch rejected the target deep inside the loss; the loss's own check says which
            # targets it takes.
            _check_target(traced, gm, y)
        raise

    b = _Builder(traced, gm)
    x_node = b.graph.placeholder(INPUT)
    y_node = b.graph.placeholder(TARGET)
    set_value(x_node, x)
    set_value(y_node, y)
    set_info(x_node, source="input")
    set_info(y_node, source="target")

    loss_nodes = set(traced.loss_nodes)
    errors: list[str] = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            b.env[node] = x_node if node.name == INPUT else y_node
            continue
        if node.op == "output" or node in loss_nodes:
            continue
        if _is_shape_query(node, b.folded):
            b.folded[node] = node.meta["val"]
            b.env[node] = node.meta["val"]
            continue
        if node.op == "get_attr":
            b.env[node] = b.lift(_fetch_attr(gm, str(node.target)))
            continue
        op, match = _match(node, gm, b.folded_args(node))
        b.env[node] = b.emit(op, match, node)

    f = b.env[traced.model_output]
    if not isinstance(f, fx.Node) or not isinstance(traced.model_output.meta.get("val"), torch.Tensor):
        raise TraceError("the model must return a tensor")
    f_val = traced.model_output.meta["val"]

    loss = _canonical_loss(traced, gm, b, f, y_node, f_val, y)
    errors += _parameters_used_as_data(b.graph)
    if errors:
        raise UnsupportedOpError("\n".join(errors))
    # Every parameter has a placeholder, in named_parameters() order: results follow that order,
    # and a parameter the model never reads gets zeros from the quantities.
    for name, p in traced.params.items():
        with b.graph.inserting_before(None):
            b.param(name, p)
    params = {name: b.params[name] for name in traced.params}
    b.graph.output(loss)
    b.graph.lint()
    # Drop example values: they hold a batch of activations.
    for node in gm.graph.nodes:
        node.meta.pop("val", None)
    return CanonicalGraph(b.root, b.graph, loss, f, params)


def _parameters_used_as_data(graph: fx.Graph) -> list[str]:
    """A trainable parameter read by an op input that is not a weight or bias slot gets no messages:
    list each such use (fxcurv would otherwise treat its leading axis as the batch)."""
    problems = []
    for node in graph.nodes:
        op_name = info(node).op
        if node.op != "call_function" or op_name is None:
            continue
        op = registry.OPS[op_name]
        for i, name in enumerate(op.inputs):
            value = node.args[i] if i < len(node.args) else None
            if (isinstance(value, fx.Node) and value.op == "placeholder" and info(value).param
                    and info(value).requires_grad and name not in op.params):
                problems.append(
                    f"parameter {info(value).param} is used as data: it is input '{name}' of node "
                    f"'{node.name}' ({info(node).source}). fxcurv takes trainable parameters as the weight "
                    f"or bias of an op (linear, conv2d); parameters computed on (e.g. torch.tanh(p)) or added "
                    "to activations are not supported yet. Freeze it (requires_grad_(False)) to use it as a "
                    "constant.")
    return problems


def _fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _lookup(node: fx.Node, gm: fx.GraphModule) -> tuple[tuple[registry.OpDef, Any] | None, nn.Module | None]:
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        return registry.MODULE_SOURCES.get(type(mod)), mod
    if node.op == "call_function":
        return registry.FUNCTION_SOURCES.get(node.target), None
    if node.op == "call_method":
        return registry.METHOD_SOURCES.get(str(node.target)), None
    return None, None


def unsupported(node: fx.Node, gm: fx.GraphModule) -> str:
    return f"node {describe(node, gm)} is not supported by fxcurv (source: {_source(node, gm)})."


def _match(node: fx.Node, gm: fx.GraphModule, args: registry.Args) -> tuple[registry.OpDef, registry.Match]:
    entry, mod = _lookup(node, gm)
    if entry is None or entry[0].is_loss:
        raise UnsupportedOpError(
            f"{unsupported(node, gm)}\nSupported ops and the torch calls that map to them:\n  "
            f"{registry.supported_sources()}")
    op, canonicalizer = entry
    try:
        match = canonicalizer(node, mod) if node.op == "call_module" else canonicalizer(node, args)
    except UnsupportedOpError as err:
        raise UnsupportedOpError(f"node {describe(node, gm)}: {err}") from err
    return op, match


def unsupported_nodes(traced: Traced) -> list[str]:
    """Every model node outside the vocabulary, found without shapes (at compile time)."""
    gm = traced.gm
    loss_nodes = set(traced.loss_nodes)
    found = []
    folded: dict[fx.Node, Any] = {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr") or node in loss_nodes:
            continue
        if _is_shape_query(node, folded):
            folded[node] = True
            continue
        entry, _ = _lookup(node, gm)
        if entry is not None and not entry[0].is_loss:
            continue
        if node.target is operator.getitem and isinstance(node.args[0], fx.Node) and _lookup(node.args[0], gm)[0]:
            continue  # a pick from a supported op's result: its canonicalizer says more once shapes are known
        found.append(unsupported(node, gm))
    return found


def _match_loss(traced: Traced, gm: fx.GraphModule) -> tuple[fx.Node, registry.OpDef, registry.Match] | None:
    """``(node, op, match)`` if the loss is one call to a closed-form loss on ``(f, y)``, else ``None``."""
    loss_nodes = [n for n in traced.loss_nodes if n.op != "get_attr"]
    if len(loss_nodes) != 1:
        return None
    node = loss_nodes[0]
    entry, mod = _lookup(node, gm)
    if entry is None or not entry[0].is_loss or node.op == "call_method":
        return None
    op, canonicalizer = entry
    try:
        match = (canonicalizer(node, mod) if node.op == "call_module"
                 else canonicalizer(node, registry.Args(node.args, node.kwargs)))
    except UnsupportedOpError as err:
        raise UnsupportedOpError(f"loss node {describe(node, gm)}: {err}") from err
    if match is None or match.inputs.get("f") is not traced.model_output:
        return None
    y_in = match.inputs.get("y")
    if not isinstance(y_in, fx.Node) or y_in.op != "placeholder":
        return None
    return node, op, match


def _check_target(traced: Traced, gm: fx.GraphModule, y: Any) -> None:
    match = _match_loss(traced, gm)
    f_val = traced.model_output.meta.get("val")
    if match is not None and isinstance(f_val, torch.Tensor) and match[1].check is not None:
        match[1].check(f_val.shape, f_val.dtype, y, **match[2].attrs)


def target_check(canon: CanonicalGraph) -> Callable[[Any], None] | None:
    """``check(y)``, raising InputError for targets the program's loss cannot take, or ``None``.

    A closed-form loss checks the target's shape and dtype against the model output's (fixed per
    input signature) and its values (class indices in range), which change at every call: the
    engine runs this before each call of the program, so that a bad target is an InputError on
    every call, not only on the one that built the program.
    """
    op = registry.OPS.get(info(canon.loss).op or "")
    if op is None or op.check is None:
        return None
    f = info(canon.model_output)
    return functools.partial(op.check, f.shape, f.dtype, **canon.loss.kwargs)


def loss_scale(canon: CanonicalGraph) -> Callable[[Any], LossScale] | None:
    """``scale(y)``: how a batch's loss with target ``y`` enters a data set's loss (its reduction and
    normalizer, :mod:`fxcurv.data`), or ``None`` for a loss that does not declare it (the general path:
    a traced loss function's reduction is not known to the compiler)."""
    op = registry.OPS.get(info(canon.loss).op or "")
    if op is None or op.scale is None:
        return None
    return functools.partial(op.scale, info(canon.model_output).shape, **canon.loss.kwargs)


def _canonical_loss(traced: Traced, gm: fx.GraphModule, b: _Builder, f: fx.Node, y_node: fx.Node,
                    f_val: torch.Tensor, y_val: Any) -> fx.Node:
    """The closed-form loss op if the loss is one call to a known loss; the general path otherwise."""
    match = _match_loss(traced, gm)
    if match is not None:
        node, op, found = match
        if op.check is not None:
            op.check(f_val.shape, f_val.dtype, y_val, **found.attrs)
        new = b.graph.call_function(op.forward, (f, y_node), dict(found.attrs))
        set_info(new, op=op.name, source=_source(node, gm), shape=(), dtype=f_val.dtype)
        return new
    # General path: the traced loss runs as a whole; torch.func differentiates it.
    hvp = check_general_loss(traced.loss_gm, f_val, y_val)  # "forward" or "reverse" products
    b.root.loss_fn = traced.loss_gm
    with b.graph.inserting_before(None):
        fn = b.graph.get_attr("loss_fn")
    set_info(fn, source="the traced loss")
    new = b.graph.call_function(general_loss, (f, y_node), {"loss_fn": fn, "hvp": hvp})
    set_info(new, op="general_loss", source="traced loss (general path, torch.func Hessian)", shape=(),
             dtype=f_val.dtype)
    return new


def _check_inputs(traced: Traced, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise InputError(f"input x must be a tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise InputError("input x must have a batch dimension (dim 0)")
    floats = [p for p in traced.params.values() if p.is_floating_point()]
    if floats:
        p = floats[0]
        if x.is_floating_point() and x.dtype != p.dtype:
            raise InputError(
                f"input x has dtype {x.dtype} but the model's parameters are {p.dtype}; cast one "
                "of them (fxcurv does not mix precisions)"
            )
        if x.device != p.device:
            raise InputError(f"input x is on {x.device} but the model's parameters are on {p.device}")
