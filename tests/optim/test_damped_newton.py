"""DampedNewton: one step equals ViViT's damped Newton step computed densely from the GGN of torch.func in
float64: ``-sum_k (g . e_k) / (lambda_k + delta_k) e_k`` over the (top-k) eigenvectors of ``G`` (eq. 9),
``-(G + delta I)^-1 g`` with ``restrict=False`` (eq. S.25), and the same per block of the block-diagonal
GGN with ``groups=`` (C.2); the bootstrap's dampings (B.3, tested by brute force in
tests/quantities/test_ggn_eigen.py) enter the dense formula direction by direction."""

from __future__ import annotations

import pytest
import reference
import torch
from optim_problems import DT, PROBLEMS, flat, step_delta

import fxcurv
from fxcurv.optim import DampedNewton
from fxcurv.quantities import GGNEigen

pytestmark = pytest.mark.usefixtures("one_thread")

# Dense eigenvalues at or below this fraction of the largest are the GGN's zeros (float64 noise ~1e-15).
ZERO = 1e-12


def restricted_step(G: torch.Tensor, g: torch.Tensor, damping, top_k: int | None = None) -> torch.Tensor:
    """``-U diag(1 / (lambda + damping)) U^T g`` over the nonzero (top-k) eigenpairs of the dense ``G``."""
    lam, U = torch.linalg.eigh(G)
    order = torch.argsort(lam, descending=True)
    lam, U = lam[order], U[:, order]
    keep = lam > ZERO * lam.max()
    lam, U = lam[keep][:top_k], U[:, keep][:, :top_k]
    return -U @ ((U.T @ g) / (lam + damping))


def full_step(G: torch.Tensor, g: torch.Tensor, damping: float) -> torch.Tensor:
    return -torch.linalg.solve(G + damping * torch.eye(G.shape[0], dtype=DT), g)


def dense(model, loss_fn, x, y) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[str]]:
    """The dense GGN, the gradient by parameter and the parameter names (the GGN's order)."""
    return reference.ggn(model, loss_fn, x, y), reference.grad(model, loss_fn, x, y), list(reference.trainable(model))


def block(G: torch.Tensor, names: list[str], members: list[str], model) -> torch.Tensor:
    """The rows and columns of ``members`` of the dense ``G`` over ``names``."""
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    starts = dict(zip(names, [sum(sizes[m] for m in names[:i]) for i in range(len(names))]))
    index = torch.cat([torch.arange(starts[n], starts[n] + sizes[n]) for n in members])
    return G[index][:, index]


