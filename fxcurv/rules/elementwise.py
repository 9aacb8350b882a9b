"""Elementwise activations ``z = phi(x)``: HBP eq. S.9, HesScale eq. 4.

Every activation is three functions -- ``phi``, ``phi'`` and ``phi''`` -- and shares the same rules:

* ``jac_t``:    ``J^T v = phi'(x) * v`` for gradients and every square-root factor column;
* ``diag``:     ``d_x = phi'(x)^2 * d_z`` (HesScale eq. 4, first term);
* ``residual``: ``r = phi''(x) * g_z``, the second term of HBP eq. S.9, ``diag[phi''(x) (.) dz]``.
  Piecewise-linear activations (ReLU, LeakyReLU) have none.

``phi'`` and ``phi''`` are *derived* quantities (``d1``, ``d2``): one node per activation, shared by
all messages. Where the output is cheaper to differentiate from (tanh, sigmoid) they use ``out``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedOpError
from .registry import Match, OpDef, define_op


def define_activation(
    name: str,
    forward: Callable[..., torch.Tensor],
    d1: Callable[..., torch.Tensor],
    d2: Callable[..., torch.Tensor] | None,
    modules: tuple[type, ...] = (),
    functions: tuple[Callable[..., Any], ...] = (),
    methods: tuple[str, ...] = (),
    attrs: dict[str, tuple[str, int | None, Any]] | None = None,
    inplace_index: int | None = None,
    aten: tuple[Any, ...] = (),
) -> OpDef:
    """Register an activation from ``phi`` (``forward(x, **attrs)``), ``phi'`` and ``phi''``.

    ``d1``/``d2`` take any of ``x``, ``out`` and the attributes by name. ``d2=None`` marks a
    piecewise-linear activation (no residual term). ``attrs`` maps attribute name to
    ``(module attribute, functional positional index, default)``; ``inplace_index`` is the positional
    index of the functional form's ``inplace`` flag (read by keyword where ``None``). ``aten``: the
    exported (ATen) ops of the activation, which take the attributes at the functional form's positions
    and nothing else (further arguments, e.g. ``aten.elu``'s ``scale``, must be 1).
    """
    attrs = attrs or {}
    op = define_op(name, "elementwise", forward, inputs=("x",))

    def _attrs_from_args(a):
        return {k: a(idx, k, default) for k, (_, idx, default) in attrs.items()}

    if modules:
        @op.module(*modules)
        def _from_module(node, mod):
            check_in_place(node.args[0], bool(getattr(mod, "inplace", False)))
            return Match({"x": node.args[0]}, {k: getattr(mod, m) for k, (m, _, _) in attrs.items()})

    if functions:
        @op.function(*functions)
        def _from_function(node, a):
            check_in_place(a(0, "input"), bool(a(inplace_index, "inplace", False)))
            return Match({"x": a(0, "input")}, _attrs_from_args(a))

    if aten:
        @op.function(*aten)
        def _from_aten(node, a):
            positional = sum(1 for _, idx, _ in attrs.values() if idx is not None)
            if any(v != 1 for v in a.args[1 + positional:]):
                return None  # ``aten.elu(x, alpha, scale, input_scale)`` with a scale: the generic rule
            return Match({"x": a(0, "self")}, _attrs_from_args(a))

    if methods:
        @op.method(*methods)
        def _from_method(node, a):
            return Match({"x": a(0, "self")}, _attrs_from_args(a))

    op.derived("d1", label=f"{name}'", pointwise=True)(d1)
    if d2 is not None:
        op.derived("d2", label=f"{name}''", pointwise=True)(d2)

        @op.residual("x", pointwise=True)
        def elementwise_residual(g, d2):
            """HBP eq. S.9, second term: ``diag[phi''(x) * g_z]``."""
            return g * d2

    @op.jac_t("x", pointwise=True)
    def elementwise_jac_t(v, d1):
        """HBP eq. S.9, first term: ``diag[phi'(x)] v``."""
        return v * d1

    @op.diag("x", pointwise=True)
    def elementwise_diag(d, d1):
        """HesScale eq. 4: ``phi'(x)^2 * d_z``."""
        return d * (d1 * d1)

    @op.dense("x")
    def elementwise_dense(m, d1):
        """Botev eq. 29's ``B M B`` batch averaged (KFRA's expectation approximation, BackPACK's):
        ``E_n[diag(phi'(x_n)) M diag(phi'(x_n))] = E_n[phi'(x_n) phi'(x_n)^T] o M``."""
        f = d1.reshape(d1.shape[0], -1)
        return (f.T @ f) * m / d1.shape[0]

    return op


# ---- in-place activations -----------------------------------------------------------------------
#
# ``F.relu(h, inplace=True)`` overwrites ``h``: in eager PyTorch every later reader of ``h`` -- and of
# any tensor ``h`` is a view of -- reads the activation's output, while in the traced graph they read
# the node before the call. The canonical op is out of place, so that is exact only where nothing
# else reads ``h`` or what it aliases.

# Traced calls whose result may share memory with their first argument.
_VIEW_METHODS = frozenset({"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
                           "reshape_as", "contiguous", "transpose", "permute", "t", "expand", "narrow"})
_VIEW_FUNCTIONS = frozenset({torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.transpose,
                             torch.permute, torch.narrow, operator.getitem, F.dropout})
_VIEW_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout)


def _aliased_input(node: Any) -> Any:
    """The traced value ``node``'s result may alias (its first argument), or ``None``."""
    op = getattr(node, "op", None)
    if op == "call_method" and node.target in _VIEW_METHODS:
        return node.args[0]
    if op == "call_function" and node.target in _VIEW_FUNCTIONS:
        return node.args[0] if node.args else None
    if op == "call_module":
        root = getattr(getattr(node, "graph", None), "owning_module", None)
        mod = root.get_submodule(str(node.target)) if root is not None else None
        if mod is None or isinstance(mod, _VIEW_MODULES):  # unknown: assume it may alias
            return node.args[0] if node.args else None
    return None


_METADATA_METHODS = frozenset({"size", "dim", "numel", "ndimension", "nelement"})


def _reads_values(user: Any) -> bool:
    """Whether a traced node reads its input's values (not only its shape: ``h.shape``, ``h.size(0)``)."""
    if user.op == "call_function" and user.target is getattr:
        return False
    return not (user.op == "call_method" and user.target in _METADATA_METHODS)


def check_in_place(x: Any, inplace: bool) -> None:
    """UnsupportedOpError for an in-place activation whose input (or a tensor it is a view of) is
    read by another node; nothing for out-of-place calls."""
    seen = x
    while inplace and seen is not None:
        users = [u for u in getattr(seen, "users", {}) if _reads_values(u)]
        if len(users) > 1:
            readers = ", ".join(sorted(str(u) for u in users))
            raise UnsupportedOpError(
                f"an in-place activation (inplace=True) overwrites '{seen}', which other nodes also read "
                f"({readers}): in PyTorch they see the overwritten values. Use inplace=False (or assign the "
                "result and use only it)")
        seen = _aliased_input(seen)


# ---- the activations -----------------------------------------------------------------------------

def relu(x):
    return torch.relu(x)


def _relu_d1(x):
    return (x > 0).to(x.dtype)


define_activation("relu", relu, _relu_d1, None,
                  modules=(nn.ReLU,), functions=(F.relu, torch.relu), methods=("relu",), inplace_index=1,
                  aten=(torch.ops.aten.relu.default,))


def leaky_relu(x, negative_slope=0.01):
    return F.leaky_relu(x, negative_slope)


def _leaky_relu_d1(x, negative_slope):
    return torch.where(x > 0, torch.ones_like(x), torch.full_like(x, negative_slope))


define_activation("leaky_relu", leaky_relu, _leaky_relu_d1, None,
                  modules=(nn.LeakyReLU,), functions=(F.leaky_relu,),
                  attrs={"negative_slope": ("negative_slope", 1, 0.01)}, inplace_index=2,
                  aten=(torch.ops.aten.leaky_relu.default,))


def sigmoid(x):
    return torch.sigmoid(x)


def _sigmoid_d1(out):
    return out * (1 - out)


def _sigmoid_d2(out):
    return out * (1 - out) * (1 - 2 * out)


define_activation("sigmoid", sigmoid, _sigmoid_d1, _sigmoid_d2,
                  modules=(nn.Sigmoid,), functions=(torch.sigmoid, F.sigmoid), methods=("sigmoid",),
                  aten=(torch.ops.aten.sigmoid.default,))


def tanh(x):
    return torch.tanh(x)


def _tanh_d1(out):
    return 1 - out * out


def _tanh_d2(out):
    return -2 * out * (1 - out * out)


define_activation("tanh", tanh, _tanh_d1, _tanh_d2,
                  modules=(nn.Tanh,), functions=(torch.tanh, F.tanh), methods=("tanh",),
                  aten=(torch.ops.aten.tanh.default,))


def elu(x, alpha=1.0):
    return F.elu(x, alpha)


def _elu_d1(x, out, alpha):
    return torch.where(x > 0, torch.ones_like(x), out + alpha)


def _elu_d2(x, out, alpha):
    return torch.where(x > 0, torch.zeros_like(x), out + alpha)


define_activation("elu", elu, _elu_d1, _elu_d2,
                  modules=(nn.ELU,), functions=(F.elu,), attrs={"alpha": ("alpha", 1, 1.0)}, inplace_index=2,
                  aten=(torch.ops.aten.elu.default,))


def softplus(x, beta=1.0, threshold=20.0):
    return F.softplus(x, beta, threshold)


def _softplus_d1(x, beta, threshold):
    # torch's softplus is linear where beta * x > threshold; its derivatives follow.
    s = torch.sigmoid(beta * x)
    return torch.where(beta * x > threshold, torch.ones_like(x), s)


def _softplus_d2(x, beta, threshold):
    s = torch.sigmoid(beta * x)
    return torch.where(beta * x > threshold, torch.zeros_like(x), beta * s * (1 - s))


define_activation("softplus", softplus, _softplus_d1, _softplus_d2,
                  modules=(nn.Softplus,), functions=(F.softplus,),
                  attrs={"beta": ("beta", 1, 1.0), "threshold": ("threshold", 2, 20.0)},
                  aten=(torch.ops.aten.softplus.default,))


def silu(x):
    return F.silu(x)


def _silu_d1(x):
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def _silu_d2(x):
    s = torch.sigmoid(x)
    return s * (1 - s) * (2 + x * (1 - 2 * s))


define_activation("silu", silu, _silu_d1, _silu_d2,
                  modules=(nn.SiLU,), functions=(F.silu,), inplace_index=1, aten=(torch.ops.aten.silu.default,))


def gelu(x, approximate="none"):
    return F.gelu(x, approximate=approximate)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_C = 0.044715


def _normal_pdf(x):
    return torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _gelu_d1(x, approximate):
    if approximate == "tanh":
        u = _SQRT_2_OVER_PI * (x + _GELU_C * x**3)
        t = torch.tanh(u)
        du = _SQRT_2_OVER_PI * (1 + 3 * _GELU_C * x * x)
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * du
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2.0)))
    return cdf + x * _normal_pdf(x)


