"""Per-sample quantities against BackPACK and torch.func (float64).

* BackPACK (MLP and CNN; cross-entropy and squared error, mean and sum; N in {1, 3}): ``batch_grad``,
  ``batch_l2_grad``, ``sum_grad_squared``, ``variance``, ``batch_diag_ggn`` equal BatchGrad, BatchL2Grad,
  SumGradSquared, Variance, BatchDiagGGNExact; ``sqrt_ggn``'s per-sample ``V V^T`` equals SqrtGGNExact's
  (fxcurv's cross-entropy factor has ``C - 1`` columns, BackPACK's ``C``); ``sqrt_ggn_mc`` and
  ``batch_diag_ggn_mc`` equal SqrtGGNMC and BatchDiagGGNMC drawn from the same seed (fxcurv's generator,
  BackPACK's global one: the same ``torch.multinomial`` / ``torch.randn`` draws).
* torch.func (``tests/per_sample_reference.py``: ``vmap(grad)`` over samples, per-sample GGNs from
  ``jacrev`` and the loss Hessian) where BackPACK cannot run: residual connections, weights used by two
  ops, linear layers on ``[N, *mid, in]`` inputs.
* Structure: single-use linear and conv parameters never form ``[N, *param]`` for ``batch_l2_grad``,
  ``sum_grad_squared`` and ``variance``; the per-sample results sum to ``grad``, ``diag_ggn`` and
  ``diag_ggn_mc``; a parameter the loss does not reach gets zeros in each quantity's shape.
"""

from __future__ import annotations

import backpack_reference as bp
import per_sample_reference as ref
import pytest
import torch
import torch.nn.functional as F
from architectures import ConvResidual, ConvTwice, Residual, SharedTwice
from helpers import assert_close, rel_error
from reference import diagonal_blocks
from torch import nn

import fxcurv
from fxcurv.errors import LossError
from fxcurv.targets import target_info

DT = torch.float64
RTOL = 1e-9
MC_SAMPLES = 3
SEED = 11
# fxcurv's name -> BackPACK's extension (built with mc_samples where it takes them)
FIRST_ORDER = {"batch_grad": "BatchGrad", "batch_l2_grad": "BatchL2Grad", "sum_grad_squared": "SumGradSquared",
               "variance": "Variance"}
DIAGONALS = {"batch_diag_ggn": "BatchDiagGGNExact", "batch_diag_ggn_mc": "BatchDiagGGNMC"}
FACTORS = {"sqrt_ggn": "SqrtGGNExact", "sqrt_ggn_mc": "SqrtGGNMC"}
EXACT = ("batch_grad", "batch_l2_grad", "sum_grad_squared", "variance", "batch_diag_ggn", "sqrt_ggn")
EVERY = EXACT + ("batch_diag_ggn_mc", "sqrt_ggn_mc")
LOSSES = ["ce_mean", "ce_sum", "mse_mean", "mse_sum"]


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)


def cnn() -> nn.Sequential:
    torch.manual_seed(1)
    # the last convolution has one output position: batch_l2_grad takes the Gram route there, the
    # blocked products before
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 2, stride=2), nn.Sigmoid(),
                         nn.Conv2d(2, 4, 2), nn.Tanh(), nn.Flatten(), nn.Linear(4, 3)).to(DT)


def data(shape: tuple[int, ...], loss: str, n: int, classes: int = 3):
    g = torch.Generator().manual_seed(7 + n)
    x = torch.randn((n,) + shape, dtype=DT, generator=g)
    if loss.startswith("ce"):
        return nn.CrossEntropyLoss(reduction=loss[3:]), x, torch.randint(0, classes, (n,), generator=g)
    return nn.MSELoss(reduction=loss[4:]), x, torch.randn(n, classes, dtype=DT, generator=g)


def run(model, loss_fn, x, y, quantities=EVERY, **kw):
    engine = fxcurv.compile(model, loss_fn, quantities=quantities, mc_samples=MC_SAMPLES, **kw)
    return engine(x, y, generator=torch.Generator(device=x.device).manual_seed(SEED))


