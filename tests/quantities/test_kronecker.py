"""The Kronecker family (kflr, kfac, kfra, hbp_hessian, hbp_pch_abs, hbp_pch_clip) against its
definitions: the exact GGN / Hessian blocks of torch.func for one sample (where the papers say they are
exact), the defining formulas of KFAC's expectation and EA-CG's positive curvature, and the errors
where no factorization exists. BackPACK's numbers are checked in test_kronecker_backpack.py."""

from __future__ import annotations

import pytest
import reference
import torch
from helpers import rel_error
from torch import nn

import fxcurv
from fxcurv.errors import UnsupportedOpError

DT = torch.float64
DENSE_FAMILY = ("kfra", "hbp_hessian", "hbp_pch_abs", "hbp_pch_clip")


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3), nn.Sigmoid(), nn.Linear(3, 2)).to(DT)


def cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Sigmoid(), nn.Conv2d(3, 2, 2, stride=2), nn.Flatten(),
                         nn.Linear(8, 3)).to(DT)


def dense(k) -> torch.Tensor:
    factors = k.factors
    return torch.kron(factors[0], factors[1]) if len(factors) == 2 else factors[0]


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("make", [mlp, cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("quantity", ["kflr", "kfra", "hbp_hessian"])
def test_exact_for_one_sample(quantity, make, loss):
    """Botev et al. / HBP: for N = 1, KFLR = KFRA = the GGN block and HBP's Hessian recursion is the
    Hessian block (the expectation approximation averages over one sample)."""
    model = make()
    shape = (1, 4) if make is mlp else (1, 2, 4, 4)
    x = torch.randn(shape, dtype=DT)
    if loss == "ce":
        loss_fn, y = nn.CrossEntropyLoss(), torch.tensor([1])
    else:
        loss_fn, y = nn.MSELoss(), torch.randn(1, 2 if make is mlp else 3, dtype=DT)
    if make is cnn and quantity == "hbp_hessian":  # BackPACK's and our HBP take no second conv here
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Sigmoid(), nn.Flatten(), nn.Linear(48, 3)).to(DT)
    out = fxcurv.compile(model, loss_fn, quantities=(quantity,))(x, y)
    exact = reference.full_hessian(model, loss_fn, x, y) if quantity == "hbp_hessian" else \
        reference.ggn(model, loss_fn, x, y)
    convs = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    for name, block in reference.diagonal_blocks(exact, model).items():
        if name in convs:
            continue  # KFC sums over output positions: exact for biases and linear layers only
        err = rel_error(dense(out[quantity][name]), block)
        assert err < 1e-10, f"{quantity} {name}: {err:.2e}"


def test_kfra_and_kflr_differ_beyond_one_sample():
    """The test above could pass vacuously if everything were the exact block: with N = 4 they differ."""
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    x, y = torch.randn(4, 4, dtype=DT), torch.tensor([0, 1, 1, 0])
    out = fxcurv.compile(model, loss_fn, quantities=("kflr", "kfra"))(x, y)
    exact = reference.diagonal_blocks(reference.ggn(model, loss_fn, x, y), model)
    assert rel_error(dense(out["kflr"]["0.weight"]), exact["0.weight"]) > 1e-3
    assert rel_error(dense(out["kfra"]["0.weight"]), dense(out["kflr"]["0.weight"])) > 1e-3
    # The last layer's input factor and output factor are exactly KFLR's and KFRA's (no recursion yet).
    torch.testing.assert_close(out["kflr"]["4.weight"].factors[0], out["kfra"]["4.weight"].factors[0])


def test_kfac_expectation_is_kflr():
    """KFAC's sampled output factor has KFLR's as its expectation (Botev et al. App. C): the mean over 400
    draws of 4 samples is within 5 standard errors of it, entry by entry."""
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    x, y = torch.randn(3, 4, dtype=DT), torch.tensor([0, 1, 1])
    kflr = fxcurv.compile(model, loss_fn, quantities=("kflr",))(x, y)["kflr"]["2.weight"].factors[0]
    engine = fxcurv.compile(model, loss_fn, quantities=("kfac",), mc_samples=4, seed=0)
    draws = torch.stack([engine(x, y)["kfac"]["2.weight"].factors[0] for _ in range(400)])
    mean, se = draws.mean(0), draws.std(0) / 400**0.5
    assert ((mean - kflr).abs() <= 5 * se + 1e-12).all()
    assert (draws[0] - kflr).abs().max() > 1e-2 * kflr.abs().max()  # one draw is not KFLR


def test_input_factors_are_shared_across_the_family():
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    x, y = torch.randn(5, 4, dtype=DT), torch.tensor([0, 1, 1, 0, 1])
    out = fxcurv.compile(model, loss_fn, quantities=("kflr", "kfac") + DENSE_FAMILY, seed=0)(x, y)
    a = x.T @ x / 5
    for q in ("kflr", "kfac") + DENSE_FAMILY:
        torch.testing.assert_close(out[q]["0.weight"].factors[1], a)
        assert len(out[q]["0.bias"].factors) == 1


def test_pch_is_the_hessian_recursion_with_modified_residuals():
    """EA-CG eq. 8b: the PCH recursion replaces the residual diag(sum_n phi'' g) by its absolute value
    (gamma = -1) or positive part (gamma = 0). At the first hidden layer's bias, the three differ only
    by that diagonal, and the PCH blocks are positive semi-definite."""
    model, loss_fn = mlp(1), nn.CrossEntropyLoss()
    x, y = torch.randn(6, 4, dtype=DT), torch.tensor([0, 1, 1, 0, 1, 0])
    out = fxcurv.compile(model, loss_fn, quantities=("kfra",) + DENSE_FAMILY)(x, y)
    for q in ("kfra", "hbp_pch_abs", "hbp_pch_clip"):
        for name in ("0.weight", "0.bias", "2.weight", "2.bias"):
            assert torch.linalg.eigvalsh(dense(out[q][name])).min() > -1e-12, (q, name)
    # The last hidden bias: M = E[f' f'^T] o (W^T M W) plus the residual diagonal r.
    hess, gn = out["hbp_hessian"]["2.bias"].factors[0], out["kfra"]["2.bias"].factors[0]
    r = torch.diagonal(hess - gn)
    assert r.abs().max() > 1e-6 and (r < 0).any()  # a signed residual, or the test proves nothing
    torch.testing.assert_close(out["hbp_pch_abs"]["2.bias"].factors[0], gn + torch.diag(r.abs()))
    torch.testing.assert_close(out["hbp_pch_clip"]["2.bias"].factors[0], gn + torch.diag(r.clamp(min=0)))


# ---- where no factorization exists ------------------------------------------------------------------

class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))


