"""BackPACK's Kronecker-factored curvature conventions, pinned down (docs/kronecker_conventions.md).

* the formula functions of ``tests/backpack_reference.py`` equal BackPACK's KFLR, KFAC, KFRA and
  HBP (``"hessian"``, ``"pch-abs"``, ``"pch-clip"``) numbers, float64, relative error < 1e-8, on
  MLPs and CNNs, cross-entropy and squared error, reductions ``"mean"`` and ``"sum"``;
* the identities the papers state, against torch.func: for ``N = 1`` (and ``N`` copies of one
  sample) KFLR = KFRA = the exact GGN block and HBP ``"hessian"`` = the exact Hessian block on MLPs
  (Botev App. C.4; HBP S.11), and which blocks are exact for any ``N``;
* what BackPACK 1.7.1 refuses.

Tests that run BackPACK are skipped when it is not installed (``BackPACK not installed``); the
formula and torch.func tests always run.
"""

from __future__ import annotations

import copy
import functools
import warnings

import backpack_reference as br
import pytest
import reference
import torch
from helpers import rel_error
from hesscale_reference import activation_derivatives
from torch import nn

pytestmark = pytest.mark.cpu_only(reason="float64 oracle of BackPACK's conventions: BackPACK and torch.func on CPU")
needs_backpack = pytest.mark.skipif(not br.available(), reason=br.SKIP_REASON)

RTOL = 1e-8
QUANTITIES = ("kflr", "kfac", "kfra", "hessian", "pch-abs", "pch-clip")  # the last three: HBP's curv_type
MC_SAMPLES, SEED = 3, 1


# ---- problems ---------------------------------------------------------------------------------

def mlp(bias: bool = True, first=nn.Sigmoid) -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 5, bias=bias), first(), nn.Linear(5, 6, bias=bias), nn.Tanh(),
                         nn.Linear(6, 3, bias=bias))


def cnn() -> nn.Sequential:
    # BackPACK's HBP takes no sigmoid/tanh after a convolution (see test_backpack_refuses): ReLU there
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(3, 4, 2, bias=False), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 3))


NETS = {
    "mlp": (mlp, (4,)),
    "mlp_relu_nobias": (lambda: mlp(bias=False, first=nn.ReLU), (4,)),
    "cnn": (cnn, (2, 4, 4)),
}
LOSSES = {
    "ce_mean": lambda: nn.CrossEntropyLoss(),
    "ce_sum": lambda: nn.CrossEntropyLoss(reduction="sum"),
    "mse_mean": lambda: nn.MSELoss(),
    "mse_sum": lambda: nn.MSELoss(reduction="sum"),
}


def problem(net: str, loss: str, n: int = 4, seed: int = 0, repeat: bool = False):
    """float64 ``(model, loss_fn, x, y)``; ``repeat``: ``n`` copies of one sample."""
    build, in_shape = NETS[net]
    torch.manual_seed(seed)
    model = build().to(torch.float64)
    loss_fn = LOSSES[loss]()
    m = 1 if repeat else n
    x = torch.randn(m, *in_shape, dtype=torch.float64)
    y = torch.randint(0, 3, (m,)) if loss.startswith("ce") else torch.randn(m, 3, dtype=torch.float64)
    if repeat:
        x, y = x.expand(n, *x.shape[1:]).clone(), y.expand(n, *y.shape[1:]).clone()
    return model, loss_fn, x, y


def formula(quantity: str, model, loss_fn, x, y) -> br.Factors:
    if quantity == "kflr":
        return br.kflr_factors(model, loss_fn, x, y)
    if quantity == "kfac":
        f = model(x).detach()
        return br.kfac_factors(model, loss_fn, x, y, br.mc_columns(loss_fn, f, MC_SAMPLES, seed=SEED))
    if quantity == "kfra":
        return br.kfra_factors(model, loss_fn, x, y)
    return br.hbp_factors(model, loss_fn, x, y, curv_type=quantity)


def backpack(quantity: str, model, loss_fn, x, y, **kw) -> br.Factors:
    if quantity in ("kflr", "kfac", "kfra"):
        return br.run_backpack(model, loss_fn, x, y, quantity, mc_samples=MC_SAMPLES, seed=SEED, **kw)
    return br.run_backpack(model, loss_fn, x, y, "hbp", curv_type=quantity, **kw)


