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
import reference
import torch
import torch.nn.functional as F
from helpers import assert_close, check_against_references, check_hesscale_exact_at_last_layer, rel_error
from torch import nn

import fxcurv
from fxcurv.errors import InputError, LossError
from fxcurv.rules import losses as L

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


def draws_for(t: torch.Tensor, seed: int) -> torch.Generator:
    """A generator for a Monte Carlo rule called on ``t``: on ``t``'s device, like the one the engine
    passes (the tests also run on CUDA tensors, ``pytest --device cuda``)."""
    return torch.Generator(device=t.device).manual_seed(seed)


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


# ---- 3. cross-entropy on [N, C, d1, ...] outputs ------------------------------------------------

def _seg_targets(kind: str, shape, g: torch.Generator):
    n, c, pos = shape[0], shape[1], tuple(shape[2:])
    if kind == "index":
        return torch.randint(0, c, (n,) + pos, generator=g), -100
    if kind == "ignored":
        y = torch.randint(0, c, (n,) + pos, generator=g)
        y.view(-1)[::3] = 2
        return y, 2
    if kind == "ignored_default":
        y = torch.randint(0, c, (n,) + pos, generator=g)
        y.view(-1)[1::4] = -100
        return y, -100
    if kind == "probs":
        return torch.softmax(torch.randn(shape, dtype=DTYPE, generator=g), 1), -100
    if kind == "probs_unnormalized":
        mass = torch.rand((n, 1) + pos, dtype=DTYPE, generator=g) * 2
        return torch.softmax(torch.randn(shape, dtype=DTYPE, generator=g), 1) * mass, -100
    raise ValueError(kind)


def ce_rules(f, y, reduction="mean", ignore_index=-100, label_smoothing=0.0):
    probs = L.ce_probs(f)
    dist = L.ce_target_dist(f, y, ignore_index=ignore_index, label_smoothing=label_smoothing)
    weight = L.ce_sample_weight(f, y, reduction=reduction, ignore_index=ignore_index)
    return probs, dist, weight


SEG_SHAPES = [(N, C, 3), (3, C, 2, 3)]


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("targets", ["index", "ignored", "ignored_default", "probs", "probs_unnormalized"])
@pytest.mark.parametrize("shape", SEG_SHAPES, ids=["1d", "2d"])
def test_segmentation_cross_entropy_rules(shape, targets, reduction, smoothing):
    g = torch.Generator().manual_seed(6)
    f = 2 * torch.randn(shape, dtype=DTYPE, generator=g)
    y, ignore_index = _seg_targets(targets, shape, g)

    def loss_fn(z):
        return F.cross_entropy(z, y, reduction=reduction, ignore_index=ignore_index, label_smoothing=smoothing)

    exp_grad, exp_blocks, _ = autodiff(loss_fn, f)
    probs, dist, weight = ce_rules(f, y, reduction, ignore_index, smoothing)
    grad = L.ce_grad(probs, dist, weight)
    s, sign = L.ce_sqrt_hessian(probs, dist, weight)
    diag = L.ce_hessian_diag(probs, dist, weight)
    positions = torch.Size(shape[2:]).numel()
    assert sign is None and s.shape == ((C - 1) * positions,) + tuple(shape)
    assert s.shape[0] == L.ce.sqrt_columns(tuple(shape))
    assert rel_error(grad, exp_grad) < 1e-10, "gradient"
    assert rel_error(factor_blocks(s, None, shape[0]), exp_blocks) < 1e-10, "S S^T"
    assert rel_error(diag.reshape(shape[0], -1), torch.diagonal(exp_blocks, dim1=1, dim2=2)) < 1e-10
    # Each column lives at one position.
    nonzero_positions = (s.flatten(3) != 0).any(2).any(1).sum(1) if s.dim() > 3 else None
    if nonzero_positions is not None:
        assert (nonzero_positions <= 1).all()


def test_segmentation_mc_columns_draw_one_class_per_position():
    """Every Monte Carlo column is ``(p - onehot(c)) sqrt(w sum t / K)`` at every position."""
    g = torch.Generator().manual_seed(7)
    shape, k = (3, C, 2, 3), 5
    f = torch.randn(shape, dtype=DTYPE, generator=g)
    y, _ = _seg_targets("index", shape, g)
    probs, dist, weight = ce_rules(f, y, "sum")
    s = L.ce_sqrt_hessian_mc(probs, dist, weight, mc_samples=k, generator=draws_for(probs, 0))
    assert s.shape == (k,) + shape
    onehot = probs.unsqueeze(0) - s * k ** 0.5  # weights are one with reduction="sum"
    assert torch.allclose(onehot.sum(2), torch.ones((), dtype=DTYPE), atol=1e-12)
    assert torch.allclose(onehot, onehot.round(), atol=1e-12) and (onehot.round() >= 0).all()