def _gelu_d2(x, approximate):
    if approximate == "tanh":
        u = _SQRT_2_OVER_PI * (x + _GELU_C * x**3)
        t = torch.tanh(u)
        du = _SQRT_2_OVER_PI * (1 + 3 * _GELU_C * x * x)
        ddu = _SQRT_2_OVER_PI * 6 * _GELU_C * x
        sech2 = 1 - t * t
        return sech2 * du + 0.5 * x * sech2 * (ddu - 2 * t * du * du)
    return _normal_pdf(x) * (2 - x * x)


define_activation("gelu", gelu, _gelu_d1, _gelu_d2,
                  modules=(nn.GELU,), functions=(F.gelu,),
                  attrs={"approximate": ("approximate", None, "none")}, aten=(torch.ops.aten.gelu.default,))


# ---- SELU, CELU: ELU's exponential branch, scaled -------------------------------------------------

# torch's SELU constants (Klambauer et al. 2017, eq. 14), as in ATen.
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946


def selu(x):
    return torch.selu(x)


def _selu_d1(x, out):
    """``lambda`` for ``x > 0``; ``lambda alpha e^x = out + lambda alpha`` otherwise."""
    return torch.where(x > 0, torch.full_like(x, SELU_SCALE), out + SELU_SCALE * SELU_ALPHA)