@pytest.mark.parametrize("top_k", [None, 3])
@pytest.mark.parametrize("problem", ["mlp-N1", "mlp-N4", "cnn-N3"])
def test_step_in_the_eigenspace(problem, top_k):
    model, loss_fn, x, y = PROBLEMS[problem]()
    G, g, names = dense(model, loss_fn, x, y)
    lr, damping = 0.8, 0.3
    opt = DampedNewton(model, loss_fn, lr=lr, damping=damping, curvature=GGNEigen(top_k=top_k))
    got = flat(step_delta(opt, x, y), names)
    assert torch.allclose(got, lr * restricted_step(G, flat(g, names), damping, top_k), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("problem", ["mlp-N1", "cnn-N3"])
def test_full_space_step(problem):
    model, loss_fn, x, y = PROBLEMS[problem]()
    G, g, names = dense(model, loss_fn, x, y)
    opt = DampedNewton(model, loss_fn, lr=1.0, damping=0.2, restrict=False)
    assert torch.allclose(flat(step_delta(opt, x, y), names), full_step(G, flat(g, names), 0.2), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("restrict", [True, False])
def test_block_diagonal_per_layer(restrict):
    """ViViT C.2: each layer's block of the dense GGN solved on its own (its eigenspace, or the whole block)."""
    model, loss_fn, x, y = PROBLEMS["mlp-N4"]()
    G, g, names = dense(model, loss_fn, x, y)
    opt = DampedNewton(model, loss_fn, lr=1.0, damping=0.4, restrict=restrict, curvature=GGNEigen(groups="layer"))
    delta = step_delta(opt, x, y)
    for members in (["0.weight", "0.bias"], ["2.weight", "2.bias"]):
        Gb = block(G, names, members, model)
        gb = flat(g, members)
        want = restricted_step(Gb, gb, 0.4) if restrict else full_step(Gb, gb, 0.4)
        assert torch.allclose(flat(delta, members), want, rtol=1e-8, atol=1e-12)


def test_explicit_groups_leave_the_rest_alone():
    model, loss_fn, x, y = PROBLEMS["mlp-N4"]()
    G, g, names = dense(model, loss_fn, x, y)
    opt = DampedNewton(model, loss_fn, lr=1.0, damping=0.4, restrict=False,
                       curvature=GGNEigen(groups={"last": ["2.weight", "2.bias"]}))
    delta = step_delta(opt, x, y)
    members = ["2.weight", "2.bias"]
    want = full_step(block(G, names, members, model), flat(g, members), 0.4)
    assert torch.allclose(flat(delta, members), want, rtol=1e-8, atol=1e-12)
    assert not delta["0.weight"].any() and not delta["0.bias"].any()


@pytest.mark.parametrize("groups", [None, "layer"])
def test_bootstrap_damping(groups):
    """``damping="bootstrap"``: the dense restricted step with one damping per direction, the bootstrap's
    choice from the same resampling seed."""
    model, loss_fn, x, y = PROBLEMS["mlp-N4"]()
    G, g, names = dense(model, loss_fn, x, y)
    grid = torch.logspace(-3, 1, 9, dtype=DT)
    options = dict(grid=grid, resamples=30)
    eigen = fxcurv.compile(model, loss_fn, quantities=(GGNEigen(groups=groups),))(x, y)["ggn_eigen"]
    opt = DampedNewton(model, loss_fn, lr=1.0, damping="bootstrap", curvature=GGNEigen(groups=groups),
                       generator=torch.Generator().manual_seed(2), **options)
    delta = step_delta(opt, x, y)
    generator = torch.Generator().manual_seed(2)
    if groups is None:
        chosen = eigen.bootstrap_damping(generator=generator, **options)
        assert torch.equal(opt.last_damping, chosen)
        assert torch.allclose(flat(delta, names), restricted_step(G, flat(g, names), chosen), rtol=1e-8, atol=1e-12)
        return
    for group, members in (("0", ["0.weight", "0.bias"]), ("2", ["2.weight", "2.bias"])):
        chosen = eigen[group].bootstrap_damping(generator=generator, **options)
        assert torch.equal(opt.last_damping[group], chosen)
        want = restricted_step(block(G, names, members, model), flat(g, members), chosen)
        assert torch.allclose(flat(delta, members), want, rtol=1e-8, atol=1e-12)


def test_monte_carlo_is_the_engines_step():
    """``ggn_eigen_mc``: the Newton step of the same seeded engine's Monte Carlo GGN (its eigenpairs are
    tested against the sampled columns' GGN in tests/quantities/test_ggn_eigen.py)."""
    model, loss_fn, x, y = PROBLEMS["mlp-N4"]()
    names = list(reference.trainable(model))
    options = {"mc_samples": 2, "seed": 3}
    eigen = fxcurv.compile(model, loss_fn, quantities=("ggn_eigen_mc",), **options)(x, y)["ggn_eigen_mc"]
    want = flat(eigen.newton_step(0.5), names)
    opt = DampedNewton(model, loss_fn, lr=1.0, damping=0.5, curvature="ggn_eigen_mc", compile_options=options)
    assert torch.allclose(flat(step_delta(opt, x, y), names), want, rtol=1e-10, atol=1e-14)
