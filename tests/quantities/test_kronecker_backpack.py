"""kflr, kfra and the hbp_* blocks equal BackPACK's KFLR, KFRA and HBP (curvature type hessian /
pch-abs / pch-clip, loss-Hessian strategy "sum", batch-average backpropagation, the Botev-Martens
expectation approximation) on MLPs and CNNs with mean and sum losses (float64, relative error < 1e-10),
and the formulas of tests/backpack_reference.py where BackPACK has no rule (other activations, residual
networks). KFAC's factors come from fxcurv's own draws: its input factor is KFLR's, and its output
factor is checked in expectation in test_kronecker.py."""

from __future__ import annotations

import backpack_reference as bp
import pytest
import torch
from helpers import rel_error
from torch import nn

import fxcurv

DT = torch.float64
# fxcurv's name -> (BackPACK's extension, its curvature type)
QUANTITIES = {"kflr": ("kflr", "hessian"), "kfra": ("kfra", "hessian"), "hbp_hessian": ("hbp", "hessian"),
              "hbp_pch_abs": ("hbp", "pch-abs"), "hbp_pch_clip": ("hbp", "pch-clip")}


def mlp(act: type = nn.Sigmoid) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), act(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)


def cnn(act: type = nn.ReLU) -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), act(), nn.Conv2d(3, 2, 2, stride=2), nn.Flatten(),
                         nn.Linear(8, 3)).to(DT)


def data(kind: str, loss: str, n: int = 4):
    g = torch.Generator().manual_seed(7)
    x = torch.randn((n, 5) if kind == "mlp" else (n, 2, 4, 4), dtype=DT, generator=g)
    if loss.startswith("ce"):
        return nn.CrossEntropyLoss(reduction=loss[3:]), x, torch.randint(0, 3, (n,), generator=g)
    return nn.MSELoss(reduction=loss[4:]), x, torch.randn(n, 3, dtype=DT, generator=g)


def assert_factors(got: dict, want: dict, what: str) -> None:
    assert list(got) == list(want), what
    for name, factors in want.items():
        mine = got[name].factors
        assert len(mine) == len(factors), f"{what} {name}: {len(mine)} factors, expected {len(factors)}"
        for i, (a, b) in enumerate(zip(mine, factors)):
            assert a.shape == b.shape, f"{what} {name}[{i}]: {tuple(a.shape)} != {tuple(b.shape)}"
            err = rel_error(a, b)
            assert err < 1e-10, f"{what} {name}[{i}]: relative error {err:.2e}"


LOSSES = ["ce_mean", "ce_sum", "mse_mean", "mse_sum"]


@pytest.mark.skipif(not bp.available(), reason=bp.SKIP_REASON)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("quantity", sorted(QUANTITIES))
def test_mlp_equals_backpack(quantity, loss):
    loss_fn, x, y = data("mlp", loss)
    model = mlp()
    ext, curv = QUANTITIES[quantity]
    out = fxcurv.compile(model, loss_fn, quantities=(quantity,))(x, y)
    assert_factors(out[quantity], bp.run_backpack(model, loss_fn, x, y, ext, curv_type=curv), f"{quantity} {loss}")


@pytest.mark.skipif(not bp.available(), reason=bp.SKIP_REASON)
@pytest.mark.parametrize("loss", ["ce_mean", "mse_sum"])
@pytest.mark.parametrize("quantity", sorted(QUANTITIES))
def test_cnn_equals_backpack(quantity, loss):
    """BackPACK's HBP with a curvature type fails on an activation right after a convolution; ReLU
    (no residual) is the one it takes, so the hbp_* checks here are of the recursion through convs."""
    loss_fn, x, y = data("cnn", loss)
    model = cnn()
    ext, curv = QUANTITIES[quantity]
    out = fxcurv.compile(model, loss_fn, quantities=(quantity,))(x, y)
    assert_factors(out[quantity], bp.run_backpack(model, loss_fn, x, y, ext, curv_type=curv), f"{quantity} {loss}")


