"""``fxcurv.compile(..., grad=False)``: curvature without the gradient.

The program then has no weight-gradient products, and where no requested quantity reads the gradient
message ``g`` it does not backpropagate ``g`` either (the bundle is ``[S_loss; S_mc]``). Every quantity
must give the same numbers as with the gradient (a quantity that reads ``g`` without declaring it is a
build error, which the sweep below would show)."""

from __future__ import annotations

import copy

import pytest
import torch
from architectures import ConvResidual, ConvTwice, Residual, SharedTwice
from torch import nn

import fxcurv
from fxcurv.errors import NotCombinableError
from fxcurv.node_info import Kind, info
from fxcurv.quantities import QUANTITIES, GGNEigen

pytestmark = pytest.mark.usefixtures("one_thread")

CURVATURE = tuple(name for name in QUANTITIES if name != "grad")


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), Residual(5, "sigmoid"), SharedTwice(5, "tanh"), nn.Linear(5, 3))


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), ConvResidual(3, "sigmoid"), ConvTwice(3, "tanh"),
                         nn.Flatten(), nn.Linear(3 * 5 * 4, 3))


def _residual_cnn() -> nn.Module:  # no tied weight: the Kronecker factors are defined
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), ConvResidual(3, "sigmoid"), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(3 * 2 * 2, 3))


NETS = {"mlp": (_mlp, (4,)), "cnn": (_cnn, (2, 5, 4)), "residual_cnn": (_residual_cnn, (2, 5, 4))}


def _values(value):
    """Comparable tensors of one quantity's result (tensors, Kronecker/matrix-free blocks, eigen objects)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _values(v)]
    if hasattr(value, "gram"):  # a ggn_eigen result: its Gram matrix and spectrum
        return [value.gram, value.values]
    return [value.to_dense()]


def _batch(net: str, n: int = 3):
    build, shape = NETS[net]
    torch.manual_seed(0)
    model = build().double()
    return model, torch.randn((n, *shape), dtype=torch.float64), torch.randint(0, 3, (n,))


@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_every_quantity_is_the_same_without_the_gradient(net):
    model, x, y = _batch(net)
    loss_fn = nn.CrossEntropyLoss()
    refused = []
    for name in CURVATURE:
        try:
            with_grad = fxcurv.compile(model, loss_fn, quantities=(name,), seed=3)(x, y)
        except fxcurv.errors.UnsupportedOpError:
            refused.append(name)  # e.g. batch-averaged matrices through a fan-out: refused with grad too
            continue
        engine = fxcurv.compile(model, loss_fn, quantities=(name,), seed=3, grad=False)
        out = engine(x, y)
        assert list(out) == [name]
        torch.testing.assert_close(out.loss, with_grad.loss, rtol=0, atol=0)
        for a, b in zip(_values(out[name]), _values(with_grad[name]), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=f"{name} on {net}")
    assert len(refused) < len(CURVATURE) // 2, refused


def _grad_nodes(engine) -> list[str]:
    return [n.name for n in engine.graph.nodes if info(n).kind is Kind.GRAD or info(n).message == "grad"]


@pytest.mark.parametrize("quantity", ["diag_ggn", "diag_ggn_mc", "hesscale_gn", "kflr", "kfac", "sqrt_ggn", "block_ggn",
                                      GGNEigen(vectors=False), GGNEigen(vectors=False, mc=True)])
def test_a_ggn_program_without_the_gradient_carries_no_gradient(quantity):
    model, x, y = _batch("residual_cnn")
    engine = fxcurv.compile(model, nn.CrossEntropyLoss(), quantities=(quantity,), grad=False)
    engine(x, y)
    assert _grad_nodes(engine) == []
    with_grad = fxcurv.compile(model, nn.CrossEntropyLoss(), quantities=(quantity,))
    with_grad(x, y)
    assert _grad_nodes(with_grad)  # the check above can see gradient nodes


@pytest.mark.parametrize("quantity", ["hesscale", "diag_hessian", "batch_grad", "ggn_eigen"])
def test_quantities_reading_g_still_carry_it_but_compute_no_gradient(quantity):
    model, x, y = _batch("mlp")
    engine = fxcurv.compile(model, nn.CrossEntropyLoss(), quantities=(quantity,), grad=False)
    engine(x, y)
    assert not any(info(n).message == "grad" and info(n).kind is Kind.PARAM for n in engine.graph.nodes)
    assert any(info(n).kind is Kind.GRAD for n in engine.graph.nodes)


def test_newton_step_without_the_gradient_in_the_result():
    """ggn_eigen keeps g per use (vectors=True), so its directional derivatives and Newton steps need no
    gradient result."""
    model, x, y = _batch("mlp", n=4)
    a = fxcurv.compile(model, nn.CrossEntropyLoss(), quantities=("ggn_eigen",))(x, y)["ggn_eigen"]
    b = fxcurv.compile(model, nn.CrossEntropyLoss(), quantities=("ggn_eigen",), grad=False)(x, y)["ggn_eigen"]
    for name, step in b.newton_step(0.1).items():
        torch.testing.assert_close(step, a.newton_step(0.1)[name], rtol=1e-10, atol=1e-14)


def test_the_result_says_it_has_no_gradient():
    model, x, y = _batch("mlp")
    engine = fxcurv.compile(model, nn.CrossEntropyLoss(), quantities=("diag_ggn",), grad=False)
    out = engine(x, y)
    with pytest.raises(KeyError, match="grad=False"):
        _ = out.grad
    with pytest.raises(KeyError, match="grad=False"):
        out.write_grad(model)
    assert copy.deepcopy(engine).grad is False  # the option survives copying (pickling)


def test_contradictory_or_empty_requests_are_refused():
    model, _, _ = _batch("mlp")
    with pytest.raises(ValueError, match="grad=False"):
        fxcurv.compile(model, nn.CrossEntropyLoss(), quantities=("grad", "diag_ggn"), grad=False)
    with pytest.raises(ValueError, match="nothing to compute"):
        fxcurv.compile(model, nn.CrossEntropyLoss(), quantities=(), grad=False)
    with pytest.raises(TypeError, match="grad must be"):
        fxcurv.compile(model, nn.CrossEntropyLoss(), quantities=("diag_ggn",), grad=None)


def test_accumulating_the_variance_needs_the_gradient():
    model, x, y = _batch("mlp")
    engine = fxcurv.compile(model, nn.CrossEntropyLoss(), quantities=("variance", "diag_ggn"), grad=False)
    with pytest.raises(NotCombinableError, match="grad=True"):
        engine.accumulate([(x, y)])
    summed = fxcurv.compile(model, nn.CrossEntropyLoss(), quantities=("diag_ggn",), grad=False).accumulate(
        [(x[:2], y[:2]), (x[2:], y[2:])])
    whole = fxcurv.compile(model, nn.CrossEntropyLoss(), quantities=("diag_ggn",))(x, y)
    for name, value in whole["diag_ggn"].items():
        torch.testing.assert_close(summed["diag_ggn"][name], value, rtol=1e-12, atol=1e-14)
