"""HesScale and HesScaleGN (HesScale paper, eq. 1-5 and App. A) against a brute-force implementation
of their defining equations (tests/hesscale_reference.py) and against the exact Hessian diagonal."""

from __future__ import annotations

import random

import hesscale_reference as hs_ref
import pytest
import reference
import torch
from helpers import assert_close, rel_error
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, hessian

import fxcurv
from fxcurv.rules import registry

DTYPE = torch.float64

ACTIVATIONS = {
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "elu": lambda: nn.ELU(alpha=0.7),
    # threshold=1 puts some entries on torch's linear branch (beta * x > threshold)
    "softplus": lambda: nn.Softplus(beta=2.0, threshold=1.0),
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
}
LOSSES = {
    "ce_mean": lambda: nn.CrossEntropyLoss(reduction="mean"),
    "ce_sum": lambda: nn.CrossEntropyLoss(reduction="sum"),
    "mse_mean": lambda: nn.MSELoss(reduction="mean"),
    "mse_sum": lambda: nn.MSELoss(reduction="sum"),
}


def mlp(widths: list[int], acts: list, seed: int) -> nn.Sequential:
    """``Linear(widths[0], widths[1]), act, ..., Linear(widths[-2], widths[-1])`` in float64;
    ``acts`` holds one activation factory per hidden layer (``len(widths) - 2``)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(acts[i]())
    return nn.Sequential(*layers).to(DTYPE)


def data(loss_fn, batch: int, d_in: int, d_out: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = 1.5 * torch.randn(batch, d_in, dtype=DTYPE, generator=g)
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        y = torch.randint(0, d_out, (batch,), generator=g)
    else:
        y = torch.randn(batch, d_out, dtype=DTYPE, generator=g)
    return x, y


def check_against_brute_force(model, loss_fn, x, y):
    engine = fxcurv.compile(model, loss_fn, quantities=("hesscale", "hesscale_gn"))
    out = engine(x, y)
    assert_close(out["hesscale"], hs_ref.hesscale(model, loss_fn, x, y), rtol=1e-6, what="hesscale")
    assert_close(out["hesscale_gn"], hs_ref.hesscale_gn(model, loss_fn, x, y), rtol=1e-6,
                 what="hesscale_gn")
    return out


# ---- the brute-force reference itself -----------------------------------------------------------

@pytest.mark.parametrize("loss", list(LOSSES))
def test_reference_loss_diagonal_is_exact(loss):
    """The closed forms the reference starts from are the diagonal of torch.func's loss Hessian."""
    loss_fn = LOSSES[loss]()
    f = torch.randn(4, 5, dtype=DTYPE)
    _, y = data(loss_fn, 4, 1, 5, seed=1)
    assert rel_error(hs_ref.loss_hessian_diag(loss_fn, f, y),
                     hs_ref.loss_hessian_diag_autodiff(loss_fn, f, y)) < 1e-12


def test_reference_matches_closed_form_eq4_eq5():
    """The reference's Jacobian machinery reproduces HesScale eq. 4-5 written out by hand for a
    one-hidden-layer tanh net (``d_a = tanh'^2 (W2^2)^T d_f + tanh'' W2^T g_f``, ``d_W1 = d_a x^2``)."""
    model = mlp([3, 4, 2], [nn.Tanh], seed=0)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    x, y = data(loss_fn, 3, 3, 2, seed=0)
    w1, b1, w2 = model[0].weight, model[0].bias, model[2].weight
    with torch.no_grad():
        a = x @ w1.T + b1
        f = torch.tanh(a) @ w2.T + model[2].bias
        p = torch.softmax(f, 1)
        g_f = p - torch.nn.functional.one_hot(y, 2)
        d_f = p - p * p
        t = torch.tanh(a)
        d_a = (1 - t ** 2) ** 2 * (d_f @ w2 ** 2) + (-2 * t * (1 - t ** 2)) * (g_f @ w2)
        expected = {"0.weight": d_a.T @ x ** 2, "0.bias": d_a.sum(0),
                    "2.weight": d_f.T @ t ** 2, "2.bias": d_f.sum(0)}
    assert_close(hs_ref.hesscale(model, loss_fn, x, y), expected, rtol=1e-12, what="reference")


def test_reference_activation_derivatives_by_autodiff():
    x = torch.linspace(-3, 3, 13, dtype=DTYPE)
    d1, d2 = hs_ref.activation_derivatives(nn.Tanh(), x)
    t = torch.tanh(x)
    assert rel_error(d1, 1 - t ** 2) < 1e-12
    assert rel_error(d2, -2 * t * (1 - t ** 2)) < 1e-12


