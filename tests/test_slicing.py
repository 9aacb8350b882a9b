"""Slicing, indexing, split/chunk/unbind and concatenation as hand ops (``index``, ``cat``; ``unsqueeze`` /
``squeeze`` as ``reshape``) on tiny models, float64, exact against torch.func (``tests/reference.py``): an
attention block whose ``q, k, v`` are the three chunks of one linear layer (one tensor sliced three times:
the messages of the three picks are summed upstream) and whose class token ``h[:, 0]`` goes to the head,
two branches concatenated and stacked, strided slices, ``split`` / ``narrow`` / ``unsqueeze``. HesScale
through the hand ops equals HesScale with the same calls left to the generic rule.
"""

from __future__ import annotations

import math
import random

import pytest
import reference as ref
import torch
from torch import nn

import fxcurv
from fxcurv.rules import registry

DT = torch.float64
RTOL = 1e-9
HAND_OPS = ("index", "cat", "index_select")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: tests/conftest.py


class ChunkedAttention(nn.Module):
    """``q, k, v = linear(x).chunk(3, -1)``, one attention head, the first token (``h[:, 0]``) to the head."""

    def __init__(self, d: int = 4, classes: int = 3):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):  # [N, T, d]
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        return self.head((scores @ v)[:, 0])


class Branches(nn.Module):
    """Two branches concatenated (``torch.cat``) and stacked then unbound, strided and negative slices."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(4, 6)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # [N, 4]
        a, b = torch.tanh(self.a(x)), torch.sigmoid(self.b(x))
        joined = torch.cat([a, b], dim=1)  # [N, 12]
        u, w = torch.stack([a, b], dim=1).unbind(1)  # [N, 6] each
        mixed = torch.tanh(u + w)
        return self.head(torch.cat([joined[:, ::3], mixed[..., -4:]], -1))  # [N, 4 + 4]


class SplitNarrow(nn.Module):
    """``torch.split`` by sizes, ``narrow``, ``select``, ``x[:, None]`` and ``unsqueeze`` / ``squeeze``."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 7)
        self.head = nn.Linear(6, 2)

    def forward(self, x):  # [N, 2, 3]
        p1, p2, p3 = torch.split(self.inp(x), [2, 3, 2], dim=2)  # [N, 2, 2], [N, 2, 3], [N, 2, 2]
        h = torch.cat([torch.tanh(p1), p2.narrow(2, 1, 2), torch.sigmoid(p3)], dim=-1)  # [N, 2, 6]
        h = torch.cat([h[:, None, 0], h.select(1, 1).unsqueeze(1)], dim=1).squeeze(1)  # [N, 2, 6]
        return self.head(torch.tanh(h)[:, 1] + h[:, 0])