def _selu_d2(x, out):
    """``0`` for ``x > 0``; ``lambda alpha e^x`` otherwise."""
    return torch.where(x > 0, torch.zeros_like(x), out + SELU_SCALE * SELU_ALPHA)


define_activation("selu", selu, _selu_d1, _selu_d2,
                  modules=(nn.SELU,), functions=(F.selu, torch.selu), inplace_index=1,
                  aten=(torch.ops.aten.selu.default,))


def celu(x, alpha=1.0):
    """``x`` for ``x > 0``, ``alpha (e^(x / alpha) - 1)`` otherwise: F.celu's values, written out
    because torch's CELU backward scales by ``1 / alpha`` rounded to float32 (a 1e-8 relative error in
    float64), which the tests' autograd references of this forward would inherit."""
    return torch.where(x > 0, x, alpha * torch.expm1(x / alpha))


def _celu_d1(x, out, alpha):
    """``1`` for ``x > 0``; ``e^(x / alpha) = out / alpha + 1`` otherwise."""
    return torch.where(x > 0, torch.ones_like(x), out / alpha + 1)


def _celu_d2(x, out, alpha):
    """``0`` for ``x > 0``; ``e^(x / alpha) / alpha`` otherwise."""
    return torch.where(x > 0, torch.zeros_like(x), (out / alpha + 1) / alpha)


