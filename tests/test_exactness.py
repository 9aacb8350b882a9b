"""grad, diag_ggn and diag_hessian equal independent torch.func references (float64, rel. err < 1e-6)
on randomized architectures: every activation in module/functional/method form, residual branches,
a weight used twice, each loss and reduction, batch sizes 1 and 3."""

from __future__ import annotations

import random

import pytest
import torch
from architectures import random_cnn, random_mlp
from helpers import check_against_references

import fxcurv

LOSSES = {
    "ce_mean": lambda: torch.nn.CrossEntropyLoss(),
    "ce_sum": lambda: torch.nn.CrossEntropyLoss(reduction="sum"),
    "mse_mean": lambda: torch.nn.MSELoss(),
    "mse_sum": lambda: torch.nn.MSELoss(reduction="sum"),
}


def make_target(loss: str, n: int, classes: int, gen: torch.Generator) -> torch.Tensor:
    if loss.startswith("ce"):
        return torch.randint(0, classes, (n,), generator=gen)
    return torch.randn(n, classes, generator=gen, dtype=torch.float64)


check_exact = check_against_references


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("seed", range(6))
def test_random_mlp(seed, loss, batch):
    rng = random.Random(1000 * seed + batch)
    torch.manual_seed(seed)
    model = random_mlp(rng, in_dim=4, out_dim=3, depth=rng.randint(2, 4))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, generator=gen, dtype=torch.float64)
    check_exact(model, LOSSES[loss](), x, make_target(loss, batch, 3, gen))


def test_diag_hessian_differs_from_ggn_on_a_curved_net():
    """The test above could pass vacuously if both were the GGN: on a tanh net they differ."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 2, 1])
    out = check_exact(model, torch.nn.CrossEntropyLoss(), x, y)
    diff = (out["diag_hessian"]["0.weight"] - out["diag_ggn"]["0.weight"]).abs().max()
    assert diff > 1e-3 * out["diag_ggn"]["0.weight"].abs().max()


def test_weight_used_three_times_in_a_chain():
    """Mixed second derivatives of a tied weight (HBP eq. S.6, second term) across three uses."""
    torch.manual_seed(1)

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.out = torch.nn.Linear(4, 2)

        def forward(self, x):
            h = torch.sigmoid(self.lin(x))
            h = torch.tanh(self.lin(h)) + h
            return self.out(torch.nn.functional.softplus(self.lin(h)))

    model = Tied().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    check_exact(model, torch.nn.CrossEntropyLoss(), x, torch.tensor([1, 0, 1]))


def test_frozen_parameters_are_constants():
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    model[0].weight.requires_grad_(False)
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 2, 1])
    out = check_exact(model, torch.nn.CrossEntropyLoss(), x, y)
    assert "0.weight" not in out.grad


def test_unused_parameter_gets_zeros():
    class WithSpare(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used = torch.nn.Linear(3, 2)
            self.spare = torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.used(x)

    model = WithSpare().double()
    x, y = torch.randn(2, 3, dtype=torch.float64), torch.tensor([0, 1])
    out = fxcurv.compile(model, torch.nn.CrossEntropyLoss(), quantities=("diag_ggn",))(x, y)
    assert torch.equal(out["diag_ggn"]["spare.weight"], torch.zeros(2, 3, dtype=torch.float64))
    assert torch.equal(out.grad["spare.bias"], torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("loss", ["ce_mean", "mse_sum"])
@pytest.mark.parametrize("seed", range(8))
def test_random_cnn(seed, loss, batch):
    """Non-square 7x6 images through random convolution/pooling/padding/residual/tied blocks."""
    rng = random.Random(7919 * seed + batch)
    torch.manual_seed(seed)
    model = random_cnn(rng, in_shape=(2, 7, 6), out_dim=3, depth=rng.randint(2, 3))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 2, 7, 6, generator=gen, dtype=torch.float64)
    check_exact(model, LOSSES[loss](), x, make_target(loss, batch, 3, gen))
