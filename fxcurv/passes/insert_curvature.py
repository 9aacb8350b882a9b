"""Insert the backward messages: canonical forward graph -> curvature program.

The program computes, in one call, the loss, the gradient and the requested quantities. After a copy
of the forward graph it walks the ops in reverse topological order. At each op it sums the messages
its consumers sent (a fan-out in the forward graph is a sum in the backward graph), asks the op's
rules (:mod:`fxcurv.rules`) what the op contributes to its parameters, and sends messages on to its
data inputs:

* ``g``  -- the gradient, ``[N, ...]``;
* square-root factor columns, grouped by **origin** -- the loss's exact factor (``diag_ggn``,
  ``diag_hessian``), its Monte Carlo factor (``diag_ggn_mc``), and for ``diag_hessian`` the residual
  term ``diag[phi''(x) g]`` of every activation (HBP eq. S.9) and the mixed term of a weight used
  twice. Columns of one origin are summed where paths meet, which makes the result exact on residual
  networks; columns of different origins are never mixed;
* ``d``  -- the HesScale diagonal, one stream per quantity (``hesscale`` adds ``phi'' g``,
  ``hesscale_gn`` does not).

A parameter used once gets its diagonals from one product per origin (``(sum_k S_k^2)^T x^2`` for a
linear layer); a parameter used several times sums its per-sample factors over uses before squaring.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Optional

import torch.fx as fx

from .. import factors
from ..errors import UnsupportedOpError
from ..quantities import DIAG_QUANTITIES
from ..rules import registry
from ..rules.registry import OpDef
from .canonicalize import Canonical


@dataclass(frozen=True)
class Origin:
    """Where a group of square-root factor columns starts, and which quantities collect it."""

    kind: str  # "loss" | "mc" | "residual" | "mixed"
    at: str  # the forward node the columns start at ("" for the loss)
    quantities: frozenset

    @property
    def label(self) -> str:
        return self.kind if not self.at else f"{self.kind}:{self.at}"


@dataclass
class Factor:
    """One origin's columns at a node: dense ``S [K, N, ...]`` (+ ``sign [K, N]``) or a diagonal
    ``r [N, ...]`` (standing for ``diag(r)``; only ever at the node where it originates)."""

    origin: Origin
    value: fx.Node
    sign: Optional[fx.Node]
    diagonal: bool = False


@dataclass
class Inbox:
    """Messages sent to one forward node's output by its consumers. ``bundle`` holds the stacked
    ``[g; S_loss; S_mc]`` columns: they start together at the loss and follow the same path, so each op
    passes them with one product (one ``W^T [g; S]`` GEMM per linear layer)."""

    bundle: list = field(default_factory=list)
    d: dict = field(default_factory=dict)  # quantity -> [node]
    factors: dict = field(default_factory=dict)  # Origin -> [Factor]


@dataclass
class ParamAccumulator:
    uses_left: int
    grads: list = field(default_factory=list)
    diag: dict = field(default_factory=dict)  # quantity -> [node]
    per_sample: dict = field(default_factory=dict)  # Origin -> [(node, sign)]
    mixed_b: dict = field(default_factory=dict)  # Origin -> node B [D, N, *param]


@functools.lru_cache(maxsize=None)
def _mixed_columns_fn(op_name: str, param: str):
    """A graph target computing ``b_i = B^T e_i`` for op ``op_name``'s bilinear (data, ``param``) pair.

    ``B^T e_i`` is the per-sample parameter VJP of the op with the data input replaced by the unit
    vector ``e_i`` and the output gradient ``g``: the columns of the mixed second derivative.
    """
    rule = registry.PER_SAMPLE[(op_name, param)]
    data = next(d for d, p in registry.OPS[op_name].bilinear if p == param)

    def mixed_columns(g, basis, **ctx):
        d = basis.shape[0]
        ctx[data] = factors.fold_lead(basis)
        return factors.unfold_lead(rule(factors.expand_columns(g, d), **ctx), d)

    mixed_columns.__name__ = f"{op_name}_mixed_columns_{param}"
    mixed_columns.rule_label = f"{op_name}.mixed[{param}]"
    return mixed_columns


class CurvatureBuilder:
    def __init__(self, canon: Canonical, quantities: tuple[str, ...], mc_samples: int):
        self.canon = canon
        self.quantities = set(quantities)
        self.mc_samples = mc_samples
        self.graph = fx.Graph()
        self.root = canon.root
        self.env: dict[fx.Node, Any] = {}
        self.saved: dict[fx.Node, dict[str, fx.Node]] = {}
        self.derived_memo: dict[tuple[fx.Node, str], fx.Node] = {}
        self.inbox: dict[fx.Node, Inbox] = {}
        self.generator: Optional[fx.Node] = None
        self.outputs: dict[str, fx.Node] = {}
        self.loss_origin = Origin("loss", "", frozenset(self.quantities & {"diag_ggn", "diag_hessian"}))
        self.mc_origin = Origin("mc", "", frozenset({"diag_ggn_mc"}))
        # Column ranges of the bundle [g; S_loss; S_mc]: origin -> (start, stop, sign node).
        self.layout: dict = {}

    # ---- helpers -------------------------------------------------------------------------------
    def node(self, fn, args=(), kwargs=None, *, kind: str, of: Optional[fx.Node] = None,
             message: str = "", stream: str = "", shape=None, name: Optional[str] = None,
             at: Optional[fx.Node] = None) -> fx.Node:
        if name is None and at is not None:
            name = f"{_PREFIX.get((kind, message), message)}{_stream_tag(stream, kind)}_{at.name}"
        n = self.graph.create_node("call_function", fn, tuple(args), dict(kwargs or {}), name=name)
        n.meta.update(kind=kind, of=of.name if of is not None else "", message=message, stream=stream)
        if shape is not None:
            n.meta["shape"] = tuple(shape)
        return n

    def op_of(self, node: fx.Node) -> Optional[OpDef]:
        name = node.meta.get("op")
        return registry.OPS.get(name) if name else None

    def input_map(self, node: fx.Node) -> dict[str, Any]:
        op = self.op_of(node)
        return {name: node.args[i] if i < len(node.args) else None for i, name in enumerate(op.inputs)}

    def resolve(self, node: fx.Node, name: str, extra: dict) -> Any:
        """The value a rule argument ``name`` refers to, at op node ``node`` (canonical graph)."""
        op = self.op_of(node)
        if name in extra:
            return extra[name]
        if name in op.inputs:
            value = self.input_map(node)[name]
            return self.env[value] if isinstance(value, fx.Node) else value
        if name in node.kwargs:
            value = node.kwargs[name]
            return self.env[value] if isinstance(value, fx.Node) else value
        if name == "out":
            return self.env[node]
        if name in op.saved:
            return self.saved[node][name]
        if (op.name, name) in registry.DERIVED:
            key = (node, name)
            if key not in self.derived_memo:
                fn = registry.DERIVED[(op.name, name)]
                self.derived_memo[key] = self.node(
                    fn, (), self.bind(fn, node, 0, extra), kind="derived", of=node, message=name,
                    name=f"{node.name}_{name}")
            return self.derived_memo[key]
        raise KeyError(name)

    def bind(self, fn, node: fx.Node, n_messages: int, extra: Optional[dict] = None) -> dict:
        extra = extra or {}
        defaults = registry.rule_defaults(fn)
        kwargs = {}
        for name in registry.rule_inputs(fn, n_messages):
            try:
                kwargs[name] = self.resolve(node, name, extra)
            except KeyError:
                if name not in defaults:
                    raise KeyError(f"rule {fn.__name__} of op {node.meta.get('op')} needs '{name}', "
                                   "which is neither an input, attribute, saved nor derived value")
        return kwargs

    def apply(self, table: dict, key, msg_args, node: fx.Node, *, kind, message, stream="", shape=None,
              name=None, at=None):
        fn = table.get(key)
        if fn is None:
            return None
        kwargs = self.bind(fn, node, len(msg_args))
        return self.node(fn, msg_args, kwargs, kind=kind, of=node, message=message, stream=stream,
                         shape=shape, name=name, at=at)

    def sum_nodes(self, nodes: list, *, kind, of, message, stream="", shape=None, name=None, at=None) -> fx.Node:
        if len(nodes) == 1:
            return nodes[0]
        return self.node(factors.add_all, nodes, kind=kind, of=of, message=message, stream=stream,
                         shape=shape, name=name, at=at)

    # ---- the forward copy ----------------------------------------------------------------------
    def needs_messages(self) -> set:
        """Forward nodes whose value depends on a parameter that gets quantities."""
        dep = set()
        for node in self.canon.graph.nodes:
            if node.op == "placeholder" and node.meta.get("param") and node.meta.get("requires_grad"):
                dep.add(node)
            elif node.op == "call_function" and any(a in dep for a in node.all_input_nodes):
                dep.add(node)
        return dep

    def copy_forward(self, needs: set) -> None:
        for node in self.canon.graph.nodes:
            if node.op == "output":
                continue
            if node.op == "placeholder":
                new = self.graph.placeholder(node.name)
            elif node.op == "get_attr":
                new = self.graph.get_attr(node.target)
            else:
                op = self.op_of(node)
                args = fx.map_arg(node.args, lambda n: self.env[n])
                kwargs = fx.map_arg(node.kwargs, lambda n: self.env[n])
                if op.saved and op.forward_saving is not None and node in needs:
                    both = self.graph.call_function(op.forward_saving, args, kwargs)
                    both.meta.update(kind="forward", of=node.name, message="(out, saved)")
                    new = self.graph.call_function(_getitem, (both, 0))
                    self.saved[node] = {}
                    for i, s in enumerate(op.saved):
                        saved = self.graph.call_function(_getitem, (both, i + 1))
                        saved.meta.update(kind="forward", of=node.name, message=s)
                        self.saved[node][s] = saved
                else:
                    new = self.graph.call_function(node.target, args, kwargs)
            new.meta.update(node.meta)
            new.meta.setdefault("kind", "forward")
            new.meta["of"] = node.name
            self.env[node] = new
        if "diag_ggn_mc" in self.quantities:
            self.generator = self.graph.placeholder("generator")
            self.generator.meta.update(kind="input", source="torch.Generator for Monte Carlo samples")

    # ---- the backward walk ---------------------------------------------------------------------
    def send(self, target: fx.Node, *, bundle=None, d: Optional[dict] = None, factor: Optional[Factor] = None):
        box = self.inbox.setdefault(target, Inbox())
        if bundle is not None:
            box.bundle.append(bundle)
        for q, v in (d or {}).items():
            box.d.setdefault(q, []).append(v)
        if factor is not None:
            box.factors.setdefault(factor.origin, []).append(factor)

    def loss_messages(self, loss: fx.Node) -> None:
        op = self.op_of(loss)
        f = loss.args[0]
        shape = f.meta.get("shape")
        key = (op.name, "f")
        g = self.apply(registry.LOSS_GRAD, key, (), loss, kind="grad", message="g", shape=shape, at=f)
        columns = [g]
        if self.quantities & set(DIAG_QUANTITIES):
            diag = self.apply(registry.LOSS_HESSIAN_DIAG, key, (), loss, kind="diag", message="d",
                              stream="hesscale", shape=shape, at=f)
            self.send(f, d={q: diag for q in DIAG_QUANTITIES if q in self.quantities})
        if self.loss_origin.quantities:
            both = self.apply(registry.LOSS_SQRT_HESSIAN, key, (), loss, kind="sqrt", message="(S, sign)",
                              stream="loss", name=f"sqrt_hessian_{f.name}")
            s = self.node(_getitem, (both, 0), kind="sqrt", of=loss, message="S", stream="loss", at=f)
            sign = None
            if not op.psd_hessian:
                sign = self.node(_getitem, (both, 1), kind="sqrt", of=loss, message="sign", stream="loss",
                                 at=f)
            columns.append(s)
            self.layout[self.loss_origin] = (1, 1 + self.loss_columns(op, shape), sign)
        if "diag_ggn_mc" in self.quantities:
            fn = registry.LOSS_SQRT_HESSIAN_MC.get(key)
            if fn is None:
                raise UnsupportedOpError(
                    f"diag_ggn_mc needs a loss with a likelihood to sample from; the loss "
                    f"({loss.meta.get('source')}) has none. Supported: nn.CrossEntropyLoss, nn.MSELoss "
                    "(or their functional forms)"
                )
            kwargs = self.bind(fn, loss, 0, {"mc_samples": self.mc_samples, "generator": self.generator})
            s = self.node(fn, (), kwargs, kind="sqrt", of=loss, message="S", stream="mc", at=f)
            start = 1 + (self.loss_columns(op, shape) if self.loss_origin in self.layout else 0)
            self.layout[self.mc_origin] = (start, start + self.mc_samples, None)
            columns.append(s)
        bundle = self.node(factors.stack_columns, (g, *columns[1:]), kind="bundle", of=loss,
                           message="[g; S]", at=f)
        self.send(f, bundle=bundle)

    @staticmethod
    def loss_columns(op: OpDef, shape) -> int:
        return op.sqrt_columns(tuple(shape)) if op.sqrt_columns is not None else _numel(shape)

    def reduce_inbox(self, node: fx.Node):
        box = self.inbox.pop(node, None)
        if box is None:
            return None, {}, {}
        shape = node.meta.get("shape")
        if not box.bundle:
            return None, {}, {}
        bundle = self.sum_nodes(box.bundle, kind="bundle", of=node, message="[g; S]", at=node)
        self.bundles[node] = bundle
        g = self.node(factors.gradient_column, (bundle,), kind="grad", of=node, message="g", shape=shape, at=node)
        d = {q: self.sum_nodes(v, kind="diag", of=node, message="d", stream=q, shape=shape, at=node)
             for q, v in box.d.items()}
        fs = {}
        for origin, (start, stop, sign) in self.layout.items():
            cols = self.node(factors.column_range, (bundle, start, stop), kind="sqrt", of=node, message="S",
                             stream=origin.label, at=node)
            fs[origin] = Factor(origin, cols, sign)
        for origin, group in box.factors.items():
            if len(group) == 1:
                fs[origin] = group[0]
                continue
            assert not any(f.diagonal for f in group), "a diagonal source reached a node twice"
            total = self.sum_nodes([f.value for f in group], kind="sqrt", of=node, message="S",
                                   stream=origin.label, at=node)
            fs[origin] = Factor(origin, total, group[0].sign)
        return g, d, fs

    def dense(self, factor: Factor, node: fx.Node) -> tuple[fx.Node, Optional[fx.Node]]:
        """The factor's columns, materializing a diagonal source ``diag(r)`` where it must pass an op."""
        if not factor.diagonal:
            return factor.value, factor.sign
        both = self.node(factors.diagonal_to_columns, (factor.value,), kind="sqrt", of=node,
                         message="(S, sign)", stream=factor.origin.label, name=f"columns_{node.name}")
        s = self.node(_getitem, (both, 0), kind="sqrt", of=node, message="S", stream=factor.origin.label,
                      at=node)
        sign = self.node(_getitem, (both, 1), kind="sqrt", of=node, message="sign",
                         stream=factor.origin.label, at=node)
        return s, sign

    def visit(self, node: fx.Node, needs: set, params: dict, uses: dict) -> None:
        g, d, fs = self.reduce_inbox(node)
        if g is None:
            return
        op = self.op_of(node)
        for name, value in self.input_map(node).items():
            if not isinstance(value, fx.Node) or value not in needs:
                continue
            if value.op == "placeholder":
                self.param_contributions(node, op, name, value, g, d, fs, params, uses)
            else:
                self.data_messages(node, op, name, value, g, d, fs, needs)

    def data_messages(self, node, op, name, target, g, d, fs, needs) -> None:
        key = (op.name, name)
        if key not in registry.JAC_T:
            raise UnsupportedOpError(f"op {op.name} has no transposed-Jacobian rule for its input '{name}'")
        shape = target.meta.get("shape")
        self.send(target, bundle=self.apply(registry.JAC_T, key, (self.bundles[node],), node, kind="bundle",
                                            message="[g; S]", at=target))
        for origin, factor in fs.items():
            if origin in self.layout:
                continue  # travels in the bundle
            s, sign = self.dense(factor, node)
            out = self.apply(registry.JAC_T, key, (s,), node, kind="sqrt", message="S", stream=origin.label,
                             at=target)
            self.send(target, factor=Factor(origin, out, sign))
        dd = {}
        for q, msg in d.items():
            rule = registry.DIAG.get(key)
            if rule is None:
                raise UnsupportedOpError(f"op {op.name} has no diagonal (HesScale) rule for its input '{name}'")
            dd[q] = self.apply(registry.DIAG, key, (msg,), node, kind="diag", message="d", stream=q, shape=shape,
                               at=target)
        if key in registry.RESIDUAL and ("hesscale" in d or "diag_hessian" in self.quantities):
            r = self.apply(registry.RESIDUAL, key, (g,), node, kind="residual", message="r", shape=shape,
                           at=target)
            if "hesscale" in dd:
                dd["hesscale"] = self.node(factors.add_all, (dd["hesscale"], r), kind="diag", of=node,
                                           message="d", stream="hesscale", shape=shape, at=target)
            if "diag_hessian" in self.quantities:
                origin = Origin("residual", node.name, frozenset({"diag_hessian"}))
                self.send(target, factor=Factor(origin, r, None, diagonal=True))
        self.send(target, d=dd)
        # The mixed term of a weight whose use here depends on another use of it (HBP eq. S.6's
        # second term for the bilinear op): unit columns start at this data input.
        for data, param in op.bilinear:
            w = self.input_map(node).get(param)
            if data == name and "diag_hessian" in self.quantities and self.reaches(w, target):
                origin = Origin("mixed", node.name, frozenset({"diag_hessian"}))
                basis = self.node(factors.unit_columns, (self.env[target],), kind="sqrt", of=node,
                                  message="E", stream=origin.label, at=target)
                self.send(target, factor=Factor(origin, basis, None))
                self.mixed_b[(origin, w)] = (node, op, param, basis, g)

    def reaches(self, param: Any, target: fx.Node) -> bool:
        """Is ``target`` computed from ``param`` (so that ``param`` is used upstream of here)?"""
        if not isinstance(param, fx.Node) or param.op != "placeholder":
            return False
        return target in self.descendants.get(param, ())

    def param_contributions(self, node, op, name, param, g, d, fs, params, uses) -> None:
        key = (op.name, name)
        acc = params[param]
        acc.grads.append(self.apply(registry.GRAD, key, (g,), node, kind="param", message="grad",
                                    shape=param.meta.get("shape"), at=param))
        shared = uses[param] > 1
        for origin, factor in fs.items():
            if origin.kind == "mixed" and not any(w is param for (o, w) in self.mixed_b if o == origin):
                continue  # mixed-term columns count only at the weight they belong to
            if shared:
                s, sign = self.dense(factor, node)
                ps = self.apply(registry.PER_SAMPLE, key, (s,), node, kind="param", message="J^T S",
                                stream=origin.label, at=param)
                acc.per_sample.setdefault(origin, []).append((ps, sign))
            elif factor.diagonal:
                # Exact: a diagonal source's unit columns never overlap (HesScale eq. 5 / 9).
                c = self.apply(registry.DIAG_DIAG, key, (factor.value,), node, kind="param",
                               message="diag", stream=origin.label, shape=param.meta.get("shape"), at=param)
                for q in origin.quantities:
                    acc.diag.setdefault(q, []).append(c)
            else:
                c = self.apply(registry.DIAG_SQRT, key, (factor.value, factor.sign), node, kind="param",
                               message="diag", stream=origin.label, shape=param.meta.get("shape"), at=param)
                for q in origin.quantities:
                    acc.diag.setdefault(q, []).append(c)
        for q, msg in d.items():
            c = self.apply(registry.DIAG_DIAG, key, (msg,), node, kind="param", message="diag", stream=q,
                           shape=param.meta.get("shape"), at=param)
            acc.diag.setdefault(q, []).append(c)
        acc.uses_left -= 1
        if acc.uses_left == 0:
            self.finalize(param, acc)

    def finalize(self, param: fx.Node, acc: ParamAccumulator) -> None:
        name = param.meta["param"]
        shape = param.meta.get("shape")
        p = self.env[param]
        for origin, parts in acc.per_sample.items():
            total = self.sum_nodes([ps for ps, _ in parts], kind="param", of=param, message="J^T S",
                                   stream=origin.label, at=param)
            if origin.kind == "mixed":
                b_at = self.mixed_b.get((origin, param))
                if b_at is None:
                    continue
                node, op, pname, basis, g = b_at
                fn = _mixed_columns_fn(op.name, pname)
                rule = registry.PER_SAMPLE[(op.name, pname)]
                data = next(dd for dd, pp in op.bilinear if pp == pname)
                kwargs = {k: v for k, v in self.bind(rule, node, 1).items() if k != data}
                b = self.node(fn, (g, basis), kwargs, kind="param", of=node, message="B^T E",
                              stream=origin.label, at=param)
                c = self.node(factors.mixed_contribution, (total, b), kind="param", of=param,
                              message="diag", stream=origin.label, shape=shape, at=param)
            else:
                c = self.node(factors.signed_square_sum, (total, parts[0][1], 1), kind="param", of=param,
                              message="diag", stream=origin.label, shape=shape, at=param)
            for q in origin.quantities:
                acc.diag.setdefault(q, []).append(c)
        self.outputs[f"grad/{name}"] = self.sum_nodes(acc.grads, kind="param", of=param, message="grad",
                                                      shape=shape, at=param)
        for q in self.quantities - {"grad"}:
            parts = acc.diag.get(q)
            if parts:
                self.outputs[f"{q}/{name}"] = self.sum_nodes(parts, kind="param", of=param, message=q,
                                                             shape=shape, at=param)
            else:
                self.outputs[f"{q}/{name}"] = self.node(factors.zeros_like_param, (p,), kind="param",
                                                        of=param, message=q, shape=shape, at=param)

    def build(self) -> fx.Graph:
        needs = self.needs_messages()
        self.copy_forward(needs)
        graph = self.canon.graph
        self.descendants = {}
        for node in graph.nodes:
            if node.op == "placeholder" and node.meta.get("param"):
                seen, stack = set(), [node]
                while stack:
                    for u in stack.pop().users:
                        if u not in seen:
                            seen.add(u)
                            stack.append(u)
                self.descendants[node] = seen
        self.mixed_b = {}
        self.bundles: dict[fx.Node, fx.Node] = {}
        trainable = [p for p in self.canon.params.values() if p.meta.get("requires_grad")]
        uses = {p: sum(1 for u in p.users for a in u.args if a is p) for p in trainable}
        params = {p: ParamAccumulator(uses_left=uses[p]) for p in trainable}
        self.outputs["loss"] = self.env[self.canon.loss]
        self.loss_messages(self.canon.loss)
        for node in reversed(list(graph.nodes)):
            if node.op == "call_function" and node is not self.canon.loss and node in needs:
                self.visit(node, needs, params, uses)
        for p, acc in params.items():
            if acc.uses_left > 0:  # a parameter the loss does not reach
                acc.uses_left = 0
                self.finalize(p, acc)
        out = self.graph.output(self.outputs)
        out.meta["kind"] = "output"
        self.graph.lint()
        return self.graph