def test_reference_exact_on_conv_with_selection_layers():
    """Conv2d -> MaxPool2d -> ZeroPad2d -> Flatten under MSE: every layer after the conv has a
    selection Jacobian and the loss Hessian is diagonal, so nothing is dropped and the brute force
    must equal the exact Hessian diagonal (checks the generic linear-layer path of the reference)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.MaxPool2d(2), nn.ZeroPad2d(1),
                          nn.Flatten()).to(DTYPE)
    x = torch.randn(2, 2, 4, 4, dtype=DTYPE)
    y = torch.randn(2, 3 * 4 * 4, dtype=DTYPE)
    loss_fn = nn.MSELoss()
    assert_close(hs_ref.hesscale(model, loss_fn, x, y), reference.diag_hessian(model, loss_fn, x, y),
                 rtol=1e-10, what="reference on conv")


# ---- fxcurv == brute force ----------------------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_matches_brute_force(act, loss, batch):
    rng = random.Random(f"{act}-{loss}-{batch}")
    depth = rng.randint(1, 3)  # hidden layers
    widths = [rng.randint(2, 6) for _ in range(depth + 2)]
    model = mlp(widths, [ACTIVATIONS[act]] * depth, seed=rng.randint(0, 10 ** 6))
    loss_fn = LOSSES[loss]()
    x, y = data(loss_fn, batch, widths[0], widths[-1], seed=rng.randint(0, 10 ** 6))
    check_against_brute_force(model, loss_fn, x, y)


@pytest.mark.parametrize("depth", [0, 1, 2, 4])
def test_matches_brute_force_depth(depth):
    widths = [5] + [4] * depth + [3]
    model = mlp(widths, [nn.Tanh] * depth, seed=depth)
    loss_fn = nn.CrossEntropyLoss()
    x, y = data(loss_fn, 3, 5, 3, seed=depth)
    check_against_brute_force(model, loss_fn, x, y)


@settings(max_examples=12, deadline=None, derandomize=True, database=None)
@given(
    widths=st.lists(st.integers(1, 5), min_size=2, max_size=5),
    act_names=st.lists(st.sampled_from(sorted(ACTIVATIONS)), min_size=3, max_size=3),
    batch=st.sampled_from([1, 3]),
    loss=st.sampled_from(sorted(LOSSES)),
    seed=st.integers(0, 1000),
)
def test_matches_brute_force_mixed_activations(widths, act_names, batch, loss, seed):
    """Random MLPs with a different activation in every hidden layer."""
    loss_fn = LOSSES[loss]()
    if isinstance(loss_fn, nn.CrossEntropyLoss) and widths[-1] < 2:
        widths = widths[:-1] + [2]
    acts = [ACTIVATIONS[a] for a in act_names][: len(widths) - 2]
    model = mlp(widths, acts, seed)
    x, y = data(loss_fn, batch, widths[0], widths[-1], seed)
    check_against_brute_force(model, loss_fn, x, y)


@pytest.mark.parametrize("model_kind", ["maxpool", "avgpool", "zeropad"])
def test_matches_brute_force_conv(model_kind):
    """HesScale App. B (conv layers) -- runs once the vocabulary has conv2d and the pooling ops."""
    middle = {"maxpool": nn.MaxPool2d(2), "avgpool": nn.AvgPool2d(2), "zeropad": nn.ZeroPad2d(1)}
    needed = (nn.Conv2d, type(middle[model_kind]))
    missing = [t.__name__ for t in needed if t not in registry.MODULE_SOURCES]
    if missing:
        pytest.skip(f"fxcurv's vocabulary has no {', '.join(missing)} yet")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), middle[model_kind], nn.Flatten())
    with torch.no_grad():
        d = model(torch.zeros(1, 2, 4, 4)).shape[1]
    model = nn.Sequential(*model, nn.Linear(d, 3)).to(DTYPE)
    x = torch.randn(2, 2, 4, 4, dtype=DTYPE)
    y = torch.tensor([0, 2])
    check_against_brute_force(model, nn.CrossEntropyLoss(), x, y)


# ---- fxcurv against the exact Hessian diagonal --------------------------------------------------

@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("act", ["tanh", "sigmoid", "gelu", "elu"])
def test_exact_for_last_layer(act, loss):
    """HesScale Sec. 3: the last layer uses the exact output Hessian diagonal, and a weight entry
    of the last layer reaches one output only, so its diagonal is exact there."""
    model = mlp([4, 5, 5, 3], [ACTIVATIONS[act]] * 2, seed=3)
    loss_fn = LOSSES[loss]()
    x, y = data(loss_fn, 3, 4, 3, seed=3)
    out = fxcurv.compile(model, loss_fn, quantities=("hesscale",))(x, y)["hesscale"]
    exact = reference.diag_hessian(model, loss_fn, x, y)
    for name in ("4.weight", "4.bias"):
        assert rel_error(out[name], exact[name]) < 1e-6, name


@pytest.mark.parametrize("loss", ["ce_mean", "ce_sum"])
def test_not_exact_for_earlier_layers(loss):
    """The off-diagonal terms HesScale drops matter before the last layer of a tanh net: this test
    would catch an implementation that (wrongly) computed the exact diagonal, and shows that the
    exactness test above can fail."""
    model = mlp([4, 5, 5, 3], [nn.Tanh] * 2, seed=3)
    loss_fn = LOSSES[loss]()
    x, y = data(loss_fn, 3, 4, 3, seed=3)
    out = fxcurv.compile(model, loss_fn, quantities=("hesscale",))(x, y)["hesscale"]
    exact = reference.diag_hessian(model, loss_fn, x, y)
    for name in ("0.weight", "0.bias", "2.weight", "2.bias"):
        assert rel_error(out[name], exact[name]) > 1e-3, name


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("act", ["relu", "leaky_relu"])
def test_piecewise_linear_hesscale_equals_gn(act, loss):
    """phi'' = 0 almost everywhere for ReLU/LeakyReLU: the two variants coincide."""
    model = mlp([4, 6, 6, 3], [ACTIVATIONS[act]] * 2, seed=5)
    loss_fn = LOSSES[loss]()
    x, y = data(loss_fn, 3, 4, 3, seed=5)
    out = fxcurv.compile(model, loss_fn, quantities=("hesscale", "hesscale_gn"))(x, y)
    assert_close(out["hesscale"], out["hesscale_gn"], rtol=1e-12, what="hesscale vs hesscale_gn")


def test_tanh_hesscale_differs_from_gn():
    """...and they do differ where phi'' is not zero (so the test above can fail)."""
    model = mlp([4, 6, 6, 3], [nn.Tanh] * 2, seed=5)
    loss_fn = nn.CrossEntropyLoss()
    x, y = data(loss_fn, 3, 4, 3, seed=5)
    out = fxcurv.compile(model, loss_fn, quantities=("hesscale", "hesscale_gn"))(x, y)
    assert rel_error(out["hesscale"]["0.weight"], out["hesscale_gn"]["0.weight"]) > 1e-3


# ---- the paper's accuracy experiment (HesScale Sec. 4, Fig. 1a), in miniature ------------------

def per_sample_diag_hessian(model, loss_fn, x, y) -> torch.Tensor:
    """``[N, P]``: the exact Hessian diagonal of each sample's loss (params in named order)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflat(v):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            out[n] = v[i:i + s.numel()].reshape(s)
            i += s.numel()
        return out

    def loss(v, xn, yn):
        return loss_fn(functional_call(model, unflat(v), (xn.unsqueeze(0),)), yn.unsqueeze(0))

    return torch.func.vmap(lambda xn, yn: torch.diagonal(hessian(loss)(theta, xn, yn)))(x, y)