class PickedTokens(nn.Module):
    """``h[:, idx]`` and ``index_select`` with constant index vectors (buffers) that repeat and reorder."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.head = nn.Linear(9, 3)
        self.register_buffer("tokens", torch.tensor([2, 0, 2]))
        self.register_buffer("features", torch.tensor([3, 1, 1]))

    def forward(self, x):  # [N, 3, 3]
        h = torch.tanh(self.inp(x))[:, self.tokens]  # [N, 3, 4]
        return self.head(torch.sigmoid(h.index_select(2, self.features)).flatten(1))


MODELS = {
    "chunked_attention": (ChunkedAttention, (3, 4, 4)),
    "branches": (Branches, (3, 4)),
    "split_narrow": (SplitNarrow, (3, 2, 3)),
    "picked_tokens": (PickedTokens, (3, 3, 3)),
}
# The hand ops each model's program must show.
USES = {"chunked_attention": ("index",), "branches": ("index", "cat"), "split_narrow": ("index", "cat", "reshape"),
        "picked_tokens": ("index_select",)}


def _uses_hand_ops(name: str, listing: str) -> None:
    for op in USES[name]:
        assert f"= {op}(" in listing, f"{name}: no {op} node"
    assert "generic(" not in listing, f"{name}: a slicing call was left to the generic rule"


def _build(name: str):
    torch.manual_seed(sum(map(ord, name)))
    make, shape = MODELS[name]
    model = make().to(DT)
    x = torch.randn(*shape, dtype=DT)
    return model, x, torch.randint(0, 3 if name != "split_narrow" else 2, (shape[0],)), nn.CrossEntropyLoss()


def _without_hand_ops(monkeypatch) -> None:
    """Remove the sources of the slicing ops: their calls become generic nodes again."""
    for table in (registry.FUNCTION_SOURCES, registry.METHOD_SOURCES, registry.OUTPUT_FUNCTION_SOURCES,
                  registry.OUTPUT_METHOD_SOURCES):
        for key, (op, _) in list(table.items()):
            if op.name in HAND_OPS:
                monkeypatch.delitem(table, key)


def _assert_close(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), what
    for name, value in want.items():
        scale = float(value.abs().max())
        assert scale > 0, f"{what}[{name}]: the reference vanishes"
        err = float((got[name] - value).abs().max()) / scale
        assert err < RTOL, f"{what}[{name}]: relative error {err:.2e}"


@pytest.mark.parametrize("name", list(MODELS))
def test_slicing_exact(name):
    model, x, y, loss = _build(name)
    engine = fxcurv.compile(model, loss, quantities=("diag_ggn", "diag_hessian"))
    out = engine(x, y)
    listing = engine.listing()
    _uses_hand_ops(name, listing)
    _assert_close(out.grad, ref.grad(model, loss, x, y), "grad")
    _assert_close(out["diag_ggn"], ref.diag_ggn(model, loss, x, y), "diag_ggn")
    _assert_close(out["diag_hessian"], ref.diag_hessian(model, loss, x, y), "diag_hessian")


@pytest.mark.parametrize("name", list(MODELS))
def test_slicing_hesscale_equals_generic_rule(name, monkeypatch):
    """HesScale through ``index`` / ``cat`` equals HesScale with those calls as generic nodes (both pass the
    exact diagonal ``S^T d`` of an index map), and is exact on the last layer (HesScale's claim)."""
    model, x, y, loss = _build(name)
    hand = fxcurv.compile(model, loss, quantities=("hesscale",))(x, y)["hesscale"]
    exact = ref.diag_hessian(model, loss, x, y)
    _assert_close({k: hand[k] for k in ("head.weight", "head.bias")},
                  {k: exact[k] for k in ("head.weight", "head.bias")}, "hesscale (last layer)")
    _without_hand_ops(monkeypatch)
    engine = fxcurv.compile(model, loss, quantities=("hesscale",))
    generic = engine(x, y)["hesscale"]
    assert "= index(" not in engine.listing() and "= cat(" not in engine.listing()
    _assert_close(hand, generic, "hesscale (hand vs generic)")


@pytest.mark.parametrize("name", ["chunked_attention", "branches", "picked_tokens"])
def test_slicing_under_aten_capture(name):
    """``capture="aten"``: ``aten.split``/``chunk`` + getitem, ``aten.select``, ``aten.slice``, ``aten.cat``,
    ``aten.stack`` / ``aten.unbind`` are the same hand ops, exact."""
    model, x, y, loss = _build(name)
    engine = fxcurv.compile(model, loss, quantities=("diag_ggn",), capture="aten")
    out = engine(x, y)
    listing = engine.listing()
    _uses_hand_ops(name, listing)
    _assert_close(out.grad, ref.grad(model, loss, x, y), "grad")
    _assert_close(out["diag_ggn"], ref.diag_ggn(model, loss, x, y), "diag_ggn")


def _tensors(value, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a result's ``to_dict()``, by path."""
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (tuple, list)):
        items = enumerate(value)
    else:
        return {}
    found: dict[str, torch.Tensor] = {}
    for key, item in items:
        found.update(_tensors(item, f"{prefix}/{key}"))
    return found


@pytest.mark.parametrize("name", ["chunked_attention", "split_narrow"])
def test_slicing_factor_quantities_equal_generic_rule(name, monkeypatch):
    """Messages with leading axes (factor columns ``[K, N, ...]``, per-sample gradients) and the Kronecker
    factors pass the hand ops as they pass the generic rule."""
    model, x, y, loss = _build(name)
    quantities = ("batch_grad", "sqrt_ggn", "kflr")
    hand = _tensors(fxcurv.compile(model, loss, quantities=quantities)(x, y).to_dict())
    _without_hand_ops(monkeypatch)
    generic = _tensors(fxcurv.compile(model, loss, quantities=quantities)(x, y).to_dict())
    assert set(hand) == set(generic) and len(hand) > 4
    for path, value in generic.items():
        scale = float(value.abs().max())
        err = float((hand[path] - value).abs().max()) / max(scale, 1e-300)
        assert err < RTOL or scale == 0 == float(hand[path].abs().max()), f"{name}: {path} error {err:.2e}"


class _Value:
    """Stands for a traced value: its example (``meta["val"]``), computed from the input."""

    def __init__(self, val: torch.Tensor):
        self.meta = {"val": val}


def _random_key(gen: random.Random, ndim: int) -> tuple:
    """A basic index of ``[N, *s]`` that takes the batch whole: slices (steps, negative and out-of-range
    bounds), integers (negative too), ``None``, at most one ``Ellipsis``."""
    entries: list = []
    for _ in range(ndim - 1):
        kind = gen.choice(("slice", "slice", "int", "none", "skip"))
        if kind == "slice":
            entries.append(slice(gen.choice((None, -7, -2, 0, 1, 3)), gen.choice((None, -1, 2, 4, 9)),
                                 gen.choice((None, 1, 2, 3))))
        elif kind == "int":
            entries.append(gen.choice((0, 1, -1, 2)))
        elif kind == "none":
            entries.append(None)
    if gen.random() < 0.5:
        entries.insert(gen.randrange(len(entries) + 1), Ellipsis)
    return (slice(None), *entries)


def test_random_basic_indices_equal_torch():
    """Random basic indices: the canonical ``index`` op computes ``x[key]``, and its ``jac_t`` / ``diag`` equal
    ``torch.func.vjp`` of ``x -> x[key]`` (the diagonal: of the squared Jacobian, ``S`` binary), with two leading
    message axes."""
    from torch.func import vjp

    from fxcurv.rules import slicing

    gen = random.Random(0)
    x = torch.randn(2, 3, 4, 5, dtype=DT)
    checked = 0
    for _ in range(300):
        key = _random_key(gen, x.dim())
        try:
            want = x[key]
        except IndexError:
            continue  # an integer out of range: torch refuses it
        match = slicing._entries(_Value(x), key)
        assert match is not None, key
        got = slicing.index(x, **match.attrs)
        assert torch.equal(got, want), key
        v = torch.randn((2,) + tuple(want.shape), dtype=DT)
        _, pull = vjp(lambda t, k=key: t[k], x)
        expected = torch.stack([pull(v_k)[0] for v_k in v])
        assert torch.equal(slicing.index_jac_t(v, **match.attrs), expected), key
        assert torch.equal(slicing.index_diag(v.abs(), **match.attrs), torch.stack(
            [pull(v_k)[0] for v_k in v.abs()])), key
        checked += 1
    assert checked > 200
