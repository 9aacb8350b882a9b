"""User-written attention end to end (float64): the hand-written ``softmax`` / ``log_softmax`` and ``matmul``
(the product of two activations) ops of :mod:`fxcurv.rules.softmax` and :mod:`fxcurv.rules.bilinear`.

``grad``, ``diag_ggn`` and ``diag_hessian`` are compared with torch.func on the flattened parameters
(``tests/reference.py``); ``hesscale`` with the same program built from the generic rule (the sources of
the three ops removed, so that torch.func derives every rule of those nodes) and, on the last layer, with
the exact Hessian diagonal (HesScale's claim). The paths of ``q`` and ``k`` (and ``v``) start at the same
input and meet again upstream, so the joint residual factors of the products and the softmax must be
summed across them (cross terms) for ``diag_hessian`` to be exact.
"""

from __future__ import annotations

import math

import pytest
import reference as ref
import torch
import torch.nn.functional as F
from helpers import assert_close
from torch import nn

import fxcurv
from fxcurv.rules import registry

DT = torch.float64
RTOL = 1e-8
HAND_OPS = ("softmax", "log_softmax", "matmul", "permute")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: tests/conftest.py


class SelfAttention(nn.Module):
    """Tokens ``[N, T, d]`` -> q, k, v linear layers of the same input, ``H`` heads, ``softmax(q k^T / sqrt(d_h)) v``,
    an output projection, a residual connection, the mean over tokens, a classifier head."""

    def __init__(self, d: int = 4, heads: int = 2, classes: int = 3):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))
        self.head = nn.Linear(d, classes)

    def split(self, h: torch.Tensor) -> torch.Tensor:
        n, t, d = h.shape
        return h.view(n, t, self.heads, d // self.heads).transpose(1, 2)  # [N, H, T, d_h]

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)
        attn = torch.softmax(scores, dim=-1)
        mixed = (attn @ v).transpose(1, 2).reshape(n, t, d)
        h = x + self.out(mixed)
        return self.head(h.mean(1))


class Gram(nn.Module):
    """``h @ h.transpose(1, 2)``: both operands of the product are one activation (its own cross term),
    then ``F.softmax`` over the middle axis, ``bmm`` with ``h`` and ``log_softmax`` inside the model."""

    def __init__(self, d: int = 3, classes: int = 3):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = torch.tanh(self.lin(x))  # [N, T, d]
        a = F.softmax(h @ h.transpose(1, 2), dim=1)  # [N, T, T]
        z = torch.bmm(a, h).log_softmax(-1)  # [N, T, d]
        return self.head(z.mean(1))


class Square(nn.Module):
    """``a @ a``: one value is both operands of the product."""

    def __init__(self, d: int = 3, classes: int = 3):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        a = torch.tanh(self.lin(x))  # [N, d, d]
        return self.head((a @ a).mean(1))


MODELS = {
    "self_attention": (SelfAttention, (3, 4, 4)),
    "gram": (Gram, (3, 4, 3)),
}


def _build(name: str):
    torch.manual_seed(sum(map(ord, name)))
    make, shape = MODELS[name]
    model = make().to(DT)
    x = torch.randn(*shape, dtype=DT)
    return model, x, torch.randint(0, 3, (shape[0],)), nn.CrossEntropyLoss()


def _without_hand_ops(monkeypatch) -> None:
    """Remove the sources of the hand ops: their calls become generic nodes again."""
    for table in (registry.FUNCTION_SOURCES, registry.METHOD_SOURCES, registry.MODULE_SOURCES):
        for key, (op, _) in list(table.items()):
            if op.name in HAND_OPS:
                monkeypatch.delitem(table, key)


def _assert_close(got: dict, want: dict, what: str, rtol: float = RTOL) -> None:
    """Every parameter's values to ``RTOL`` of the largest entry of the quantity over all parameters: the key
    bias's gradient and curvature vanish (a softmax row is invariant to a shift of its scores,
    ``q . (k + b) = q . k + q . b``), so its reference holds rounding errors only."""
    assert set(got) == set(want), what
    scale = max(float(v.abs().max()) for v in want.values())
    assert scale > 0, what
    for name, value in want.items():
        err = float((got[name] - value).abs().max()) / scale
        assert err < rtol, f"{what}[{name}]: error {err:.2e} (relative to the largest entry)"


