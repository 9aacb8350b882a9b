"""Hypothesis strategies that draw whole problems -- model, loss, input, target -- over fxcurv's
supported vocabulary, for the property tests (tests/test_properties.py) and the long fuzz run
(benchmarks/fuzz.py).

A drawn :class:`Case` *is* Python source: a ``class Net(nn.Module)`` and a ``make()`` returning
``(model, loss_fn, x, y)``. The model under test is built by executing that source, so the source a
failure prints is exactly the model that failed (no hidden builder state), and hypothesis shrinks the
draws behind it.

What the strategies cover
-------------------------
* **Ops**: ``nn.Linear`` and ``F.linear`` (with and without bias, also on a 3-d ``[N, a, b]`` input);
  ``nn.Conv2d`` and ``F.conv2d`` with non-square kernels 1-3, stride 1-2, padding 0-2 or ``"same"``,
  dilation 1-2, groups; the 8 activations (ReLU, LeakyReLU with slopes 0.01/0.2/1.5/-0.5, Sigmoid,
  Tanh, ELU alpha 0.5/1/1.7, Softplus beta 0.5/1/2 and threshold 20 or 1 (so some entries take
  torch's linear branch), SiLU, GELU exact and tanh) in module, functional (``F.x`` and ``torch.x``,
  positional and keyword arguments) and method forms (``.relu()``, ``.tanh()``, ``.sigmoid()``, the
  only methods torch has); ``nn.MaxPool2d``/``F.max_pool2d`` (kernel 1-3, stride, padding up to half
  the kernel, dilation, ``ceil_mode``); ``nn.AvgPool2d``/``F.avg_pool2d`` (``ceil_mode``,
  ``count_include_pad``, ``divisor_override``); ``nn.ZeroPad2d``, ``nn.ConstantPad2d`` and
  ``F.pad(mode="constant")`` with 2 or 4 pads from -1 (cropping) to 2 and nonzero fill values;
  ``nn.Flatten``, ``torch.flatten``, ``.flatten``, ``.view``, ``.reshape`` (batch axis kept),
  including a vector viewed as an image (``[N, d] -> [N, c, h, w]``, e.g. ``d`` channels of 1x1);
  ``nn.Identity``, ``nn.Dropout``/``nn.Dropout2d`` in eval mode, ``F.dropout(training=False)``.
* **Graphs**: sequential chains; residual blocks ``h + act(layer(h))`` (spelled ``+``, ``torch.add``,
  ``Tensor.add``, either operand order); **branching** blocks where one tensor feeds two *different*
  branches that are summed (``act(A h) + B h``, ``act(A h) + B2 act(B1 h)``, a convolution beside a
  shape-preserving max/avg pooling); a weight used two or three times (a tied linear or conv layer,
  possibly as the residual branch, possibly re-used through ``F.linear``/``F.conv2d`` with the
  module's own ``.weight``), and an earlier linear or conv layer applied again later with other
  layers in between.
* **Parameters**: frozen (``requires_grad_(False)``) subsets, unused parameters (a spare module or a
  bare ``nn.Parameter`` never read), and registration order different from use order (the head is
  sometimes registered first).
* **Shapes**: widths 1-5, 1x1 and non-square images up to 5x5 with 1-3 channels, N in {1, 2, 3},
  1-4 classes (one class: the degenerate constant loss), outputs of width 1 and image-shaped outputs
  for the losses that take them.
* **Losses**: ``nn.CrossEntropyLoss`` mean/sum, with label smoothing, with class-probability
  targets, with ``ignore_index`` (at least one target kept), with class weights (fxcurv's general
  path), ``F.cross_entropy`` in a lambda; ``nn.MSELoss`` mean/sum and ``F.mse_loss`` in a lambda;
  two general traced losses: ``((f - y) ** 4).mean()`` (convex, not quadratic) and
  ``(sin(f) * y).sum()`` (indefinite Hessian: signed factors).
* **Quantities**: a random non-empty subset of diag_ggn, diag_ggn_mc (only with a loss that has a
  likelihood), diag_hessian, hesscale, hesscale_gn (grad always).

What they leave out
-------------------
* 1-d, 3-d and transposed convolutions and non-zero padding modes (tests/rules/test_conv_family.py
  covers them); everything outside the vocabulary (no batch norm, attention, ``torch.cat``,
  multiplication of two traced tensors, ``x + constant``),
  training-mode dropout, and the error paths (tests/test_errors.py covers those).
* Inputs where fxcurv's answer is legitimately undefined: exact ties of ReLU/max-pool at a kink
  beyond those the zero padding produces, ``ignore_index`` with every target ignored (torch gives
  ``nan``), non-finite values (a dilated max-pooling window that covers only padding outputs -inf:
  such configurations are not drawn).
* Big shapes (the float64 torch.func references are cubic in the parameter count): at most a few
  hundred parameters per model; float32 and CUDA tensors.
* Tying through parameters shared between *different* modules (``b.weight = a.weight``), and a
  module registered under two names.
* Weights shared between the model and the loss, and losses reading parameters.
"""

