"""The loss rules (fxcurv.rules.losses) against torch.func, then end to end.

For every loss: the rule's gradient is ``torch.func.grad`` of the loss w.r.t. the model output ``f``;
its square-root factor satisfies ``sum_k sign_k S_k S_k^T = d2L/df_n^2`` for every sample ``n`` (the
diagonal blocks of ``torch.func.hessian``; the off-diagonal blocks vanish for these sample-separable
losses); its Hessian diagonal is the diagonal of those blocks.
"""

from __future__ import annotations

import pytest
import reference
import torch
import torch.nn.functional as F
from helpers import assert_close, rel_error
from torch import nn

import fxcurv
from fxcurv.rules import losses as L

DTYPE = torch.float64
N, C = 5, 4


# ---- helpers ------------------------------------------------------------------------------------

def autodiff(loss_fn, f):
    """``(grad [N, *f], blocks [N, D, D])`` of ``loss_fn(f)`` by torch.func; asserts separability."""
    n, d = f.shape[0], f[0].numel()
    grad = torch.func.grad(loss_fn)(f)
    h = torch.func.hessian(loss_fn)(f).reshape(n, d, n, d)
    blocks = torch.stack([h[i, :, i, :] for i in range(n)])
    off = h.clone()
    for i in range(n):
        off[i, :, i, :] = 0
    assert off.abs().max() <= 1e-12 * max(h.abs().max().item(), 1.0), "loss is not separable"
    return grad, blocks


def factor_blocks(s, sign, n):
    """``sum_k sign[k, n] S[k, n] S[k, n]^T`` for every ``n``: ``[N, D, D]``."""
    s = s.reshape(s.shape[0], n, -1)
    if sign is None:
        sign = torch.ones(s.shape[:2], dtype=s.dtype)
    return torch.einsum("kn,kni,knj->nij", sign.to(s.dtype), s, s)


def check_rules(grad, s, sign, diag, loss_fn, f):
    exp_grad, exp_blocks = autodiff(loss_fn, f)
    assert grad.shape == f.shape and diag.shape == f.shape
    assert s.shape[1:] == f.shape, (tuple(s.shape), tuple(f.shape))
    assert rel_error(grad, exp_grad) < 1e-10, "gradient"
    assert rel_error(factor_blocks(s, sign, f.shape[0]), exp_blocks) < 1e-10, "S S^T"
    assert rel_error(diag.reshape(f.shape[0], -1), torch.diagonal(exp_blocks, dim1=1, dim2=2)) < 1e-10, \
        "Hessian diagonal"


# ---- cross-entropy ------------------------------------------------------------------------------

def _ce_targets(kind: str, g: torch.Generator):
    if kind == "index":
        return torch.randint(0, C, (N,), generator=g), -100
    if kind == "ignored":  # two of five samples carry the ignore index
        y = torch.randint(0, C, (N,), generator=g)
        y[1] = y[3] = 3
        return y, 3
    if kind == "ignored_default":
        y = torch.randint(0, C, (N,), generator=g)
        y[0] = -100
        return y, -100
    if kind == "probs":
        return torch.softmax(torch.randn(N, C, dtype=DTYPE, generator=g), 1), -100
    if kind == "probs_unnormalized":  # soft targets of mass != 1 (torch accepts them)
        mass = torch.tensor([[0.5], [1.0], [2.0], [1.5], [0.25]], dtype=DTYPE)
        return torch.softmax(torch.randn(N, C, dtype=DTYPE, generator=g), 1) * mass, -100
    raise ValueError(kind)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("targets", ["index", "ignored", "ignored_default", "probs", "probs_unnormalized"])