@pytest.mark.parametrize("name", list(MODELS))
def test_attention_exact(name):
    model, x, y, loss = _build(name)
    engine = fxcurv.compile(model, loss, quantities=("diag_ggn", "diag_hessian"))
    out = engine(x, y)
    listing = engine.listing()
    assert "= matmul(" in listing and "softmax(" in listing and "= permute(" in listing, "the hand ops were not used"
    _assert_close(out.grad, ref.grad(model, loss, x, y), "grad")
    _assert_close(out["diag_ggn"], ref.diag_ggn(model, loss, x, y), "diag_ggn")
    _assert_close(out["diag_hessian"], ref.diag_hessian(model, loss, x, y), "diag_hessian")


@pytest.mark.parametrize("name", list(MODELS))
def test_attention_hesscale_equals_generic_rule(name, monkeypatch):
    """HesScale through the hand ops equals HesScale through the generic rule of the same calls (both
    pass exact per-op diagonals and residual diagonals), and is exact on the last layer."""
    model, x, y, loss = _build(name)
    hand = fxcurv.compile(model, loss, quantities=("hesscale",))(x, y)["hesscale"]
    exact = ref.diag_hessian(model, loss, x, y)
    assert_close({k: hand[k] for k in ("head.weight", "head.bias")},
                 {k: exact[k] for k in ("head.weight", "head.bias")}, RTOL, "hesscale (last layer)")
    _without_hand_ops(monkeypatch)
    engine = fxcurv.compile(model, loss, quantities=("hesscale",))
    generic = engine(x, y)["hesscale"]
    assert "= matmul(" not in engine.listing() and "softmax(" not in engine.listing()
    _assert_close(hand, generic, "hesscale (hand vs generic)")


class ParameterProduct(nn.Module):
    """``x @ W`` with ``W`` a parameter, and a product with a buffer: linear in the data, generic nodes."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 3))
        self.register_buffer("mix", torch.randn(4, 4))
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        h = torch.tanh(x @ self.w)  # [N, T, 3]
        h = torch.matmul(self.mix, h)  # [4, 4] @ [N, 4, 3]: the buffer broadcast over the batch
        return self.head(h.mean(1))


def test_product_with_parameter_or_constant_stays_generic():
    torch.manual_seed(0)
    model = ParameterProduct().to(DT)
    x, y, loss = torch.randn(3, 4, 3, dtype=DT), torch.randint(0, 2, (3,)), nn.CrossEntropyLoss()
    engine = fxcurv.compile(model, loss, quantities=("diag_hessian",))
    out = engine(x, y)
    assert "= matmul(" not in engine.listing()
    assert_close(out["diag_hessian"], ref.diag_hessian(model, loss, x, y), RTOL, "diag_hessian")


def test_attention_fused_and_eager_agree():
    """The permutations' messages are views of the messages they permute (``view=True``): the fused program,
    which overwrites dead buffers, gives the eager program's numbers."""
    model, x, y, loss = _build("self_attention")
    quantities = ("hesscale", "diag_ggn", "diag_hessian")
    fused = fxcurv.compile(model, loss, quantities=quantities, backend="fused")(x, y)
    eager = fxcurv.compile(model, loss, quantities=quantities, backend="eager")(x, y)
    for quantity in ("grad",) + quantities:
        _assert_close(fused[quantity], eager[quantity], quantity, rtol=1e-12)


def test_square_of_one_value_stays_generic():
    """``a @ a`` stays one generic call of one input (its HesScale diagonal keeps the cross terms between the
    two uses, as on main), exact for the Hessian diagonal."""
    torch.manual_seed(0)
    model, loss = Square().to(DT), nn.CrossEntropyLoss()
    x, y = torch.randn(4, 3, 3, dtype=DT), torch.randint(0, 3, (4,))
    engine = fxcurv.compile(model, loss, quantities=("diag_hessian",))
    out = engine(x, y)
    assert "= matmul(" not in engine.listing()
    _assert_close(out["diag_hessian"], ref.diag_hessian(model, loss, x, y), "diag_hessian")
