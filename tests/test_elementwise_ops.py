"""The activations beyond the first eight (SELU, CELU, LogSigmoid, Mish, Softsign, Hardswish,
Hardtanh/ReLU6, Hardsigmoid) and arithmetic with Python numbers (``scalar_affine``, ``pow``), end to
end on tiny float64 nets: grad, diag_ggn and diag_hessian against torch.func (tests/reference.py),
HesScale/HesScaleGN against the brute-force reference of their defining equations
(tests/hesscale_reference.py), and BackPACK's DiagGGNExact / DiagHessian where BackPACK has the
module (SELU, LogSigmoid)."""

from __future__ import annotations

import copy
import warnings

import backpack_reference as bp
import hesscale_reference as hs_ref
import pytest
import reference
import torch
import torch.nn.functional as F
from helpers import assert_close, check_against_references
from torch import nn

import fxcurv
from fxcurv.errors import UnsupportedOpError

DTYPE = torch.float64

ACTIVATIONS = {
    "selu": nn.SELU,
    "celu": lambda: nn.CELU(0.7),
    "logsigmoid": nn.LogSigmoid,
    "mish": nn.Mish,
    "softsign": nn.Softsign,
    "hardswish": nn.Hardswish,
    "hardtanh": lambda: nn.Hardtanh(-0.5, 1.5),
    "relu6": nn.ReLU6,
    "hardsigmoid": nn.Hardsigmoid,
}
FUNCTIONAL = {
    "selu": F.selu, "torch_selu": torch.selu, "celu": lambda h: F.celu(h, 1.3), "logsigmoid": F.logsigmoid,
    "mish": F.mish, "softsign": F.softsign, "hardswish": F.hardswish,
    "hardtanh": lambda h: F.hardtanh(h, -2.0, 0.5), "relu6": F.relu6, "hardsigmoid": F.hardsigmoid,
}
LOSSES = {"ce": lambda: nn.CrossEntropyLoss(), "mse_sum": lambda: nn.MSELoss(reduction="sum")}


def _spread(model: nn.Sequential) -> nn.Sequential:
    """Scale the first layer so that pre-activations reach every piece of the hard activations
    (``|x| > 3``) and both branches of the exponential ones."""
    with torch.no_grad():
        model[0].weight.mul_(4.0)
    return model


def act_mlp(act, seed: int = 0) -> nn.Sequential:
    """``Linear, act, Linear, act, Linear`` with two instances of the activation (BackPACK keeps one
    output per module)."""
    torch.manual_seed(seed)
    return _spread(nn.Sequential(nn.Linear(3, 6), act(), nn.Linear(6, 4), act(), nn.Linear(4, 3)).to(DTYPE))


def data(loss: str, n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, dtype=DTYPE, generator=g)
    y = torch.randint(0, 3, (n,), generator=g) if loss == "ce" else torch.randn(n, 3, dtype=DTYPE, generator=g)
    return x, y