def test_cross_entropy_rules(targets, reduction, smoothing):
    g = torch.Generator().manual_seed(0)
    f = 2 * torch.randn(N, C, dtype=DTYPE, generator=g)
    y, ignore_index = _ce_targets(targets, g)

    def loss_fn(z):
        return F.cross_entropy(z, y, reduction=reduction, ignore_index=ignore_index,
                               label_smoothing=smoothing)

    probs = L.ce_probs(f)
    dist = L.ce_target_dist(f, y, ignore_index=ignore_index, label_smoothing=smoothing)
    weight = L.ce_sample_weight(f, y, reduction=reduction, ignore_index=ignore_index)
    grad = L.ce_grad(probs, dist, weight)
    s, sign = L.ce_sqrt_hessian(probs, dist, weight)
    assert sign is None and s.shape == (C - 1, N, C)  # rank C - 1: H annihilates the ones vector
    diag = L.ce_hessian_diag(probs, dist, weight)
    check_rules(grad, s, sign, diag, loss_fn, f)
    if targets.startswith("ignored"):
        ignored = y == ignore_index
        assert (grad[ignored] == 0).all() and (diag[ignored] == 0).all() and (s[:, ignored] == 0).all()


def test_cross_entropy_hessian_diag_is_q_minus_q2():
    """HesScale App. A.1: ``diag H = q - q o q`` per sample (sum reduction, one-hot targets)."""
    f = torch.randn(N, C, dtype=DTYPE)
    y = torch.arange(N) % C
    probs = L.ce_probs(f)
    dist = L.ce_target_dist(f, y, ignore_index=-100, label_smoothing=0.0)
    weight = L.ce_sample_weight(f, y, reduction="sum", ignore_index=-100)
    assert rel_error(L.ce_hessian_diag(probs, dist, weight), probs - probs ** 2) < 1e-14


# ---- squared error ------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shape", [(N, C), (N, 1), (3, 2, 3), (2, 2, 3, 2)])
def test_mse_rules(shape, reduction):
    g = torch.Generator().manual_seed(1)
    f = torch.randn(shape, dtype=DTYPE, generator=g)
    y = torch.randn(shape, dtype=DTYPE, generator=g)

    def loss_fn(z):
        return F.mse_loss(z, y, reduction=reduction)

    grad = L.mse_grad(f, y, reduction=reduction)
    s, sign = L.mse_sqrt_hessian(f, reduction=reduction)
    assert sign is None and s.shape == (f[0].numel(),) + tuple(shape)
    diag = L.mse_hessian_diag(f, reduction=reduction)
    check_rules(grad, s, sign, diag, loss_fn, f)


# ---- the general path ---------------------------------------------------------------------------

def eacg_criterion(f, y, delta=5.0, eps=0.2):
    """EA-CG eq. 14: ``C(yhat | y) = 1 / (1 + exp(delta (y^T yhat - eps)))``, averaged over the batch."""
    return (1.0 / (1.0 + torch.exp(delta * ((y * f).sum(1) - eps)))).mean()


def weighted_ce(weight):
    return lambda f, y: F.cross_entropy(f, y, weight=weight)


def tanh_squares(f, y):
    """A non-convex loss on outputs with extra dims ``[N, 2, 3]``."""
    return ((torch.tanh(f) - y) ** 2).sum() / 7.0


def _general_cases():
    g = torch.Generator().manual_seed(2)
    onehot = F.one_hot(torch.tensor([0, 1, 2, 3, 0]), C).to(DTYPE)
    # Outputs that put some samples on each side of the criterion's inflection point y^T f = eps.
    f_eacg = torch.randn(N, C, dtype=DTYPE, generator=g) * 0.6
    w = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=DTYPE)
    f_ce = torch.randn(N, C, dtype=DTYPE, generator=g)
    y_ce = torch.tensor([0, 1, 3, 3, 2])
    f3 = torch.randn(N, 2, 3, dtype=DTYPE, generator=g)
    y3 = torch.randn(N, 2, 3, dtype=DTYPE, generator=g)
    return {
        "eacg": (eacg_criterion, f_eacg, onehot),
        "weighted_ce": (weighted_ce(w), f_ce, y_ce),
        "tanh_squares_3d": (tanh_squares, f3, y3),
    }


