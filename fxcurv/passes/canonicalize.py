"""Canonicalization: the traced graph, rewritten into fxcurv's op vocabulary.

Every ``call_module`` (``nn.Linear``), ``call_function`` (``F.linear``) and ``call_method``
(``x.view``) becomes one ``call_function`` node whose target is the op's forward
(:mod:`fxcurv.rules`); parameters become graph inputs (``p_<name>`` placeholders), so a weight used
twice is one node with two users; shape queries fold into constants; identities (``nn.Identity``,
dropout in eval mode) disappear. Each node keeps ``meta['op']``, ``meta['shape']``, ``meta['dtype']``
and ``meta['source']`` (what the user wrote). Anything outside the vocabulary is an error naming the
node, its source and what is supported.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx
from torch import nn

from ..errors import InputError, TraceError, UnsupportedOpError
from ..rules import registry
from ..rules.losses import check_general_loss, general_loss
from ..trace import Traced
from .shape_prop import describe, propagate_shapes

_SHAPE_METHODS = {"size", "dim", "numel", "ndimension", "nelement"}
_SHAPE_ATTRS = {"shape", "ndim"}
_INT_FUNCTIONS = {operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv,
                  operator.mod, operator.neg, operator.truediv}


@dataclass
class Canonical:
    """The canonical graph of one input signature and what the compiler needs to know about it."""

    root: nn.Module  # owns `loss_fn` (general losses) and constants
    graph: fx.Graph
    loss: fx.Node
    model_output: fx.Node
    params: dict[str, fx.Node]  # parameter name -> placeholder, in named_parameters() order


def param_placeholder_name(name: str) -> str:
    return "p_" + name.replace(".", "_")


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
        mod = root.get_submodule(node.target)
        return f"{node.target.split('.', 1)[-1]}: {mod!r}".replace("\n", " ")
    if node.op == "call_function":
        return describe(node).split("(", 1)[-1].rstrip(")")
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return node.op


def canonicalize(traced: Traced, x: torch.Tensor, y: Any) -> Canonical:
    """Rewrite ``traced`` for inputs like ``(x, y)`` into the canonical op vocabulary."""
    _check_inputs(traced, x)
    gm = traced.gm
    try:
        propagate_shapes(gm, x, y)
    except InputError as err:
        if getattr(err, "node", None) in set(traced.loss_nodes):
            # torch rejected the target deep inside the loss; the loss's own check says which
            # targets it takes.
            _check_target(traced, gm, y)
        raise

    graph = fx.Graph()
    root = nn.Module()
    env: dict[fx.Node, Any] = {}
    folded: dict[fx.Node, Any] = {}
    params: dict[str, fx.Node] = {}
    constants: dict[int, fx.Node] = {}

    def set_meta(new: fx.Node, old: fx.Node, op: Optional[str], source: str):
        val = old.meta.get("val")
        if isinstance(val, torch.Tensor):
            new.meta["shape"], new.meta["dtype"] = tuple(val.shape), val.dtype
        new.meta["op"] = op
        new.meta["source"] = source

    def lift(value: Any) -> Any:
        """A canonical input: nodes map through ``env``; parameters and tensors become graph inputs."""
        if isinstance(value, fx.Node):
            return env[value]
        if isinstance(value, nn.Parameter) and id(value) in traced.param_names:
            name = traced.param_names[id(value)]
            if name not in params:
                node = graph.placeholder(param_placeholder_name(name))
                node.meta.update(param=name, shape=tuple(value.shape), dtype=value.dtype, op=None,
                                 source=f"parameter {name}", requires_grad=value.requires_grad)
                params[name] = node
            return params[name]
        if isinstance(value, torch.Tensor):
            if id(value) not in constants:
                attr = f"const_{len(constants)}"
                root.register_buffer(attr, value.detach(), persistent=False)
                with graph.inserting_before(None):
                    node = graph.get_attr(attr)
                node.meta.update(shape=tuple(value.shape), dtype=value.dtype, op=None, source="constant")
                constants[id(value)] = node
            return constants[id(value)]
        return value

    def emit(op: registry.OpDef, canon: registry.Canonical, old: fx.Node) -> fx.Node:
        missing = [k for k in canon.inputs if k not in op.inputs]
        assert not missing, f"canonicalizer of {op.name} returned unknown inputs {missing}"
        args = tuple(lift(canon.inputs.get(k)) for k in op.inputs)
        if op.alias:
            return args[0]
        new = graph.call_function(op.forward, args, dict(canon.attrs))
        set_meta(new, old, op.name, _source(old, gm))
        return new

    x_node = graph.placeholder("x")
    y_node = graph.placeholder("y")
    set_meta(x_node, next(n for n in gm.graph.nodes if n.name == "x"), None, "input")
    set_meta(y_node, next(n for n in gm.graph.nodes if n.name == "y"), None, "target")

    loss_nodes = set(traced.loss_nodes)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = x_node if node.name == "x" else y_node
            continue
        if node.op == "output" or node in loss_nodes:
            continue
        if _is_shape_query(node, folded):
            folded[node] = node.meta["val"]
            env[node] = node.meta["val"]
            continue
        if node.op == "get_attr":
            env[node] = lift(_fetch_attr(gm, node.target))
            continue
        op, canon = _match(node, gm)
        env[node] = emit(op, canon, node)

    f = env[traced.model_output]
    if not isinstance(f, fx.Node) or not isinstance(traced.model_output.meta.get("val"), torch.Tensor):
        raise TraceError("the model must return a tensor")
    f_val, y_val = traced.model_output.meta["val"], y

    loss = _canonical_loss(traced, gm, graph, root, f, y_node, f_val, y_val, env, set_meta)
    graph.output(loss)
    graph.lint()
    # Drop example values: they hold a batch of activations.
    for node in gm.graph.nodes:
        node.meta.pop("val", None)
    return Canonical(root, graph, loss, f, params)


def _fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _match(node: fx.Node, gm: fx.GraphModule) -> tuple[registry.OpDef, registry.Canonical]:
    entry, mod = None, None
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        entry = registry.MODULE_SOURCES.get(type(mod))
    elif node.op == "call_function":
        entry = registry.FUNCTION_SOURCES.get(node.target)
    elif node.op == "call_method":
        entry = registry.METHOD_SOURCES.get(node.target)
    if entry is None or entry[0].is_loss:
        raise UnsupportedOpError(
            f"node {describe(node, gm)} is not supported by fxcurv (source: {_source(node, gm)}).\n"
            f"Supported ops and the torch calls that map to them:\n  {registry.supported_sources()}"
        )
    op, canonicalizer = entry
    try:
        canon = canonicalizer(node, mod) if node.op == "call_module" else canonicalizer(
            node, registry.Args(node.args, node.kwargs))
    except UnsupportedOpError as err:
        raise UnsupportedOpError(f"node {describe(node, gm)}: {err}") from err
    return op, canon


def _match_loss(traced, gm):
    """``(node, op, canonical)`` if the loss is one call to a closed-form loss on ``(f, y)``, else ``None``."""
    loss_nodes = [n for n in traced.loss_nodes if n.op != "get_attr"]
    if len(loss_nodes) != 1:
        return None
    node = loss_nodes[0]
    entry = None
    if node.op == "call_module":
        entry = registry.MODULE_SOURCES.get(type(gm.get_submodule(node.target)))
    elif node.op == "call_function":
        entry = registry.FUNCTION_SOURCES.get(node.target)
    if entry is None or not entry[0].is_loss:
        return None
    op, canonicalizer = entry
    try:
        canon = (canonicalizer(node, gm.get_submodule(node.target)) if node.op == "call_module"
                 else canonicalizer(node, registry.Args(node.args, node.kwargs)))
    except UnsupportedOpError as err:
        raise UnsupportedOpError(f"loss node {describe(node, gm)}: {err}") from err
    if canon is None or canon.inputs.get("f") is not traced.model_output:
        return None
    y_in = canon.inputs.get("y")
    if not isinstance(y_in, fx.Node) or y_in.op != "placeholder":
        return None
    return node, op, canon


def _check_target(traced, gm, y) -> None:
    match = _match_loss(traced, gm)
    f_val = traced.model_output.meta.get("val")
    if match is not None and isinstance(f_val, torch.Tensor) and match[1].check is not None:
        match[1].check(f_val, y, **match[2].attrs)


def _canonical_loss(traced, gm, graph, root, f, y_node, f_val, y_val, env, set_meta) -> fx.Node:
    """The closed-form loss op if the loss is one call to a known loss; the general path otherwise."""
    match = _match_loss(traced, gm)
    if match is not None:
        node, op, canon = match
        if op.check is not None:
            op.check(f_val, y_val, **canon.attrs)
        new = graph.call_function(op.forward, (f, y_node), dict(canon.attrs))
        set_meta(new, node, op.name, _source(node, gm))
        new.meta["shape"], new.meta["dtype"] = (), f_val.dtype
        return new
    # General path: the traced loss runs as a whole; torch.func differentiates it.
    check_general_loss(traced.loss_gm, f_val, y_val)
    root.loss_fn = traced.loss_gm
    with graph.inserting_before(None):
        fn = graph.get_attr("loss_fn")
    fn.meta.update(op=None, source="the traced loss")
    new = graph.call_function(general_loss, (f, y_node), {"loss_fn": fn})
    new.meta.update(op="general_loss", source="traced loss (general path, torch.func Hessian)",
                    shape=(), dtype=f_val.dtype)
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