def _pre_activations(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model[0](x)


class Functional(nn.Module):
    """``Linear -> fn -> Linear``: the functional spelling of an activation, traced to its function."""

    def __init__(self, fn, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = _spread(nn.Sequential(nn.Linear(3, 6), nn.Identity(), nn.Linear(6, 3)).to(DTYPE))
        self.fn = fn

    def forward(self, x):
        return self.body[2](self.fn(self.body[0](x)))


class Relu6Hardsigmoid(nn.Module):
    """``relu6(x + 3) / 6``: Hardsigmoid's values with a torch.func Hessian (torch has no double
    backward for ``F.hardsigmoid``), for the references only."""

    def forward(self, x):
        return F.relu6(x + 3) / 6


def for_reference(model: nn.Module) -> nn.Module:
    """``model`` with every Hardsigmoid (module or function) swapped for :class:`Relu6Hardsigmoid`."""
    ref = copy.deepcopy(model)
    if isinstance(ref, Functional):
        if ref.fn is F.hardsigmoid:
            ref.fn = Relu6Hardsigmoid()
        return ref
    for name, mod in list(ref._modules.items()):
        if isinstance(mod, nn.Hardsigmoid):
            setattr(ref, name, Relu6Hardsigmoid())
    return ref


def check_exact(model, loss_fn, x, y):
    """grad, diag_ggn, diag_hessian against torch.func (the references run on :func:`for_reference`)."""
    out = fxcurv.compile(model, loss_fn, quantities=("diag_ggn", "diag_hessian"))(x, y)
    ref = for_reference(model)
    assert_close(out.grad, reference.grad(ref, loss_fn, x, y), what="grad")
    assert_close(out["diag_ggn"], reference.diag_ggn(ref, loss_fn, x, y), what="diag_ggn")
    assert_close(out["diag_hessian"], reference.diag_hessian(ref, loss_fn, x, y), what="diag_hessian")


# ---- activations ----------------------------------------------------------------------------------

# Every activation with cross-entropy; a few with summed squared error too (another loss Hessian).
EXACT = [(name, "ce") for name in sorted(ACTIVATIONS)] + [(name, "mse_sum") for name in ("selu", "mish", "hardswish")]


@pytest.mark.parametrize("name, loss", EXACT, ids=[f"{n}-{loss}" for n, loss in EXACT])
def test_activation_exact(name, loss):
    model = act_mlp(ACTIVATIONS[name])
    x, y = data(loss)
    if name.startswith("hard") or name == "relu6":  # every piece is visited
        pre = _pre_activations(model, x)
        assert (pre < -3).any() and (pre > 3).any() and (pre.abs() < 0.5).any()
    check_exact(model, LOSSES[loss](), x, y)


@pytest.mark.parametrize("name", sorted(FUNCTIONAL))
def test_functional_activation_exact(name):
    model = Functional(FUNCTIONAL[name])
    x, y = data("ce")
    check_exact(model, nn.CrossEntropyLoss(), x, y)


# Hardsigmoid is left out of HesScale's brute force: torch has no double backward for it, which the
# reference's phi'' needs (its rules are checked against a torch.func forward in test_generic).
HESSCALE = sorted(set(ACTIVATIONS) - {"hardsigmoid"})


@pytest.mark.parametrize("name", HESSCALE)
def test_activation_hesscale(name, monkeypatch):
    model = act_mlp(ACTIVATIONS[name])
    monkeypatch.setattr(hs_ref, "ELEMENTWISE", (*hs_ref.ELEMENTWISE, type(model[1])))
    x, y = data("ce")
    out = fxcurv.compile(model, nn.CrossEntropyLoss(), quantities=("hesscale", "hesscale_gn"))(x, y)
    assert_close(out["hesscale"], hs_ref.hesscale(model, nn.CrossEntropyLoss(), x, y), rtol=1e-6, what="hesscale")
    assert_close(out["hesscale_gn"], hs_ref.hesscale_gn(model, nn.CrossEntropyLoss(), x, y), rtol=1e-6,
                 what="hesscale_gn")


@pytest.mark.skipif(not bp.available(), reason=bp.SKIP_REASON)
@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("name", ["selu", "logsigmoid"])
def test_activation_backpack(name, loss):
    """BackPACK's DiagGGNExact and DiagHessian (it has both modules)."""
    from backpack.extensions import DiagGGNExact, DiagHessian

    model = act_mlp(ACTIVATIONS[name])
    x, y = data(loss)
    loss_fn = LOSSES[loss]()
    out = fxcurv.compile(model, loss_fn, quantities=("diag_ggn", "diag_hessian"))(x, y)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        ggn = bp.run_extension(model, loss_fn, x, y, DiagGGNExact())
        hess = bp.run_extension(model, loss_fn, x, y, DiagHessian())
    assert_close(out["diag_ggn"], ggn, rtol=1e-10, what="diag_ggn vs BackPACK")
    assert_close(out["diag_hessian"], hess, rtol=1e-10, what="diag_hessian vs BackPACK")


# ---- arithmetic with numbers --------------------------------------------------------------------

class Arithmetic(nn.Module):
    """Every spelling of ``a x + c`` and ``x ** p`` between layers, and a residual sum of two branches."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.l1, self.l2, self.l3 = nn.Linear(3, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = 0.5 * torch.tanh(self.l1(x)) + 1           # operator.mul(number, .), operator.add(., number)
        h = -(1 - h) / 3                                # rsub by operator.sub(number, .), truediv, neg
        h = h ** 2 + h.pow(3) * 0.25                    # pow; add of two branches
        h = torch.sub(self.l2(h), 0.5, alpha=2).mul(1.5)  # torch.sub with alpha, Tensor.mul
        h = torch.square(torch.sigmoid(h)).div(0.7) - 2.0  # torch.square, Tensor.div, operator.sub
        h = h / h.size(1) ** 0.5                        # a number computed from a shape (folded)
        return self.l3(h + h * 3)                       # a branch scaled and summed


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_arithmetic_exact(loss):
    model = Arithmetic().to(DTYPE)
    x, y = data(loss)
    engine = fxcurv.compile(model, LOSSES[loss](), quantities=("diag_ggn", "diag_hessian"))
    engine(x, y)
    check_against_references(model, LOSSES[loss](), x, y)
    listing = str(engine.graph)
    assert "scalar_affine" in listing and "pow" in listing


class Affine(nn.Module):
    def __init__(self, scale: float, shift: float):
        super().__init__()
        self.scale, self.shift = scale, shift

    def forward(self, x):
        return self.scale * x + self.shift


class Power(nn.Module):
    def __init__(self, p: int):
        super().__init__()
        self.p = p

    def forward(self, x):
        return x ** self.p


def test_arithmetic_hesscale(monkeypatch):
    """HesScale through ``a x + c`` (a layer linear in its input for the reference) and ``x ** p``
    (an elementwise activation for the reference)."""
    monkeypatch.setattr(hs_ref, "ELEMENTWISE", (*hs_ref.ELEMENTWISE, Power))
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 5), Affine(-0.5, 1.0), Power(3), nn.Linear(5, 4), nn.Tanh(),
                          Affine(2.0, 0.0), Power(2), nn.Linear(4, 3)).to(DTYPE)
    x, y = data("ce")
    out = fxcurv.compile(model, nn.CrossEntropyLoss(), quantities=("hesscale", "hesscale_gn"))(x, y)
    assert_close(out["hesscale"], hs_ref.hesscale(model, nn.CrossEntropyLoss(), x, y), rtol=1e-6, what="hesscale")
    assert_close(out["hesscale_gn"], hs_ref.hesscale_gn(model, nn.CrossEntropyLoss(), x, y), rtol=1e-6,
                 what="hesscale_gn")


def test_product_of_two_activations_has_no_hand_rule():
    """``x * y`` of two traced tensors is not ``scalar_affine``: until the generic rule takes it,
    the compiler refuses it by name instead of using a wrong rule."""

    class Product(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            h = self.lin(x)
            return torch.tanh(h) * torch.sigmoid(h)

    model = Product().to(DTYPE)
    x, y = data("ce")
    try:
        fxcurv.compile(model, nn.CrossEntropyLoss(), quantities=("diag_hessian",))(x, y)
    except UnsupportedOpError as err:
        assert "mul" in str(err) and "do not cover these arguments" in str(err)
        return
    # Once the generic rule takes the product, it must be exact here.
    check_against_references(model, nn.CrossEntropyLoss(), x, y)


@pytest.mark.parametrize("name", ["hardswish", "hardsigmoid", "hardtanh", "relu6", "selu", "celu", "softsign"])
def test_derivative_at_the_kinks_is_torchs(name):
    """At the points where a piecewise activation's pieces meet (``+-3``, the clip values, ``0``),
    ``phi'`` is the value torch's backward gives there (the one-sided choice is a convention; fxcurv's
    gradient follows torch's). torch's Hardsigmoid and CELU backwards scale by 1/6 and 1/alpha rounded
    to float32 (fxcurv's derivatives are exact): a 1e-8 difference there."""
    from fxcurv.rules import registry

    act = ACTIVATIONS.get(name, lambda: nn.CELU(0.5) if name == "celu" else nn.Softsign())()
    x = torch.tensor([-3.0, 3.0, -1.0, 1.0, 0.0, 6.0, -0.5, 1.5, -6.0], dtype=DTYPE, requires_grad=True)
    (want,) = torch.autograd.grad(act(x).sum(), x)
    c = registry.MODULE_SOURCES[type(act)]
    match = c[1](type("Node", (), {"args": (None,)})(), act)
    op = registry.matched_op(c[0], match)
    d1 = registry.DERIVED[(op.name, "d1")]
    avail = {"x": x.detach(), "out": op.forward(x.detach(), **match.attrs), **match.attrs}
    got = d1.fn(**{k: avail[k] for k in d1.context_names(0)})
    assert (got - want).abs().max() < (1e-7 if name in ("hardsigmoid", "celu") else 1e-15), (got, want)


@pytest.mark.parametrize("method", ["add_", "mul_"])
def test_in_place_method_never_gives_wrong_numbers(method):
    """``h.add_(g)`` without rebinding ``h`` changes what later users of ``h`` read in eager PyTorch;
    a graph that reads ``h`` as it was computes another loss. The compiler refuses it (or, with a
    rule that handles the mutation, matches the references)."""

    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.out = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            h = self.lin(x)
            getattr(h, method)(torch.sigmoid(self.lin(x)) if method == "add_" else 2.0)
            return self.out(h)

    model = InPlace().to(DTYPE)
    x, y = torch.randn(4, 3, dtype=DTYPE), torch.tensor([0, 1, 1, 0])
    try:
        out = fxcurv.compile(model, nn.CrossEntropyLoss(), quantities=("diag_ggn",))(x, y)
    except UnsupportedOpError as err:
        assert f"Tensor.{method}" in str(err)
        return
    assert abs(out.loss.item() - nn.CrossEntropyLoss()(model(x), y).item()) < 1e-12
    check_against_references(model, nn.CrossEntropyLoss(), x, y, quantities=("diag_ggn",))


class InPlaceActivation(nn.Module):
    """``F.relu(., inplace=True)`` (or ``nn.ReLU(inplace=True)``) on ``h`` or a view of ``h``, with
    ``h`` read again afterwards (``reread``) or not."""

    def __init__(self, through_view: bool, reread: bool, module: bool):
        super().__init__()
        self.lin, self.out, self.out2 = nn.Linear(3, 3), nn.Linear(3, 2), nn.Linear(3, 2)
        self.act = nn.ReLU(inplace=True) if module else None
        self.through_view, self.reread = through_view, reread

    def forward(self, x):
        h = self.lin(x)
        v = h.view(h.shape[0], 3) if self.through_view else h
        r = self.act(v) if self.act is not None else F.relu(v, inplace=True)
        return self.out(r) + self.out2(h) if self.reread else self.out(r)


@pytest.mark.parametrize("module", [False, True], ids=["functional", "module"])
@pytest.mark.parametrize("through_view", [False, True], ids=["direct", "view"])
def test_in_place_activation_read_again_is_refused(through_view, module):
    """In PyTorch the later reader of ``h`` sees the activation's output; the out-of-place canonical
    op would give it ``h``: a different loss, refused by name."""
    model = InPlaceActivation(through_view, reread=True, module=module).to(DTYPE)
    x, y = torch.randn(4, 3, dtype=DTYPE), torch.tensor([0, 1, 1, 0])
    with pytest.raises(UnsupportedOpError, match="inplace=True"):
        fxcurv.compile(model, nn.CrossEntropyLoss(), quantities=("diag_ggn",))(x, y)


@pytest.mark.parametrize("module", [False, True], ids=["functional", "module"])
@pytest.mark.parametrize("through_view", [False, True], ids=["direct", "view"])
def test_in_place_activation_read_once_is_exact(through_view, module):
    model = InPlaceActivation(through_view, reread=False, module=module).to(DTYPE)
    x, y = torch.randn(4, 3, dtype=DTYPE), torch.tensor([0, 1, 1, 0])
    out = check_against_references(model, nn.CrossEntropyLoss(), x, y, quantities=("diag_ggn",))
    assert abs(out.loss.item() - nn.CrossEntropyLoss()(model(x), y).item()) < 1e-12
