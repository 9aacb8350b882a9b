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
from torch.utils import _pytree as pytree

from .. import capture_aten
from ..data import LossScale
from ..errors import InputError, TraceError, UnsupportedOpError
from ..node_info import INPUT, TARGET, info, param_placeholder, set_info, set_value
from ..rules import generic as generic_rules
from ..rules import registry
from ..rules.losses import check_general_loss, general_loss
from ..trace import Traced, user_location
from .shape_prop import describe, propagate_shapes

_SHAPE_METHODS = {"size", "dim", "numel", "ndimension", "nelement"}
_SHAPE_ATTRS = {"shape", "ndim", "dtype", "device", "is_floating_point"}
_INT_FUNCTIONS = {operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv,
                  operator.mod, operator.neg, operator.truediv, operator.pow}


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
    if node.op == "call_function" and node.target in capture_aten.SHAPE_QUERIES:
        return True  # aten.sym_size.int(x, d) of an exported graph
    if node.op == "call_function" and node.target is getattr and node.args[1] in _SHAPE_ATTRS:
        return True
    if node.op == "call_function" and node.target in _INT_FUNCTIONS:
        return all(a in folded for a in node.all_input_nodes)
    # Arithmetic on folded values (``math.sqrt(x.size(-1))``): a constant of this input signature.
    if node.op in ("call_function", "call_method") and node.all_input_nodes and "val" in node.meta:
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
        self.batched: dict[fx.Node, bool] = {}
        self.trainable: dict[fx.Node, bool] = {}
        self.calls: list[Any] = []
        self.shapes: dict[fx.Node, fx.Node] = {}  # x.shape / x.size() -> x
        self.batch_sizes: set[fx.Node] = set()  # folded values that are the batch size

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

    def emit(self, op: registry.OpDef, match: registry.Match, old: fx.Node, picked: Any = None) -> Any:
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
        while op.drops_absent_tail and args and args[-1] is None:
            args = args[:-1]
        new = self.graph.call_function(op.forward, args, dict(match.attrs))
        set_value(new, old.meta.get("val") if picked is None else picked)
        set_info(new, op=op.name, source=_source(old, self.gm))
        return new

    def note_batch_size(self, node: fx.Node) -> None:
        """Remember a folded value that is the batch size (``x.size(0)``, ``x.shape[0]``) of a value
        carrying the batch, so that generic calls take it as :class:`~fxcurv.rules.generic.BatchSize`."""
        args = node.args
        source = args[0] if args and isinstance(args[0], fx.Node) else None
        if source is None:
            return
        if capture_aten.layout(node) is capture_aten.SymLayout.BATCH:
            self.batch_sizes.add(node)  # exported: the batch symbol itself (aten.sym_size.int(x, 0))
            return
        if (node.op == "call_method" and node.target == "size" and len(args) == 1) or (
                node.op == "call_function" and node.target is getattr and args[1] == "shape"):
            self.shapes[node] = source  # x.size() / x.shape
        elif node.op == "call_method" and node.target == "size" and len(args) == 2 and args[1] == 0:
            if self.is_batched(self.env.get(source)):
                self.batch_sizes.add(node)
        elif node.op == "call_function" and node.target is operator.getitem and source in self.shapes and args[1] == 0:
            if self.is_batched(self.env.get(self.shapes[source])):
                self.batch_sizes.add(node)

    # ---- the generic rule --------------------------------------------------------------------------
    def is_batched(self, value: Any) -> bool:
        """Whether a canonical value carries the batch (is computed from the input ``x``)."""
        if not isinstance(value, fx.Node):
            return False
        if value not in self.batched:
            if value.op == "placeholder":
                self.batched[value] = value.name == INPUT
            elif value.op == "get_attr":
                self.batched[value] = False
            else:
                self.batched[value] = any(self.is_batched(a) for a in value.all_input_nodes)
        return self.batched[value]

    def is_trainable(self, value: Any) -> bool:
        """Whether a canonical value depends on a trainable parameter."""
        if not isinstance(value, fx.Node):
            return False
        if value not in self.trainable:
            if value.op == "placeholder":
                self.trainable[value] = bool(info(value).param) and info(value).requires_grad
            elif value.op == "get_attr":
                self.trainable[value] = False
            else:
                self.trainable[value] = any(self.is_trainable(a) for a in value.all_input_nodes)
        return self.trainable[value]

    def generic(self, node: fx.Node, pick: int | None = None, value: Any = None) -> Any:
        """``node`` as a generic op (:mod:`fxcurv.rules.generic`): its tensor arguments become slots, the
        rest stays in its :class:`~fxcurv.rules.generic.GenericCall`. A call returning several tensors
        is kept as :class:`_Outputs`, made into one generic node per output its users pick."""
        val = node.meta.get("val") if value is None else value
        where = f"node {describe(node, self.gm)}{user_location(node)}"
        _refuse_in_place(node, where)
        if pick is None and isinstance(val, (tuple, list)):
            return _Outputs(self, node, val)
        slots: list[Any] = []
        examples: list[torch.Tensor] = []

        def add(lifted: fx.Node, example: Any) -> int:
            if lifted not in slots:
                slots.append(lifted)
                examples.append(example.detach() if isinstance(example, torch.Tensor) else example)
            return slots.index(lifted)

        def slot(v: Any) -> Any:
            if isinstance(v, fx.Node) and isinstance(self.env.get(v), _Outputs):
                return [slot(o) for o in self.env[v].all()]
            if isinstance(v, fx.Node) and isinstance(self.env.get(v), _ParamExpr):
                expr = self.env[v]
                return generic_rules.Nested(expr.call, tuple(add(s, e) for s, e in zip(expr.slots, expr.examples)))
            example = v.meta.get("val") if isinstance(v, fx.Node) else v
            lifted = self.lift(v)
            if not isinstance(lifted, fx.Node):
                return lifted
            return generic_rules.Slot(add(lifted, example))

        def constant(v: fx.Node) -> Any:
            if v in self.folded:
                return generic_rules.BatchSize() if v in self.batch_sizes else self.folded[v]
            return v

        def leaf(v: Any) -> Any:
            return slot(v) if isinstance(v, (fx.Node, torch.Tensor)) else v

        # Folded shape values first (also inside slices), then the tensors become slots.
        args, kwargs = fx.map_arg((tuple(node.args), dict(node.kwargs)), constant)
        args, kwargs = pytree.tree_map(leaf, (args, kwargs))
        module_params: tuple[tuple[str, int], ...] = ()
        target: Any
        if node.op == "call_module":
            module = self.gm.get_submodule(str(node.target))
            kind, target = generic_rules.CallKind.MODULE, module
            module_params = tuple((name, slot(p).index) for name, p in module.named_parameters())
        elif node.op == "call_method":
            kind, target = generic_rules.CallKind.METHOD, str(node.target)
        else:
            kind, target = generic_rules.CallKind.FUNCTION, node.target
        if len(slots) > generic_rules.MAX_SLOTS:
            raise UnsupportedOpError(f"{where} takes {len(slots)} tensors; the generic rule takes at most "
                                     f"{generic_rules.MAX_SLOTS}")
        if not isinstance(val, torch.Tensor):
            raise UnsupportedOpError(f"{where} returns {type(val).__name__}, not a tensor; fxcurv differentiates "
                                     "ops whose values are tensors (shape queries fold into constants)")
        kinds = tuple(generic_rules.SlotKind.PARAM if info(s).param else generic_rules.SlotKind.DATA
                      if self.is_batched(s) else generic_rules.SlotKind.CONSTANT for s in slots)
        call = generic_rules.GenericCall(kind, target, tuple(args), dict(kwargs), kinds, _source(node, self.gm),
                                         module_params, pick)
        call.trainable = frozenset(i for i, s in enumerate(slots) if info(s).param and info(s).requires_grad)
        trainable = any(self.is_trainable(s) for s in slots)
        if trainable and generic_rules.SlotKind.DATA not in kinds:
            # A computation on parameters alone: inlined into the calls that read it.
            return _ParamExpr(call, tuple(slots), tuple(examples), where)
        if generic_rules.SlotKind.DATA in kinds:
            generic_rules.check_samples_independent(call, tuple(examples), where)
            if trainable:
                generic_rules.probe_curvature(call, tuple(examples), where)
        attr = f"generic_{len(self.calls)}"
        self.calls.append(call)
        setattr(self.root, attr, call)
        with self.graph.inserting_before(None):
            handle = self.graph.get_attr(attr)
        set_info(handle, source=f"the generic call of {node.name}")
        new = self.graph.call_function(generic_rules.generic, tuple(slots), {"call": handle})
        set_value(new, val)
        set_info(new, op=generic_rules.op.name, source=call.source, call=call)
        return new

    def emit_output(self, node: fx.Node, pick: int, value: Any) -> Any:
        """Output ``pick`` of a call returning several tensors: a hand op where its source has an output
        canonicalizer that takes it (``h.chunk(3, -1)[0]`` is an ``index`` node), else a generic node."""
        found = None
        if not any(isinstance(self.env.get(a), _ParamExpr) for a in node.all_input_nodes):
            found = _match_output(node, self.gm, self.folded_args(node), pick)
        if found is None:
            return self.generic(node, pick=pick, value=value)
        return self.emit(*found, node, picked=value)

    def folded_args(self, node: fx.Node) -> registry.Args:
        """The call's arguments with shape queries replaced by their values (``h.shape[2:]``)."""
        def fold(n: fx.Node) -> Any:
            return self.folded.get(n, n)

        return registry.Args(fx.map_arg(node.args, fold), fx.map_arg(node.kwargs, fold))


