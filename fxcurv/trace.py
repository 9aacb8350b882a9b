"""Tracing a model and its loss into one torch.fx graph.

:func:`trace` runs once per engine: it traces the model and the loss separately with torch.fx
(built-in ``torch.nn`` layers stay whole, as ``call_module`` nodes) and stitches them into one graph
``(x, y) -> loss`` owned by a small root module. Canonicalization into fxcurv's op vocabulary needs
shapes (a ``view(x.size(0), -1)`` is resolved to the per-sample shape it produces), so it happens per
input signature, in :mod:`fxcurv.passes.canonicalize`.
"""

from __future__ import annotations

import functools
import os
import re
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .errors import TraceError
from .rules import registry

_TORCH_DIR = os.path.dirname(torch.__file__)
_FXCURV_DIR = os.path.dirname(os.path.abspath(__file__))


class Tracer(fx.Tracer):
    """torch.fx's tracer, with every module type that has a canonical op kept whole; each node records
    the stack it was traced from, so that errors name the user's file and line (:func:`user_location`)."""

    record_stack_traces = True

    def __init__(self, leaves: frozenset[str] = frozenset()):
        super().__init__()
        self.leaves = leaves  # submodules kept whole because their forward cannot be traced
        self.path: list[str] = []  # the submodules being traced into, outermost first
        self.failed_in: list[str] | None = None  # the path where tracing failed
        self.expanding: set[int] = set()  # modules traced through their expansion (_EXPANSIONS)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if id(m) in self.expanding:
            return False
        return (qualname in self.leaves or type(m) in registry.MODULE_SOURCES
                or super().is_leaf_module(m, qualname))

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        qualname = self.path_of_module(m)
        self.path.append(qualname)
        expansion = _EXPANSIONS.get(type(m))
        expand = expansion is not None and qualname not in self.leaves and expansion.applies(m, *args, **kwargs)
        if expand:
            assert expansion is not None
            forward = functools.partial(expansion.forward, m)
            self.expanding.add(id(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = list(self.path)
            raise
        finally:
            self.path.pop()
            self.expanding.discard(id(m))


# ---- module expansions ---------------------------------------------------------------------------
#
# torch.nn modules whose forward torch.fx cannot trace (checks for fused fast paths) but whose math path
# is a composition of modules fxcurv has rules for: traced through that path, so that their linear
# layers, activations and residual sums are hand-written ops and only what has no hand rule (the
# attention, the norms) is a generic node -- instead of the whole module being one.


@dataclass(frozen=True)
class Expansion:
    """``forward(module, *args, **kwargs)``: the module's math path; ``applies(module, *args, **kwargs)``:
    whether this call takes it (else the module is traced as usual, kept whole if it cannot be)."""

    forward: Callable[..., Any]
    applies: Callable[..., bool]


def _layer_call(layer: nn.Module, src: Any, src_mask: Any = None, src_key_padding_mask: Any = None,
                is_causal: Any = False, **rest: Any) -> bool:
    # ``is_causal`` is a hint that ``src_mask`` is causal; without a mask torch refuses it.
    return not rest and not (is_causal and src_mask is None)


def _encoder_layer(layer: nn.TransformerEncoderLayer, src: Any, src_mask: Any = None,
                   src_key_padding_mask: Any = None, is_causal: Any = False) -> Any:
    """``nn.TransformerEncoderLayer.forward`` on its math path (Xiong et al. 2020, Fig. 1: post- or
    pre-norm), what it computes when its fused fast path is off. The masks go to the attention as they
    are (nn.MultiheadAttention canonicalizes them as the layer would); ``is_causal`` is only a hint that
    the mask is causal, dropped."""
    x = src
    if layer.norm_first:
        x = x + layer._sa_block(layer.norm1(x), src_mask, src_key_padding_mask)
        return x + layer._ff_block(layer.norm2(x))
    x = layer.norm1(x + layer._sa_block(x, src_mask, src_key_padding_mask))
    return layer.norm2(x + layer._ff_block(x))


def _encoder(encoder: nn.TransformerEncoder, src: Any, mask: Any = None, src_key_padding_mask: Any = None,
             is_causal: Any = None) -> Any:
    """``nn.TransformerEncoder.forward``: its layers in turn with the masks, then its norm."""
    x = src
    for layer in encoder.layers:
        x = layer(x, src_mask=mask, src_key_padding_mask=src_key_padding_mask)
    return x if encoder.norm is None else encoder.norm(x)


def _encoder_call(encoder: nn.Module, src: Any, mask: Any = None, src_key_padding_mask: Any = None,
                  is_causal: Any = None, **rest: Any) -> bool:
    return not rest and not (is_causal and mask is None)


def _attention_call(m: nn.Module, query: Any, key: Any, value: Any, key_padding_mask: Any = None,
                    need_weights: Any = True, attn_mask: Any = None, average_attn_weights: Any = True,
                    is_causal: Any = False, **rest: Any) -> bool:
    """Self-attention, batch first, with the packed in-projection and without masks or extra key/value
    rows: the configuration :func:`_attention` spells out. Anything else keeps the module whole (one
    generic node: exact, slower)."""
    assert isinstance(m, nn.MultiheadAttention)
    return (not rest and m.batch_first and m._qkv_same_embed_dim and m.bias_k is None and m.bias_v is None
            and not m.add_zero_attn and query is key and key is value and key_padding_mask is None
            and attn_mask is None and is_causal is False and average_attn_weights is True)


def _attention(m: nn.MultiheadAttention, query: Any, key: Any, value: Any, key_padding_mask: Any = None,
               need_weights: Any = True, attn_mask: Any = None, average_attn_weights: Any = True,
               is_causal: Any = False) -> Any:
    """``nn.MultiheadAttention`` (Vaswani et al. 2017, Sec. 3.2) on ``x [N, T, E]``, ``H`` heads of width
    ``d = E / H``, as ops with hand rules: the packed in-projection (linear), its split into ``q, k, v``
    (slices), the heads (reshape ``[N, T, H, d]`` and permutation to ``[N, H, T, d]``), the scores
    ``(q / sqrt(d)) k^T`` (scalar, product of two activations), softmax over the keys, the product with
    ``v``, the heads merged back and the out-projection. The batch stays on dim 0 throughout, so every
    op is per sample. Returns ``(out, weights)`` as the module does: the weights averaged over the heads
    where ``need_weights``, else ``None``."""
    x = query
    n, t, e = x.size(0), x.size(1), m.embed_dim
    h, d = m.num_heads, m.head_dim
    qkv = F.linear(x, m.in_proj_weight, m.in_proj_bias)
    q, k, v = qkv.chunk(3, dim=-1)
    q = q.reshape(n, t, h, d).transpose(1, 2)
    k = k.reshape(n, t, h, d).transpose(1, 2)
    v = v.reshape(n, t, h, d).transpose(1, 2)
    scores = (q * (float(d) ** -0.5)) @ k.transpose(-2, -1)
    attn = F.dropout(scores.softmax(dim=-1), p=m.dropout, training=m.training)
    out = (attn @ v).transpose(1, 2).reshape(n, t, e)
    out = F.linear(out, m.out_proj.weight, m.out_proj.bias)
    return out, (attn.mean(dim=1) if need_weights else None)


_EXPANSIONS: dict[type, Expansion] = {
    nn.MultiheadAttention: Expansion(_attention, _attention_call),
    nn.TransformerEncoderLayer: Expansion(_encoder_layer, _layer_call),
    nn.TransformerEncoder: Expansion(_encoder, _encoder_call),
}


class _Loss(nn.Module):
    """Wraps any loss callable as ``forward(f, y)`` so that modules and functions trace alike."""

    def __init__(self, loss_fn: Callable):
        super().__init__()
        if isinstance(loss_fn, nn.Module):
            self.fn = loss_fn
        else:
            self._fn = loss_fn

    def forward(self, f, y):
        fn = self.fn if hasattr(self, "fn") else self._fn
        return fn(f, y)


UNKNOWN_LOCATION = "an unknown location"


def frame_text(f: traceback.FrameSummary) -> str:
    """``file:line in function: `code```."""
    code = (f.line or "").strip()
    return f"{f.filename}:{f.lineno} in {f.name}" + (f": `{code}`" if code else "")


def user_frame(err: BaseException) -> str:
    """``file:line in function: `code``` of the innermost frame outside torch and fxcurv where tracing
    failed."""
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if not f.filename.startswith((_TORCH_DIR, _FXCURV_DIR))]
    return frame_text(frames[-1]) if frames else UNKNOWN_LOCATION


_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<fn>\S+)\n\s*(?P<code>[^\n]*)')


