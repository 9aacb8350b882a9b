"""KroneckerNewton: one step equals Botev et al.'s factored damped inverse applied to the gradient,
computed densely: ``-lr kron(G + pi sqrt(k) I, A + sqrt(k) / pi I)^-1 (g + eta theta)`` with eq. 38's
``pi = sqrt((tr G / O) / (tr A / I))`` and ``k = gamma + eta`` (a bias: ``-(G + k I)^-1 g``), from the
engine's factors (tested against their definitions in tests/quantities/test_kronecker.py) and the
torch.func gradient, in float64; and the step size of eq. 39-41 with the dense GGN of torch.func."""

from __future__ import annotations

import math

import pytest
import reference
import torch
from helpers import assert_close, rel_error
from optim_problems import DT, PROBLEMS, flat, params, step_delta

import fxcurv
from fxcurv.operators import Kronecker, SingularOperatorError
from fxcurv.optim import KroneckerNewton
from fxcurv.optim.kronecker_newton import damped_inverse_product, quadratic_step_size

pytestmark = pytest.mark.usefixtures("one_thread")


def eye(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=DT)


def dense_direction(factors, grad: torch.Tensor, k: float) -> torch.Tensor:
    """Botev eq. 36-38 densely: the damped inverse times the gradient, shaped like the parameter."""
    if len(factors) == 1:
        (G,) = factors
        return torch.linalg.solve(G + k * eye(G.shape[0]), grad.reshape(-1)).reshape(grad.shape)
    G, A = factors
    pi = math.sqrt((G.trace() / G.shape[0]) / (A.trace() / A.shape[0]))
    damped = torch.kron(G + pi * math.sqrt(k) * eye(G.shape[0]), A + math.sqrt(k) / pi * eye(A.shape[0]))
    return torch.linalg.solve(damped, grad.reshape(-1)).reshape(grad.shape)


@pytest.mark.parametrize("curvature", ["kflr", "kfra"])
@pytest.mark.parametrize("problem", ["mlp-N1", "mlp-N4", "cnn-N1", "cnn-N3"])
def test_step_is_the_factored_damped_inverse(curvature, problem):
    model, loss_fn, x, y = PROBLEMS[problem]()
    lr, gamma, eta = 0.7, 0.05, 0.01
    blocks = fxcurv.compile(model, loss_fn, quantities=(curvature,))(x, y)[curvature]
    g, theta = reference.grad(model, loss_fn, x, y), params(model)
    want = {n: -lr * dense_direction(blocks[n].factors, g[n] + eta * theta[n], gamma + eta) for n in g}
    assert {len(blocks[n].factors) for n in g} == {1, 2}  # weights and biases
    opt = KroneckerNewton(model, loss_fn, lr=lr, damping=gamma, weight_decay=eta, curvature=curvature)
    assert_close(step_delta(opt, x, y), want, rtol=1e-9, what=curvature)


def test_step_on_a_transposed_convolution():
    """A ConvTranspose1d weight ``[C_in, C_out, k]``: its factors split ``weight.transpose(0, 1)``, so the step
    is the dense direction of the transposed gradient, transposed back (BackPACK's recipe for its factors)."""
    torch.manual_seed(9)
    model = torch.nn.Sequential(torch.nn.ConvTranspose1d(2, 3, 2, stride=2), torch.nn.Tanh(), torch.nn.Flatten(),
                                torch.nn.Linear(18, 3)).to(DT)
    loss_fn, x, y = torch.nn.CrossEntropyLoss(), torch.randn(3, 2, 3, dtype=DT), torch.tensor([0, 2, 1])
    blocks = fxcurv.compile(model, loss_fn, quantities=("kflr",))(x, y)["kflr"]
    g = reference.grad(model, loss_fn, x, y)
    want = {n: -0.5 * dense_direction(blocks[n].factors, g[n], 0.1) for n in g if n != "0.weight"}
    want["0.weight"] = -0.5 * dense_direction(blocks["0.weight"].factors, g["0.weight"].transpose(0, 1).contiguous(),
                                              0.1).transpose(0, 1)
    opt = KroneckerNewton(model, loss_fn, lr=0.5, damping=0.1, curvature="kflr")
    got = step_delta(opt, x, y)
    assert_close(got, want, rtol=1e-9, what="kflr")
    assert rel_error(got["0.weight"], -0.5 * dense_direction(blocks["0.weight"].factors, g["0.weight"], 0.1)) > 1e-3


