"""The loss rules answer for the inputs of every call, or say why they cannot.

Regression tests of the issue "Trust: the engine always answers for the model as it is now, or says
why it cannot", loss cases: a loss coupling samples other than sample 0, Huber-like losses (selectors,
torch ops without forward-mode derivatives), cross-entropy on ``[N, C, d1, ...]`` outputs, empty
batches, NaN inputs with Monte Carlo factors, out-of-range class targets on later calls, and a
single class. Rules are compared with torch.func in float64 (relative error < 1e-10), programs with
the torch.func references of ``tests/reference.py`` (< 1e-6 via ``helpers``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcurv
import reference
from fxcurv.errors import LossError
from fxcurv.rules import losses as L
from helpers import assert_close, check_against_references, rel_error

DTYPE = torch.float64
N, C = 5, 4


# ---- helpers ------------------------------------------------------------------------------------

def autodiff(loss_fn, f, reverse: bool = False):
    """``(grad, blocks [N, D, D], off-diagonal part [N, D, N, D])`` of ``loss_fn(f)`` by torch.func
    (``jacrev(jacrev)`` where ``reverse``, for ops without forward-mode derivatives)."""
    n, d = f.shape[0], f[0].numel()
    grad = torch.func.grad(loss_fn)(f)
    hess = torch.func.jacrev(torch.func.jacrev(loss_fn))(f) if reverse else torch.func.hessian(loss_fn)(f)
    h = hess.reshape(n, d, n, d)
    blocks = torch.stack([h[i, :, i, :] for i in range(n)])
    off = h.clone()
    for i in range(n):
        off[i, :, i, :] = 0
    return grad, blocks, off


def factor_blocks(s, sign, n):
    """``sum_k sign[k, n] S[k, n] S[k, n]^T`` for every ``n``: ``[N, D, D]``."""
    s = s.reshape(s.shape[0], n, -1)
    if sign is None:
        sign = torch.ones(s.shape[:2], dtype=s.dtype)
    return torch.einsum("kn,kni,knj->nij", sign.to(s.dtype), s, s)


def mlp(d_out=C, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, d_out)).to(DTYPE)


def general_loss_node(engine):
    return next(n for n in engine.graph_module.graph.nodes if n.target is L.general_loss)


# ---- 1. losses that couple samples --------------------------------------------------------------

@pytest.mark.parametrize("pair", [(1, 2), (3, 4), (0, 4)])
def test_coupling_between_any_two_samples_is_refused(pair):
    """The check probes every sample, not only sample 0 (which this coupling may leave out)."""
    a, b = pair

    def loss(f, y):
        return (f[a] * f[b]).sum() + F.cross_entropy(f, y)

    x = torch.randn(N, 3, dtype=DTYPE)
    y = torch.arange(N) % C
    with pytest.raises(LossError) as exc:
        fxcurv.compile(mlp(), loss, quantities=("diag_ggn",))(x, y)
    assert "couples samples" in str(exc.value) and "per-sample" in str(exc.value)


@pytest.mark.parametrize("hvp", L.HVP_MODES)
def test_per_sample_hessians_refuse_a_coupling_whose_block_row_sums_vanish(hvp):
    """``(f_1 - f_2)^2`` has ``H_11 + H_12 = 0``: the unit-vector products alone see nothing."""
    f = torch.randn(N, C, dtype=DTYPE)

    def loss(z, y):
        return ((z[1] - z[2]) ** 2).sum() + 0.5 * (z ** 2).sum()

    with pytest.raises(LossError, match="couples samples"):
        L.per_sample_hessians(loss, f, None, hvp)


def test_a_coupling_that_appears_at_a_later_call_is_refused_then():
    """The check runs at every call, on that call's inputs: the coupling weight ``y[0, 0]`` is zero
    at the first call (the numbers are exact: the loss is separable there) and one at the second."""

    def loss(f, y):
        return ((f - y) ** 2).mean() + y[0, 0] * (f[2] * f[3]).sum()

    model = mlp()
    x = torch.randn(N, 3, dtype=DTYPE)
    y = torch.randn(N, C, dtype=DTYPE)
    y[0, 0] = 0.0
    engine = fxcurv.compile(model, loss, quantities=("diag_ggn", "diag_hessian"))
    out = engine(x, y)
    assert_close(out["diag_ggn"], reference.diag_ggn(model, loss, x, y), what="diag_ggn")
    assert_close(out["diag_hessian"], reference.diag_hessian(model, loss, x, y), what="diag_hessian")
    y2 = y.clone()
    y2[0, 0] = 1.0
    with pytest.raises(LossError, match="couples samples"):
        engine(x, y2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_separable_losses_pass_the_check_in_every_dtype(dtype):
    """No false alarm from rounding: 128 samples, float32 included."""
    g = torch.Generator().manual_seed(4)
    f = 3 * torch.randn(128, 10, generator=g).to(dtype)
    y = torch.randint(0, 10, (128,), generator=g)
    for loss in (lambda z, t: F.cross_entropy(z, t) + (z ** 2).mean(),
                 lambda z, t: torch.logsumexp(10 * z, 1).sum(),
                 lambda z, t: F.cross_entropy(z, t, weight=torch.linspace(0.5, 3, 10, dtype=dtype))):
        L.per_sample_hessians(loss, f, y)


def test_the_probe_leaves_the_global_random_state_alone():
    f, y = torch.randn(N, C, dtype=DTYPE), torch.arange(N) % C
    state = torch.get_rng_state()
    L.per_sample_hessians(lambda z, t: F.cross_entropy(z, t) + (z ** 4).mean(), f, y)
    assert torch.equal(state, torch.get_rng_state())


# ---- 2. Huber-like losses -----------------------------------------------------------------------

def huber_where(delta=1.0, reduction="mean"):
    """The Huber loss written with a comparison as the branch selector (reference form)."""

    def loss(f, y):
        d = f - y
        h = torch.where(d.abs() < delta, 0.5 * d ** 2, delta * (d.abs() - 0.5 * delta))
        return h.mean() if reduction == "mean" else h.sum()

    return loss


def huber_data():
    """Residuals on both sides of ``delta = 1`` and of ``beta = 0.5``."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 3, dtype=DTYPE, generator=g)
    y = 2.5 * torch.randn(6, C, dtype=DTYPE, generator=g)
    return x, y


