"""ggn_eigen (ViViT): every number against an independent float64 reference from torch.func.

* eigenvalues = the nonzero eigenvalues of the dense GGN ``J^T H J`` (MLPs, CNNs, residual and
  weight-tied nets, N = 1, an indefinite loss Hessian), per block with ``groups=``;
* ``G e = lambda e`` and ``e^T e' = delta`` for every returned vector;
* directional derivatives = ``N`` times torch.func JVPs of each sample's loss ``L_n`` and its
  output-Hessian quadratic form along ``J_n e`` (ViViT eq. 8);
* Newton steps = the dense damped solve restricted to the eigenspace, and ``-(G + d I)^-1 g``;
* Monte Carlo and subsampled variants = the GGN of their definitions (the sampler's own columns; the
  subset's GGN times ``N / N_s``);
* the bootstrap damping = ViViT B.3 computed by brute force.
"""

from __future__ import annotations

import random

import pytest
import reference
import torch
from architectures import Residual, TiedThreeTimes, random_cnn, random_mlp
from helpers import GenericAffine, call_rule, rel_error
from torch import nn
from torch.func import functional_call, jvp

import fxcurv
from fxcurv.factors import first_samples
from fxcurv.node_info import Kind, info
from fxcurv.operators import BlockDiagonalEigen, GramEigen, NoVectorsError
from fxcurv.operators.gram_eigen import lapack_in_place
from fxcurv.quantities import GGNEigen
from fxcurv.rules import registry

DT = torch.float64
# Dense eigenvalues at or below this fraction of the largest are the GGN's zeros (float64 noise of
# the dense reference is ~1e-15 relative).
ZERO = 1e-12
# Eigenvectors are checked where lambda_k is above this fraction of the largest: e_k = V u_k / sqrt(lambda_k)
# inherits the Gram eigenvector's absolute error eps * lambda_max, i.e. a relative error of about
# eps * lambda_max / lambda_k (ViViT's implementation warns about the same), 1e-10 at this ratio.
WELL_CONDITIONED = 1e-6


def nonzero_eigenvalues(matrix: torch.Tensor) -> torch.Tensor:
    """The nonzero eigenvalues of a symmetric matrix, descending."""
    values = torch.linalg.eigvalsh(matrix).flip(0)
    return values[values.abs() > ZERO * values.abs().max()]


def flat(vectors, names) -> torch.Tensor:
    """``[k, P]`` from ``{name: [k, *shape]}`` in the order ``names``."""
    return torch.cat([vectors[n].flatten(1) for n in names], dim=1)


def reduction_scale(loss_fn, n: int) -> float:
    """``L_n = scale * loss_fn(f(x_n), y_n)``: the sample's share of the batch loss."""
    return 1.0 / n if getattr(loss_fn, "reduction", "mean") == "mean" else 1.0


def check_eigenpairs(e: GramEigen, G: torch.Tensor, names, top_k=None) -> None:
    want = nonzero_eigenvalues(G)
    if top_k is not None:
        want = want[:top_k]
    assert e.values.shape == want.shape, f"{e.values.shape[0]} eigenvalues, expected {want.shape[0]}"
    assert rel_error(e.values, want) < 1e-9
    V = flat(e.vectors, names)  # [k, P]
    good = e.values.abs() > WELL_CONDITIONED * e.values.abs().max()
    V, lam = V[good], e.values[good]
    assert rel_error(V @ G, lam[:, None] * V) < 1e-8, "G v != lambda v"
    assert rel_error(V @ V.T, torch.eye(V.shape[0], dtype=DT)) < 1e-8, "eigenvectors are not orthonormal"


def compile_eigen(model, loss_fn, x, y, quantity=None, **kw):
    q = quantity if quantity is not None else "ggn_eigen"
    out = fxcurv.compile(model, loss_fn, quantities=(q,), **kw)(x, y)
    return out, out[q if isinstance(q, str) else q.name]


# ---- eigenvalues and eigenvectors -----------------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 3])
def test_tied_and_residual(batch):
    torch.manual_seed(0)
    model = TiedThreeTimes(out_dim=4).to(DT)
    x, y = torch.randn(batch, 3, dtype=DT), torch.tensor([0, 3, 1][:batch])
    loss_fn = nn.CrossEntropyLoss()
    _, e = compile_eigen(model, loss_fn, x, y)
    assert e.gram.shape == (3 * batch, 3 * batch)  # K = C - 1 columns per sample
    check_eigenpairs(e, reference.ggn(model, loss_fn, x, y), [n for n, _ in model.named_parameters()])


@pytest.mark.parametrize("seed", range(3))
def test_random_mlps(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model = random_mlp(rng, in_dim=4, out_dim=3, depth=3)
    x, y = torch.randn(3, 4, dtype=DT), torch.randn(3, 3, dtype=DT)
    loss_fn = nn.MSELoss(reduction="sum")
    _, e = compile_eigen(model, loss_fn, x, y)
    check_eigenpairs(e, reference.ggn(model, loss_fn, x, y), list(reference.trainable(model)))


@pytest.mark.parametrize("seed", range(2))
def test_random_cnns(seed):
    rng = random.Random(50 + seed)
    torch.manual_seed(seed)
    model = random_cnn(rng, in_shape=(2, 5, 4), out_dim=3, depth=2)
    x, y = torch.randn(2, 2, 5, 4, dtype=DT), torch.tensor([0, 2])
    loss_fn = nn.CrossEntropyLoss()
    _, e = compile_eigen(model, loss_fn, x, y)
    check_eigenpairs(e, reference.ggn(model, loss_fn, x, y), list(reference.trainable(model)))


def small_cnn() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Sigmoid(), nn.MaxPool2d(2), nn.Conv2d(3, 2, 2, stride=2),
                         nn.Tanh(), nn.Flatten(), nn.Linear(2, 4)).to(DT)