def user_location(node: fx.Node) -> str:
    """`` at file:line in function: `code` `` of the user's code that traced ``node`` (the innermost
    frame outside torch and fxcurv), or ``""`` where unknown."""
    frames = [m for m in _FRAME.finditer(node.stack_trace or "")
              if not m["file"].startswith((_TORCH_DIR, _FXCURV_DIR))]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {f['file']}:{f['line']} in {f['fn']}: `{f['code'].strip()}`"


def _trace(root: nn.Module) -> fx.Graph:
    """Trace ``root``; a submodule whose forward torch.fx cannot trace (Python logic on its inputs, an
    ``isinstance`` check) is kept whole -- it runs eagerly in the program, a call the generic rule
    differentiates -- and the trace is repeated. A failure in ``root``'s own forward is raised."""
    leaves: frozenset[str] = frozenset()
    while True:
        tracer = Tracer(leaves)
        try:
            return tracer.trace(root)
        except Exception:  # noqa: BLE001 - retried with the failing submodule whole, else re-raised
            failed = tracer.failed_in
            if not failed or failed[-1] in leaves:
                raise
            leaves = leaves | {failed[-1]}


def symbolic_trace(root: nn.Module, what: str) -> fx.GraphModule:
    try:
        graph = _trace(root)
    except Exception as err:  # noqa: BLE001 - every tracing failure becomes a TraceError with context
        where = user_frame(err)
        msg = str(err).split("\n")[0]
        hint = ""
        if "control flow" in msg or "iterated" in msg or "__bool__" in msg or "__len__" in msg:
            hint = (" torch.fx traces symbolically: Python control flow (if/while/for/len) on tensor "
                    "values cannot be traced. Rewrite it with tensor ops or move it out of forward.")
        raise TraceError(f"cannot trace the {what} with torch.fx at {where}: {msg}.{hint}") from err
    return fx.GraphModule(root, graph, root.__class__.__name__)


