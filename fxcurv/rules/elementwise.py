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
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

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
) -> OpDef:
    """Register an activation from ``phi`` (``forward(x, **attrs)``), ``phi'`` and ``phi''``.

    ``d1``/``d2`` take any of ``x``, ``out`` and the attributes by name. ``d2=None`` marks a
    piecewise-linear activation (no residual term). ``attrs`` maps attribute name to
    ``(module attribute, functional positional index, default)``.
    """
    attrs = attrs or {}
    op = define_op(name, "elementwise", forward, inputs=("x",))

    def _attrs_from_args(a):
        return {k: a(idx, k, default) for k, (_, idx, default) in attrs.items()}

    if modules:
        @op.module(*modules)
        def _from_module(node, mod):
            return Match({"x": node.args[0]}, {k: getattr(mod, m) for k, (m, _, _) in attrs.items()})

    if functions:
        @op.function(*functions)
        def _from_function(node, a):
            return Match({"x": a(0, "input")}, _attrs_from_args(a))

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


# ---- the activations -----------------------------------------------------------------------------

def relu(x):
    return torch.relu(x)


def _relu_d1(x):
    return (x > 0).to(x.dtype)


define_activation("relu", relu, _relu_d1, None,
                  modules=(nn.ReLU,), functions=(F.relu, torch.relu), methods=("relu",))


def leaky_relu(x, negative_slope=0.01):
    return F.leaky_relu(x, negative_slope)


def _leaky_relu_d1(x, negative_slope):
    return torch.where(x > 0, torch.ones_like(x), torch.full_like(x, negative_slope))


define_activation("leaky_relu", leaky_relu, _leaky_relu_d1, None,
                  modules=(nn.LeakyReLU,), functions=(F.leaky_relu,),
                  attrs={"negative_slope": ("negative_slope", 1, 0.01)})


def sigmoid(x):
    return torch.sigmoid(x)


def _sigmoid_d1(out):
    return out * (1 - out)


def _sigmoid_d2(out):
    return out * (1 - out) * (1 - 2 * out)


define_activation("sigmoid", sigmoid, _sigmoid_d1, _sigmoid_d2,
                  modules=(nn.Sigmoid,), functions=(torch.sigmoid, F.sigmoid), methods=("sigmoid",))


def tanh(x):
    return torch.tanh(x)


def _tanh_d1(out):
    return 1 - out * out


def _tanh_d2(out):
    return -2 * out * (1 - out * out)


define_activation("tanh", tanh, _tanh_d1, _tanh_d2,
                  modules=(nn.Tanh,), functions=(torch.tanh, F.tanh), methods=("tanh",))


def elu(x, alpha=1.0):
    return F.elu(x, alpha)


def _elu_d1(x, out, alpha):
    return torch.where(x > 0, torch.ones_like(x), out + alpha)


def _elu_d2(x, out, alpha):
    return torch.where(x > 0, torch.zeros_like(x), out + alpha)


define_activation("elu", elu, _elu_d1, _elu_d2,
                  modules=(nn.ELU,), functions=(F.elu,), attrs={"alpha": ("alpha", 1, 1.0)})


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
                  attrs={"beta": ("beta", 1, 1.0), "threshold": ("threshold", 2, 20.0)})


def silu(x):
    return F.silu(x)


def _silu_d1(x):
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def _silu_d2(x):
    s = torch.sigmoid(x)
    return s * (1 - s) * (2 + x * (1 - 2 * s))


define_activation("silu", silu, _silu_d1, _silu_d2,
                  modules=(nn.SiLU,), functions=(F.silu,))


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
                  attrs={"approximate": ("approximate", None, "none")})