def test_cnn_with_top_k_and_blocked_products(monkeypatch):
    """Convolution factors formed a sample at a time (block pairs recomputed and mirrored) give the
    same eigenpairs; ``top_k`` keeps the largest."""
    from fxcurv import gram

    monkeypatch.setattr(gram, "GRAM_BLOCK_ELEMENTS", 1)
    model, loss_fn = small_cnn(), nn.CrossEntropyLoss()
    x, y = torch.randn(4, 2, 4, 4, dtype=DT), torch.tensor([0, 3, 1, 2])
    _, e = compile_eigen(model, loss_fn, x, y, GGNEigen(top_k=5))
    check_eigenpairs(e, reference.ggn(model, loss_fn, x, y), list(reference.trainable(model)), top_k=5)


@pytest.mark.parametrize("rows", [1, 7])
def test_gram_in_row_chunks(rows, monkeypatch):
    """Block rows of the Gram products formed a chunk of samples at a time (with the weight's rows
    ``x x^T (+ 1)`` per chunk; one sample, or chunks not dividing the batch) give the same eigenpairs,
    for linear layers with and without bias."""
    from fxcurv import gram

    monkeypatch.setattr(gram, "GRAM_ROW_ELEMENTS", rows * 3 * 5)  # M = K N = 3 * 5: `rows` rows per chunk
    assert gram.gram_rows(15, 5) == min(rows, 5)
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Tanh(), nn.Linear(4, 4)).to(DT)
    x, y = torch.randn(5, 3, dtype=DT), torch.tensor([0, 3, 1, 2, 2])
    loss_fn = nn.CrossEntropyLoss()
    _, e = compile_eigen(model, loss_fn, x, y)
    check_eigenpairs(e, reference.ggn(model, loss_fn, x, y), list(reference.trainable(model)))