define_activation("celu", celu, _celu_d1, _celu_d2,
                  modules=(nn.CELU,), functions=(F.celu, torch.celu), attrs={"alpha": ("alpha", 1, 1.0)},
                  inplace_index=2, aten=(torch.ops.aten.celu.default,))


# ---- LogSigmoid, Mish, Softsign -----------------------------------------------------------------------

def logsigmoid(x):
    return F.logsigmoid(x)


def _logsigmoid_d1(x):
    """``log sigma(x)' = 1 - sigma(x) = sigma(-x)``."""
    return torch.sigmoid(-x)


def _logsigmoid_d2(x):
    """``-sigma(x) (1 - sigma(x))``."""
    s = torch.sigmoid(x)
    return -s * (1 - s)


define_activation("logsigmoid", logsigmoid, _logsigmoid_d1, _logsigmoid_d2,
                  modules=(nn.LogSigmoid,), functions=(F.logsigmoid,), aten=(torch.ops.aten.log_sigmoid.default,))


def mish(x):
    return F.mish(x)


def _mish_parts(x):
    """``(t, s, q, 1 - t^2)`` with ``t = tanh(softplus(x))``, ``s = sigma(x) = softplus'(x)`` and
    ``q = 1 - s = sigma(-x)``, all from the sigmoids: with ``w = 1 + e^x = 1 / q``,
    ``t = (w^2 - 1) / (w^2 + 1) = s (1 + q) / (1 + q^2)`` and ``1 - t^2 = 4 q^2 / (1 + q^2)^2``, which
    neither overflow for large ``x`` nor cancel for large ``|x|`` (``t ~ s`` as ``x -> -inf``)."""
    s, q = torch.sigmoid(x), torch.sigmoid(-x)
    r = 1 + q * q
    return s * (1 + q) / r, s, q, 4 * q * q / (r * r)


def _mish_d1(x):
    """``(x t)' = t + x s (1 - t^2)``, since ``t' = (1 - t^2) softplus'(x)``."""
    t, s, _, sech2 = _mish_parts(x)
    return t + x * s * sech2


def _mish_d2(x):
    """``s (1 - t^2) (2 + x q - 2 x s t)``: the derivative of ``t + x s (1 - t^2)`` with
    ``t' = s (1 - t^2)``, ``s' = s q`` and ``(1 - t^2)' = -2 t s (1 - t^2)``."""
    t, s, q, sech2 = _mish_parts(x)
    return s * sech2 * (2 + x * q - 2 * x * s * t)


define_activation("mish", mish, _mish_d1, _mish_d2, modules=(nn.Mish,), functions=(F.mish,), inplace_index=1,
                  aten=(torch.ops.aten.mish.default,))


