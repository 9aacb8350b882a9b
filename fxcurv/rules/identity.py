"""Ops that are the identity at evaluation: ``nn.Identity`` and dropout in eval mode.

They are folded away during canonicalization (``alias=True``); dropout in training mode is
stochastic and rejected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedOpError
from .registry import Match, define_op


def identity(x):
    return x


op = define_op("identity", "identity", identity, inputs=("x",), alias=True)

_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


@op.module(nn.Identity, *_DROPOUTS)
def _from_module(node, mod):
    if isinstance(mod, _DROPOUTS) and mod.training and mod.p > 0:
        raise UnsupportedOpError(
            f"{type(mod).__name__} in training mode is stochastic; call model.eval() (dropout is "
            "then the identity) or remove it"
        )
    return Match({"x": node.args[0]})


@op.function(F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.ops.aten.dropout.default,
             torch.ops.aten.feature_dropout.default, torch.ops.aten.alpha_dropout.default,
             torch.ops.aten.feature_alpha_dropout.default)
def _from_function(node, a):
    if a(2, "training", True) and a(1, "p", 0.5) > 0:
        raise UnsupportedOpError("functional dropout with training=True is stochastic; pass training=False")
    return Match({"x": a(0, "input")})



@op.function(torch.ops.aten.clone.default, torch.ops.aten.contiguous.default, torch.ops.aten.alias.default)
def _from_aten_copy(node, a):
    """Exported copies (``x.clone()``, ``x.contiguous()``): the identity on values."""
    return Match({"x": a(0, "self")})