from __future__ import annotations

import linecache
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

QUANTITY_NAMES = ("diag_ggn", "diag_ggn_mc", "diag_hessian", "hesscale", "hesscale_gn")

# ---- losses -------------------------------------------------------------------------------------

# key -> (expression of the loss, target kind, output must be [N, C], has a likelihood for MC)
LOSSES: dict[str, tuple[str, str, bool, bool]] = {
    "ce_mean": ("nn.CrossEntropyLoss()", "classes", True, True),
    "ce_sum": ("nn.CrossEntropyLoss(reduction='sum')", "classes", True, True),
    "ce_functional": ("lambda f, y: F.cross_entropy(f, y, reduction='sum')", "classes", True, True),
    "ce_smoothing": ("nn.CrossEntropyLoss(label_smoothing=0.1)", "classes", True, True),
    "ce_probabilities": ("nn.CrossEntropyLoss(reduction='sum')", "probabilities", True, True),
    "ce_ignore_index": ("nn.CrossEntropyLoss(ignore_index=0)", "classes_ignore0", True, True),
    "ce_weighted": ("nn.CrossEntropyLoss(weight=torch.linspace(0.5, 2.0, {C}, dtype=torch.float64))",
                    "classes", True, False),
    "mse_mean": ("nn.MSELoss()", "regression", False, True),
    "mse_sum": ("nn.MSELoss(reduction='sum')", "regression", False, True),
    "mse_functional": ("lambda f, y: F.mse_loss(f, y, reduction='sum')", "regression", False, True),
    "quartic": ("lambda f, y: ((f - y) ** 4).mean()", "regression", False, False),
    "sin": ("lambda f, y: (torch.sin(f) * y).sum()", "regression", False, False),
}


# ---- activations --------------------------------------------------------------------------------

def _activation(draw) -> tuple[str, list[str], list[str]]:
    """One activation: (module constructor, functional templates, method templates); ``{h}`` is the
    input expression."""
    kind = draw(st.sampled_from(["relu", "leaky_relu", "sigmoid", "tanh", "elu", "softplus", "silu",
                                 "gelu"]))
    if kind == "relu":
        return "nn.ReLU()", ["F.relu({h})", "torch.relu({h})"], ["{h}.relu()"]
    if kind == "leaky_relu":
        s = draw(st.sampled_from([0.01, 0.2, 1.5, -0.5]))
        return (f"nn.LeakyReLU({s})", [f"F.leaky_relu({{h}}, {s})", f"F.leaky_relu({{h}}, negative_slope={s})"],
                [])
    if kind == "sigmoid":
        return "nn.Sigmoid()", ["torch.sigmoid({h})", "F.sigmoid({h})"], ["{h}.sigmoid()"]
    if kind == "tanh":
        return "nn.Tanh()", ["torch.tanh({h})", "F.tanh({h})"], ["{h}.tanh()"]
    if kind == "elu":
        a = draw(st.sampled_from([0.5, 1.0, 1.7]))
        return f"nn.ELU(alpha={a})", [f"F.elu({{h}}, {a})", f"F.elu({{h}}, alpha={a})"], []
    if kind == "softplus":
        b = draw(st.sampled_from([0.5, 1.0, 2.0]))
        t = draw(st.sampled_from([20.0, 1.0]))
        return (f"nn.Softplus(beta={b}, threshold={t})",
                [f"F.softplus({{h}}, {b}, {t})", f"F.softplus({{h}}, beta={b}, threshold={t})"], [])
    if kind == "silu":
        return "nn.SiLU()", ["F.silu({h})"], []
    approx = draw(st.sampled_from(["none", "tanh"]))
    fn = ["F.gelu({h})"] if approx == "none" else []
    return f"nn.GELU(approximate='{approx}')", fn + [f"F.gelu({{h}}, approximate='{approx}')"], []


# ---- the builder: source lines, parameter names, shapes ----------------------------------------