def test_segmentation_mc_factor_is_unbiased():
    """``E[S S^T]`` is the block-diagonal Hessian (cross-position terms vanish in expectation):
    the mean over 20,000 draws lies within 5 standard errors (estimated from 40 batches of 500) of
    torch.func's blocks, entry by entry; ignored positions have exactly zero columns."""
    g = torch.Generator().manual_seed(8)
    shape = (2, 3, 2, 2)
    f = torch.randn(shape, dtype=DTYPE, generator=g)
    y = torch.tensor([[[0, 1], [2, -100]], [[1, 1], [0, 2]]])
    probs, dist, weight = ce_rules(f, y, "mean")
    _, blocks, _ = autodiff(lambda z: F.cross_entropy(z, y), f)
    draws = draws_for(probs, 0)
    estimates = torch.stack([factor_blocks(L.ce_sqrt_hessian_mc(probs, dist, weight, mc_samples=500,
                                                                generator=draws), None, 2)
                             for _ in range(40)])
    mean, se = estimates.mean(0), estimates.std(0) / 40 ** 0.5
    random = se > 0
    assert ((mean - blocks).abs()[random] < 5 * se[random]).all()
    assert (mean[~random] == blocks[~random]).all()
    assert (blocks[random] == 0).any()  # cross-position entries are tested too


def seg_net(c=3):
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, c, 1)).to(DTYPE)


@pytest.mark.parametrize("loss_fn, ignore", [
    (nn.CrossEntropyLoss(), -100),
    (nn.CrossEntropyLoss(reduction="sum", label_smoothing=0.1), -100),
    (nn.CrossEntropyLoss(ignore_index=1, label_smoothing=0.2), 1),
    (lambda f, y: F.cross_entropy(f, y, ignore_index=-100), -100),
], ids=["mean", "sum_smoothing", "ignore_index_smoothing", "functional"])
def test_segmentation_end_to_end(loss_fn, ignore):
    model = seg_net()
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 2, 3, 3, dtype=DTYPE, generator=g)
    y = torch.randint(0, 3, (2, 3, 3), generator=g)
    y[0, 1, 2] = y[1, 2, 0] = ignore
    engine = fxcurv.compile(model, loss_fn, quantities=("diag_ggn", "diag_hessian"))
    out = engine(x, y)
    assert "cross_entropy" in str(engine.graph) and "general_loss" not in str(engine.graph)
    assert_close(out.grad, reference.grad(model, loss_fn, x, y), what="grad")
    assert_close(out["diag_ggn"], reference.diag_ggn(model, loss_fn, x, y), what="diag_ggn")
    assert_close(out["diag_hessian"], reference.diag_hessian(model, loss_fn, x, y), what="diag_hessian")
    if ignore == 1:  # A 1x1 convolution's weight sees one position's block per entry: HesScale is exact there.
        check_hesscale_exact_at_last_layer(model, loss_fn, x, y, "hesscale", ("2.weight", "2.bias"))


def test_segmentation_end_to_end_probability_targets():
    model = seg_net()
    x = torch.randn(2, 2, 3, 3, dtype=DTYPE)
    y = torch.softmax(torch.randn(2, 3, 3, 3, dtype=DTYPE), 1) * 1.5
    check_against_references(model, nn.CrossEntropyLoss(label_smoothing=0.1), x, y)


def test_segmentation_end_to_end_mc_is_unbiased():
    """``diag_ggn_mc`` on ``[N, C, H, W]`` outputs converges to ``diag_ggn`` (mean of 20 calls of
    200 draws within 5 standard errors per entry)."""
    model = seg_net()
    x = torch.randn(2, 2, 3, 3, dtype=DTYPE)
    y = torch.randint(0, 3, (2, 3, 3))
    exact = reference.diag_ggn(model, nn.CrossEntropyLoss(), x, y)
    engine = fxcurv.compile(model, nn.CrossEntropyLoss(), quantities=("diag_ggn_mc",), mc_samples=200, seed=0)
    runs = [engine(x, y)["diag_ggn_mc"] for _ in range(20)]
    for k, e in exact.items():
        stack = torch.stack([r[k] for r in runs])
        se = stack.std(0) / 20 ** 0.5
        assert ((stack.mean(0) - e).abs() < 5 * se + 1e-15).all(), k