SOURCES = {"formula": formula, "backpack": backpack}
SOURCE_PARAMS = [pytest.param("formula"), pytest.param("backpack", marks=needs_backpack)]


def assert_same(actual: br.Factors, expected: br.Factors, what: str, rtol: float = RTOL) -> None:
    assert list(actual) == list(expected), f"{what}: parameters {list(actual)} != {list(expected)}"
    for name, exp in expected.items():
        act = actual[name]
        assert len(act) == len(exp), f"{what} {name}: {len(act)} factors != {len(exp)}"
        for i, (a, e) in enumerate(zip(act, exp)):
            assert a.shape == e.shape, f"{what} {name}[{i}]: shape {tuple(a.shape)} != {tuple(e.shape)}"
            err = rel_error(a, e)
            assert err < rtol, f"{what} {name}[{i}]: relative error {err:.2e}"


@functools.cache
def exact_curvature(net: str, loss: str, n: int = 4, repeat: bool = False) -> tuple[dict, dict]:
    """The exact GGN and Hessian blocks (torch.func) of ``problem(net, loss, n, repeat)``, once."""
    model, loss_fn, x, y = problem(net, loss, n=n, repeat=repeat)
    return (reference.diagonal_blocks(reference.ggn(model, loss_fn, x, y), model),
            reference.diagonal_blocks(reference.full_hessian(model, loss_fn, x, y), model))


def block_errors(factors: br.Factors, exact: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: rel_error(br.kron_block(f), exact[name]) for name, f in factors.items()}


# ---- 1. the formulas are BackPACK's numbers ---------------------------------------------------

@needs_backpack
@pytest.mark.parametrize("quantity", QUANTITIES)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("net", NETS)
def test_formula_equals_backpack(net, loss, quantity):
    model, loss_fn, x, y = problem(net, loss)
    assert_same(backpack(quantity, model, loss_fn, x, y), formula(quantity, model, loss_fn, x, y),
                f"{quantity} {net} {loss}")


@pytest.mark.parametrize("source", SOURCE_PARAMS)
@pytest.mark.parametrize("quantity", QUANTITIES)
def test_factor_names_order_and_shapes(quantity, source):
    """Weight ``[out, in]`` -> ``(G [out, out], A [in, in])``; conv weight ``[C_out, C_in, k, k]`` ->
    ``(G [C_out, C_out], A [C_in k k, C_in k k])``; bias -> ``(G,)``; keyed and ordered like
    ``named_parameters()``; the ``kron`` of the factors is the block in row-major flattening."""
    model, loss_fn, x, y = problem("cnn", "ce_mean")
    factors = SOURCES[source](quantity, model, loss_fn, x, y)
    assert list(factors) == [name for name, _ in model.named_parameters()]
    for name, p in model.named_parameters():
        g = factors[name][0]
        assert g.shape == (p.shape[0], p.shape[0]), name
        if name.endswith("weight"):
            assert len(factors[name]) == 2 and factors[name][1].shape == (p[0].numel(), p[0].numel()), name
        else:
            assert len(factors[name]) == 1, name
        assert br.kron_block(factors[name]).shape == (p.numel(), p.numel())


@pytest.mark.parametrize("source", SOURCE_PARAMS)
@pytest.mark.parametrize("loss", ["ce_mean", "mse_sum"])
def test_residual_is_the_summed_diagonal_modified_after_the_sum(loss, source):
    """HBP's curv_types differ from KFRA only by ``diag(mod(sum_n phi''(h_n) o g_n))`` added at each
    activation (Botev eq. 31 summed over the batch; ``g_n = dL/da_n`` with the reduction's scale).
    Right below the last activation (the Tanh after layer ``2``) ``G`` differs by exactly that
    diagonal; ``pch-abs`` / ``pch-clip`` take ``|.|`` / ``max(., 0)`` of the *summed* diagonal
    (EA-CG eq. 8b: Pos-Eig of the expectation), not of each sample's."""
    model, loss_fn, x, y = problem("mlp", loss)
    get = SOURCES[source]
    kfra = get("kfra", model, loss_fn, x, y)["2.bias"][0]
    h = model[:3](x).detach()  # the Tanh's input
    d1, d2 = activation_derivatives(model[3], h)
    a = model[3](h).detach().requires_grad_(True)
    g = torch.autograd.grad(loss_fn(model[4](a), y), a)[0]
    per_sample = d2 * g  # [N, 6]
    res = per_sample.sum(0)
    assert (res > 0).any() and (res < 0).any(), "the test needs residual entries of both signs"
    assert rel_error(per_sample.abs().sum(0), res.abs()) > 1e-3, "the test needs samples of mixed signs"
    for curv, mod in [("hessian", res), ("pch-abs", res.abs()), ("pch-clip", res.clamp(min=0))]:
        diff = get(curv, model, loss_fn, x, y)["2.bias"][0] - kfra
        assert rel_error(diff, torch.diag(mod)) < RTOL, curv


