"""Constant padding (``nn.ZeroPad*d``, ``nn.ConstantPad*d``, ``F.pad(mode='constant')``): HBP Sec. D.2.

Padding copies every input entry to one output entry and adds constants, so it is the transpose of
an index selection: ``z = Pi^T x + c``. The padding value is a constant and drops out of every
derivative. ``J^T v = Pi v`` crops ``v`` back to the input, and since ``Pi`` is binary the HesScale
diagonal ``(Pi^T o Pi^T)^T d`` is the same crop. Negative pads (cropping) are covered alike: their
transpose pads with zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedOpError
from .registry import Match, define_op, example


def pad(x, pad, value=0.0):
    return F.pad(x, pad, "constant", value)


op = define_op("pad", "padding", pad, inputs=("x",))

_MODULES = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)


def _canonical(x, pads, value):
    pads = tuple(int(p) for p in pads)
    if len(pads) % 2:
        raise UnsupportedOpError(f"pad={pads} has odd length; F.pad takes (left, right) pairs")
    val = example(x)
    if val is not None and len(pads) // 2 > val.dim() - 1:
        raise UnsupportedOpError(
            f"pad={pads} pads {len(pads) // 2} trailing dims of an input with shape {tuple(val.shape)}, "
            "including the batch axis (dim 0); fxcurv treats samples as independent. Supported: "
            "padding of the per-sample dimensions"
        )
    return Match({"x": x}, {"pad": pads, "value": 0.0 if value is None else float(value)})


@op.module(*_MODULES)
def _from_module(node, mod):
    return _canonical(node.args[0], mod.padding, mod.value)


@op.function(F.pad)
def _from_function(node, a):
    mode = a(2, "mode", "constant")
    if mode != "constant":
        raise UnsupportedOpError(
            f"F.pad with mode={mode!r} is not supported; supported: mode='constant' (and "
            "nn.ZeroPad2d / nn.ConstantPad2d)"
        )
    return _canonical(a(0, "input"), a(1, "pad"), a(3, "value", None))


@op.function(torch.ops.aten.constant_pad_nd.default, torch.ops.aten.pad.default)
def _from_aten(node, a):
    """Exported padding: ``constant_pad_nd(x, pad, value)``, or ``pad(x, pad, mode, value)`` whose other
    modes (reflect, replicate, circular) take the generic rule."""
    if node.target is torch.ops.aten.constant_pad_nd.default:
        return _canonical(a(0, "self"), a(1, "pad"), a(2, "value", 0.0))
    if a(2, "mode", "constant") != "constant":
        return None
    return _canonical(a(0, "self"), a(1, "pad"), a(3, "value", None))


def _crop(v, pad):
    if all(p >= 0 for p in pad):
        # A view, not a copy: the next rule (an activation's product, a scatter) reads it strided.
        for i in range(len(pad) // 2):
            dim = v.dim() - 1 - i
            v = v.narrow(dim, pad[2 * i], v.shape[dim] - pad[2 * i] - pad[2 * i + 1])
        return v
    # F.pad pads the trailing dims, so negated pads crop (and zero-pad) any [*lead, N, ...] message.
    return F.pad(v, tuple(-p for p in pad))


@op.jac_t("x", view=True)
def pad_jac_t(v, pad):
    """HBP Sec. D.2 (transposed index selection): ``J^T v = Pi v`` crops the padding off."""
    return _crop(v, pad)


@op.diag("x", view=True)
def pad_diag(d, pad):
    """HBP Sec. D.2 with HesScale eq. 8: ``Pi`` is binary, so the diagonal is cropped alike."""
    return _crop(d, pad)