@pytest.mark.parametrize("case", ["eacg", "weighted_ce", "tanh_squares_3d"])
def test_general_rules(case):
    loss, f, y = _general_cases()[case]
    hess = L.per_sample_hessians(loss, f, y)
    d = f[0].numel()
    assert hess.shape == (N, d, d)
    _, blocks = autodiff(lambda z: loss(z, y), f)
    assert rel_error(hess, blocks) < 1e-10
    grad = L.general_grad(f, y, loss_fn=loss)
    s, sign = L.general_sqrt_hessian(f, hess)
    assert sign.shape == (s.shape[0], N)
    diag = L.general_hessian_diag(f, hess)
    check_rules(grad, s, sign, diag, lambda z: loss(z, y), f)
    if case in ("eacg", "tanh_squares_3d"):  # indefinite: the signs matter
        assert (sign < 0).any() and (sign > 0).any()
        unsigned = factor_blocks(s, None, N)
        assert rel_error(unsigned, blocks) > 1e-3


def test_eacg_hessian_is_indefinite_across_samples():
    """The per-sample Hessian is ``c''(u) y y^T`` with ``u = y^T f``: rank one, its sign changes at
    ``u = eps``; the test data has samples on both sides."""
    loss, f, y = _general_cases()["eacg"]
    top = torch.linalg.eigvalsh(L.per_sample_hessians(loss, f, y))
    has_neg = (top.min(1).values < -1e-8)
    has_pos = (top.max(1).values > 1e-8)
    assert has_neg.any() and has_pos.any()


# ---- end to end ---------------------------------------------------------------------------------

def small_mlp(d_in=3, d_out=C, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, 5), nn.Tanh(), nn.Linear(5, d_out)).to(DTYPE)


def end_to_end(model, loss_fn, x, y):
    engine = fxcurv.compile(model, loss_fn, quantities=("diag_ggn", "diag_hessian"))
    out = engine(x, y)
    assert_close(out.grad, reference.grad(model, loss_fn, x, y), rtol=1e-8, what="grad")
    assert_close(out["diag_ggn"], reference.diag_ggn(model, loss_fn, x, y), rtol=1e-8, what="diag_ggn")
    assert_close(out["diag_hessian"], reference.diag_hessian(model, loss_fn, x, y), rtol=1e-8,
                 what="diag_hessian")
    assert abs(out.loss.item() - loss_fn(model(x), y).item()) < 1e-12
    return engine, out


def test_end_to_end_eacg_criterion():
    """EA-CG eq. 14 (delta=5, eps=0.2), a non-convex criterion: general path, signed factors."""
    model = small_mlp()
    g = torch.Generator().manual_seed(3)
    x = 2 * torch.randn(6, 3, dtype=DTYPE, generator=g)
    y = F.one_hot(torch.tensor([0, 1, 2, 3, 1, 2]), C).to(DTYPE)
    with torch.no_grad():
        eig = torch.linalg.eigvalsh(L.per_sample_hessians(eacg_criterion, model(x), y))
    assert (eig.min(1).values < -1e-8).any() and (eig.max(1).values > 1e-8).any()
    engine, out = end_to_end(model, eacg_criterion, x, y)
    listing = str(engine.graph)
    assert "general_loss" in listing and "cross_entropy" not in listing
    # The GGN with an indefinite loss Hessian is not PSD: some diagonal entries are negative.
    assert any((v < 0).any() for v in out["diag_ggn"].values())