class Residual(nn.Module):
    """``h = lin(x)``, then ``h + tanh(a(h))``: a fan-out whose both branches depend on parameters."""

    def __init__(self):
        super().__init__()
        self.lin, self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        h = self.lin(x)
        return self.b(h + torch.tanh(self.a(h)))


@pytest.mark.parametrize("quantity", ["kflr", "kfac", "kfra", "hbp_hessian"])
def test_weight_used_twice_is_refused(quantity):
    with pytest.raises(UnsupportedOpError) as err:
        fxcurv.compile(Tied().to(DT), nn.CrossEntropyLoss(), quantities=(quantity,))(
            torch.randn(2, 3, dtype=DT), torch.tensor([0, 1]))
    assert "parameter a.weight" in str(err.value) and "more than one op" in str(err.value)


@pytest.mark.parametrize("quantity", DENSE_FAMILY)
def test_fan_out_is_refused_for_batch_averaged_matrices(quantity):
    with pytest.raises(UnsupportedOpError) as err:
        fxcurv.compile(Residual().to(DT), nn.CrossEntropyLoss(), quantities=(quantity,))(
            torch.randn(2, 3, dtype=DT), torch.tensor([0, 1]))
    assert "fan-out" in str(err.value) and "cross terms" in str(err.value)


def test_kflr_takes_residual_networks():
    """Columns pass a fan-out exactly (they are summed per origin): kflr's output factor on the residual
    branch's layer is the exact GGN of its bias."""
    model, loss_fn = Residual().to(DT), nn.CrossEntropyLoss()
    x, y = torch.randn(1, 3, dtype=DT), torch.tensor([1])
    out = fxcurv.compile(model, loss_fn, quantities=("kflr",))(x, y)
    exact = reference.diagonal_blocks(reference.ggn(model, loss_fn, x, y), model)
    for name in ("lin.bias", "a.bias", "lin.weight"):
        assert rel_error(dense(out["kflr"][name]), exact[name]) < 1e-10, name