def test_paper_accuracy_experiment_in_miniature():
    """6-16-16-16-10 tanh net, softmax cross-entropy, one example per call; L1 distance to the exact
    Hessian diagonal summed over all layers and averaged over the examples, for several inits.

    Measured (4 inits x 16 examples, float64): mean L1 error per example, summed over layers
        hesscale     0.369, 0.296, 0.331, 0.322   (mean 0.33)
        hesscale_gn  5.045, 5.561, 5.678, 5.344   (mean 5.41)
        diag_ggn_mc  8.000, 8.235, 8.088, 7.800   (mean 8.03; 1 MC sample)
    against a mean ||diag H||_1 of 6.9-7.3 per example. The exact GGN diagonal itself is off by
    5.01 / 5.56 (inits 0 / 1): HesScaleGN is close to the GGN, and the GGN far from the Hessian of
    this tanh net. HesScale is ~16x more accurate than HesScaleGN and ~24x more than GGN-MC-1,
    consistent with the paper's Fig. 1a (every other method's normalized error > 1).
    """
    loss_fn = nn.CrossEntropyLoss()
    errors = {"hesscale": [], "hesscale_gn": [], "diag_ggn_mc": []}
    n = 16
    for init in range(4):
        model = mlp([6, 16, 16, 16, 10], [nn.Tanh] * 3, seed=init)
        names = [name for name, _ in model.named_parameters()]
        g = torch.Generator().manual_seed(100 + init)
        x = torch.randn(n, 6, dtype=DTYPE, generator=g)
        y = torch.randint(0, 10, (n,), generator=g)
        exact = per_sample_diag_hessian(model, loss_fn, x, y)
        engine = fxcurv.compile(model, loss_fn, quantities=tuple(errors), mc_samples=1, seed=init)
        total = dict.fromkeys(errors, 0.0)
        for i in range(n):
            out = engine(x[i:i + 1], y[i:i + 1])
            for q in errors:
                approx = torch.cat([out[q][name].reshape(-1) for name in names])
                total[q] += (approx - exact[i]).abs().sum().item() / n
        for q in errors:
            errors[q].append(total[q])
        assert total["hesscale"] < total["hesscale_gn"], (init, total)
        assert total["hesscale"] < total["diag_ggn_mc"], (init, total)
    mean = {q: sum(v) / len(v) for q, v in errors.items()}
    assert mean["hesscale"] < 0.2 * mean["hesscale_gn"], mean
    assert mean["hesscale"] < 0.2 * mean["diag_ggn_mc"], mean


def test_per_sample_diag_hessian_helper():
    model = mlp([3, 4, 2], [nn.Tanh], seed=0)
    loss_fn = nn.CrossEntropyLoss()
    x, y = data(loss_fn, 2, 3, 2, seed=0)
    per_sample = per_sample_diag_hessian(model, loss_fn, x, y)
    exact = reference.diag_hessian(model, loss_fn, x[1:], y[1:])
    assert rel_error(per_sample[1], torch.cat([v.reshape(-1) for v in exact.values()])) < 1e-12