def softsign(x):
    return F.softsign(x)


def _softsign_d1(x):
    """``(x / (1 + |x|))' = 1 / (1 + |x|)^2``."""
    return (1 + x.abs()).pow(-2)


def _softsign_d2(x):
    """``-2 sign(x) / (1 + |x|)^3`` (at ``x = 0`` the one-sided values are ``-+2``; ``0`` is taken,
    as autograd's ``sign``)."""
    return -2 * torch.sign(x) * (1 + x.abs()).pow(-3)


define_activation("softsign", softsign, _softsign_d1, _softsign_d2, modules=(nn.Softsign,),
                  functions=(F.softsign,))


# ---- the hard activations: piecewise linear (Hardtanh, ReLU6, Hardsigmoid) or quadratic (Hardswish) --
#
# Their derivatives follow torch's backward kernels, including at the kinks: ``hardtanh`` passes the
# gradient strictly inside ``(min_val, max_val)``, ``hardsigmoid`` strictly inside ``(-3, 3)``,
# ``hardswish`` uses ``x / 3 + 1/2`` strictly inside ``(-3, 3)`` (``0`` at ``-3``, ``1`` at ``3``).
# Away from the kinks (a set of measure zero) the piecewise-linear ones have ``phi'' = 0`` exactly,
# hence no residual rule; Hardswish is quadratic on ``(-3, 3)``, ``phi'' = 1/3`` there.


def hardtanh(x, min_val=-1.0, max_val=1.0):
    return F.hardtanh(x, min_val, max_val)


def _hardtanh_d1(x, min_val, max_val):
    return ((x > min_val) & (x < max_val)).to(x.dtype)


hardtanh_op = define_activation(
    "hardtanh", hardtanh, _hardtanh_d1, None, modules=(nn.Hardtanh, nn.ReLU6), functions=(F.hardtanh,),
    attrs={"min_val": ("min_val", 1, -1.0), "max_val": ("max_val", 2, 1.0)}, inplace_index=3,
    aten=(torch.ops.aten.hardtanh.default,))


@hardtanh_op.function(F.relu6)
def _relu6_from_function(node, a):
    """``relu6(x) = hardtanh(x, 0, 6)``."""
    check_in_place(a(0, "input"), bool(a(1, "inplace", False)))
    return Match({"x": a(0, "input")}, {"min_val": 0.0, "max_val": 6.0})


@hardtanh_op.function(torch.ops.aten.relu6.default)
def _relu6_from_aten(node, a):
    """The exported ``relu6(x) = hardtanh(x, 0, 6)`` (out of place)."""
    return Match({"x": a(0, "self")}, {"min_val": 0.0, "max_val": 6.0})


def hardsigmoid(x):
    # relu6(x + 3) / 6, as ATen computes it; torch has no double backward for F.hardsigmoid, which
    # the tests' torch.func references of this forward need.
    return F.relu6(x + 3) / 6


def _hardsigmoid_d1(x):
    return ((x > -3) & (x < 3)).to(x.dtype) / 6


define_activation("hardsigmoid", hardsigmoid, _hardsigmoid_d1, None,
                  modules=(nn.Hardsigmoid,), functions=(F.hardsigmoid,), inplace_index=1,
                  aten=(torch.ops.aten.hardsigmoid.default,))


def hardswish(x):
    return F.hardswish(x)


def _hardswish_d1(x):
    """``0`` up to ``-3``, ``x / 3 + 1/2`` on ``(-3, 3)``, ``1`` from ``3`` on."""
    return torch.where(x <= -3, torch.zeros_like(x), torch.where(x < 3, x / 3 + 0.5, torch.ones_like(x)))


def _hardswish_d2(x):
    """``1/3`` on ``(-3, 3)`` (the quadratic piece ``x (x + 3) / 6``), ``0`` elsewhere."""
    return ((x > -3) & (x < 3)).to(x.dtype) / 3


define_activation("hardswish", hardswish, _hardswish_d1, _hardswish_d2,
                  modules=(nn.Hardswish,), functions=(F.hardswish,), inplace_index=1,
                  aten=(torch.ops.aten.hardswish.default,))