def _refuse_in_place(node: fx.Node, where: str) -> None:
    """An in-place call changes a value other nodes may read; the program computes each value once, so
    only out-of-place calls are taken (``inplace=True`` where nothing else reads the input is fine)."""
    name = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")
    in_place_method = node.op == "call_method" and name.endswith("_") and not name.endswith("__")
    shared_input = node.kwargs.get("inplace") is True and any(
        len(a.users) > 1 for a in node.all_input_nodes)
    if in_place_method or shared_input:
        raise UnsupportedOpError(
            f"{where} works in place ({name}), changing a value that other nodes read; write it out of place "
            f"(e.g. `h = h.{name.rstrip('_')}(...)` or inplace=False)")


@dataclass
class _ParamExpr:
    """A call on parameters alone (``self.w.t()``, ``self.cls.expand(N, -1, -1)``): not a node of its own
    (it has no batch), but nested into each generic call that reads it
    (:class:`~fxcurv.rules.generic.Nested`), which then takes the parameters as its inputs."""

    call: Any
    slots: tuple[fx.Node, ...]
    examples: tuple[Any, ...]
    where: str


class _Outputs:
    """A generic call that returns several tensors (``chunk``, ``split``, ``nn.MultiheadAttention``): one
    generic node per output that is used, made when it is picked."""

    def __init__(self, builder: _Builder, node: fx.Node, values: Any):
        self.builder, self.node, self.values = builder, node, values
        self.picked: dict[int, Any] = {}

    def pick(self, index: Any) -> Any:
        named: Any = getattr(self.values, "_fields", None) or getattr(type(self.values), "__match_args__", ())
        fields: tuple[str, ...] = tuple(named)
        if isinstance(index, str) and index in fields:
            index = fields.index(index)  # a named tuple's field (torch.sort(x).values)
        if not isinstance(index, int):
            raise UnsupportedOpError(f"node {describe(self.node, self.builder.gm)}: its outputs are picked with "
                                     f"{index!r}; fxcurv takes one output at a time, by an integer index")
        index = index % len(self.values)
        if index not in self.picked:
            value = self.values[index]
            self.picked[index] = (None if value is None else self.builder.emit_output(self.node, index, value))
        return self.picked[index]

    def all(self) -> list[Any]:
        return [self.pick(i) for i in range(len(self.values))]


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
            b.note_batch_size(node)
            continue
        if node.op == "get_attr":
            b.env[node] = b.lift(_fetch_attr(gm, str(node.target)))
            continue
        if node.target in (operator.getitem, getattr) and isinstance(b.env.get(node.args[0]), _Outputs):
            # An output, by index or field name; one nobody reads (`h, _ = rnn(x)`) is not built.
            b.env[node] = b.env[node.args[0]].pick(node.args[1]) if node.users else None
            continue
        found = _match(node, gm, b.folded_args(node))
        if found is not None and any(isinstance(b.env.get(v), _ParamExpr) for v in found[1].inputs.values()
                                     if isinstance(v, fx.Node)):
            found = None  # a hand op takes parameters, not computations on them: nested into a generic call
        b.env[node] = b.emit(*found, node) if found is not None else b.generic(node)

    f = b.env[traced.model_output]
    if isinstance(f, _ParamExpr):
        raise UnsupportedOpError(f"the model's output ({f.where}) is computed from parameters alone, not from x")
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
        if op.variadic:
            continue  # every input of a generic op may be a parameter
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