def sample_blocks(v: torch.Tensor) -> torch.Tensor:
    """``sum_k V_kn V_kn^T`` per sample, ``[N, p, p]``, from ``V [K, N, *param]``."""
    flat = v.flatten(2)
    return torch.einsum("knp,knq->npq", flat, flat)


def assert_variance(got: dict, want: dict, sum_grad_squared: dict, n: int, what: str) -> None:
    """Variances relative to the second moments ``sum_grad_squared / N`` they are differences of (with
    one sample, or equal per-sample gradients, the variance is zero up to their rounding)."""
    for name, e in want.items():
        assert got[name].shape == e.shape, f"{what} {name}"
        scale = max(e.abs().max().item(), sum_grad_squared[name].abs().max().item() / n)
        err = (got[name] - e).abs().max().item() / scale
        assert err < RTOL, f"{what} {name}: relative error {err:.3e}"


def assert_blocks(got: dict, want: dict, what: str) -> None:
    assert_close({k: sample_blocks(v) for k, v in got.items()}, want, rtol=RTOL, what=what)


def backpack(model, loss_fn, x, y, ext: str) -> dict:
    from backpack import extensions

    cls = getattr(extensions, ext)
    obj = cls(mc_samples=MC_SAMPLES) if ext.endswith("MC") else cls()
    return bp.run_extension(model, loss_fn, x, y, obj, seed=SEED)


# ---- BackPACK ---------------------------------------------------------------------------------------

NETS = {"mlp": (mlp, (5,)), "cnn": (cnn, (2, 4, 4))}


@pytest.mark.skipif(not bp.available(), reason=bp.SKIP_REASON)
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("net", sorted(NETS))
def test_equals_backpack(net, loss, n):
    build, shape = NETS[net]
    model = build()
    loss_fn, x, y = data(shape, loss, n)
    out = run(model, loss_fn, x, y)
    for q, ext in {**FIRST_ORDER, **DIAGONALS}.items():
        want = backpack(model, loss_fn, x, y, ext)
        if q == "variance":
            assert_variance(out[q], want, out["sum_grad_squared"], n, f"{q} {net} {loss}")
        else:
            assert_close(out[q], want, rtol=RTOL, what=f"{q} {net} {loss}")
    for q, ext in FACTORS.items():
        want = backpack(model, loss_fn, x, y, ext)
        for name, v in out[q].items():
            k = want[name].shape[0] - (1 if q == "sqrt_ggn" and loss.startswith("ce") else 0)
            assert v.shape == (k,) + tuple(want[name].shape[1:]), f"{q} {name}: {tuple(v.shape)}"
        assert_blocks(out[q], {k: sample_blocks(v) for k, v in want.items()}, f"{q} {net} {loss}")


@pytest.mark.skipif(not bp.available(), reason=bp.SKIP_REASON)
def test_monte_carlo_columns_are_backpack_s_draws():
    """With the same seed the Monte Carlo columns themselves agree (not only ``V V^T``)."""
    model = mlp()
    loss_fn, x, y = data((5,), "ce_mean", 3)
    out = run(model, loss_fn, x, y, quantities=("sqrt_ggn_mc",))
    assert_close(out["sqrt_ggn_mc"], backpack(model, loss_fn, x, y, "SqrtGGNMC"), rtol=RTOL, what="sqrt_ggn_mc")


# ---- torch.func, where BackPACK cannot run ----------------------------------------------------------

class ResidualTiedMLP(nn.Module):
    """A residual block, a weight used by two ops, and a weight used by two ops across a skip."""

    def __init__(self):
        super().__init__()
        self.inp, self.res, self.tied = nn.Linear(5, 4), Residual(4, "sigmoid"), SharedTwice(4, "tanh")
        self.skip, self.out = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = self.tied(self.res(torch.tanh(self.inp(x))))
        return self.out(h + F.softplus(self.skip(self.skip(h))))


