"""Reshapes that keep the batch axis (``nn.Flatten``, ``torch.flatten``, ``view``, ``reshape``).

HBP Sec. D.1: a reshape is the identity on vectorized tensors, ``H_X = H_Z``; every message is
reshaped back. The canonical op stores the per-sample input and output shapes, resolved from the
traced shapes, so that ``view(x.size(0), -1)`` and ``flatten(1)`` become the same node.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedOpError
from .registry import Match, define_op, example


def reshape(x, shape, in_shape):
    return x.reshape((x.shape[0],) + tuple(shape))


op = define_op("reshape", "reshape", reshape, inputs=("x",))


def _canonical(node, x):
    out_val, in_val = example(node), example(x)
    if out_val is None or in_val is None:
        raise UnsupportedOpError("reshape of a value whose shape is unknown")
    if out_val.dim() == 0 or out_val.shape[0] != in_val.shape[0]:
        raise UnsupportedOpError(
            f"reshape from {tuple(in_val.shape)} to {tuple(out_val.shape)} does not keep the batch "
            "axis (dim 0); fxcurv treats dim 0 as the batch and samples as independent. Supported: "
            "reshapes of the per-sample dimensions, e.g. x.flatten(1) or x.view(x.size(0), -1)"
        )
    return Match({"x": x}, {"shape": tuple(out_val.shape[1:]), "in_shape": tuple(in_val.shape[1:])})


@op.module(nn.Flatten, nn.Unflatten)
def _from_module(node, mod):
    return _canonical(node, node.args[0])


@op.function(torch.flatten, torch.reshape)
def _from_function(node, a):
    return _canonical(node, a(0, "input"))


@op.method("view", "reshape", "flatten", "unflatten")
def _from_method(node, a):
    return _canonical(node, a(0, "self"))


_aten = torch.ops.aten


@op.function(_aten.view.default, _aten.reshape.default, _aten._unsafe_view.default, _aten.flatten.using_ints,
             _aten.unflatten.int)
def _from_aten(node, a):
    """Exported reshapes: the batch kept at dim 0 (where it is not, the node is inside a region,
    :mod:`fxcurv.capture_aten`)."""
    return _canonical(node, a(0, "self"))


def _reshape_back(v, shape, in_shape):
    lead = v.dim() - 1 - len(shape)
    return v.reshape(v.shape[: lead + 1] + tuple(in_shape))


@op.jac_t("x", view=True)
def reshape_jac_t(v, shape, in_shape):
    """HBP Sec. D.1: reshape every column back to the input's per-sample shape."""
    return _reshape_back(v, shape, in_shape)


@op.diag("x", view=True)
def reshape_diag(d, shape, in_shape):
    return _reshape_back(d, shape, in_shape)


@op.dense("x")
def reshape_dense(m):
    """HBP Sec. D.1: a reshape is the identity on vectorized tensors, so is its batch-averaged matrix."""
    return m
