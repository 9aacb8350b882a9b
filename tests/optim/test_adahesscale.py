"""AdaHesScale: three steps equal HesScale Algorithm 2 run by hand -- moments, bias corrections, eps under
the square root -- with the gradient (torch.func) and the HesScale(GN) diagonal (brute force,
tests/hesscale_reference.py) recomputed at every step's parameters, in float64."""

from __future__ import annotations

import hesscale_reference
import pytest
import reference
import torch
from helpers import assert_close
from optim_problems import PROBLEMS, params

from fxcurv.optim import AdaHesScale

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 3


def algorithm_2(model, loss_fn, x, y, diagonal, lr, betas, eps) -> list[dict[str, torch.Tensor]]:
    """HesScale Algorithm 2 on a copy of the parameters: their values after each of ``STEPS`` steps."""
    beta1, beta2 = betas
    m = {n: torch.zeros_like(p) for n, p in params(model).items()}
    v = {n: torch.zeros_like(p) for n, p in params(model).items()}
    trajectory = []
    for t in range(1, STEPS + 1):
        F = reference.grad(model, loss_fn, x, y)
        S = diagonal(model, loss_fn, x, y)
        with torch.no_grad():
            for n, W in model.named_parameters():
                m[n] = beta1 * m[n] + (1 - beta1) * F[n]
                v[n] = beta2 * v[n] + (1 - beta2) * S[n] ** 2
                m_hat, v_hat = m[n] / (1 - beta1**t), v[n] / (1 - beta2**t)
                W -= lr * m_hat / (v_hat + eps) ** 0.5
        trajectory.append(params(model))
    return trajectory


@pytest.mark.parametrize("curvature", ["hesscale", "hesscale_gn"])
@pytest.mark.parametrize("problem", ["mlp-N1", "mlp-mse-N3", "cnn-N3"])
def test_three_steps_are_algorithm_2(curvature, problem):
    model, loss_fn, x, y = PROBLEMS[problem]()
    start = params(model)
    # A large eps (relative to S^2) and betas far from 1 make every term of the update matter.
    lr, betas, eps = 0.05, (0.8, 0.9), 1e-3
    want = algorithm_2(model, loss_fn, x, y, getattr(hesscale_reference, curvature), lr, betas, eps)
    model.load_state_dict(start)
    opt = AdaHesScale(model, loss_fn, lr=lr, betas=betas, eps=eps, curvature=curvature)
    for t in range(STEPS):
        opt.step(x, y)
        assert_close(params(model), want[t], rtol=1e-10, what=f"step {t + 1}")
    state = opt.state[next(iter(model.parameters()))]
    assert state["step"] == STEPS and set(state) == {"step", "exp_avg", "exp_avg_sq"}