def test_dense_matrix_too_large_is_refused_with_its_size():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 5), nn.Sigmoid(), nn.Flatten(), nn.Linear(64 * 28 * 28, 10))
    with pytest.raises(UnsupportedOpError) as err:
        fxcurv.compile(model, nn.CrossEntropyLoss(), quantities=("kfra",)).program(
            torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    assert "[50176, 50176]" in str(err.value) and "GiB" in str(err.value) and "kflr" in str(err.value)


def test_grouped_convolution_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(16, 2)).to(DT)
    with pytest.raises(UnsupportedOpError, match="groups=2"):
        fxcurv.compile(model, nn.CrossEntropyLoss(), quantities=("kflr",))(
            torch.randn(2, 2, 4, 4, dtype=DT), torch.tensor([0, 1]))


def test_the_issue_example():
    """The user's view: a Kronecker object per parameter, BackPACK's factor order and shapes, products
    and the damped inverse without forming the product, an exact block through products."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    x, y = torch.randn(4, 1, 3, 4, dtype=DT), torch.tensor([0, 2, 1, 1])
    engine = fxcurv.compile(model, nn.CrossEntropyLoss(), quantities=(
        "kfac", "kflr", "kfra", "hbp_hessian", "hbp_pch_abs", "hbp_pch_clip", "block_ggn", "block_hessian"),
        mc_samples=1, seed=0)
    out = engine(x, y)
    k = out["kflr"]["1.weight"]
    g, a = k.factors
    assert g.shape == (5, 5) and a.shape == (12, 12) and len(out["kflr"]["1.bias"].factors) == 1
    full = k.to_dense()
    torch.testing.assert_close(full, torch.kron(g, a))
    v = torch.randn(5, 12, dtype=DT)
    torch.testing.assert_close(k @ v, (full @ v.reshape(-1)).reshape(5, 12))
    torch.testing.assert_close(k.inverse(0.1) @ v,
                               torch.linalg.solve(full + 0.1 * torch.eye(60, dtype=DT), v.reshape(-1)).reshape(5, 12))
    b = out["block_ggn"]["1.weight"]
    exact = reference.diagonal_blocks(reference.ggn(model, nn.CrossEntropyLoss(), x, y), model)["1.weight"]
    torch.testing.assert_close(b @ v, (exact @ v.reshape(-1)).reshape(5, 12))
    assert list(out) == ["grad", "kfac", "kflr", "kfra", "hbp_hessian", "hbp_pch_abs", "hbp_pch_clip",
                         "block_ggn", "block_hessian"]


# ---- transposed convolutions (factors of weight.transpose(0, 1): KroneckerLayout.TRANSPOSED) -----

def conv_transpose_net(seed: int = 0) -> nn.Sequential:
    """A ConvTranspose2d with one output position on a 1 x 1 input (kernel 3, padding 1): a linear layer
    on one patch, where KFC's sum over positions is no approximation."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.ConvTranspose2d(2, 3, 3, padding=1), nn.Sigmoid(), nn.Flatten(), nn.Linear(3, 2)).to(DT)


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("quantity", ["kflr", "kfra"])
def test_transposed_convolution_exact_for_one_sample_and_one_position(quantity, loss):
    """For N = 1 and one output position (the case where the conv tests say KFLR/KFRA are exact), the
    transposed convolution's blocks -- ``to_dense()`` over ``weight.reshape(-1)``, the weight being
    ``[C_in, C_out, k1, k2]`` -- are the exact GGN blocks of torch.func."""
    model = conv_transpose_net()
    x = torch.randn(1, 2, 1, 1, dtype=DT)
    if loss == "ce":
        loss_fn, y = nn.CrossEntropyLoss(), torch.tensor([1])
    else:
        loss_fn, y = nn.MSELoss(), torch.randn(1, 2, dtype=DT)
    out = fxcurv.compile(model, loss_fn, quantities=(quantity,))(x, y)[quantity]
    assert out["0.weight"].layout is fxcurv.KroneckerLayout.TRANSPOSED
    assert [f.shape[0] for f in out["0.weight"].factors] == [3, 2 * 9]  # G over C_out, A over C_in k1 k2
    for name, block in reference.diagonal_blocks(reference.ggn(model, loss_fn, x, y), model).items():
        err = rel_error(out[name].to_dense(), block)
        assert err < 1e-10, f"{quantity} {name}: {err:.2e}"


