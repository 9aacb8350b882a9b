"""DiagonalNewton: one step is ``-lr g / (|d| + damping)`` with the gradient and the curvature diagonal of
independent float64 references (torch.func for the exact GGN and Hessian diagonals, the brute-force
HesScale of tests/hesscale_reference.py), on an MLP and a CNN with N = 1 and N > 1."""

from __future__ import annotations

import hesscale_reference
import pytest
import reference
from helpers import assert_close
from optim_problems import PROBLEMS, step_delta

import fxcurv
from fxcurv.optim import DiagonalNewton

pytestmark = pytest.mark.usefixtures("one_thread")

REFERENCES = {"diag_ggn": reference.diag_ggn, "diag_hessian": reference.diag_hessian,
              "hesscale": hesscale_reference.hesscale, "hesscale_gn": hesscale_reference.hesscale_gn}


@pytest.mark.parametrize("curvature", list(REFERENCES))
@pytest.mark.parametrize("problem", ["mlp-N1", "mlp-N4", "cnn-N3"])
def test_step_is_the_elementwise_formula(curvature, problem):
    model, loss_fn, x, y = PROBLEMS[problem]()
    g = reference.grad(model, loss_fn, x, y)
    d = REFERENCES[curvature](model, loss_fn, x, y)
    lr, damping = 0.3, 0.05
    opt = DiagonalNewton(model, loss_fn, lr=lr, damping=damping, curvature=curvature)
    want = {n: -lr * g[n] / (d[n].abs() + damping) for n in g}
    assert_close(step_delta(opt, x, y), want, rtol=1e-10, what=curvature)


def test_negative_entries_step_downhill():
    """The sign rule: where the Hessian diagonal is negative the step still opposes the gradient."""
    model, loss_fn, x, y = PROBLEMS["mlp-N4"]()
    d = reference.diag_hessian(model, loss_fn, x, y)
    assert any((v < 0).any() for v in d.values()), "the problem must have negative Hessian-diagonal entries"
    g = reference.grad(model, loss_fn, x, y)
    delta = step_delta(DiagonalNewton(model, loss_fn, lr=1.0, curvature="diag_hessian"), x, y)
    for n in g:
        assert (delta[n] * g[n] <= 0).all()


def test_monte_carlo_diagonal_is_the_engines():
    """diag_ggn_mc: the formula with the diagonal the same seeded engine draws (the MC diagonal itself is
    tested against its definition in tests/test_mc.py)."""
    model, loss_fn, x, y = PROBLEMS["mlp-N4"]()
    options = {"mc_samples": 3, "seed": 4}
    d = fxcurv.compile(model, loss_fn, quantities=("diag_ggn_mc",), **options)(x, y)["diag_ggn_mc"]
    g = reference.grad(model, loss_fn, x, y)
    opt = DiagonalNewton(model, loss_fn, lr=0.5, damping=0.1, curvature="diag_ggn_mc", compile_options=options)
    assert_close(step_delta(opt, x, y), {n: -0.5 * g[n] / (d[n].abs() + 0.1) for n in g}, rtol=1e-10)