def test_end_to_end_weighted_cross_entropy():
    """Class weights are not in the closed form: the general path takes them."""
    model = small_mlp()
    x = torch.randn(6, 3, dtype=DTYPE)
    y = torch.tensor([0, 1, 2, 3, 1, 1])
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=DTYPE))
    engine, _ = end_to_end(model, loss_fn, x, y)
    assert "general_loss" in str(engine.graph)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_end_to_end_functional_cross_entropy_is_closed_form(reduction):
    model = small_mlp()
    x = torch.randn(6, 3, dtype=DTYPE)
    y = torch.tensor([0, 1, 2, 3, 1, 1])
    engine, _ = end_to_end(model, lambda f, y: F.cross_entropy(f, y, reduction=reduction), x, y)
    listing = str(engine.graph)
    assert "cross_entropy" in listing and "general_loss" not in listing


@pytest.mark.parametrize("loss_fn", [
    nn.CrossEntropyLoss(ignore_index=2),
    nn.CrossEntropyLoss(label_smoothing=0.1, reduction="sum"),
], ids=["ignore_index", "label_smoothing"])
def test_end_to_end_cross_entropy_options(loss_fn):
    model = small_mlp()
    x = torch.randn(6, 3, dtype=DTYPE)
    y = torch.tensor([0, 2, 2, 3, 1, 1])
    engine, _ = end_to_end(model, loss_fn, x, y)
    assert "general_loss" not in str(engine.graph)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("normalized", [True, False])
def test_end_to_end_cross_entropy_probability_targets(normalized, smoothing):
    model = small_mlp()
    x = torch.randn(6, 3, dtype=DTYPE)
    y = torch.softmax(torch.randn(6, C, dtype=DTYPE), 1)
    if not normalized:
        y = y * torch.linspace(0.25, 2.0, 6, dtype=DTYPE).unsqueeze(1)
    engine, _ = end_to_end(model, nn.CrossEntropyLoss(label_smoothing=smoothing), x, y)
    assert "general_loss" not in str(engine.graph)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_end_to_end_mse_extra_dims(reduction):
    """MSE on outputs ``[N, 2, 3]`` (a Linear producing 6 features, unflattened)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Sigmoid(), nn.Linear(5, 6), nn.Unflatten(1, (2, 3))).to(DTYPE)
    x = torch.randn(4, 3, dtype=DTYPE)
    y = torch.randn(4, 2, 3, dtype=DTYPE)
    engine, _ = end_to_end(model, nn.MSELoss(reduction=reduction), x, y)
    assert "mse_loss" in str(engine.graph)


@pytest.mark.parametrize("case", ["near_one_hot", "uniform", "mixed"])
def test_cross_entropy_factor_is_exact_where_the_reflection_could_degenerate(case):
    """The rank-(C-1) factor S = diag(sqrt p) Q (Householder basis of sqrt(p)'s complement) stays
    exact for saturated and for uniform softmax outputs: S S^T = diag(p) - p p^T per sample."""
    from fxcurv.rules.losses import ce_sqrt_hessian

    c = 5
    f = {
        "near_one_hot": torch.tensor([[40.0, 0, 0, 0, 0], [0, 0, 0, 0, 60.0]]),
        "uniform": torch.zeros(2, c),
        "mixed": torch.tensor([[3.0, -2, 0.5, 1, -40], [0.1, 0.2, 0.3, 0.4, 0.5]]),
    }[case].double()
    p = torch.softmax(f, 1)
    s, sign = ce_sqrt_hessian(p, torch.ones(2, 1, dtype=f.dtype).expand(2, c) / c, torch.ones(2, dtype=f.dtype))
    assert sign is None and s.shape == (c - 1, 2, c)
    gram = torch.einsum("kni,knj->nij", s, s)
    expected = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    torch.testing.assert_close(gram, expected, rtol=0, atol=1e-12)


def test_cross_entropy_with_one_class_has_no_curvature():
    from fxcurv.rules.losses import ce_sqrt_hessian

    p = torch.ones(3, 1, dtype=torch.float64)
    s, _ = ce_sqrt_hessian(p, p, torch.ones(3, dtype=torch.float64))
    assert s.shape == (0, 3, 1)