def test_transposed_convolution_factors_are_their_definitions():
    """Several positions and samples (stride, padding, output padding, dilation): KFLR's ``G`` is the exact
    GGN block of the bias (torch.func), and ``A = (1/N) sum_{n,q} u_nq u_nq^T`` with ``u_nq[(c, t)] =
    dZ[n, o, q] / dW[c, o, t]`` (the same for every ``o``), from torch.func's Jacobian of the op."""
    torch.manual_seed(3)
    conv = nn.ConvTranspose2d(2, 3, (3, 2), stride=2, padding=1, output_padding=1, dilation=(1, 2))
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(3 * 6 * 6, 4)).to(DT)
    x, y = torch.randn(3, 2, 3, 3, dtype=DT), torch.tensor([0, 3, 1])
    loss_fn = nn.CrossEntropyLoss()
    out = fxcurv.compile(model, loss_fn, quantities=("kflr",))(x, y)["kflr"]
    exact = reference.diagonal_blocks(reference.ggn(model, loss_fn, x, y), model)
    assert rel_error(out["0.bias"].to_dense(), exact["0.bias"]) < 1e-10
    G, A = out["0.weight"].factors
    assert rel_error(G, exact["0.bias"]) < 1e-10

    def z(weight):
        return torch.nn.functional.conv_transpose2d(x, weight, None, conv.stride, conv.padding, conv.output_padding,
                                                    1, conv.dilation)

    jac = torch.func.jacrev(z)(conv.weight.detach())  # [N, C_out, H, W, C_in, C_out, k1, k2]
    u = torch.einsum("noqrcpab,op->ncabqr", jac, torch.eye(3, dtype=DT) / 3)  # every o alike: averaged
    u = u.reshape(3, 2 * 3 * 2, -1)
    assert rel_error(A, torch.einsum("niq,njq->ij", u, u) / 3) < 1e-10
    assert rel_error(A, torch.zeros_like(A)) > 0.5


def test_grouped_transposed_convolution_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(4, 2, 2, groups=2), nn.Flatten(), nn.Linear(32, 2)).to(DT)
    for quantity in ("kflr", "kfra"):
        with pytest.raises(UnsupportedOpError, match="groups=2"):
            fxcurv.compile(model, nn.CrossEntropyLoss(), quantities=(quantity,))(
                torch.randn(2, 4, 3, 3, dtype=DT), torch.tensor([0, 1]))


def test_unreached_transposed_convolution_has_zero_factors_in_its_layout():
    """A parameter the loss never reaches gets zero factors, shaped as its op's factors would be: for a
    transposed convolution's weight ``[C_in, C_out, k]``, ``G [C_out, C_out]`` and ``A [C_in k, C_in k]``."""

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose1d(2, 3, 2)
            self.lin = nn.Linear(8, 3)

        def forward(self, x):
            self.up(x)  # computed, never used by the loss
            return self.lin(x.flatten(1))

    out = fxcurv.compile(Unused().to(DT), nn.CrossEntropyLoss(), quantities=("kflr", "kfra"))(
        torch.randn(2, 2, 4, dtype=DT), torch.tensor([0, 1]))
    for quantity in ("kflr", "kfra"):
        block = out[quantity]["up.weight"]
        assert block.layout is fxcurv.KroneckerLayout.TRANSPOSED
        assert [f.shape[0] for f in block.factors] == [3, 4] and not any(f.any() for f in block.factors)
        assert not block.to_dense().any()