@pytest.mark.parametrize("act", [nn.ELU, nn.Softplus, nn.SiLU, nn.GELU, nn.LeakyReLU])
@pytest.mark.parametrize("quantity", sorted(QUANTITIES))
def test_activations_backpack_lacks_equal_the_formulas(quantity, act):
    loss_fn, x, y = data("mlp", "ce_mean")
    model = mlp(act)
    _, curv = QUANTITIES[quantity]
    want = (bp.kflr_factors(model, loss_fn, x, y) if quantity == "kflr" else
            bp.kfra_factors(model, loss_fn, x, y) if quantity == "kfra" else
            bp.hbp_factors(model, loss_fn, x, y, curv))
    out = fxcurv.compile(model, loss_fn, quantities=(quantity,))(x, y)
    assert_factors(out[quantity], want, f"{quantity} {act.__name__}")


@pytest.mark.parametrize("quantity", ["hbp_hessian", "hbp_pch_abs", "kfra"])
def test_sigmoid_after_a_convolution_equals_the_formula(quantity):
    """Where BackPACK's HBP fails (its residual diagonal is not flattened after a conv), the recursion
    still has a definition: the formula's."""
    loss_fn, x, y = data("cnn", "ce_mean")
    model = cnn(nn.Sigmoid)
    _, curv = QUANTITIES[quantity]
    want = bp.kfra_factors(model, loss_fn, x, y) if quantity == "kfra" else bp.hbp_factors(model, loss_fn, x, y, curv)
    out = fxcurv.compile(model, loss_fn, quantities=(quantity,))(x, y)
    assert_factors(out[quantity], want, quantity)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.a, self.b = nn.Linear(5, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        return self.b(h + torch.sigmoid(self.a(h)))


@pytest.mark.parametrize("loss", ["ce_mean", "mse_sum"])
def test_kflr_on_a_residual_network_equals_the_formula(loss):
    """BackPACK has no KFLR for residual networks; its definition (G the exact GGN of the bias, A the
    input covariance) still holds and fxcurv's columns, summed over paths, give it."""
    loss_fn, x, y = data("mlp", loss)
    torch.manual_seed(3)
    model = Residual().to(DT)
    out = fxcurv.compile(model, loss_fn, quantities=("kflr",))(x, y)
    assert_factors(out["kflr"], bp.kflr_factors(model, loss_fn, x, y), f"kflr residual {loss}")


def test_kfac_input_factors_are_kflr_s():
    loss_fn, x, y = data("mlp", "ce_mean")
    model = mlp()
    out = fxcurv.compile(model, loss_fn, quantities=("kfac", "kflr"), seed=0)(x, y)
    for name in out["kflr"]:
        if name.endswith("weight"):
            torch.testing.assert_close(out["kfac"][name].factors[1], out["kflr"][name].factors[1])


def transposed_cnn() -> nn.Sequential:
    """A convolution and a transposed convolution (stride 2, padding 1, dilation 2), ReLU between them."""
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(3, 2, 2, stride=2, padding=1,
                                                                                      dilation=2),
                         nn.Flatten(), nn.Linear(2 * 7 * 7, 3)).to(DT)


@pytest.mark.skipif(not bp.available(), reason=bp.SKIP_REASON)
@pytest.mark.filterwarnings("ignore:The Kronecker factors stored in the weight parameters of transpose")
@pytest.mark.parametrize("loss", ["ce_mean", "mse_sum"])
@pytest.mark.parametrize("quantity", sorted(QUANTITIES))
def test_transposed_cnn_equals_backpack(quantity, loss):
    """A transposed convolution's factors are BackPACK's, which split ``weight.transpose(0, 1)``
    (``KroneckerLayout.TRANSPOSED``), through every quantity of the family."""
    loss_fn, x, y = data("cnn", loss)
    model = transposed_cnn()
    ext, curv = QUANTITIES[quantity]
    out = fxcurv.compile(model, loss_fn, quantities=(quantity,))(x, y)
    assert out[quantity]["2.weight"].layout is fxcurv.KroneckerLayout.TRANSPOSED
    assert_factors(out[quantity], bp.run_backpack(model, loss_fn, x, y, ext, curv_type=curv), f"{quantity} {loss}")
