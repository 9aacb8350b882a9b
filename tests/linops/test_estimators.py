"""Estimators on fxcurv.linops operators against exact values: the ``diag_ggn`` quantity (its sum is the
trace), the ``ggn_eigen`` quantity's eigenvalues and the dense matrix's. Stochastic estimates are checked
at a fixed seed against their own variance computed from the dense matrix (four standard deviations)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxcurv
from fxcurv import linops

DT = torch.float64


def _setup(n: int = 6, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    g = torch.Generator().manual_seed(seed + 1)
    x, y = torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)
    engine = fxcurv.compile(model, nn.CrossEntropyLoss(), quantities=("diag_ggn", "ggn_eigen"))
    return engine, x, y


def _flat(result: dict) -> torch.Tensor:
    return torch.cat([v.flatten() for v in result.values()])


def test_hutchinson_trace_and_diagonal_against_diag_ggn():
    engine, x, y = _setup()
    exact = _flat(engine(x, y)["diag_ggn"])
    op = linops.GGN(engine, [(x, y)], chunk=100)
    G = op.to_dense()
    off = G.square().sum() - G.diagonal().square().sum()  # sum of squared off-diagonal entries
    s = 400
    trace = linops.hutchinson_trace(op, s, seed=1)
    # Var[z^T G z] = 2 sum_{j != k} G_jk^2 for Rademacher z
    assert abs(trace.value - exact.sum().item()) < 4 * (2 * off / s).sqrt().item()
    assert trace.std_error == pytest.approx((2 * off / s).sqrt().item(), rel=0.5)
    diag = linops.hutchinson_diagonal(op, s, seed=2)
    # E ||d - diag G||^2 = sum_{j != k} G_jk^2 / s
    assert (diag.value - exact).norm() < 4 * (off / s).sqrt()
    assert diag.value.shape == exact.shape


def test_hutchpp_is_exact_once_its_sketch_spans_the_range():
    """The GGN of ``N`` samples and ``C = 3`` classes has rank ``<= N (C - 1) = 4`` for ``N = 2``: a sketch of
    5 columns spans its range, the deflated remainder vanishes, and Hutch++ returns the trace."""
    engine, x, y = _setup(n=2)
    exact = _flat(engine(x, y)["diag_ggn"]).sum().item()
    op = linops.GGN(engine, [(x, y)])
    assert linops.hutchpp_trace(op, 15, seed=0) == pytest.approx(exact, rel=1e-10)


def test_lanczos_top_eigenvalues_against_ggn_eigen_and_dense():
    pytest.importorskip("scipy")
    engine, x, y = _setup()
    op = linops.GGN(engine, [(x, y)])
    values = linops.top_eigenvalues(op, 4, seed=0)
    torch.testing.assert_close(values, engine(x, y)["ggn_eigen"].values[:4], rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(values, torch.linalg.eigvalsh(op.to_dense()).flip(0)[:4], rtol=1e-8, atol=1e-12)
    values, vectors = linops.top_eigenvalues(op, 2, vectors=True)
    torch.testing.assert_close(op @ vectors, vectors * values, rtol=1e-7, atol=1e-10)