def test_huber_written_with_where_is_exact():
    model = mlp()
    x, y = huber_data()
    d = (model(x) - y).abs()
    assert (d < 1).any() and (d > 1).any()
    check_against_references(model, huber_where(), x, y)


# Selectors other than torch.where's condition; each loss equals the Huber loss with delta = 1.
SELECTOR_FORMS = {
    "method_where": lambda f, y: (0.5 * (f - y) ** 2).where((f - y).abs() < 1, (f - y).abs() - 0.5).mean(),
    "masked_fill": lambda f, y: ((0.5 * (f - y) ** 2).masked_fill((f - y).abs() >= 1, 0.0)
                                 + ((f - y).abs() - 0.5).masked_fill((f - y).abs() < 1, 0.0)).mean(),
    "mask_product": lambda f, y: (((f - y).abs() < 1).to(f.dtype) * 0.5 * (f - y) ** 2
                                  + ((f - y).abs() >= 1).to(f.dtype) * ((f - y).abs() - 0.5)).mean(),
    "logical_and": lambda f, y: torch.where(((f - y) < 1) & ((f - y) > -1), 0.5 * (f - y) ** 2,
                                            (f - y).abs() - 0.5).mean(),
    "boolean_index": lambda f, y: ((0.5 * (f - y) ** 2)[(f - y).abs() < 1].sum()
                                   + ((f - y).abs() - 0.5)[(f - y).abs() >= 1].sum()) / (f.shape[0] * f.shape[1]),
}


@pytest.mark.parametrize("form", list(SELECTOR_FORMS))
def test_selectors_are_accepted_and_exact(form):
    model = mlp()
    x, y = huber_data()
    loss = SELECTOR_FORMS[form]
    with torch.no_grad():
        assert abs(loss(model(x), y) - huber_where()(model(x), y)) < 1e-12
    check_against_references(model, loss, x, y)