class _Builder:
    """Accumulates ``Net.__init__`` and ``Net.forward`` lines while tracking the per-sample shape.

    ``chain`` lists the module attributes applied one after another when the whole model is a chain
    of modules each used once (the shape HesScale's brute-force reference takes); it becomes
    ``None`` as soon as anything else (a functional op, a view, a branch, a re-used module) is used.
    """

    def __init__(self, draw, shape: tuple, chain_only: bool):
        self.draw = draw
        self.shape = shape
        self.chain_only = chain_only
        self.init: list[str] = []
        self.forward: list[str] = []
        self.params: list[str] = []  # dotted names, in registration order
        self.chain: list[str] | None = []
        self.tags: set[str] = set()
        self.linears: list[tuple[str, int, int]] = []  # module-form linear maps: name, d_in, d_out
        self.convs: list[tuple] = []  # module-form convolutions: name, c_in, c_out, groups, kernel, ...
        self._count = 0

    # names and registration
    def fresh(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}{self._count}"

    def module(self, prefix: str, ctor: str, params: tuple = ()) -> str:
        name = self.fresh(prefix)
        self.init.append(f"self.{name} = {ctor}")
        self.params += [f"{name}.{p}" for p in params]
        return name

    def parameter(self, prefix: str, init: str) -> str:
        name = self.fresh(prefix)
        self.init.append(f"self.{name} = nn.Parameter({init})")
        self.params.append(name)
        return name

    def emit(self, line: str) -> None:
        self.forward.append(line)

    def not_a_chain(self, tag: str) -> None:
        self.chain = None
        self.tags.add(tag)

    def apply_module(self, name: str) -> None:
        """``h = self.<name>(h)``, one link of a chain."""
        self.emit(f"h = self.{name}(h)")
        if self.chain is not None:
            self.chain.append(name)

    def apply(self, expr: str) -> None:
        """``h = expr``: a link of the chain where ``expr`` calls a module of the net (``self.<name>(h)``),
        otherwise a functional or method expression, which ends the chain."""
        if expr.startswith("self."):
            self.apply_module(expr[len("self."):-len("(h)")])
        else:
            self.not_a_chain("functional")
            self.emit(f"h = {expr}")

    def form(self, functional_ok: bool = True, method_ok: bool = False) -> str:
        forms = ["module"]
        if not self.chain_only:
            forms += ["functional"] * functional_ok + ["method"] * method_ok
        return self.draw(st.sampled_from(forms))

    # activations
    def activation_expr(self, h: str) -> str:
        """An activation of the expression ``h`` (registering a module if drawn in module form)."""
        ctor, functional, methods = _activation(self.draw)
        form = self.form(bool(functional), bool(methods))
        if form == "module":
            return f"self.{self.module('act', ctor)}({h})"
        self.tags.add(f"activation:{form}")
        template = self.draw(st.sampled_from(functional if form == "functional" else methods))
        return template.format(h=h)

    def activation(self) -> None:
        self.apply(self.activation_expr("h"))

    # linear maps
    def linear_expr(self, h: str, d_in: int, d_out: int) -> tuple[str, str]:
        """``(expression, weight reference)`` of a new linear map ``d_in -> d_out`` applied to ``h``."""
        bias = self.draw(st.booleans())
        if self.form() == "module":
            name = self.module("lin", f"nn.Linear({d_in}, {d_out}, bias={bias})",
                               ("weight", "bias") if bias else ("weight",))
            self.linears.append((name, d_in, d_out))
            return f"self.{name}({h})", f"self.{name}.weight"
        self.tags.add("F.linear")
        w = self.parameter("w", f"torch.randn({d_out}, {d_in}) / {d_in} ** 0.5")
        if bias:
            b = self.parameter("b", f"0.5 * torch.randn({d_out})")
            spelled = self.draw(st.sampled_from([f"F.linear({h}, self.{w}, self.{b})",
                                                 f"F.linear({h}, self.{w}, bias=self.{b})"]))
        else:
            spelled = f"F.linear({h}, self.{w})"
        return spelled, f"self.{w}"

    def conv_ctor(self, c_in: int, c_out: int, groups: int, kernel, stride, padding, dilation,
                  bias: bool) -> tuple[str, str]:
        """``(module constructor, functional keyword tail)`` of a convolution."""
        args = f"{c_in}, {c_out}, {kernel}, stride={stride}, padding={padding!r}, dilation={dilation}"
        if groups != 1:
            args += f", groups={groups}"
        return f"nn.Conv2d({args}, bias={bias})", (f"stride={stride}, padding={padding!r}, "
                                                    f"dilation={dilation}, groups={groups}")

    def conv_expr(self, h: str, c_in: int, c_out: int, groups: int, kernel, stride, padding, dilation,
                  bias: bool) -> tuple[str, str]:
        ctor, tail = self.conv_ctor(c_in, c_out, groups, kernel, stride, padding, dilation, bias)
        if self.form() == "module":
            name = self.module("conv", ctor, ("weight", "bias") if bias else ("weight",))
            self.convs.append((name, c_in, c_out, groups, kernel, stride, padding, dilation))
            return f"self.{name}({h})", f"self.{name}"
        self.tags.add("F.conv2d")
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        fan_in = c_in // groups * kh * kw
        w = self.parameter("w", f"torch.randn({c_out}, {c_in // groups}, {kh}, {kw}) / {fan_in} ** 0.5")
        b = self.parameter("b", f"0.5 * torch.randn({c_out})") if bias else None
        return f"F.conv2d({h}, self.{w}, {'self.' + b if b else 'None'}, {tail})", ""


