"""Binary cross-entropy with logits and NLLLoss (fxcurv.rules.losses) against torch.func, then end to
end against tests/reference.py and BackPACK; BackPACK agreement for cross-entropy on ``[N, C, H, W]``.

As in tests/rules/test_losses.py: the rule's gradient is ``torch.func.grad`` of the loss w.r.t. the
model output ``f``; its square-root factor gives ``sum_k S_k S_k^T = d2L/df_n^2`` per sample; its
Hessian diagonal is the diagonal of those blocks (float64, relative error < 1e-10).
"""

from __future__ import annotations

import warnings

import backpack_reference as bp
import pytest
import reference
import torch
import torch.nn.functional as F
from helpers import assert_close, check_against_references, check_hesscale_exact_at_last_layer, rel_error
from test_losses import autodiff, check_rules, factor_blocks
from torch import nn

import fxcurv
from fxcurv.data import LossReduction, LossScale
from fxcurv.errors import InputError, UnsupportedOpError
from fxcurv.rules import losses as L
from fxcurv.rules import registry

DTYPE = torch.float64
N, C = 5, 4


def draws(t: torch.Tensor, seed: int) -> torch.Generator:
    return torch.Generator(device=t.device).manual_seed(seed)


# ---- BCEWithLogitsLoss: rules -------------------------------------------------------------------

def _bce_targets(kind: str, shape, g: torch.Generator) -> torch.Tensor:
    if kind == "binary":
        return torch.randint(0, 2, shape, generator=g).to(DTYPE)
    return torch.rand(shape, dtype=DTYPE, generator=g)  # soft labels in [0, 1)


BCE_SHAPES = [(N, 1), (N, C), (3, 2, 3)]