# ---- 2. KFAC: Monte Carlo columns -------------------------------------------------------------

def test_kfac_tends_to_kflr():
    """KFAC's ``G`` replaces ``H_n`` by ``sum_v c_vn c_vn^T``: it tends to KFLR as ``M`` grows."""
    model, loss_fn, x, y = problem("mlp", "ce_mean")
    kflr = br.kflr_factors(model, loss_fn, x, y)
    cols = br.mc_columns(loss_fn, model(x).detach(), mc_samples=20000, seed=0)
    kfac = br.kfac_factors(model, loss_fn, x, y, cols)
    for name in kflr:
        assert rel_error(kfac[name][0], kflr[name][0]) < 0.05, name
        if name.endswith("weight"):
            assert rel_error(kfac[name][1], kflr[name][1]) < RTOL, name  # A is not sampled


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.l0, self.l1, self.act, self.l2 = nn.Linear(4, 4), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)

    def forward(self, x):
        h = self.l0(x)
        return self.l2(h + self.act(self.l1(h)))


@needs_backpack
@pytest.mark.parametrize("loss", ["ce_mean", "mse_sum"])
def test_kfac_on_a_residual_net(loss):
    """KFAC is the one Kronecker extension that takes branching (``extend(..., use_converter=True)``;
    backpropagated columns are added): it equals the formula with the true ``J_n`` of each layer."""
    torch.manual_seed(0)
    model = Residual().to(torch.float64)
    loss_fn = LOSSES[loss]()
    x = torch.randn(4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (4,)) if loss.startswith("ce") else torch.randn(4, 3, dtype=torch.float64)
    bp = br.run_backpack(model, loss_fn, x, y, "kfac", mc_samples=MC_SAMPLES, seed=SEED, use_converter=True)
    cols = br.mc_columns(loss_fn, model(x).detach(), MC_SAMPLES, seed=SEED)
    assert_same(bp, br.kfac_factors(model, loss_fn, x, y, cols), f"kfac residual {loss}")


# ---- 3. identities against torch.func ---------------------------------------------------------

@pytest.mark.parametrize("source", SOURCE_PARAMS)
@pytest.mark.parametrize("repeat", [False, True], ids=["N=1", "N=3_copies"])
@pytest.mark.parametrize("loss", LOSSES)
def test_exact_blocks_for_one_sample(loss, repeat, source):
    """For one sample (or ``N`` copies of it, which pins where ``1/N`` goes for "mean" and "sum"):
    KFLR and KFRA give the exact GGN blocks and HBP ``"hessian"`` the exact Hessian blocks of every
    Linear weight and bias of an MLP (Botev App. C.4; HBP S.8c, S.11)."""
    n = 3 if repeat else 1
    model, loss_fn, x, y = problem("mlp", loss, n=n, repeat=repeat)
    ggn, hess = exact_curvature("mlp", loss, n, repeat)
    get = SOURCES[source]
    for quantity, exact in [("kflr", ggn), ("kfra", ggn), ("hessian", hess)]:
        errs = block_errors(get(quantity, model, loss_fn, x, y), exact)
        assert max(errs.values()) < RTOL, (quantity, errs)