# Node names say what a value is: `g_tanh` is the gradient w.r.t. tanh's output, `S_tanh` the loss
# factor there, `Smc_`/`Sr_`/`Se_` Monte Carlo, residual and mixed-term columns, `d_`/`dgn_` the
# HesScale(GN) diagonals, `r_` a residual phi''(x) g, and `diag_<origin>_p_...` a parameter's share.
_PREFIX = {
    ("grad", "g"): "g", ("bundle", "[g; S]"): "gS", ("sqrt", "S"): "S", ("sqrt", "sign"): "sign", ("sqrt", "E"): "E",
    ("diag", "d"): "d", ("residual", "r"): "r", ("param", "grad"): "grad", ("param", "diag"): "diag_",
    ("param", "J^T S"): "JtS", ("param", "B^T E"): "BtE",
}


def _stream_tag(stream: str, kind: str) -> str:
    if not stream:
        return ""
    origin = stream.split(":")[0]
    if kind == "param":
        return {"loss": "ggn", "mc": "mc", "residual": "res", "mixed": "mix", "hesscale": "hs",
                "hesscale_gn": "hsgn"}.get(origin, origin)
    return {"loss": "", "mc": "mc", "residual": "r", "mixed": "e", "hesscale": "",
            "hesscale_gn": "gn"}.get(origin, origin)


def _numel(shape) -> int:
    n = 1
    for s in shape[1:]:
        n *= s
    return n


def _getitem(t, i):
    return t[i]


_getitem.rule_label = "getitem"


def insert_curvature(canon: Canonical, quantities: tuple[str, ...], mc_samples: int = 1) -> fx.Graph:
    """The curvature program for ``quantities`` (a ``torch.fx.Graph`` owned by ``canon.root``)."""
    return CurvatureBuilder(canon, quantities, mc_samples).build()