def _out_shape(fn: Callable, shape: tuple) -> tuple | None:
    """The per-sample output shape of ``fn`` on a zero input of per-sample ``shape``, or ``None``
    when torch rejects the configuration (a kernel larger than the padded input, ...) or the output
    is not finite (a dilated max-pooling window over padding only gives -inf)."""
    try:
        with torch.no_grad():
            out = fn(torch.zeros((1,) + shape))
    except (RuntimeError, ValueError):
        return None
    if out.numel() == 0 or not torch.isfinite(out).all():
        return None  # no output, or a max-pooling window that covers only padding (-inf)
    return tuple(out.shape[1:])


# ---- vector stages ([N, d]) ---------------------------------------------------------------------

def _vector_stage(b: _Builder) -> None:
    draw = b.draw
    (d,) = b.shape
    kinds = ["linear", "linear_act", "act", "identity"]
    if not b.chain_only:
        kinds += ["residual", "branch", "tied", "reshape", "to_image", "reuse", "reuse"]
    kind = draw(st.sampled_from(kinds))
    b.tags.add(kind)
    if kind in ("linear", "linear_act"):
        out = draw(st.integers(1, 5))
        b.apply(b.linear_expr("h", d, out)[0])
        b.shape = (out,)
        if kind == "linear_act":
            b.activation()
    elif kind == "act":
        b.activation()
    elif kind == "identity":
        spelled = draw(st.sampled_from(["nn.Identity()", "nn.Dropout(0.3)", "F.dropout"]))
        if spelled == "F.dropout" and not b.chain_only:
            b.not_a_chain("functional")
            b.emit("h = F.dropout(h, 0.5, training=False)")
        else:
            b.apply_module(b.module("drop" if "Dropout" in spelled else "ident",
                                    "nn.Dropout(0.3)" if spelled == "F.dropout" else spelled))
    elif kind == "residual":
        b.not_a_chain("residual")
        inner = draw(st.sampled_from(["act(lin)", "lin(act(lin))"]))
        if inner == "act(lin)":
            t = b.activation_expr(b.linear_expr("h", d, d)[0])
        else:
            hidden = draw(st.integers(1, 4))
            t = b.linear_expr(b.activation_expr(b.linear_expr("h", d, hidden)[0]), hidden, d)[0]
        _emit_sum(b, "h", t)
    elif kind == "branch":
        b.not_a_chain("branch")
        out = draw(st.integers(1, 5))
        b.emit(f"a = {b.activation_expr(b.linear_expr('h', d, out)[0])}")
        if draw(st.booleans()):
            b.emit(f"c = {b.linear_expr('h', d, out)[0]}")
        else:
            hidden = draw(st.integers(1, 4))
            b.emit(f"c = {b.linear_expr(b.activation_expr(b.linear_expr('h', d, hidden)[0]), hidden, out)[0]}")
        _emit_sum(b, "a", "c", target="h")
        b.shape = (out,)
    elif kind == "tied":
        b.not_a_chain("tied")
        uses = draw(st.integers(2, 3))
        bias = draw(st.booleans())
        name = b.module("lin", f"nn.Linear({d}, {d}, bias={bias})", ("weight", "bias") if bias else ("weight",))
        for i in range(uses):
            spelled = draw(st.sampled_from(["module", "module", "F.linear"])) if i > 0 else "module"
            if spelled == "module":
                z = f"self.{name}(h)"
            else:
                b.tags.add("tied:F.linear")
                z = f"F.linear(h, self.{name}.weight{', self.' + name + '.bias' if bias else ''})"
            t = b.activation_expr(z)
            if i > 0 and draw(st.booleans()):
                _emit_sum(b, "h", t)
            else:
                b.emit(f"h = {t}")
    elif kind == "reshape":
        b.not_a_chain("reshape")
        divisors = [a for a in range(1, d + 1) if d % a == 0]
        a = draw(st.sampled_from(divisors))
        b.emit(draw(st.sampled_from([f"h = h.view(h.size(0), {a}, {d // a})",
                                     f"h = h.reshape(-1, {a}, {d // a})",
                                     f"h = torch.reshape(h, (h.shape[0], {a}, {d // a}))"])))
        last = d // a
        if draw(st.booleans()):  # a linear map of the last axis of a 3-d tensor
            out = draw(st.integers(1, 4))
            b.emit(f"h = {b.linear_expr('h', last, out)[0]}")
            last = out
        b.emit(draw(st.sampled_from(["h = h.flatten(1)", "h = torch.flatten(h, 1)",
                                     "h = h.reshape(h.shape[0], -1)", "h = h.view(h.size(0), -1)"])))
        b.shape = (a * last,)
    elif kind == "reuse":  # an earlier linear layer applied again, with other layers in between
        if not b.linears:  # none yet: a layer now, another one in between, then the first again
            bias = draw(st.booleans())
            first = b.module("lin", f"nn.Linear({d}, {d}, bias={bias})", ("weight", "bias") if bias else ("weight",))
            b.linears.append((first, d, d))
            b.emit(f"h = {b.activation_expr(f'self.{first}(h)')}")
            b.emit(f"h = {b.linear_expr('h', d, d)[0]}")
        fits = [lin for lin in b.linears if lin[1] == d]
        name, d_in, out = draw(st.sampled_from(fits or b.linears))
        b.not_a_chain("tied:across")
        if d_in != d:  # a new linear map into the re-used layer's input width
            b.emit(f"h = {b.linear_expr('h', d, d_in)[0]}")
        t = f"self.{name}(h)"
        b.emit(f"h = {b.activation_expr(t) if draw(st.booleans()) else t}")
        b.shape = (out,)
    elif kind == "to_image":
        b.not_a_chain("to_image")
        c = draw(st.sampled_from([c for c in (1, 2, 3, d) if d % c == 0]))
        rest = d // c
        hh = draw(st.sampled_from([k for k in range(1, rest + 1) if rest % k == 0]))
        b.emit(f"h = h.view(h.size(0), {c}, {hh}, {rest // hh})")
        b.shape = (c, hh, rest // hh)


def _emit_sum(b: _Builder, first: str, second: str, target: str = "h") -> None:
    """``target = first + second`` in one of torch's spellings of the sum of two tensors."""
    a, c = (first, second) if b.draw(st.booleans()) else (second, first)
    b.emit(b.draw(st.sampled_from([f"{target} = {a} + {c}", f"{target} = torch.add({a}, {c})",
                                   f"{target} = ({a}).add({c})"])))


# ---- image stages ([N, C, H, W]) ----------------------------------------------------------------

def _kernel(draw):
    return draw(st.one_of(st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3))))