@pytest.mark.parametrize("source", SOURCE_PARAMS)
@pytest.mark.parametrize("loss", LOSSES)
def test_exact_blocks_for_many_samples(loss, source):
    """For ``N > 1`` (the CNN: conv 0, conv 3 (no bias), linear 6, sigmoid, linear 8):

    * KFLR's bias factor is the exact GGN bias block of *every* layer (conv included: ``J_n``
      summed over the positions, HBP D.4); KFRA's / HBP's only of the last layer (the batch averages
      in between are approximations);
    * with squared error (a constant loss Hessian ``H_n = H``) also the last weight block is exact
      (``sum_n H (x) x_n x_n^T = N H (x) mean_n x_n x_n^T``) and so is KFRA's / HBP's bias block
      right below the last activation (``M = N H`` makes the average a sum);
    * every other block is off.
    """
    model, loss_fn, x, y = problem("cnn", loss)
    ggn, hess = exact_curvature("cnn", loss)
    mse = loss.startswith("mse")
    expected = {
        "kflr": (ggn, {"0.bias", "6.bias", "8.bias"} | ({"8.weight"} if mse else set())),
        "kfra": (ggn, {"8.bias"} | ({"8.weight", "6.bias"} if mse else set())),
        "hessian": (hess, {"8.bias"} | ({"8.weight", "6.bias"} if mse else set())),
    }
    for quantity, (exact, exact_names) in expected.items():
        errs = block_errors(SOURCES[source](quantity, model, loss_fn, x, y), exact)
        assert {k for k, e in errs.items() if e < RTOL} == exact_names, (quantity, errs)
        assert all(e > 1e-5 for k, e in errs.items() if k not in exact_names), (quantity, errs)


@pytest.mark.parametrize("source", SOURCE_PARAMS)
def test_conv_weight_is_not_exact_for_one_sample(source):
    """A convolution's weight block is not a Kronecker product even for ``N = 1`` (weight sharing,
    HBP D.4 "Discussion"). BackPACK's ``kron(G, A)`` (``G`` the bias GGN, ``A`` the patches summed
    over the ``P`` positions) is far off for conv 0 (``P = 16``: its trace is ~``P`` times the exact
    block's; Grosse & Martens' KFC divides ``G`` by ``P``, BackPACK does not); conv 3 has ``P = 1``
    (a Linear on one patch) and is exact, like every bias."""
    model, loss_fn, x, y = problem("cnn", "ce_sum", n=1)
    ggn, _ = exact_curvature("cnn", "ce_sum", 1)
    for quantity in ("kflr", "kfra"):
        factors = SOURCES[source](quantity, model, loss_fn, x, y)
        errs = block_errors(factors, ggn)
        assert errs["0.weight"] > 1.0, (quantity, errs)
        assert all(e < RTOL for k, e in errs.items() if k != "0.weight"), (quantity, errs)
        trace_ratio = (torch.trace(br.kron_block(factors["0.weight"])) / torch.trace(ggn["0.weight"])).item()
        assert 8 < trace_ratio < 32, (quantity, trace_ratio)


def test_kflr_formula_on_a_residual_net_has_exact_biases():
    """The formula's ``G = sum_n J_n^T H_n J_n`` uses the true Jacobians, so it needs no Sequential:
    on a residual net every bias factor is still the exact GGN bias block (where BackPACK's KFLR
    refuses: no accumulation rule for branches)."""
    torch.manual_seed(0)
    model = Residual().to(torch.float64)
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.randint(0, 3, (4,))
    ggn = reference.diagonal_blocks(reference.ggn(model, loss_fn, x, y), model)
    errs = block_errors(br.kflr_factors(model, loss_fn, x, y), ggn)
    assert all(errs[k] < RTOL for k in errs if k.endswith("bias")), errs


# ---- 4. what BackPACK refuses -----------------------------------------------------------------

def _raw_backpack(model, loss_fn, x, y, quantity, **kw):
    """BackPACK without run_backpack's float64 default dtype."""
    from backpack import backpack as bp_ctx
    from backpack import extend

    net, lossf = extend(copy.deepcopy(model)), extend(copy.deepcopy(loss_fn))
    loss = lossf(net(x), y)
    with warnings.catch_warnings(), bp_ctx(br.make_extension(quantity, **kw)):
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        loss.backward()