@dataclass
class Traced:
    """The model and loss as one graph ``(x, y) -> loss``.

    ``root`` owns ``model`` and ``loss`` submodules; ``model_output`` is the node fed to the loss;
    ``loss_nodes`` are the nodes of the loss part; ``params`` maps each parameter (by identity) to
    its first name in ``model.named_parameters()`` -- shared weights map to one name.
    """

    root: nn.Module
    graph: fx.Graph
    model_output: fx.Node
    loss_nodes: list[fx.Node]
    loss_gm: fx.GraphModule
    param_names: dict[int, str]
    params: dict[str, nn.Parameter]

    @property
    def gm(self) -> fx.GraphModule:
        return fx.GraphModule(self.root, self.graph)


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The module a data-parallel wrapper (``DistributedDataParallel``, ``DataParallel``) holds, itself
    otherwise. A wrapper's forward syncs buffers and registers its gradient buckets' hooks -- nothing a
    curvature program computes -- so fxcurv traces, guards and names parameters by the wrapped module
    (the same parameter objects: results are keyed by ``model.module.named_parameters()``)."""
    parallel: tuple[type, ...] = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while isinstance(model, parallel):
        inner = model.module
        assert isinstance(inner, nn.Module)
        model = inner
    return model


class Capture(Enum):
    """How the model is captured: ``FX`` by torch.fx with nn layers kept whole (at compile time), ``ATEN``
    by ``torch.export`` as ATen ops with a symbolic batch size (at the first call, on its input:
    :mod:`fxcurv.capture_aten`). The loss is traced by torch.fx in both."""

    FX = "fx"
    ATEN = "aten"


def parse_capture(value: Any) -> Capture:
    try:
        return Capture(value)
    except ValueError:
        choices = ", ".join(repr(c.value) for c in Capture)
        raise ValueError(f"unknown capture {value!r}; choose from {choices}") from None


def check_callables(model: Any, loss_fn: Any) -> None:
    """TypeError unless ``model`` is a module and ``loss_fn`` callable."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (e.g. torch.nn.CrossEntropyLoss()), got {type(loss_fn).__name__}")


def trace(model: nn.Module, loss_fn: Callable, capture: Capture = Capture.FX,
          example: torch.Tensor | None = None) -> Traced:
    """Trace ``loss_fn(model(x), y)`` into one graph; with ``Capture.ATEN`` the model is exported on the
    input ``example`` (any batch size: the batch is symbolic)."""
    check_callables(model, loss_fn)
    if capture is Capture.ATEN:
        from .capture_aten import capture as capture_aten

        if example is None:
            raise ValueError("capture='aten' exports the model on an example input: pass example=x")
        model_gm = capture_aten(model, example)
    else:
        model_gm = symbolic_trace(model, "model")
    loss_gm = symbolic_trace(_Loss(loss_fn), "loss")

    model_inputs = [n for n in model_gm.graph.nodes if n.op == "placeholder"]
    if len(model_inputs) != 1:
        names = ", ".join(n.name for n in model_inputs)
        raise TraceError(
            f"the model's forward takes {len(model_inputs)} inputs ({names}); fxcurv supports "
            "models with one input tensor x, forward(x)"
        )

    root = nn.Module()
    root.model = model_gm
    root.loss = loss_gm
    graph = fx.Graph()
    x = graph.placeholder("x")
    y = graph.placeholder("y")

    def prefixed(gm: fx.GraphModule, prefix: str, inputs: list[fx.Node]) -> tuple[Any, list[fx.Node]]:
        env: dict[fx.Node, Any] = {}
        placeholders = iter(inputs)
        out, copied = None, []
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                env[node] = next(placeholders)
                continue
            if node.op == "output":
                out = fx.map_arg(node.args[0], lambda n: env[n])
                continue
            new = graph.node_copy(node, lambda n: env[n])
            if node.op in ("call_module", "get_attr"):
                new.target = f"{prefix}.{node.target}"
            env[node] = new
            copied.append(new)
        return out, copied

    f, _ = prefixed(model_gm, "model", [x])
    if not isinstance(f, fx.Node):
        raise TraceError("the model must return a single tensor (the model output fed to the loss)")
    loss_inputs = [n for n in loss_gm.graph.nodes if n.op == "placeholder"]
    loss_out, loss_nodes = prefixed(loss_gm, "loss", [f, y][: len(loss_inputs)])
    if not isinstance(loss_out, fx.Node):
        raise TraceError("the loss must return a single scalar tensor")
    graph.output(loss_out)

    param_names: dict[int, str] = {}
    params: dict[str, nn.Parameter] = {}
    for name, p in model.named_parameters():
        param_names[id(p)] = name
        params[name] = p
    return Traced(root, graph, f, loss_nodes, loss_gm, param_names, params)