@pytest.mark.parametrize("targets", ["binary", "soft"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shape", BCE_SHAPES, ids=["N1", "NC", "N23"])
def test_bce_rules(shape, reduction, targets):
    g = torch.Generator().manual_seed(11)
    f = 3 * torch.randn(shape, dtype=DTYPE, generator=g)
    y = _bce_targets(targets, shape, g)

    def loss_fn(z):
        return F.binary_cross_entropy_with_logits(z, y, reduction=reduction)

    probs = L.bce_probs(f)
    grad = L.bce_grad(probs, y, reduction=reduction)
    s, sign = L.bce_sqrt_hessian(probs, reduction=reduction)
    d = f[0].numel()
    assert sign is None and s.shape == (d,) + tuple(shape)
    assert L.bce.sqrt_columns is None  # the default: one column per output entry
    diag = L.bce_hessian_diag(probs, reduction=reduction)
    check_rules(grad, s, sign, diag, loss_fn, f)
    # The Hessian does not depend on the targets.
    _, other = autodiff(lambda z: F.binary_cross_entropy_with_logits(z, 1 - y, reduction=reduction), f)
    assert rel_error(factor_blocks(s, None, shape[0]), other) < 1e-10


def test_bce_mc_columns_are_probabilities_minus_bernoulli_draws():
    """Every Monte Carlo column is ``(s - b) sqrt(w / K)`` with ``b`` in ``{0, 1}``."""
    f = torch.randn(N, C, dtype=DTYPE)
    probs, k = L.bce_probs(f), 6
    s = L.bce_sqrt_hessian_mc(probs, reduction="sum", mc_samples=k, generator=draws(f, 0))
    assert s.shape == (k, N, C)
    b = probs.unsqueeze(0) - s * k ** 0.5
    assert torch.allclose(b, b.round(), atol=1e-12) and set(b.round().unique().tolist()) <= {0.0, 1.0}


def test_bce_mc_factor_is_unbiased():
    """``E[S S^T] = w diag(s (1 - s))``: the mean over 20,000 draws lies within 5 standard errors
    (from 40 batches of 500) of torch.func's blocks, entry by entry, off-diagonal entries included."""
    g = torch.Generator().manual_seed(12)
    f = torch.randn(2, 3, dtype=DTYPE, generator=g)
    y = _bce_targets("binary", (2, 3), g)
    probs = L.bce_probs(f)
    _, blocks = autodiff(lambda z: F.binary_cross_entropy_with_logits(z, y), f)
    gen = draws(f, 0)
    estimates = torch.stack([
        factor_blocks(L.bce_sqrt_hessian_mc(probs, reduction="mean", mc_samples=500, generator=gen), None, 2)
        for _ in range(40)])
    mean, se = estimates.mean(0), estimates.std(0) / 40 ** 0.5
    assert (se > 0).all()
    assert ((mean - blocks).abs() < 5 * se).all()
    assert (blocks == 0).any()  # the off-diagonal entries are tested too


def test_bce_mc_propagates_nan():
    f = torch.randn(3, 2, dtype=DTYPE)
    f[1, 0] = torch.nan
    s = L.bce_sqrt_hessian_mc(L.bce_probs(f), reduction="mean", mc_samples=4, generator=draws(f, 0))
    assert s[:, 1, 0].isnan().all() and not s[:, [0, 2]].isnan().any() and not s[:, 1, 1].isnan().any()


@pytest.mark.parametrize("y, phrase", [
    (torch.zeros(N, 2, dtype=DTYPE), "shape (5, 3)"),
    (torch.zeros(N, 3, dtype=torch.long), "float targets in [0, 1]"),
    (torch.zeros(N, 3, dtype=torch.float32), "dtype torch.float32"),
    (torch.tensor([[0.5] * 3] * 2 + [[0.5, 1.5, 0.5]] + [[0.5] * 3] * 2, dtype=DTYPE), "y[2, 1] = 1.5"),
    (torch.full((N, 3), torch.nan, dtype=DTYPE), "probabilities in [0, 1]"),
], ids=["shape", "int", "dtype", "range", "nan"])
def test_bce_check_refuses_bad_targets(y, phrase):
    with pytest.raises(InputError, match="target y") as exc:
        L.bce.check((N, 3), DTYPE, y, reduction="mean")
    assert phrase in str(exc.value)


def test_bce_scale():
    y = torch.zeros(N, 3, dtype=DTYPE)
    assert L.bce.scale((N, 3), y, reduction="mean") == LossScale(LossReduction.MEAN, N * 3)
    assert L.bce.scale((N, 3), y, reduction="sum") == LossScale(LossReduction.SUM)


# ---- BCEWithLogitsLoss: end to end --------------------------------------------------------------

def mlp(d_out: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, d_out)).to(DTYPE)


@pytest.mark.parametrize("loss_fn, d_out", [
    (nn.BCEWithLogitsLoss(), 1),
    (nn.BCEWithLogitsLoss(reduction="sum"), 3),
    (lambda f, y: F.binary_cross_entropy_with_logits(f, y), 3),
], ids=["mean_N1", "sum_N3", "functional"])
def test_bce_end_to_end(loss_fn, d_out):
    model = mlp(d_out)
    g = torch.Generator().manual_seed(13)
    x = 2 * torch.randn(6, 3, dtype=DTYPE, generator=g)
    y = torch.rand(6, d_out, dtype=DTYPE, generator=g)
    engine = fxcurv.compile(model, loss_fn, quantities=("diag_ggn", "diag_hessian"))
    out = engine(x, y)
    listing = str(engine.graph)
    assert "bce_with_logits" in listing and "general_loss" not in listing
    assert_close(out.grad, reference.grad(model, loss_fn, x, y), what="grad")
    assert_close(out["diag_ggn"], reference.diag_ggn(model, loss_fn, x, y), what="diag_ggn")
    assert_close(out["diag_hessian"], reference.diag_hessian(model, loss_fn, x, y), what="diag_hessian")
    # HesScale is exact at the last layer (HesScale paper), from the loss's exact Hessian diagonal.
    check_hesscale_exact_at_last_layer(model, loss_fn, x, y, "hesscale", ("2.weight", "2.bias"))


@pytest.mark.parametrize("loss_fn", [
    nn.BCEWithLogitsLoss(pos_weight=torch.tensor([2.0, 0.5, 1.0], dtype=DTYPE)),
    nn.BCEWithLogitsLoss(weight=torch.tensor([0.3, 1.0, 2.0], dtype=DTYPE), reduction="sum"),
], ids=["pos_weight", "weight"])
def test_bce_weights_take_the_general_path(loss_fn):
    model = mlp(3)
    x = torch.randn(4, 3, dtype=DTYPE)
    y = torch.randint(0, 2, (4, 3)).to(DTYPE)
    engine = fxcurv.compile(model, loss_fn, quantities=("diag_ggn", "diag_hessian"))
    engine(x, y)
    assert "general_loss" in str(engine.graph)
    check_against_references(model, loss_fn, x, y)


def test_bce_end_to_end_mc_is_unbiased():
    """``diag_ggn_mc`` converges to ``diag_ggn`` (mean of 20 calls of 200 draws within 5 standard
    errors per entry)."""
    model = mlp(3)
    x = torch.randn(4, 3, dtype=DTYPE)
    y = torch.randint(0, 2, (4, 3)).to(DTYPE)
    loss_fn = nn.BCEWithLogitsLoss()
    exact = reference.diag_ggn(model, loss_fn, x, y)
    engine = fxcurv.compile(model, loss_fn, quantities=("diag_ggn_mc",), mc_samples=200, seed=0)
    runs = [engine(x, y)["diag_ggn_mc"] for _ in range(20)]
    for k, e in exact.items():
        stack = torch.stack([r[k] for r in runs])
        se = stack.std(0) / 20 ** 0.5
        assert ((stack.mean(0) - e).abs() < 5 * se + 1e-15).all(), k


def test_bce_bad_target_on_a_later_call():
    model = mlp(2)
    engine = fxcurv.compile(model, nn.BCEWithLogitsLoss(), quantities=("diag_ggn",))
    x = torch.randn(3, 3, dtype=DTYPE)
    engine(x, torch.zeros(3, 2, dtype=DTYPE))
    with pytest.raises(InputError, match=r"y\[1, 0\] = 2.0"):
        engine(x, torch.tensor([[0.0, 1.0], [2.0, 0.0], [1.0, 1.0]], dtype=DTYPE))


# ---- NLLLoss ------------------------------------------------------------------------------------

@pytest.mark.parametrize("ignore", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shape", [(N, C), (3, C, 2, 3)], ids=["2d", "4d"])
def test_nll_rules(shape, reduction, ignore):
    g = torch.Generator().manual_seed(14)
    f = torch.log_softmax(torch.randn(shape, dtype=DTYPE, generator=g), 1)
    y = torch.randint(0, C, (shape[0],) + tuple(shape[2:]), generator=g)
    ignore_index = -100
    if ignore:
        ignore_index = 2
        y.view(-1)[::3] = 2

    def loss_fn(z):
        return F.nll_loss(z, y, reduction=reduction, ignore_index=ignore_index)

    weight = L.nll_sample_weight(f, y, reduction=reduction, ignore_index=ignore_index)
    grad = L.nll_grad(f, y, ignore_index=ignore_index, sample_weight=weight)
    s, sign = L.nll_sqrt_hessian(f)
    assert sign is None and s.shape == (0,) + tuple(shape) and L.nll.sqrt_columns(shape) == 0
    diag = L.nll_hessian_diag(f)
    exp_grad, blocks = autodiff(loss_fn, f)
    assert (blocks == 0).all()  # nll_loss is linear in its input
    assert rel_error(grad, exp_grad) < 1e-10 and exp_grad.abs().max() > 0
    assert (diag == 0).all() and diag.shape == f.shape
    mc = L.nll_sqrt_hessian_mc(f, mc_samples=3, generator=draws(f, 0))
    assert mc.shape == (3,) + tuple(shape) and (mc == 0).all()
    assert L.nll.scale(shape, y, reduction=reduction, ignore_index=ignore_index) == (
        LossScale(LossReduction.SUM) if reduction == "sum" else
        LossScale(LossReduction.MEAN, float((y != ignore_index).sum())))


@pytest.mark.parametrize("y, phrase", [
    (torch.zeros(N, dtype=torch.int32), "int64 class indices"),
    (torch.zeros(N, 2, dtype=torch.long), "expects shape (5,)"),
    (torch.tensor([0, 1, 4, 0, 0]), "class index 4"),
], ids=["dtype", "shape", "range"])
def test_nll_check_refuses_bad_targets(y, phrase):
    with pytest.raises(InputError, match="target y") as exc:
        L.nll.check((N, C), DTYPE, y, reduction="mean", ignore_index=-100)
    assert phrase in str(exc.value)


@pytest.mark.parametrize("loss_fn", [nn.NLLLoss(), nn.NLLLoss(reduction="sum", ignore_index=1),
                                     lambda f, y: F.nll_loss(f, y)], ids=["mean", "sum_ignore", "functional"])
def test_nll_end_to_end(loss_fn):
    """NLLLoss on a model output: the GGN w.r.t. that output is zero (the loss is linear), the exact
    Hessian diagonal comes from the model's own curvature (tanh's residual)."""
    model = mlp(C)
    g = torch.Generator().manual_seed(15)
    x = 2 * torch.randn(6, 3, dtype=DTYPE, generator=g)
    y = torch.randint(0, C, (6,), generator=g)
    engine = fxcurv.compile(model, loss_fn, quantities=("diag_ggn", "diag_hessian"))
    out = engine(x, y)
    assert "nll_loss" in str(engine.graph) and "general_loss" not in str(engine.graph)
    assert_close(out.grad, reference.grad(model, loss_fn, x, y), what="grad")
    assert all((v == 0).all() for v in out["diag_ggn"].values())
    assert_close(out["diag_ggn"], reference.diag_ggn(model, loss_fn, x, y), what="diag_ggn")
    exact = reference.diag_hessian(model, loss_fn, x, y)
    assert exact["0.weight"].abs().max() > 0
    assert_close(out["diag_hessian"], exact, what="diag_hessian")


def test_nll_with_class_weights_takes_the_general_path():
    model = mlp(C)
    x, y = torch.randn(4, 3, dtype=DTYPE), torch.tensor([0, 3, 1, 1])
    loss_fn = nn.NLLLoss(weight=torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=DTYPE))
    engine = fxcurv.compile(model, loss_fn, quantities=("diag_hessian",))
    engine(x, y)
    assert "general_loss" in str(engine.graph)
    check_against_references(model, loss_fn, x, y, quantities=("diag_hessian",))


class LogSoftmaxNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = mlp(C)

    def forward(self, x):
        return F.log_softmax(self.body(x), dim=1)


def test_log_softmax_nll_hessian_equals_cross_entropy():
    """``log_softmax`` + ``NLLLoss`` is cross-entropy: the same loss, gradient and exact Hessian
    diagonal as ``CrossEntropyLoss`` on the logits (the GGN differs by convention: it is taken at the
    model output, the log-probabilities, where the loss is linear). Needs a rule for ``log_softmax``
    (the generic rule); skipped while the compiler refuses it."""
    model = LogSoftmaxNet()
    x, y = torch.randn(5, 3, dtype=DTYPE), torch.tensor([0, 3, 1, 1, 2])
    try:
        out = fxcurv.compile(model, nn.NLLLoss(), quantities=("diag_ggn", "diag_hessian"))(x, y)
    except UnsupportedOpError as err:
        assert "log_softmax" in str(err)
        pytest.skip("log_softmax has no rule yet (the generic rule takes it)")
    ce = fxcurv.compile(model.body, nn.CrossEntropyLoss(), quantities=("diag_ggn", "diag_hessian"))(x, y)
    assert_close({f"body.{k}": v for k, v in ce["diag_hessian"].items()}, out["diag_hessian"], what="diag_hessian")
    assert_close(out["diag_hessian"], reference.diag_hessian(model, nn.NLLLoss(), x, y), what="diag_hessian")
    assert all((v == 0).all() for v in out["diag_ggn"].values())


# ---- canonicalization ---------------------------------------------------------------------------

class _Node:
    def __init__(self, *args):
        self.args = args


@pytest.mark.parametrize("mod, op", [
    (nn.BCEWithLogitsLoss(), "bce_with_logits"), (nn.BCEWithLogitsLoss(pos_weight=torch.ones(3)), None),
    (nn.BCEWithLogitsLoss(weight=torch.ones(3)), None), (nn.NLLLoss(), "nll_loss"),
    (nn.NLLLoss(weight=torch.ones(3)), None),
], ids=["bce", "bce_pos_weight", "bce_weight", "nll", "nll_weight"])
def test_loss_canonicalizers(mod, op):
    """Weights are not in the closed forms: ``None`` sends the loss to the general path."""
    registered, canon = registry.MODULE_SOURCES[type(mod)]
    match = canon(_Node("f", "y"), mod)
    if op is None:
        assert match is None
    else:
        assert registry.matched_op(registered, match).name == op and match.inputs == {"f": "f", "y": "y"}


@pytest.mark.parametrize("mod", [nn.BCEWithLogitsLoss(reduction="none"), nn.NLLLoss(reduction="none")],
                         ids=["bce", "nll"])
def test_unreduced_losses_are_refused(mod):
    _, canon = registry.MODULE_SOURCES[type(mod)]
    with pytest.raises(UnsupportedOpError, match="reduction='none'"):
        canon(_Node("f", "y"), mod)


# ---- BackPACK ------------------------------------------------------------------------------------

def _backpack_diagonals(model, loss_fn, x, y):
    from backpack.extensions import DiagGGNExact, DiagHessian

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        return (bp.run_extension(model, loss_fn, x, y, DiagGGNExact()),
                bp.run_extension(model, loss_fn, x, y, DiagHessian()))


@pytest.mark.skipif(not bp.available(), reason=bp.SKIP_REASON)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bce_matches_backpack(reduction):
    """BackPACK 1.7 takes BCEWithLogitsLoss on ``[N, 1]`` outputs with binary targets (DiagGGNExact,
    DiagHessian, KFLR; its KFRA has no summed Hessian for it)."""
    model = mlp(1)
    x = torch.randn(6, 3, dtype=DTYPE)
    y = torch.randint(0, 2, (6, 1)).to(DTYPE)
    loss_fn = nn.BCEWithLogitsLoss(reduction=reduction)
    out = fxcurv.compile(model, loss_fn, quantities=("diag_ggn", "diag_hessian", "kflr"))(x, y)
    ggn, hess = _backpack_diagonals(model, loss_fn, x, y)
    assert_close(out["diag_ggn"], ggn, rtol=1e-10, what="diag_ggn vs BackPACK")
    assert_close(out["diag_hessian"], hess, rtol=1e-10, what="diag_hessian vs BackPACK")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        kflr = bp.run_backpack(model, loss_fn, x, y, "kflr")
    for name, factors in kflr.items():
        mine = out["kflr"][name].factors
        assert len(mine) == len(factors)
        for a, b in zip(mine, factors):
            assert a.shape == b.shape and rel_error(a, b) < 1e-10, f"kflr {name}"


@pytest.mark.skipif(not bp.available(), reason=bp.SKIP_REASON)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_segmentation_cross_entropy_matches_backpack(reduction):
    """Cross-entropy on ``[N, C, H, W]`` (one softmax per pixel) after convolutions."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 3, 1)).to(DTYPE)
    x = torch.randn(2, 2, 3, 3, dtype=DTYPE)
    y = torch.randint(0, 3, (2, 3, 3))
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    out = fxcurv.compile(model, loss_fn, quantities=("diag_ggn", "diag_hessian"))(x, y)
    ggn, hess = _backpack_diagonals(model, loss_fn, x, y)
    assert_close(out["diag_ggn"], ggn, rtol=1e-10, what="diag_ggn vs BackPACK")
    assert_close(out["diag_hessian"], hess, rtol=1e-10, what="diag_hessian vs BackPACK")
    # and both differ where tanh's residual enters
    assert rel_error(out["diag_hessian"]["0.weight"], out["diag_ggn"]["0.weight"]) > 1e-3


@pytest.mark.skipif(not bp.available(), reason=bp.SKIP_REASON)
def test_backpack_has_no_nllloss_extension():
    """The NLLLoss convention above has no BackPACK number to match: BackPACK 1.7 refuses NLLLoss
    (should a later version take it, this fails and a comparison belongs here)."""
    from backpack.extensions import DiagGGNExact

    model = nn.Sequential(nn.Linear(3, 4), nn.LogSoftmax(dim=1)).to(DTYPE)
    x, y = torch.randn(5, 3, dtype=DTYPE), torch.tensor([0, 3, 1, 1, 2])
    with pytest.raises(NotImplementedError, match="NLLLoss"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        bp.run_extension(model, nn.NLLLoss(), x, y, DiagGGNExact())