def _match(node: fx.Node, gm: fx.GraphModule, args: registry.Args
           ) -> tuple[registry.OpDef, registry.Match] | None:
    """The hand-written op for ``node`` and its canonical inputs, or ``None``: the generic rule."""
    entry, mod = _lookup(node, gm)
    if entry is None:
        return None
    if entry[0].is_loss:
        raise UnsupportedOpError(f"{unsupported(node, gm)} A loss can only end the graph, as loss_fn(model(x), y).")
    op, canonicalizer = entry
    try:
        match = canonicalizer(node, mod) if node.op == "call_module" else canonicalizer(node, args)
    except UnsupportedOpError as err:
        raise UnsupportedOpError(f"node {describe(node, gm)}{user_location(node)}: {err}") from err
    return None if match is None else (registry.matched_op(op, match), match)


def _match_output(node: fx.Node, gm: fx.GraphModule, args: registry.Args, pick: int
                  ) -> tuple[registry.OpDef, registry.Match] | None:
    """The hand-written op for output ``pick`` of the multi-output call ``node``, or ``None``."""
    entry = (registry.OUTPUT_FUNCTION_SOURCES.get(node.target) if node.op == "call_function" else
             registry.OUTPUT_METHOD_SOURCES.get(str(node.target)) if node.op == "call_method" else None)
    if entry is None:
        return None
    op, canonicalizer = entry
    try:
        match = canonicalizer(node, args, pick)
    except UnsupportedOpError as err:
        raise UnsupportedOpError(f"node {describe(node, gm)}{user_location(node)}: {err}") from err
    return None if match is None else (registry.matched_op(op, match), match)


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
        if entry is not None and entry[0].is_loss:
            found.append(unsupported(node, gm))  # every other call has a hand-written or the generic rule
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
    return node, registry.matched_op(op, match), match


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