class PositionsMLP(nn.Module):
    """Linear layers on ``[N, *mid, in]`` inputs: a sample's parameter gradient sums over ``mid``."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(5, 4), nn.Linear(4, 4), nn.Linear(12, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))  # [N, 3, 4]
        return self.c(torch.sigmoid(self.b(h)).flatten(1))


class ResidualTiedCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.res, self.tied = ConvResidual(4, "tanh"), ConvTwice(4, "softplus")
        self.grouped = nn.Conv2d(4, 4, 2, stride=2, groups=2)
        self.last = nn.Conv2d(4, 3, 2)  # one output position: the Gram route of batch_l2_grad
        self.out = nn.Linear(3, 3)

    def forward(self, x):
        h = self.tied(self.res(torch.sigmoid(self.conv(x))))
        return self.out(self.last(torch.tanh(self.grouped(h))).flatten(1))


GRAPHS = {"residual_tied_mlp": (ResidualTiedMLP, (5,)), "positions_mlp": (PositionsMLP, (3, 5)),
          "residual_tied_cnn": (ResidualTiedCNN, (2, 4, 4))}


def check_exact(model, loss_fn, x, y, **kw):
    out = run(model, loss_fn, x, y, quantities=EXACT, **kw)
    first = ref.first_order(model, loss_fn, x, y)
    for q, want in first.items():
        if q == "variance":
            assert_variance(out[q], want, first["sum_grad_squared"], x.shape[0], q)
        else:
            assert_close(out[q], want, rtol=RTOL, what=q)
    assert_close(out["batch_diag_ggn"], ref.batch_diag_ggn(model, loss_fn, x, y), rtol=RTOL, what="batch_diag_ggn")
    assert_blocks(out["sqrt_ggn"], diagonal_blocks(ref.per_sample_ggns(model, loss_fn, x, y), model), "sqrt_ggn")
    return out


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("loss", ["ce_mean", "mse_sum"])
@pytest.mark.parametrize("graph", sorted(GRAPHS))
def test_equals_torch_func(graph, loss, n):
    build, shape = GRAPHS[graph]
    torch.manual_seed(5)
    model = build().to(DT)
    check_exact(model, *data(shape, loss, n))


@pytest.mark.parametrize("backend", ["eager", "fused"])
@pytest.mark.parametrize("graph", ["residual_tied_mlp", "residual_tied_cnn"])
def test_backends_agree(graph, backend):
    build, shape = GRAPHS[graph]
    torch.manual_seed(6)
    model = build().to(DT)
    check_exact(model, *data(shape, "mse_mean", 3), backend=backend)


# ---- structure ------------------------------------------------------------------------------------

def _labels(engine) -> list[str]:
    labels = []
    for node in engine.graph_module.graph.nodes:
        if node.op == "call_function":
            labels.append(target_info(node.target).label)
            labels.extend(node.meta["fxcurv"].contains)
    return labels


@pytest.mark.parametrize("backend", ["eager", "fused"])
@pytest.mark.parametrize("net", sorted(NETS))
def test_norms_and_squares_never_form_per_sample_gradients(net, backend):
    """The Goodfellow / BackPACK route: ``batch_l2_grad``, ``sum_grad_squared`` and ``variance`` of
    single-use linear and conv parameters read ``g`` and the layer input, never ``[N, *param]``."""
    build, shape = NETS[net]
    model = build()
    loss_fn, x, y = data(shape, "ce_mean", 3)
    engine = fxcurv.compile(model, loss_fn, quantities=("batch_l2_grad", "sum_grad_squared", "variance"),
                            backend=backend)
    engine(x, y)
    labels = _labels(engine)
    assert not [lab for lab in labels if "per_sample" in lab], labels
    assert any("batch_l2" in lab for lab in labels)
    # fused: a convolution's gradient, squares and norms come from one pass over its per-sample products
    assert ("fused.sample_reductions" in labels) == (net == "cnn" and backend == "fused")


@pytest.mark.parametrize("case", ["grouped_strided", "one_position"])
def test_conv_sample_reductions_equal_the_rules(case, monkeypatch):
    """The fused node's function gives what the rules it replaces give (each tested against its generic
    derivation in tests/rules/test_generic.py), block by block down to one sample per block."""
    from fxcurv.rules import conv as conv_rules

    monkeypatch.setattr(conv_rules, "_SAMPLE_BLOCK_ELEMENTS", 1)
    torch.manual_seed(8)
    conv = (nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2) if case == "grouped_strided"
            else nn.Conv2d(2, 3, (4, 3))).to(DT)
    x = torch.randn(3, conv.in_channels, 5, 3 if case == "one_position" else 4, dtype=DT)
    ctx = dict(weight=conv.weight.detach(), stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
               groups=conv.groups)
    g = torch.randn_like(conv(x))
    cols = conv_rules.x_cols(x, **ctx)
    want = {"sum": conv_rules.grad_weight(g, x, **ctx),
            "squares": conv_rules.diag_sqrt_weight(g[None], None, cols, ctx["weight"], conv.groups),
            "norms": conv_rules.batch_l2_weight(g, cols, ctx["weight"], conv.groups)}
    # ("norms", "sum") with one output position takes the Gram route and the convolution's backward
    for reduces in (("sum", "squares", "norms"), ("norms", "sum"), ("squares", "sum")):
        got = conv_rules.sample_reductions(g, reduces, x, **ctx)
        for r, value in zip(reduces, got):
            assert value.shape == want[r].shape and rel_error(value, want[r]) < 1e-12, (reduces, r)


def test_per_sample_results_sum_to_the_batch_quantities():
    torch.manual_seed(2)
    model = ResidualTiedMLP().to(DT)
    loss_fn, x, y = data((5,), "ce_mean", 3)
    out = run(model, loss_fn, x, y, quantities=EVERY + ("diag_ggn", "diag_ggn_mc"))
    for name, g in out.grad.items():
        assert rel_error(out["batch_grad"][name].sum(0), g) < RTOL
        assert rel_error(out["batch_diag_ggn"][name].sum(0), out["diag_ggn"][name]) < RTOL
        assert rel_error(out["batch_diag_ggn_mc"][name].sum(0), out["diag_ggn_mc"][name]) < RTOL
        assert rel_error((out["sqrt_ggn_mc"][name] ** 2).sum(0), out["batch_diag_ggn_mc"][name]) < RTOL
        assert out["sqrt_ggn_mc"][name].shape == (MC_SAMPLES, 3) + tuple(g.shape)


class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        return self.used(x)


@pytest.mark.parametrize("loss", ["ce_mean", "mse_sum"])
def test_unreached_parameters_get_zeros(loss):
    torch.manual_seed(3)
    model = WithUnused().to(DT)
    loss_fn, x, y = data((4,), loss, 3)
    out = run(model, loss_fn, x, y)
    for q in EVERY:
        got, used = out[q]["unused.weight"], out[q]["used.weight"]
        assert got.shape == used.shape and (got == 0).all(), q
        assert got.dtype == used.dtype


def test_sqrt_ggn_of_a_general_loss():
    """A loss outside the closed forms has signed factors: a positive semi-definite one (class weights)
    gives V with V V^T its GGN; an indefinite one is refused at the call, naming the quantity."""
    torch.manual_seed(4)
    model = mlp()
    x = torch.randn(3, 5, dtype=DT)
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([0.5, 1.0, 2.0], dtype=DT))
    y = torch.tensor([0, 2, 1])
    out = run(model, weighted, x, y, quantities=("sqrt_ggn",))
    per_sample = ref.per_sample_ggns(model, nn.CrossEntropyLoss(weight=weighted.weight, reduction="sum"), x, y)
    # the weighted mean divides by the sum of the targets' weights, not by N
    scale = weighted.weight[y].sum()
    assert_blocks(out["sqrt_ggn"], {k: v / scale for k, v in diagonal_blocks(per_sample, model).items()}, "sqrt_ggn")

    def non_convex(f, t):
        return (torch.tanh(f - t) ** 2).sum()

    t = 2 * torch.randn(3, 3, dtype=DT)
    with pytest.raises(LossError, match=r"sqrt_ggn\[\d\.(weight|bias)\].*negative eigenvalue"):
        run(model, non_convex, 3 * x, t, quantities=("sqrt_ggn",))