class FunctionalTanh(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


def _mlp_with(act):
    return nn.Sequential(nn.Linear(4, 5), act, nn.Linear(5, 3)).to(torch.float64)


# the cases build their tensors when they run (not at import: under --device cuda, tensors created at
# collection would land on the GPU)
def x4():
    return torch.randn(3, 4, dtype=torch.float64)


def xc():
    return torch.randn(3, 2, 4, 4, dtype=torch.float64)


def y3():
    return torch.tensor([0, 2, 1])


def _twice(layer):
    return nn.Sequential(layer, nn.Tanh(), layer)


CE = nn.CrossEntropyLoss()
REFUSALS = {
    # activations: only ReLU, Sigmoid, Tanh (plus Dropout, Flatten, pooling, ZeroPad2d, Identity)
    **{f"{act.__name__}_{q}": (lambda act=act, q=q: br.run_backpack(_mlp_with(act()), CE, x4(), y3(), q),
                               NotImplementedError, f"does not have an extension for Module.*{act.__name__}")
       for act in (nn.ELU, nn.LeakyReLU, nn.Softplus, nn.SiLU, nn.GELU) for q in ("kflr", "kfra")},
    "identity_kfra": (lambda: br.run_backpack(_mlp_with(nn.Identity()), CE, x4(), y3(), "kfra"), NotImplementedError,
                      None),  # Identity is a ScaleModule, which has no EA rule (bare NotImplementedError)
    # branching: without the converter the custom module has no extension; with it, only KFAC works
    **{f"residual_{q}": (lambda q=q: br.run_backpack(Residual(), CE, x4(), y3(), q), NotImplementedError,
                         "does not have an extension for Module") for q in ("kflr", "kfra", "hbp")},
    "residual_converter_kflr": (lambda: br.run_backpack(Residual(), CE, x4(), y3(), "kflr", use_converter=True),
                                NotImplementedError, "No accumulation rule"),
    **{f"residual_converter_{q}": (lambda q=q: br.run_backpack(Residual(), CE, x4(), y3(), q, use_converter=True),
                                   NotImplementedError, None) for q in ("kfra", "hbp")},  # SumModule: no EA rule
    "functional_tanh_converter_kfra": (lambda: br.run_backpack(FunctionalTanh(), CE, x4(), y3(), "kfra",
                                                               use_converter=True),
                                       AssertionError, "expects a backpropagation quantity"),
    "shared_linear_kflr": (lambda: br.run_backpack(_twice(nn.Linear(3, 3)), CE, x4()[:, :3], y3(),
                                                   "kflr"), AttributeError, "output"),
    # HBP's residual of an activation after a convolution is [C, H, W], not a vector
    **{f"conv_sigmoid_hbp_{c}": (lambda c=c: br.run_backpack(
        nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Sigmoid(), nn.Flatten(), nn.Linear(48, 3)), CE, xc(), y3(),
        "hbp", curv_type=c), AssertionError, None) for c in ("hessian", "pch-abs")},
    "linear_3d_input": (lambda: br.run_backpack(nn.Sequential(nn.Linear(4, 3), nn.Flatten(), nn.Linear(6, 3)), CE,
                                                torch.randn(3, 2, 4), y3(), "kflr"),
                        NotImplementedError, "Only 2d inputs"),
    "conv_groups": (lambda: br.run_backpack(nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten(), nn.Linear(8, 3)),
                                            CE, xc(), y3(), "kflr"), NotImplementedError, "groups"),
    "batchnorm": (lambda: br.run_backpack(nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)), CE, x4(),
                                          y3(), "kflr"), NotImplementedError, "BatchNorm1d"),
    "ce_class_weights": (lambda: br.run_backpack(_mlp_with(nn.Tanh()), nn.CrossEntropyLoss(weight=torch.ones(3)), x4(),
                                                 y3(), "kflr"), NotImplementedError, "weight"),
    "huber_loss": (lambda: br.run_backpack(_mlp_with(nn.Tanh()), nn.HuberLoss(), x4(), torch.randn(3, 3), "kflr"),
                   NotImplementedError, "HuberLoss"),
    # MSELoss's summed Hessian (KFRA/HBP) is torch.eye in the default dtype: float64 nets fail
    # unless float64 is the default dtype (what run_backpack does)
    "mse_float64_kfra": (lambda: _raw_backpack(_mlp_with(nn.Tanh()), nn.MSELoss(), x4(), torch.randn(3, 3,
                                               dtype=torch.float64), "kfra"),
                         RuntimeError, "expected scalar type Double but found Float"),
}


@needs_backpack
@pytest.mark.filterwarnings("ignore:Encountered node that may break second-order extensions")
@pytest.mark.parametrize("case", REFUSALS)
def test_backpack_refuses(case):
    """What BackPACK (1.7.1) raises; fxcurv will have to say its own error or compute these."""
    run, error, match = REFUSALS[case]
    with pytest.raises(error, match=match):
        run()
