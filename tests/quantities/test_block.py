"""block_ggn and block_hessian: each parameter's exact block equals torch.func's (float64), residual and
weight-tied graphs included, through products, to_dense() and the diagonal; products match the dense
block for parameter-shaped, flat and matrix operands."""

from __future__ import annotations

import random

import pytest
import reference
import torch
from architectures import TiedThreeTimes, random_cnn, random_mlp
from helpers import rel_error
from torch import nn

import fxcurv

DT = torch.float64


def check_blocks(model, loss_fn, x, y, quantities=("block_ggn", "block_hessian")):
    out = fxcurv.compile(model, loss_fn, quantities=quantities)(x, y)
    expected = {"block_ggn": lambda: reference.ggn(model, loss_fn, x, y),
                "block_hessian": lambda: reference.full_hessian(model, loss_fn, x, y)}
    for q in quantities:
        for name, block in reference.diagonal_blocks(expected[q](), model).items():
            err = rel_error(out[q][name].to_dense(), block)
            assert err < 1e-10, f"{q} {name}: {err:.2e}"
    return out


@pytest.mark.parametrize("batch", [1, 3])
def test_tied_and_residual(batch):
    torch.manual_seed(0)
    x, y = torch.randn(batch, 3, dtype=DT), torch.tensor([0, 1, 1][:batch])
    check_blocks(TiedThreeTimes(out_dim=2).to(DT), nn.CrossEntropyLoss(), x, y)


@pytest.mark.parametrize("seed", range(3))
def test_random_mlps(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model = random_mlp(rng, in_dim=4, out_dim=3, depth=3)
    x, y = torch.randn(3, 4, dtype=DT), torch.randn(3, 3, dtype=DT)
    check_blocks(model, nn.MSELoss(reduction="sum"), x, y)


@pytest.mark.parametrize("seed", range(2))
def test_random_cnns(seed):
    rng = random.Random(50 + seed)
    torch.manual_seed(seed)
    model = random_cnn(rng, in_shape=(2, 5, 4), out_dim=3, depth=2)
    x, y = torch.randn(2, 2, 5, 4, dtype=DT), torch.tensor([0, 2])
    check_blocks(model, nn.CrossEntropyLoss(), x, y)


def test_indefinite_general_loss():
    """A loss with an indefinite Hessian w.r.t. the output: its signed columns give the exact blocks."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    check_blocks(model, lambda f, y: (torch.sin(f) * y).sum(), torch.randn(3, 3, dtype=DT),
                 torch.randn(3, 2, dtype=DT))


def test_products_and_diagonal():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 3), nn.Sigmoid(), nn.Linear(3, 2)).to(DT)
    x, y = torch.randn(5, 4, dtype=DT), torch.tensor([0, 1, 1, 0, 1])
    out = fxcurv.compile(model, nn.CrossEntropyLoss(), quantities=("block_ggn", "diag_ggn"))(x, y)
    b = out["block_ggn"]["0.weight"]
    dense = b.to_dense()
    v = torch.randn(3, 4, dtype=DT)
    torch.testing.assert_close(b @ v, (dense @ v.reshape(-1)).reshape(3, 4))
    torch.testing.assert_close(b @ v.reshape(-1), dense @ v.reshape(-1))
    m = torch.randn(12, 5, dtype=DT)
    torch.testing.assert_close(b @ m, dense @ m)
    torch.testing.assert_close(b.diag(), out["diag_ggn"]["0.weight"])
    assert b.shape == (12, 12)


def test_to_dense_refuses_a_large_block_with_its_size():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(200, 300), nn.Tanh(), nn.Linear(300, 2))
    out = fxcurv.compile(model, nn.CrossEntropyLoss(), quantities=("block_ggn",))(
        torch.randn(2, 200), torch.tensor([0, 1]))
    with pytest.raises(fxcurv.MemoryBudgetError) as err:
        out["block_ggn"]["0.weight"].to_dense()
    assert "60000" in str(err.value).replace(",", "")
    v = torch.randn(300, 200)
    assert (out["block_ggn"]["0.weight"] @ v).shape == (300, 200)  # products still work