@pytest.mark.parametrize("k, n", [(3, 5), (1, 6), (4, 2)])
def test_gram_as_one_product_equals_the_blocked_products(k, n, monkeypatch):
    """Few samples per column index: ``(A A^T) o W`` as one product equals the blocked upper-triangle
    products mirrored (fresh and added into a total; weight as a matrix, as row chunks, none)."""
    from fxcurv import gram

    torch.manual_seed(15)
    a, x = torch.randn(k * n, 7, dtype=DT), torch.randn(n, 4, dtype=DT)
    square = x @ x.T
    weights = (None, square, lambda start, stop: x[start:stop] @ x.T)
    start = torch.randn(k * n, k * n, dtype=DT)
    one = [gram.gram_into(a, None, k, w) for w in weights] + [gram.gram_into(a, start.clone(), k, square)]
    monkeypatch.setattr(gram, "ONE_PRODUCT_SAMPLES", 0)  # the blocked loop
    blocked = [gram.gram_into(a, None, k, w) for w in weights] + [gram.gram_into(a, start.clone(), k, square)]
    want = (a @ a.T) * square.repeat(k, k)
    for got, ref in zip(one, blocked, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(one[1], want, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(one[3], start + want, rtol=1e-14, atol=1e-14)


def test_indefinite_loss_hessian():
    """A loss whose Hessian w.r.t. the output is indefinite: signed columns, ``G = V D V^T`` with
    negative eigenvalues, from ``Lambda^1/2 Q^T D Q Lambda^1/2``."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)

    def loss_fn(f, y):
        return (torch.sin(f) * y).sum()

    x, y = torch.randn(3, 3, dtype=DT), torch.randn(3, 2, dtype=DT)
    _, e = compile_eigen(model, loss_fn, x, y)
    G = reference.ggn(model, loss_fn, x, y)
    assert (e.values < 0).any() and (e.values > 0).any()
    check_eigenpairs(e, G, list(reference.trainable(model)))


def test_frozen_and_unreached_parameters():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    model[0].bias.requires_grad_(False)
    x, y = torch.randn(2, 3, dtype=DT), torch.tensor([1, 2])
    _, e = compile_eigen(model, nn.CrossEntropyLoss(), x, y)
    names = list(reference.trainable(model))
    assert list(e.vectors) == names
    check_eigenpairs(e, reference.ggn(model, nn.CrossEntropyLoss(), x, y), names)


# ---- groups ---------------------------------------------------------------------------------------

def dense_block(G: torch.Tensor, model: nn.Module, names) -> torch.Tensor:
    offsets, start = {}, 0
    for n, p in reference.trainable(model).items():
        offsets[n] = torch.arange(start, start + p.numel())
        start += p.numel()
    index = torch.cat([offsets[n] for n in names])
    return G[index][:, index]


@pytest.mark.parametrize("groups", ["layer", "parameter", {"first": ["0.weight"], "rest": ["2.weight", "2.bias"]}])
def test_groups(groups):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 3)).to(DT)
    x, y = torch.randn(3, 3, dtype=DT), torch.tensor([0, 2, 1])
    loss_fn = nn.CrossEntropyLoss()
    _, e = compile_eigen(model, loss_fn, x, y, GGNEigen(groups=groups))
    assert isinstance(e, BlockDiagonalEigen)
    G = reference.ggn(model, loss_fn, x, y)
    named = {"layer": {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"]},
             "parameter": {n: [n] for n in reference.trainable(model)}}
    expected = named[groups] if isinstance(groups, str) else groups
    assert set(e) == set(expected)
    for g, names in expected.items():
        check_eigenpairs(e[g], dense_block(G, model, names), names)
    # The block-diagonal damped Newton step, block by block (ViViT C.2).
    grad = reference.grad(model, loss_fn, x, y)
    step = e.newton_step(0.3, restrict=False)
    for names in expected.values():
        block = dense_block(G, model, names)
        g = torch.cat([grad[n].flatten() for n in names])
        want = -torch.linalg.solve(block + 0.3 * torch.eye(block.shape[0], dtype=DT), g)
        assert rel_error(torch.cat([step[n].flatten() for n in names]), want) < 1e-9
    assert set(step) == {n for names in expected.values() for n in names}


def test_two_instances_in_one_program():
    """A full and a grouped instance share the Gram products in one program (common subexpressions) and
    still accumulate into buffers of their own."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    x, y = torch.randn(3, 3, dtype=DT), torch.tensor([0, 2, 1])
    loss_fn = nn.CrossEntropyLoss()
    grouped = GGNEigen(groups="layer", name="ggn_eigen_layers")
    out = fxcurv.compile(model, loss_fn, quantities=("ggn_eigen", grouped))(x, y)
    G = reference.ggn(model, loss_fn, x, y)
    names = list(reference.trainable(model))
    check_eigenpairs(out["ggn_eigen"], G, names)
    for _, block in out["ggn_eigen_layers"].items():
        check_eigenpairs(block, dense_block(G, model, block.names), block.names)


# ---- directional derivatives and Newton steps ---------------------------------------------------

def per_sample_directional(model, loss_fn, x, y, vectors: torch.Tensor, samples) -> tuple[torch.Tensor, torch.Tensor]:
    """``N d/dt L_n(theta + t e)`` and ``N (J_n e)^T (d2 L_n / df2) (J_n e)`` by torch.func JVPs, for
    every sample and row ``e`` of ``vectors [k, P]`` (ViViT eq. 8)."""
    params = reference.trainable(model)
    theta, layout = reference._flat(params)
    n = x.shape[0]
    scale = reduction_scale(loss_fn, n)

    def output(vec, i):
        return functional_call(model, reference._unflat(vec, layout), (x[i:i + 1],))

    def loss_n(vec, i):
        return scale * loss_fn(output(vec, i), y[i:i + 1])

    first = torch.stack([torch.stack([jvp(lambda v, i=i: loss_n(v, i), (theta,), (e,))[1] for e in vectors])
                         for i in range(n)])
    second = []
    for i in samples:
        f = output(theta, i)
        grad_f = torch.func.grad(lambda z, i=i: scale * loss_fn(z, y[i:i + 1]))
        row = []
        for e in vectors:
            jv = jvp(lambda v, i=i: output(v, i), (theta,), (e,))[1]
            hjv = jvp(grad_f, (f,), (jv,))[1]
            row.append((jv * hjv).sum())
        second.append(torch.stack(row))
    return n * first, n * torch.stack(second)


def mlp_problem(n=4, loss="ce"):
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    x = torch.randn(n, 3, dtype=DT)
    if loss == "ce":
        return model, nn.CrossEntropyLoss(), x, torch.tensor([0, 2, 1, 1, 0, 2][:n])
    return model, nn.MSELoss(reduction=loss), x, torch.randn(n, 3, dtype=DT)


@pytest.mark.parametrize("loss", ["ce", "sum"])
def test_directional_derivatives(loss):
    model, loss_fn, x, y = mlp_problem(loss=loss)
    _, e = compile_eigen(model, loss_fn, x, y)
    names = list(reference.trainable(model))
    d = e.directional()
    first, second = per_sample_directional(model, loss_fn, x, y, flat(e.vectors, names), range(x.shape[0]))
    assert rel_error(d.first, first) < 1e-9
    assert rel_error(d.second, second) < 1e-9
    # Their means are the mini-batch values.
    grad = reference.grad(model, loss_fn, x, y)
    g = torch.cat([grad[n].flatten() for n in names])
    assert rel_error(d.first.mean(0), flat(e.vectors, names) @ g) < 1e-9
    assert rel_error(d.second.mean(0), e.values) < 1e-9


@pytest.mark.parametrize("top_k", [None, 3])
def test_newton_steps(top_k):
    model, loss_fn, x, y = mlp_problem()
    _, e = compile_eigen(model, loss_fn, x, y, GGNEigen(top_k=top_k))
    names = list(reference.trainable(model))
    G = reference.ggn(model, loss_fn, x, y)
    grad = reference.grad(model, loss_fn, x, y)
    g = torch.cat([grad[n].flatten() for n in names])
    lam, U = torch.linalg.eigh(G)
    order = torch.argsort(lam, descending=True)
    lam, U = lam[order], U[:, order]
    k = e.values.shape[0]
    lam, U = lam[:k], U[:, :k]
    for damping in (0.5, torch.linspace(0.1, 1.0, k, dtype=DT)):
        # The dense damped solve restricted to the (top-k) eigenspace.
        want = -U @ ((U.T @ g) / (lam + damping))
        step = e.newton_step(damping)
        assert rel_error(torch.cat([step[n].flatten() for n in names]), want) < 1e-8
    full = e.newton_step(0.2, restrict=False)
    want = -torch.linalg.solve(G + 0.2 * torch.eye(G.shape[0], dtype=DT), g)
    assert rel_error(torch.cat([full[n].flatten() for n in names]), want) < 1e-9


def test_bootstrap_damping_is_vivit_b3():
    model, loss_fn, x, y = mlp_problem(n=5)
    _, e = compile_eigen(model, loss_fn, x, y, GGNEigen(top_k=4))
    grid = torch.logspace(-3, 1, 7, dtype=DT)
    got = e.bootstrap_damping(grid=grid, resamples=20, generator=torch.Generator().manual_seed(3))
    # Brute force: the same resamples, direction by direction, candidate by candidate.
    d = e.directional()
    idx = torch.randint(0, 5, (20, 5), generator=torch.Generator().manual_seed(3))
    for k in range(4):
        best, best_bound = None, -float("inf")
        for delta in grid:
            s = -d.first[:, k].mean() / (d.second[:, k].mean() + delta)
            samples = [-s * d.first[i, k].mean() - 0.5 * s**2 * d.second[i, k].mean() for i in idx]
            bound = torch.quantile(torch.stack(samples), 0.05)
            if bound > best_bound:
                best, best_bound = delta, bound
        assert got[k] == best


# ---- the approximations: Monte Carlo and subsampling -------------------------------------------

def ggn_from_output_columns(model, x, S: torch.Tensor) -> torch.Tensor:
    """``sum_{k,n} J_n^T s_kn s_kn^T J_n`` with columns ``S [K, N, C]`` at the model output."""
    params = reference.trainable(model)
    theta, layout = reference._flat(params)
    jac = torch.func.jacrev(lambda v: functional_call(model, reference._unflat(v, layout), (x,)))(theta)  # [N, C, P]
    a = torch.einsum("knc,ncp->knp", S, jac).reshape(-1, theta.numel())
    return a.T @ a


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_monte_carlo_is_its_definition(reduction):
    model, loss_fn, x, y = mlp_problem(loss=reduction)
    engine = fxcurv.compile(model, loss_fn, quantities=("ggn_eigen_mc",), mc_samples=2)
    e = engine(x, y, generator=torch.Generator().manual_seed(11))["ggn_eigen_mc"]
    with torch.no_grad():
        f = model(x)
    S = call_rule(registry.LOSS_SQRT_HESSIAN_MC, "mse_loss", "f", f=f, y=y, reduction=reduction, mc_samples=2,
                  generator=torch.Generator().manual_seed(11))
    assert e.gram.shape == (2 * x.shape[0],) * 2
    check_eigenpairs(e, ggn_from_output_columns(model, x, S), list(reference.trainable(model)))


def test_monte_carlo_cross_entropy_matches_its_diagonal():
    """With cross-entropy: the MC eigenpairs' ``sum_k lambda_k e_k^2`` is the MC GGN diagonal of the same
    draws (``diag_ggn_mc`` in the same program)."""
    model, loss_fn, x, y = mlp_problem()
    out = fxcurv.compile(model, loss_fn, quantities=("ggn_eigen_mc", "diag_ggn_mc"), mc_samples=3, seed=2)(x, y)
    e = out["ggn_eigen_mc"]
    for name, diag in out["diag_ggn_mc"].items():
        assert rel_error(torch.einsum("k,k...->...", e.values, e.vectors[name] ** 2), diag) < 1e-9


@pytest.mark.parametrize("subsample", [0.5, [3, 0]])
@pytest.mark.parametrize("reduction", ["ce", "sum"])
def test_subsampling_is_its_definition(subsample, reduction):
    """``(N / N_s) sum_{n in subset} G_n``; the directional curvatures on the subset, the gradients on the
    whole batch; Newton steps with the subset's GGN and the whole batch's gradient."""
    model, loss_fn, x, y = mlp_problem(loss=reduction)
    n = x.shape[0]
    index = [0, 1] if subsample == 0.5 else subsample
    _, e = compile_eigen(model, loss_fn, x, y, GGNEigen(subsample=subsample))
    scale = reduction_scale(loss_fn, len(index)) / reduction_scale(loss_fn, n)  # the subset's own reduction
    G_sub = (n / len(index)) * reference.ggn(model, loss_fn, x[index], y[index]) / scale
    names = list(reference.trainable(model))
    assert e.gram.shape == ((2 if reduction == "ce" else 3) * len(index),) * 2
    check_eigenpairs(e, G_sub, names)
    d = e.directional()
    first, second = per_sample_directional(model, loss_fn, x, y, flat(e.vectors, names), index)
    assert rel_error(d.first, first) < 1e-9
    assert rel_error(d.second, second) < 1e-9
    grad = reference.grad(model, loss_fn, x, y)
    g = torch.cat([grad[n].flatten() for n in names])
    step = e.newton_step(0.1, restrict=False)
    want = -torch.linalg.solve(G_sub + 0.1 * torch.eye(G_sub.shape[0], dtype=DT), g)
    assert rel_error(torch.cat([step[n].flatten() for n in names]), want) < 1e-9


def test_subsampled_cnn_and_tied_weights():
    torch.manual_seed(8)
    model, loss_fn = TiedThreeTimes(out_dim=4).to(DT), nn.CrossEntropyLoss()
    x, y = torch.randn(4, 3, dtype=DT), torch.tensor([0, 3, 1, 2])
    _, e = compile_eigen(model, loss_fn, x, y, GGNEigen(subsample=[1, 2]))
    G_sub = 2 * reference.ggn(model, loss_fn, x[[1, 2]], y[[1, 2]]) * (2 / 4)
    check_eigenpairs(e, G_sub, list(reference.trainable(model)))
    model, x, y = small_cnn(), torch.randn(4, 2, 4, 4, dtype=DT), torch.tensor([0, 3, 1, 2])
    _, e = compile_eigen(model, loss_fn, x, y, GGNEigen(subsample=0.5))
    G_sub = 2 * reference.ggn(model, loss_fn, x[:2], y[:2]) * (2 / 4)
    check_eigenpairs(e, G_sub, list(reference.trainable(model)))


def _prefix_case(case: str):
    """(model, loss, x, y, mc) for test_prefix_subsample_propagates_the_subset_only."""
    torch.manual_seed(11)
    labels = torch.tensor([0, 3, 1, 2, 2, 0])
    if case == "cnn":  # convolutions, a max-pool (its saved indices), a flatten
        return small_cnn(), nn.CrossEntropyLoss(), torch.randn(6, 2, 4, 4, dtype=DT), labels, False
    if case == "tied":  # a weight used three times: per-sample factors summed over its uses
        return TiedThreeTimes(out_dim=4).to(DT), nn.CrossEntropyLoss(), torch.randn(6, 3, dtype=DT), labels, False
    model = nn.Sequential(nn.Linear(3, 4), Residual(4, "tanh"), nn.Linear(4, 3)).to(DT)
    x = torch.randn(6, 3, dtype=DT)
    if case == "residual":  # a fan-out: the subset's columns summed where the paths meet
        return model, nn.MSELoss(reduction="sum"), x, torch.randn(6, 3, dtype=DT), False
    if case == "indefinite":  # signed columns: their signs cut to the subset as well

        def loss_fn(f, y):
            return (torch.sin(f) * y).sum()

        return model, loss_fn, x, torch.randn(6, 3, dtype=DT), False
    return model, nn.CrossEntropyLoss(), x, torch.tensor([0, 2, 1, 1, 0, 2]), True


@pytest.mark.parametrize("case", ["cnn", "tied", "residual", "indefinite", "mc"])
def test_prefix_subsample_propagates_the_subset_only(case):
    """A fraction's factor columns start at the loss on the first ``N_s`` samples and pass every op on
    those samples alone (ViViT B.1: ``K N_s`` columns backpropagated, the gradient on all ``N``): past
    the loss's own (whole-batch) factor, cut at once, the program's loss/MC columns are ``[K, N_s, ...]``;
    the result equals the same subset given as indices (whole-batch columns cut at each use, the same
    Monte Carlo draws) and the subset's GGN ``(N / N_s) sum_{n < N_s} G_n`` (exact settings)."""
    model, loss_fn, x, y, mc = _prefix_case(case)
    n, n_sub = x.shape[0], 3
    fraction = GGNEigen(subsample=0.5, mc=mc, name="fraction")
    index = GGNEigen(subsample=[0, 1, 2], mc=mc, name="index")
    engines = {q.name: fxcurv.compile(model, loss_fn, quantities=(q,), mc_samples=2, seed=3) for q in (fraction, index)}
    stream = "mc" if mc else "loss"
    whole: dict[str, list] = {}
    for name, engine in engines.items():
        graph = engine.program(x, y).gm.graph
        columns = [v for v in graph.nodes if info(v).kind is Kind.SQRT and info(v).stream == stream and info(v).shape]
        assert {info(v).shape[1] for v in columns} <= {n, n_sub}
        whole[name] = [v for v in columns if info(v).shape[1] == n]
    assert whole["fraction"] and all(u.target is first_samples for v in whole["fraction"] for u in v.users)
    assert any(u.target is not first_samples for v in whole["index"] for u in v.users)
    e = engines["fraction"](x, y)["fraction"]
    e_index = engines["index"](x, y)["index"]
    assert rel_error(e.gram, e_index.gram) < 1e-12
    assert rel_error(e.values, e_index.values) < 1e-10
    if not mc:
        scale = 1 / n_sub if isinstance(loss_fn, nn.CrossEntropyLoss) else 1.0
        scale /= 1 / n if isinstance(loss_fn, nn.CrossEntropyLoss) else 1.0
        G_sub = (n / n_sub) * reference.ggn(model, loss_fn, x[:n_sub], y[:n_sub]) / scale
        check_eigenpairs(e, G_sub, list(reference.trainable(model)))
    names = list(reference.trainable(model))
    step, step_index = e.newton_step(0.5, restrict=False), e_index.newton_step(0.5, restrict=False)
    assert rel_error(torch.cat([step[m].flatten() for m in names]),
                     torch.cat([step_index[m].flatten() for m in names])) < 1e-9


def test_prefix_subsample_beside_a_whole_batch_quantity():
    """Where another quantity of the program needs the loss's columns on the whole batch, they are
    carried on it and the fraction's subset is cut at each use: the same Gram matrix."""
    model, loss_fn, x, y, _ = _prefix_case("residual")
    alone = fxcurv.compile(model, loss_fn, quantities=(GGNEigen(subsample=0.5),))(x, y)["ggn_eigen"]
    out = fxcurv.compile(model, loss_fn, quantities=(GGNEigen(subsample=0.5), "diag_ggn"))(x, y)
    assert rel_error(out["ggn_eigen"].gram, alone.gram) < 1e-12
    diag = reference.ggn(model, loss_fn, x, y).diagonal()
    assert rel_error(torch.cat([v.flatten() for v in out["diag_ggn"].values()]), diag) < 1e-10


# ---- options and errors ---------------------------------------------------------------------------

def test_vectors_false_keeps_the_gram_path_only():
    model, loss_fn, x, y = mlp_problem()
    engine = fxcurv.compile(model, loss_fn, quantities=(GGNEigen(vectors=False),))
    e = engine(x, y)["ggn_eigen"]
    assert rel_error(e.values, nonzero_eigenvalues(reference.ggn(model, loss_fn, x, y))) < 1e-9
    with pytest.raises(NoVectorsError, match="vectors=False"):
        e.vectors["0.weight"]
    with pytest.raises(NoVectorsError):
        e.newton_step(1.0)
    kept = fxcurv.compile(model, loss_fn, quantities=("ggn_eigen",)).memory_estimate(x, y)
    assert engine.memory_estimate(x, y).peak_bytes <= kept.peak_bytes


def test_backends_agree():
    model, x, y = small_cnn(), torch.randn(3, 2, 4, 4, dtype=DT), torch.tensor([0, 3, 1])
    loss_fn = nn.CrossEntropyLoss()
    eager = fxcurv.compile(model, loss_fn, quantities=("ggn_eigen",), backend="eager")(x, y)["ggn_eigen"]
    fused = fxcurv.compile(model, loss_fn, quantities=("ggn_eigen",))(x, y)["ggn_eigen"]
    assert rel_error(fused.gram, eager.gram) < 1e-12


@pytest.mark.parametrize("kwargs, match", [
    ({"top_k": 0}, "top_k"), ({"groups": "module"}, "groups"), ({"subsample": 1.5}, "fraction"),
    ({"groups": [["0.weight"], ["0.weight"]]}, "two groups"), ({"min_value": -1.0}, "min_value"),
    ({"keep_gram": False}, "vectors=False"),
])
def test_option_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        GGNEigen(**kwargs)


def test_call_errors_name_the_cause():
    model, loss_fn, x, y = mlp_problem()
    with pytest.raises(fxcurv.InputError, match="subsample indices"):
        fxcurv.compile(model, loss_fn, quantities=(GGNEigen(subsample=[0, 9]),))(x, y)
    with pytest.raises(ValueError, match="not"):
        fxcurv.compile(model, loss_fn, quantities=(GGNEigen(groups={"a": ["0.weight", "nope"]}),))(x, y)
    _, e = compile_eigen(model, loss_fn, x, y)
    with pytest.raises(ValueError, match="positive"):
        e.newton_step(0.0, restrict=False)
    with pytest.raises(ValueError, match="per direction"):
        e.newton_step(torch.ones(2, dtype=DT))


# ---- memory: the estimate and memory_budget= ------------------------------------------------------

def memory_problem(n: int = 128):
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(30, 60), nn.Tanh(), nn.Linear(60, 10))
    return model, nn.CrossEntropyLoss(), torch.randn(n, 30), torch.randint(0, 10, (n,))


@pytest.mark.parametrize("vectors, keep_gram", [(False, True), (False, False), (True, True)])
def test_memory_estimate_matches_the_measured_peak(vectors, keep_gram):
    """The estimate before running (program + Gram temporaries, or outputs + eigendecomposition) against
    the CPU allocator's peak during a call and its eigendecomposition (the profiler, as the benchmarks
    measure it)."""
    import sys
    from pathlib import Path

    from fxcurv.operators.gram_eigen import packed_storage

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from measure import peak_memory

    model, loss_fn, x, y = memory_problem(256)
    q = GGNEigen(vectors=vectors, keep_gram=keep_gram)
    engine = fxcurv.compile(model, loss_fn, quantities=(q,))
    estimate = q.memory(engine, x, y)
    m = 9 * 256
    packed = not keep_gram and packed_storage(x.device, x.dtype, m)
    if vectors or not (lapack_in_place(x.device, x.dtype, m) or packed):
        assert estimate.decomposition >= (3 if vectors else 1) * m * m * 4
    elif packed:  # the upper triangle, ?spevd in it
        assert m * (m + 1) // 2 * 4 <= estimate.outputs < m * m * 4
        assert 3 * m * 4 <= estimate.decomposition < 4 * m * 4
    else:  # eigenvalues in place: no copy of the Gram matrix, its O(M) workspace and one restoring block
        assert 4 * m * 4 <= estimate.decomposition < m * m * 4 / 4
    engine(x, y)  # built and warm

    def call():
        e = engine(x, y)["ggn_eigen"]
        return e.values

    measured, _, _ = peak_memory(call)
    assert abs(estimate.peak - measured) < 0.15 * measured, f"estimated {estimate.peak}, measured {measured:.0f}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_symmetric_eigenvalues_in_place(dtype, monkeypatch):
    """Eigenvalues without a copy of the matrix (LAPACK's ?syevd on it, the destroyed lower triangle and
    diagonal restored blockwise): those of torch.linalg.eigvalsh, the matrix unchanged afterwards, and
    the allocator's peak far below the M^2 entries of a copy; a matrix it cannot work on (a
    non-contiguous view) goes to torch.linalg.eigvalsh."""
    import sys
    from pathlib import Path

    from fxcurv.operators import gram_eigen

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from measure import peak_memory

    monkeypatch.setattr(gram_eigen, "IN_PLACE_BYTES", 0)  # in place however small
    if not lapack_in_place(torch.device("cpu"), dtype, 300):
        pytest.skip("SciPy is not installed: eigenvalues take torch.linalg.eigvalsh's copy")
    monkeypatch.setattr(gram_eigen, "MIRROR_BLOCK", 64)  # several block rows, a partial last one
    torch.manual_seed(12)
    a = torch.randn(300, 40, dtype=dtype)
    g = a @ a.T
    g = (g + g.T) / 2  # exactly symmetric
    g[0, 0] += 5.0  # a distinct diagonal, restored from its copy
    want = torch.linalg.eigvalsh(g.double())
    work = g.clone()
    values, _, _ = peak_memory(lambda: gram_eigen.symmetric_eigenvalues(work))
    got = gram_eigen.symmetric_eigenvalues(work.clone())
    assert got.dtype == dtype
    assert rel_error(got.double(), want) < (1e-5 if dtype == torch.float32 else 1e-12)
    assert torch.equal(work, g)
    assert values < g.numel() * g.element_size() / 8
    wide = torch.zeros(300, 600, dtype=dtype)
    wide[:, ::2] = g
    view = wide[:, ::2]
    assert not gram_eigen.eigenvalues_in_place(view)
    assert rel_error(gram_eigen.symmetric_eigenvalues(view).double(), want) < (1e-5 if dtype == torch.float32
                                                                               else 1e-12)


def test_memory_budget_picks_the_most_accurate_approximation_that_fits():
    model, loss_fn, x, y = memory_problem()
    full = GGNEigen(vectors=False)
    half = GGNEigen(vectors=False, subsample=0.5)
    need_full = full.memory(fxcurv.compile(model, loss_fn, quantities=(full,)), x, y).peak
    need_half = half.memory(fxcurv.compile(model, loss_fn, quantities=(half,)), x, y).peak
    assert need_half < need_full
    budget = (need_half + need_full) / 2
    chosen = GGNEigen(vectors=False, memory_budget=budget)
    e = fxcurv.compile(model, loss_fn, quantities=(chosen,))(x, y)["ggn_eigen"]
    assert e.setting == "exact, frac 0.5" and e.choice is not None
    assert [s for s, _ in e.choice.tried] == ["exact, full", "exact, frac 0.5"]
    assert e.choice.memory.peak <= budget
    reference_values = fxcurv.compile(model, loss_fn, quantities=(half,))(x, y)["ggn_eigen"].values
    assert torch.equal(e.values, reference_values)
    # A budget below every exact fraction: Monte Carlo columns.
    small = GGNEigen(vectors=False, memory_budget=need_half / 20)
    e = fxcurv.compile(model, loss_fn, quantities=(small,), mc_samples=1, seed=0)(x, y)["ggn_eigen"]
    assert e.setting.startswith("MC") and e.choice.memory.peak <= need_half / 20
    with pytest.raises(fxcurv.MemoryBudgetError, match="no approximation fits"):
        fxcurv.compile(model, loss_fn, quantities=(GGNEigen(memory_budget=1000),))(x, y)


def test_custom_instances_survive_pickling():
    import pickle

    model, loss_fn, x, y = mlp_problem()
    q = GGNEigen(top_k=2, groups="layer", name="layers")
    engine = pickle.loads(pickle.dumps(fxcurv.compile(model, loss_fn, quantities=(q,))))
    out = engine(x, y)["layers"]
    assert isinstance(out, BlockDiagonalEigen) and all(b.values.shape[0] <= 2 for _, b in out.items())


def _batch_norm_net():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv2d(2, 2, 2), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 2, 3))
    model[1].running_mean.normal_()
    model[1].running_var.uniform_(0.5, 2.0)
    return model.to(DT).eval(), torch.randn(4, 2, 4, 3, dtype=DT)