# ---- 4. empty batches ---------------------------------------------------------------------------

def _rule_outputs(loss: str, shape):
    """grad, (S, sign), diag and the Monte Carlo factor of a closed-form loss at ``f`` of ``shape``."""
    f = torch.randn(shape, dtype=DTYPE)
    g = draws_for(f, 0)
    if loss == "mse":
        y = torch.randn(shape, dtype=DTYPE)
        return (f, L.mse_grad(f, y, reduction="mean"), L.mse_sqrt_hessian(f, reduction="mean"),
                L.mse_hessian_diag(f, reduction="mean"),
                L.mse_sqrt_hessian_mc(f, reduction="mean", mc_samples=2, generator=g))
    y = torch.zeros((shape[0],) + tuple(shape[2:]), dtype=torch.long) if loss == "ce_index" else \
        torch.softmax(torch.randn(shape, dtype=DTYPE), 1)
    probs, dist, weight = ce_rules(f, y, "mean", -100, 0.1)
    return (f, L.ce_grad(probs, dist, weight), L.ce_sqrt_hessian(probs, dist, weight),
            L.ce_hessian_diag(probs, dist, weight),
            L.ce_sqrt_hessian_mc(probs, dist, weight, mc_samples=2, generator=g))


@pytest.mark.parametrize("loss", ["mse", "ce_index", "ce_probs"])
@pytest.mark.parametrize("shape", [(0, C), (0, C, 2, 3)], ids=["2d", "4d"])
def test_rules_on_an_empty_batch(loss, shape):
    f, grad, (s, _), diag, mc = _rule_outputs(loss, shape)
    assert grad.shape == f.shape and diag.shape == f.shape and mc.shape == (2,) + f.shape
    columns = L.ce.sqrt_columns(shape) if loss.startswith("ce") else f.shape[1:].numel()
    assert s.shape == (columns,) + f.shape


@pytest.mark.parametrize("loss_fn, y", [
    (nn.MSELoss(), torch.zeros(0, C, dtype=DTYPE)),
    (nn.MSELoss(reduction="sum"), torch.zeros(0, C, dtype=DTYPE)),
    (nn.CrossEntropyLoss(), torch.zeros(0, dtype=torch.long)),
    (nn.CrossEntropyLoss(label_smoothing=0.1), torch.zeros(0, C, dtype=DTYPE)),
    (lambda f, y: ((f - y) ** 4).mean(), torch.zeros(0, C, dtype=DTYPE)),
], ids=["mse", "mse_sum", "ce", "ce_probs", "general"])
def test_an_empty_batch_behaves_like_torch(loss_fn, y):
    """The loss is torch's (NaN for a mean over nothing, 0 for a sum); every derivative is zero."""
    model = mlp()
    x = torch.zeros(0, 3, dtype=DTYPE)
    quantities = ("diag_ggn", "diag_hessian", "hesscale")
    if isinstance(loss_fn, nn.Module):
        quantities += ("diag_ggn_mc",)
    out = fxcurv.compile(model, loss_fn, quantities=quantities, seed=0)(x, y)
    with torch.no_grad():
        torch.testing.assert_close(out.loss, loss_fn(model(x), y), equal_nan=True)
    for q in out:
        for name, p in model.named_parameters():
            assert torch.equal(out[q][name], torch.zeros_like(p)), (q, name)


# ---- 5. NaN with Monte Carlo factors ------------------------------------------------------------

def test_mc_factor_propagates_nan_per_position():
    probs = torch.softmax(torch.randn(4, C, 3, dtype=DTYPE), 1)
    probs[1, :, 2] = float("nan")
    probs[3, 0, 0] = float("inf")
    y = torch.zeros(4, 3, dtype=torch.long)
    dist = L.ce_target_dist(probs, y, ignore_index=-100, label_smoothing=0.0)
    weight = L.ce_sample_weight(probs, y, reduction="sum", ignore_index=-100)
    s = L.ce_sqrt_hessian_mc(probs, dist, weight, mc_samples=3, generator=draws_for(probs, 0))
    bad = torch.zeros(4, 3, dtype=torch.bool)
    bad[1, 2] = bad[3, 0] = True
    assert torch.isnan(s.movedim(2, -1)[:, bad]).all()
    assert torch.isfinite(s.movedim(2, -1)[:, ~bad]).all()