@pytest.mark.parametrize("loss, node", [
    (lambda f, y: (f > 0).to(f.dtype).sum() + (f ** 2).mean(), "'gt'"),
    (lambda f, y: torch.where(f > y, 1.0, 0.0).mean() + (f ** 2).mean(), "'gt'"),
    (lambda f, y: ((f < 0) + f).pow(2).mean(), "'lt'"),
    (lambda f, y: (f * (f > 0)).sum() + (f.gt(0).to(f.dtype) * 2.0).sum(), "'gt_1'"),
], ids=["mask summed", "where of constants summed", "mask added", "scaled mask summed"])
def test_a_comparison_used_as_a_value_is_refused(loss, node):
    """A selector whose value (not its choice) reaches the loss: the loss is piecewise constant
    there, its Hessian meaningless; the error names the comparison and says what selectors may do."""
    with pytest.raises(LossError) as exc:
        fxcurv.compile(mlp(), loss, quantities=("diag_ggn",))(torch.randn(N, 3, dtype=DTYPE),
                                                               torch.randn(N, C, dtype=DTYPE))
    msg = str(exc.value)
    assert f"loss node {node}" in msg and "used as a value" in msg and "torch.where's condition" in msg


# torch's Huber-like losses, each with its form written with torch.where (the reference: torch has
# no forward-mode derivative of huber_loss_backward, so torch.func.hessian cannot take F.huber_loss).
HUBER_LIKE = {
    "F.huber_loss": (lambda f, y: F.huber_loss(f, y, delta=0.7), huber_where(0.7)),
    "nn.HuberLoss(sum)": (nn.HuberLoss(reduction="sum", delta=1.5), huber_where(1.5, "sum")),
    "F.smooth_l1_loss": (lambda f, y: F.smooth_l1_loss(f, y, beta=0.5),
                         lambda f, y: huber_where(0.5)(f, y) / 0.5),
    "nn.SmoothL1Loss": (nn.SmoothL1Loss(), huber_where(1.0)),
}


@pytest.mark.parametrize("name", list(HUBER_LIKE))
def test_torch_huber_losses_take_the_general_path(name):
    loss, same = HUBER_LIKE[name]
    model = mlp()
    x, y = huber_data()
    engine = fxcurv.compile(model, loss, quantities=("diag_ggn", "diag_hessian", "hesscale"))
    out = engine(x, y)
    with torch.no_grad():
        assert abs(out.loss - loss(model(x), y)) < 1e-12
        assert abs(out.loss - same(model(x), y)) < 1e-12
    assert_close(out.grad, reference.grad(model, same, x, y), what="grad")
    assert_close(out["diag_ggn"], reference.diag_ggn(model, same, x, y), what="diag_ggn")
    assert_close(out["diag_hessian"], reference.diag_hessian(model, same, x, y), what="diag_hessian")
    # HesScale is exact at the last layer (HesScale Sec. 3).
    exact = reference.diag_hessian(model, same, x, y)
    assert_close({k: out["hesscale"][k] for k in ("2.weight", "2.bias")},
                 {k: exact[k] for k in ("2.weight", "2.bias")}, what="hesscale")
    expected_mode = "reverse" if name.startswith(("F.huber", "nn.Huber")) else "forward"
    assert general_loss_node(engine).kwargs["hvp"] == expected_mode


@pytest.mark.parametrize("loss", [huber_where(), lambda f, y: F.cross_entropy(f, y.argmax(1)) + (f ** 3).mean(),
                                  lambda f, y: F.huber_loss(f, y)], ids=["huber_where", "ce_cubic", "F.huber_loss"])
def test_both_hessian_vector_product_modes_give_the_blocks(loss):
    """Reverse-over-reverse equals forward-over-reverse where torch has both, and the torch.func
    blocks (``jacrev(jacrev)``) everywhere."""
    _, y = huber_data()
    f = 2 * torch.randn(6, C, dtype=DTYPE)
    _, blocks, off = autodiff(lambda z: loss(z, y), f, reverse=True)
    assert off.abs().max() == 0
    reverse = L.per_sample_hessians(loss, f, y, "reverse")
    assert rel_error(reverse, blocks) < 1e-10
    if L.hvp_mode(loss, f, y) == "forward":
        assert rel_error(L.per_sample_hessians(loss, f, y, "forward"), reverse) < 1e-12
    else:
        with pytest.raises(NotImplementedError):
            L.per_sample_hessians(loss, f, y, "forward")