def _embedding_net():
    torch.manual_seed(10)
    model = nn.Sequential(nn.Embedding(5, 2, padding_idx=4), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 2, 3))
    return model.to(DT), torch.tensor([[0, 0, 4], [1, 2, 4], [3, 0, 0], [2, 2, 1]])


@pytest.mark.parametrize("subsample", [None, [3, 0]], ids=["whole", "subsample"])
@pytest.mark.parametrize("net", [_batch_norm_net, _embedding_net], ids=["batch_norm", "embedding"])
def test_batch_norm_and_embedding_gram(net, subsample):
    """The Gram rules of eval-mode batch norm and of embeddings (integer inputs); subsampling slices the
    samples, never batch norm's running statistics."""
    model, x = net()
    y, loss_fn = torch.tensor([0, 2, 1, 2]), nn.CrossEntropyLoss()
    names = list(reference.trainable(model))
    if subsample is None:
        _, e = compile_eigen(model, loss_fn, x, y)
        check_eigenpairs(e, reference.ggn(model, loss_fn, x, y), names)
        return
    _, e = compile_eigen(model, loss_fn, x, y, GGNEigen(subsample=subsample))
    n, m = x.shape[0], len(subsample)
    scale = reduction_scale(loss_fn, m) / reduction_scale(loss_fn, n)
    check_eigenpairs(e, (n / m) * reference.ggn(model, loss_fn, x[subsample], y[subsample]) / scale, names)