@pytest.mark.parametrize("where", ["input", "weight"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_nan_propagates_through_diag_ggn_mc_like_diag_ggn(where, loss):
    model = mlp()
    x = torch.randn(N, 3, dtype=DTYPE)
    if where == "input":
        x[2, 0] = float("nan")
    else:
        with torch.no_grad():
            model[2].weight[1, 3] = float("nan")
    loss_fn, y = (nn.CrossEntropyLoss(), torch.arange(N) % C) if loss == "ce" else \
        (nn.MSELoss(), torch.randn(N, C, dtype=DTYPE))
    out = fxcurv.compile(model, loss_fn, quantities=("diag_ggn", "diag_ggn_mc"), seed=0)(x, y)
    assert torch.isnan(out.loss)
    for name in out.grad:
        assert torch.equal(torch.isnan(out["diag_ggn_mc"][name]), torch.isnan(out["diag_ggn"][name])), name
    assert any(torch.isnan(v).any() for v in out["diag_ggn_mc"].values())


# ---- 6. target values checked at every call -----------------------------------------------------

@pytest.mark.parametrize("bad", [C, 7, -1, -100], ids=["C", "7", "-1", "other ignore index"])
def test_out_of_range_class_on_a_later_call(bad):
    engine = fxcurv.compile(mlp(), nn.CrossEntropyLoss(ignore_index=-5), quantities=("diag_ggn",))
    x = torch.randn(N, 3, dtype=DTYPE)
    y = torch.tensor([0, 1, 2, 3, -5])
    engine(x, y)
    y_bad = y.clone()
    y_bad[2] = bad
    for _ in range(2):  # the first call with this target, then again
        with pytest.raises(InputError) as exc:
            engine(x, y_bad)
        msg = str(exc.value)
        assert "target y" in msg and f"class index {bad} at (2,)" in msg and f"[0, {C})" in msg
        assert "ignore_index=-5" in msg
    engine(x, y)  # the engine still works


def test_out_of_range_class_in_segmentation_targets():
    model = seg_net()
    engine = fxcurv.compile(model, nn.CrossEntropyLoss(), quantities=("diag_ggn",))
    x = torch.randn(2, 2, 3, 3, dtype=DTYPE)
    y = torch.randint(0, 3, (2, 3, 3))
    y[1, 2, 0] = -100
    engine(x, y)
    y[0, 1, 1] = 3
    with pytest.raises(InputError, match=r"class index 3 at \(0, 1, 1\)"):
        engine(x, y)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_index_targets_must_be_int64(dtype):
    y = torch.tensor([0, 1, 2, 3, 0], dtype=dtype)
    with pytest.raises(InputError, match="int64"):
        fxcurv.compile(mlp(), nn.CrossEntropyLoss(), quantities=("diag_ggn",))(torch.randn(N, 3, dtype=DTYPE), y)


# ---- 7. a single class --------------------------------------------------------------------------

@pytest.mark.parametrize("targets", ["index", "probs"])
@pytest.mark.parametrize("shape", [(N, 1), (3, 1, 2, 3)], ids=["2d", "4d"])
def test_one_class_rules(shape, targets):
    """``C = 1``: the loss is constant; zero gradient, no factor columns, zero diagonal."""
    f = torch.randn(shape, dtype=DTYPE)
    y = torch.zeros((shape[0],) + shape[2:], dtype=torch.long) if targets == "index" else \
        torch.rand(shape, dtype=DTYPE)
    probs, dist, weight = ce_rules(f, y, "mean", -100, 0.1)
    exp_grad, exp_blocks, _ = autodiff(lambda z: F.cross_entropy(z, y, label_smoothing=0.1), f)
    assert exp_blocks.abs().max() == 0 and exp_grad.abs().max() == 0
    assert torch.equal(L.ce_grad(probs, dist, weight), torch.zeros(shape, dtype=DTYPE))
    assert torch.equal(L.ce_hessian_diag(probs, dist, weight), torch.zeros(shape, dtype=DTYPE))
    s, sign = L.ce_sqrt_hessian(probs, dist, weight)
    assert sign is None and s.shape == (0,) + shape and L.ce.sqrt_columns(shape) == 0
    mc = L.ce_sqrt_hessian_mc(probs, dist, weight, mc_samples=2, generator=draws_for(probs, 0))
    assert torch.equal(mc, torch.zeros((2,) + shape, dtype=DTYPE))


def test_one_class_end_to_end():
    model = mlp(d_out=1)
    x = torch.randn(N, 3, dtype=DTYPE)
    out = check_against_references(model, nn.CrossEntropyLoss(), x, torch.zeros(N, dtype=torch.long),
                                   quantities=("diag_ggn", "diag_hessian", "hesscale"))
    for q in out:
        assert all(torch.equal(v, torch.zeros_like(v)) for v in out[q].values()), q