def test_kfac_with_the_engines_draws():
    model, loss_fn, x, y = PROBLEMS["mlp-N4"]()
    options = {"mc_samples": 2, "seed": 1}
    blocks = fxcurv.compile(model, loss_fn, quantities=("kfac",), **options)(x, y)["kfac"]
    g = reference.grad(model, loss_fn, x, y)
    opt = KroneckerNewton(model, loss_fn, lr=1.0, damping=0.1, curvature="kfac", compile_options=options)
    assert_close(step_delta(opt, x, y), {n: -dense_direction(blocks[n].factors, g[n], 0.1) for n in g}, rtol=1e-9)


@pytest.mark.parametrize("problem", ["mlp-N4", "cnn-N3"])
def test_quadratic_step_size_is_botev_eq_40(problem):
    """``theta <- theta - lr alpha delta``, ``alpha = delta.g / (delta^T G delta + (tau + eta) delta.delta)`` with
    the dense GGN of torch.func (eq. 39-41)."""
    model, loss_fn, x, y = PROBLEMS[problem]()
    lr, gamma, eta, tau = 0.5, 0.1, 0.02, 0.3
    blocks = fxcurv.compile(model, loss_fn, quantities=("kflr",))(x, y)["kflr"]
    g, theta = reference.grad(model, loss_fn, x, y), params(model)
    names = list(g)
    grad = {n: g[n] + eta * theta[n] for n in names}
    direction = flat({n: dense_direction(blocks[n].factors, grad[n], gamma + eta) for n in names}, names)
    G = reference.ggn(model, loss_fn, x, y)
    alpha = direction @ flat(grad, names) / (direction @ G @ direction + (tau + eta) * direction @ direction)
    opt = KroneckerNewton(model, loss_fn, lr=lr, damping=gamma, weight_decay=eta, step_size="quadratic", tau=tau)
    delta = step_delta(opt, x, y)
    assert rel_error(flat(delta, names), -lr * alpha * direction) < 1e-9


def test_zero_block_is_damping_alone():
    """A two-factor block with a zero factor is the zero matrix: ``(0 + k I)^-1 v = v / k`` exactly, the
    exact damped inverse's value (eq. 38's pi is undefined there)."""
    torch.manual_seed(0)
    G = torch.randn(3, 3, dtype=DT)
    block = Kronecker((G @ G.T, torch.zeros(2, 2, dtype=DT)))
    v = torch.randn(3, 2, dtype=DT)
    assert torch.equal(damped_inverse_product(block, v, 0.25, "optimal"), v / 0.25)
    assert rel_error(block.inverse(0.25) @ v, v / 0.25) < 1e-12


def test_quadratic_step_size_edge_cases():
    """A zero direction takes no step; zero curvature along a nonzero direction is refused (not inf)."""
    v, g = torch.tensor([1.0, -2.0], dtype=DT), torch.tensor([0.5, 0.5], dtype=DT)
    assert quadratic_step_size(torch.zeros(2, dtype=DT), g, torch.zeros(2, dtype=DT), 0.0) == 0
    assert quadratic_step_size(v, g, 3 * v, 0.5) == pytest.approx((0.5 - 1.0) / (3 * 5 + 0.5 * 5))
    with pytest.raises(SingularOperatorError, match="tau > 0"):
        quadratic_step_size(v, g, torch.zeros(2, dtype=DT), 0.0)