@pytest.mark.parametrize("norm", [nn.LayerNorm, GenericAffine], ids=["layer_norm", "generic_affine"])
def test_through_generic_ops(norm):
    """A generic node with two parameters in one Gram call (``torch.addcmul``) or the hand layer_norm op,
    and ``x.mean(1)`` (generic) between linear layers: the Gram matrix of their per-sample factors joins
    the others' (ViViT eq. S.23)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)
            self.norm = norm(4)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.norm(self.lin(x))).mean(1))

    torch.manual_seed(7)
    model = Net().to(DT)
    with torch.no_grad():
        model.norm.weight.normal_()
        model.norm.bias.normal_()
    x, y = torch.randn(3, 2, 3, dtype=DT), torch.tensor([0, 2, 1])
    loss_fn = nn.CrossEntropyLoss()
    _, e = compile_eigen(model, loss_fn, x, y)
    check_eigenpairs(e, reference.ggn(model, loss_fn, x, y), list(reference.trainable(model)))


# ---- packed storage (vectors=False) ---------------------------------------------------------------

def _packed_cases():
    rng = random.Random(51)
    torch.manual_seed(51)
    cnn = random_cnn(rng, in_shape=(2, 5, 4), out_dim=3, depth=2)
    torch.manual_seed(52)
    tied = TiedThreeTimes(out_dim=4).to(DT)
    bn, x_bn = _batch_norm_net()
    emb, x_emb = _embedding_net()
    return {
        "mlp": (nn.Sequential(nn.Linear(3, 4, bias=False), nn.Tanh(), nn.Linear(4, 4)).to(DT),
                torch.randn(5, 3, dtype=DT), torch.tensor([0, 3, 1, 2, 2])),
        "small_cnn": (small_cnn(), torch.randn(4, 2, 4, 4, dtype=DT), torch.tensor([0, 3, 1, 2])),
        "random_cnn": (cnn, torch.randn(3, 2, 5, 4, dtype=DT), torch.tensor([0, 2, 1])),
        "tied": (tied, torch.randn(3, 3, dtype=DT), torch.tensor([0, 3, 1])),
        "batch_norm": (bn, x_bn, torch.tensor([0, 2, 1, 2])),
        "embedding": (emb, x_emb, torch.tensor([0, 2, 1, 2])),
    }


@pytest.mark.parametrize("chunks", [False, True], ids=["whole", "chunked"])
@pytest.mark.parametrize("case", ["mlp", "small_cnn", "random_cnn", "tied", "batch_norm", "embedding"])
def test_packed_gram(case, chunks, monkeypatch):
    """``keep_gram=False`` above the packing threshold (set to 0 here) accumulates the Gram matrix's upper
    triangle alone (a 1-D program value; every Gram rule's way of adding: row chunks, blocks of samples,
    convolutions' position products, a weight used three times, embeddings' square shares): its
    eigenvalues (LAPACK's ?spevd in its storage) are the dense GGN's; ``.gram`` read first unpacks to the
    square Gram matrix of ``vectors=True``; after ``.values`` it is consumed (refused)."""
    from fxcurv import gram
    from fxcurv.kernels import matmul
    from fxcurv.operators import gram_eigen
    from fxcurv.quantities.ggn_eigen import FactorGramInto, GramInto

    monkeypatch.setattr(gram_eigen, "IN_PLACE_BYTES", 0)
    if not gram_eigen.packed_lapack(torch.device("cpu"), DT):
        pytest.skip("SciPy is not installed: no packed eigensolver")
    if chunks:  # and the CPU matmul epilogues (an activation's derivative) a row at a time
        monkeypatch.setattr(gram, "GRAM_ROW_ELEMENTS", 1)
        monkeypatch.setattr(gram, "GRAM_BLOCK_ELEMENTS", 1)
        monkeypatch.setattr(matmul, "EPILOGUE_WHOLE_BYTES", 0)
        monkeypatch.setattr(matmul, "EPILOGUE_CHUNK_ELEMENTS", 1)
    model, x, y = _packed_cases()[case]
    loss_fn = nn.CrossEntropyLoss()
    engine = fxcurv.compile(model, loss_fn, quantities=(GGNEigen(vectors=False, keep_gram=False),))
    grams = [n for n in engine.program(x, y).gm.graph.nodes if isinstance(n.target, (GramInto, FactorGramInto))]
    assert grams and all(len(info(n).shape) == 1 for n in grams), "the Gram values are not packed"
    want = nonzero_eigenvalues(reference.ggn(model, loss_fn, x, y))
    e = engine(x, y)["ggn_eigen"]
    assert e.values.shape == want.shape
    assert rel_error(e.values, want) < 1e-9
    with pytest.raises(gram_eigen.GramConsumedError, match="keep_gram"):
        _ = e.gram
    first = engine(x, y)["ggn_eigen"]
    _, square = compile_eigen(model, loss_fn, x, y)
    assert torch.equal(first.gram, first.gram.T)
    assert rel_error(first.gram, square.gram) < 1e-12
    assert rel_error(first.values, want) < 1e-9  # from the unpacked matrix
    kept = fxcurv.compile(model, loss_fn, quantities=(GGNEigen(vectors=False),))
    assert all(len(info(n).shape) == 2 for n in kept.program(x, y).gm.graph.nodes
               if isinstance(n.target, (GramInto, FactorGramInto))), "keep_gram=True packs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_packed_helpers(dtype):
    """PackedGram's storage and additions against the square matrix: a square share added whole, a
    rectangle straddling the diagonal, and ?spevd's eigenvalues against torch.linalg.eigvalsh."""
    from fxcurv.gram import PackedGram, add_square, packed_numel
    from fxcurv.operators import gram_eigen

    if not gram_eigen.packed_lapack(torch.device("cpu"), dtype):
        pytest.skip("SciPy is not installed: no packed eigensolver")
    torch.manual_seed(14)
    m = 37
    a = torch.randn(m, 60, dtype=dtype)  # full rank: every eigenvalue well above rounding
    g = a @ a.T
    g = (g + g.T) / 2
    packed = PackedGram.zeros(m, g)
    assert packed.data.numel() == packed_numel(m) == m * (m + 1) // 2
    add_square(packed.data, g)
    assert torch.equal(packed.full(), torch.triu(g) + torch.triu(g, 1).T)
    rect = torch.randn(7, 11, dtype=dtype)  # rows 10..16, columns 8..18: straddles the diagonal
    packed.add_(10, 8, rect)
    want = g.clone()
    upper = torch.zeros_like(g)
    upper[10:17, 8:19] = rect
    upper = torch.triu(upper)
    want += upper + torch.triu(upper, 1).T
    assert rel_error(packed.full().double(), torch.triu(want).double() + torch.triu(want, 1).T.double()) < 1e-6
    values = gram_eigen.packed_eigenvalues(PackedGram.of(packed.data.clone()))
    expect = torch.linalg.eigvalsh(packed.full().double())
    assert rel_error(values.double(), expect) < (1e-5 if dtype == torch.float32 else 1e-12)
    # A block that keeps its packed Gram matrix (positive semi-definite) computes in a copy: .gram
    # afterwards is the matrix
    psd = PackedGram.zeros(m, g)
    add_square(psd.data, g)
    square = psd.full()
    e = GramEigen(psd, columns=1, keep_gram=True)
    assert rel_error(e.values.double(), nonzero_eigenvalues(square.double())) < (1e-5 if dtype == torch.float32
                                                                                  else 1e-12)
    assert torch.equal(e.gram, square)
    with pytest.raises(ValueError, match="packed storage"):
        PackedGram.of(torch.zeros(5, dtype=dtype))