MAX_SIDE = 7  # images never grow past 7x7 (the references are cubic in the parameter count)


def _image_stage(b: _Builder) -> None:
    draw = b.draw
    c, hgt, wid = b.shape
    kinds = ["conv", "conv_act", "act", "maxpool", "avgpool", "pad", "identity"]
    if not b.chain_only:
        kinds += ["residual", "branch", "tied", "pad", "reuse"]  # padding twice: F.pad is rarer
    kind = draw(st.sampled_from(kinds))
    b.tags.add(kind if kind in ("residual", "branch", "tied") else "image:" + kind)
    if kind in ("conv", "conv_act"):
        groups = draw(st.sampled_from([g for g in (1, 2, 3) if c % g == 0]))
        c_out = groups * draw(st.integers(1, 1 if groups == 3 else 2 if groups == 2 else 3))
        kernel = _kernel(draw)
        dilation = draw(st.sampled_from([1, 1, 2]))
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        if draw(st.integers(0, 5)) == 0 and dilation * (kh - 1) % 2 == 0 and dilation * (kw - 1) % 2 == 0:
            # "same" that pads symmetrically (fxcurv refuses the asymmetric case with an
            # UnsupportedOpError, tests/test_errors.py's business)
            stride, padding = 1, "same"
        else:
            stride = draw(st.sampled_from([1, 1, 2, (1, 2)]))
            padding = draw(st.sampled_from([0, 1, 2, (0, 1)]))
        bias = draw(st.booleans())
        shape = _out_shape(lambda t: F.conv2d(t, torch.zeros(c_out, c // groups, *(
            (kernel, kernel) if isinstance(kernel, int) else kernel)), None, stride, padding, dilation,
            groups), b.shape)
        if shape is None or max(shape[1:]) > MAX_SIDE:  # does not fit: a 1x1 convolution instead
            kernel, padding, dilation, stride = 1, 0, 1, 1
            shape = (c_out, hgt, wid)
        b.apply(b.conv_expr("h", c, c_out, groups, kernel, stride, padding, dilation, bias)[0])
        b.shape = shape
        if kind == "conv_act":
            b.activation()
    elif kind == "act":
        b.activation()
    elif kind in ("maxpool", "avgpool"):
        kernel = _kernel(draw)
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        stride = draw(st.sampled_from([None, 1, 2, (1, 2)]))
        padding = draw(st.sampled_from([0, 1])) if min(kh, kw) >= 2 else 0
        ceil_mode = draw(st.booleans())
        if kind == "maxpool":
            dilation = draw(st.sampled_from([1, 1, 2]))
            args = f"{kernel}, stride={stride}, padding={padding}, dilation={dilation}, ceil_mode={ceil_mode}"
            ctor, fn = f"nn.MaxPool2d({args})", f"F.max_pool2d(h, {args})"
            shape = _out_shape(lambda t: F.max_pool2d(t, kernel, stride, padding, dilation, ceil_mode), b.shape)
        else:
            include = draw(st.booleans())
            divisor = draw(st.sampled_from([None, None, None, 2]))
            args = (f"{kernel}, stride={stride}, padding={padding}, ceil_mode={ceil_mode}, "
                    f"count_include_pad={include}" + (f", divisor_override={divisor}" if divisor else ""))
            ctor, fn = f"nn.AvgPool2d({args})", f"F.avg_pool2d(h, {args})"
            shape = _out_shape(lambda t: F.avg_pool2d(t, kernel, stride, padding, ceil_mode, include, divisor),
                               b.shape)
        if shape is None or max(shape[1:]) > MAX_SIDE:
            return
        if b.form() == "module":
            b.apply_module(b.module("pool", ctor))
        else:
            b.not_a_chain("functional")
            b.emit(f"h = {fn}")
        b.shape = shape
    elif kind == "pad":
        n_pads = draw(st.sampled_from([2, 4]))
        pads = tuple(draw(st.integers(-1, 2)) for _ in range(n_pads))
        value = draw(st.sampled_from([0.0, 0.0, 1.5, -2.0]))
        shape = _out_shape(lambda t: F.pad(t, pads, value=value), b.shape)
        if shape is None or min(shape) < 1 or max(shape[1:]) > MAX_SIDE:
            return
        form = "module" if b.chain_only else draw(st.sampled_from(["functional", "module"]))
        if form == "module":
            if value == 0.0 and n_pads == 4:
                ctor = draw(st.sampled_from([f"nn.ZeroPad2d({pads})", f"nn.ConstantPad2d({pads}, 0.0)"]))
            else:
                ctor = f"nn.ConstantPad2d({pads}, {value})"
            b.apply_module(b.module("pad", ctor))
        else:
            b.not_a_chain("functional")
            b.emit(draw(st.sampled_from([f"h = F.pad(h, {pads}, value={value})",
                                         f"h = F.pad(h, {list(pads)}, 'constant', {value})"])))
        b.shape = shape
    elif kind == "identity":
        ctor = draw(st.sampled_from(["nn.Identity()", "nn.Dropout(0.4)", "nn.Dropout2d(0.2)"]))
        b.apply_module(b.module("ident" if ctor == "nn.Identity()" else "drop", ctor))
    elif kind in ("residual", "tied"):
        b.not_a_chain(kind)
        k = draw(st.sampled_from([1, 3]))
        dilation = draw(st.sampled_from([1, 2])) if k == 3 else 1
        padding = dilation * (k // 2)
        bias = draw(st.booleans())
        ctor, tail = b.conv_ctor(c, c, 1, k, 1, padding, dilation, bias)
        if kind == "residual":
            expr, _ = b.conv_expr("h", c, c, 1, k, 1, padding, dilation, bias)
            _emit_sum(b, "h", b.activation_expr(expr))
            return
        name = b.module("conv", ctor, ("weight", "bias") if bias else ("weight",))
        for i in range(draw(st.integers(2, 3))):
            if i > 0 and draw(st.integers(0, 2)) == 0:
                b.tags.add("tied:F.conv2d")
                z = f"F.conv2d(h, self.{name}.weight, {'self.' + name + '.bias' if bias else 'None'}, {tail})"
            else:
                z = f"self.{name}(h)"
            t = b.activation_expr(z)
            if i > 0 and draw(st.booleans()):
                _emit_sum(b, "h", t)
            else:
                b.emit(f"h = {t}")
    elif kind == "reuse":  # an earlier convolution applied again, with other layers in between
        fits = []
        for conv in b.convs:
            name, c_in, c_out, groups, kernel, stride, padding, dilation = conv
            if c_in != c:
                continue
            kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
            shape = _out_shape(lambda t, conv=conv, kh=kh, kw=kw: F.conv2d(
                t, torch.zeros(conv[2], conv[1] // conv[3], kh, kw), None, conv[5], conv[6], conv[7], conv[3]),
                b.shape)
            if shape is not None and max(shape[1:]) <= MAX_SIDE:
                fits.append((name, shape))
        if not fits:
            return
        name, shape = draw(st.sampled_from(fits))
        b.not_a_chain("tied:across")
        t = f"self.{name}(h)"
        b.emit(f"h = {b.activation_expr(t) if draw(st.booleans()) else t}")
        b.shape = shape
    elif kind == "branch":
        b.not_a_chain("branch")
        other = draw(st.sampled_from(["conv1x1", "maxpool", "avgpool"]))
        c_out = c if other != "conv1x1" else draw(st.integers(1, 3))
        bias = draw(st.booleans())
        expr, _ = b.conv_expr("h", c, c_out, 1, 3, 1, 1, 1, bias)
        b.emit(f"a = {b.activation_expr(expr)}")
        if other == "conv1x1":
            b.emit(f"c = {b.conv_expr('h', c, c_out, 1, 1, 1, 0, 1, draw(st.booleans()))[0]}")
        elif other == "maxpool":
            b.emit("c = F.max_pool2d(h, 3, stride=1, padding=1)")
        else:
            b.emit("c = F.avg_pool2d(h, 3, stride=1, padding=1, count_include_pad=False)")
        _emit_sum(b, "a", "c", target="h")
        b.shape = (c_out, hgt, wid)


def _flatten(b: _Builder) -> None:
    c, hgt, wid = b.shape
    spelled = "nn.Flatten()" if b.chain_only else b.draw(st.sampled_from(
        ["nn.Flatten()", "h.flatten(1)", "torch.flatten(h, 1)", "h.view(h.size(0), -1)",
         "h.reshape(h.shape[0], -1)"]))
    if spelled == "nn.Flatten()":
        b.apply_module(b.module("flat", spelled))
    else:
        b.not_a_chain("reshape")
        b.emit(f"h = {spelled}")
    b.shape = (c * hgt * wid,)


# ---- the case ------------------------------------------------------------------------------------

@dataclass
class Case:
    """One drawn problem. ``source`` defines ``Net`` and ``make() -> (model, loss_fn, x, y)``.

    ``chain``: the module attributes applied in order when the model is a plain chain of modules,
    each used once (HesScale's brute-force reference applies); ``None`` otherwise. ``unused``: the
    parameter names the forward never reads; ``frozen``: those with ``requires_grad=False``.
    ``head``: the parameters of a last linear layer whose output is the model's output and whose
    weight is used once (HesScale is exact there), empty if the model ends otherwise.
    """

    source: str
    loss: str
    batch: int
    quantities: tuple[str, ...]
    chain: list[str] | None
    unused: list[str]
    frozen: list[str]
    tags: set = field(default_factory=set)
    head: list[str] = field(default_factory=list)

    @property
    def has_mc(self) -> bool:
        return LOSSES[self.loss][3]

    def namespace(self) -> dict:
        filename = f"<fxcurv-case-{abs(hash(self.source)):x}>"
        linecache.cache[filename] = (len(self.source), None, self.source.splitlines(True), filename)
        ns: dict = {"__name__": "fxcurv_case"}
        exec(compile(self.source, filename, "exec"), ns)  # noqa: S102 - our own generated source
        return ns

    def make(self):
        """A fresh ``(model, loss_fn, x, y)`` (same numbers every time)."""
        return self.namespace()["make"]()

    def __repr__(self) -> str:  # what hypothesis prints for a falsifying example
        return (f"Case(loss={self.loss!r}, batch={self.batch}, quantities={self.quantities}, "
                f"chain={self.chain is not None}, tags={sorted(self.tags)})\n{self.source}")


HEADER = """\
import torch
import torch.nn.functional as F
from torch import nn
"""


def render(b: _Builder, head_first: tuple | None, spare: str | None, spare_first: bool,
           frozen: list[str], loss: str, batch: int, in_shape: tuple, out_shape: tuple, classes: int,
           seed: int) -> str:
    """The source of ``Net`` and ``make()``."""
    init = list(b.init)
    if head_first:
        init = init[head_first[0]:head_first[1]] + init[:head_first[0]] + init[head_first[1]:]
    if spare:
        init = [spare] + init if spare_first else init + [spare]
    lines = [HEADER, "", "class Net(nn.Module):", "    def __init__(self):", "        super().__init__()"]
    lines += ["        " + line for line in init]
    lines += ["", "    def forward(self, x):", "        h = x"]
    lines += ["        " + line for line in b.forward]
    lines += ["        return h", "", "", "def make():", f"    torch.manual_seed({seed})",
              "    model = Net().double().eval()"]
    lines += [f"    model.get_parameter({name!r}).requires_grad_(False)" for name in frozen]
    lines.append(f"    x = torch.randn({(batch,) + in_shape}, dtype=torch.float64)")
    expr, target, _, _ = LOSSES[loss]
    if target == "classes":
        lines.append(f"    y = torch.randint(0, {classes}, ({batch},))")
    elif target == "classes_ignore0":
        lines.append(f"    y = torch.randint(0, {classes}, ({batch},))")
        lines.append("    y[0] = 1  # keep one target: torch's mean over no targets is nan")
    elif target == "probabilities":
        lines.append(f"    y = torch.softmax(torch.randn({batch}, {classes}, dtype=torch.float64), dim=1)")
    else:
        lines.append(f"    y = torch.randn({(batch,) + out_shape}, dtype=torch.float64)")
    lines.append(f"    loss_fn = {expr.format(C=classes)}")
    lines.append("    return model, loss_fn, x, y")
    return "\n".join(lines) + "\n"


@st.composite
def cases(draw, max_stages: int = 4, style: str | None = None, quantities: tuple | None = None,
          losses: list | None = None, classes: list | None = None) -> Case:
    """A whole problem. ``style``: ``"chain"`` (modules only, each used once: HesScale's reference
    applies), ``"graph"`` (everything), or drawn. ``quantities``: fixed, or a drawn subset.
    ``losses``: restrict the loss keys (default: all). ``classes``: the numbers of classes a
    cross-entropy loss may get (default 1-4, one class being the constant loss)."""
    style = style or draw(st.sampled_from(["chain", "graph"]))
    chain_only = style == "chain"
    loss = draw(st.sampled_from(sorted(losses or LOSSES)))
    _, target, needs_logits, _ = LOSSES[loss]
    if classes is None:
        classes = [1, 2, 2, 3, 3, 4]
    if target == "classes_ignore0":
        classes = [c for c in classes if c >= 2] or [2]  # class 0 is ignored: keep one more
    classes = draw(st.sampled_from(list(classes)))
    image = draw(st.integers(0, 4)) >= 2  # 3 in 5
    if image:
        in_shape = (draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    else:
        in_shape = (draw(st.integers(1, 5)),)
    b = _Builder(draw, in_shape, chain_only)
    b.tags.add(style)
    for _ in range(draw(st.integers(0, max_stages))):
        if len(b.shape) == 3:
            if draw(st.integers(0, 5)) == 0:
                _flatten(b)
            else:
                _image_stage(b)
        else:
            _vector_stage(b)
    # The head: logits [N, C] for cross-entropy; anything for the others.
    head = needs_logits or not b.params or draw(st.booleans())
    head_first, head_params = None, []
    if head:
        if len(b.shape) == 3:
            _flatten(b)
        (d,) = b.shape
        before = len(b.init)
        out = classes if needs_logits else draw(st.integers(1, 4))
        n_params = len(b.params)
        b.apply(b.linear_expr("h", d, out)[0])
        head_params = b.params[n_params:]
        b.shape = (out,)
        if draw(st.integers(0, 3)) == 0:  # registered before the layers it follows
            head_first = (before, len(b.init))
            b.tags.add("head_first")
        if draw(st.integers(0, 4)) == 0:  # an activation on the output (logits through softplus, ...)
            b.activation()
            head_params = []
    # Unused parameters (a spare module or a bare parameter, registered first or last).
    spare, unused, spare_first = None, [], False
    if draw(st.integers(0, 5)) == 0:
        b.tags.add("unused")
        if draw(st.booleans()):
            spare, unused = "self.spare = nn.Linear(2, 3)", ["spare.weight", "spare.bias"]
        else:
            spare, unused = "self.spare = nn.Parameter(torch.randn(3))", ["spare"]
        spare_first = draw(st.booleans())
    all_params = b.params + unused
    # Frozen parameters: any proper subset (at least one stays trainable).
    frozen: list[str] = []
    if draw(st.integers(0, 4)) == 0 and len(all_params) > 1:
        frozen = sorted(draw(st.sets(st.sampled_from(all_params), min_size=1, max_size=len(all_params) - 1)))
        b.tags.add("frozen")
    batch = draw(st.sampled_from([1, 2, 3]))
    if quantities is None:
        pool = [q for q in QUANTITY_NAMES if q != "diag_ggn_mc" or LOSSES[loss][3]]
        chosen = draw(st.sets(st.sampled_from(pool), min_size=1))
        quantities = tuple(q for q in QUANTITY_NAMES if q in chosen)
    seed = draw(st.integers(0, 2 ** 16))
    source = render(b, head_first, spare, spare_first, frozen, loss, batch, in_shape, b.shape, classes,
                    seed)
    chain = b.chain if chain_only else None
    return Case(source=source, loss=loss, batch=batch, quantities=quantities,
                chain=chain, unused=unused, frozen=frozen, tags=b.tags, head=head_params)
