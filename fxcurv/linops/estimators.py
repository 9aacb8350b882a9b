"""Estimators on top of any symmetric operator ``A`` ``[P, P]`` known through products (``A @ V``, ``A.shape``,
``A.dtype``, ``A.device``; every :mod:`fxcurv.linops` operator): traces, diagonals, top eigenvalues.

* :func:`hutchinson_trace`: ``tr(A) ~ (1/s) sum_i z_i^T A z_i`` with Rademacher ``z_i`` (Hutchinson 1989);
  unbiased, variance ``2 (||A||_F^2 - sum_j A_jj^2) / s``; returned with its empirical standard error.
* :func:`hutchinson_diagonal`: ``diag(A) ~ (1/s) sum_i z_i o (A z_i)`` (Bekas et al. 2007); unbiased,
  entry ``j`` with variance ``sum_{k != j} A_jk^2 / s``.
* :func:`hutchpp_trace`: Hutch++ (Meyer, Musco, Musco, Woodruff 2021, Algorithm 1) with ``m`` products:
  ``Q`` an orthonormal basis of ``A S`` (``S`` ``m/3`` sign columns), ``tr(Q^T A Q)`` exactly plus
  Hutchinson on the deflated ``(I - QQ^T) A (I - QQ^T)`` with ``m/3`` more; exact when ``m/3`` reaches the
  rank of ``A``, relative error ``O(1/m)`` for PSD ``A`` otherwise.
* :func:`top_eigenvalues`: the ``k`` largest (algebraic) eigenvalues by Lanczos (ARPACK's implicitly
  restarted Lanczos through ``scipy.sparse.linalg.eigsh`` on ``A.to_scipy()``).

Random draws come from a ``torch.Generator`` seeded with ``seed`` on the operator's device: the results are
reproducible and the global random state is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TraceEstimate:
    """A stochastic trace estimate: ``value``, its estimated standard error, the products used."""

    value: float
    std_error: float
    products: int


@dataclass(frozen=True)
class DiagonalEstimate:
    """A stochastic diagonal estimate ``value [P]`` and the standard error of each entry."""

    value: torch.Tensor
    std_error: torch.Tensor
    products: int


def _check_samples(samples: int, least: int = 1) -> None:
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < least:
        raise ValueError(f"the number of samples must be an integer >= {least}, got {samples!r}")


def rademacher(op: Any, columns: int, generator: torch.Generator) -> torch.Tensor:
    """``[P, columns]`` independent signs ``+-1`` in the operator's dtype and device."""
    z = torch.randint(0, 2, (op.shape[1], columns), generator=generator, device=op.device)
    return (2 * z - 1).to(op.dtype)


def _generator(op: Any, seed: int) -> torch.Generator:
    return torch.Generator(device=op.device).manual_seed(seed)


def hutchinson_trace(op: Any, samples: int, *, seed: int = 0) -> TraceEstimate:
    """``tr(A)`` from ``samples`` Rademacher products, with the standard error of the mean."""
    _check_samples(samples, 2)
    Z = rademacher(op, samples, _generator(op, seed))
    terms = (Z * (op @ Z)).sum(0)  # z_i^T A z_i
    return TraceEstimate(float(terms.mean()), float(terms.std() / samples ** 0.5), samples)


def hutchinson_diagonal(op: Any, samples: int, *, seed: int = 0) -> DiagonalEstimate:
    """``diag(A)`` ``[P]`` from ``samples`` Rademacher products, with per-entry standard errors."""
    _check_samples(samples, 2)
    Z = rademacher(op, samples, _generator(op, seed))
    terms = Z * (op @ Z)  # [P, s]: z_ij (A z_i)_j
    return DiagonalEstimate(terms.mean(1), terms.std(1) / samples ** 0.5, samples)


def hutchpp_trace(op: Any, products: int, *, seed: int = 0) -> float:
    """Hutch++'s ``tr(A)`` from ``products`` products (a multiple of 3 used: ``m/3`` each for the sketch
    ``A S``, the exact part ``A Q`` and the deflated Hutchinson part)."""
    _check_samples(products, 3)
    third = products // 3
    gen = _generator(op, seed)
    S = rademacher(op, third, gen)
    G = rademacher(op, third, gen)
    Q, _ = torch.linalg.qr(op @ S)  # [P, m/3], orthonormal
    exact = (Q * (op @ Q)).sum()  # tr(Q^T A Q)
    G = G - Q @ (Q.mT @ G)  # (I - Q Q^T) G
    deflated = (G * (op @ G)).sum() / third
    return float(exact + deflated)


def top_eigenvalues(op: Any, k: int, *, tol: float = 0.0, seed: int = 0,
                    vectors: bool = False) -> Any:
    """The ``k`` largest eigenvalues of ``A``, descending (``torch`` float64), by Lanczos; with
    ``vectors=True`` also the eigenvectors ``[P, k]`` (columns, same order). ``tol`` is ARPACK's relative
    accuracy (0: machine precision); the start vector is drawn from ``seed``."""
    import numpy as np
    from scipy.sparse.linalg import eigsh

    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k < op.shape[0]:
        raise ValueError(f"k must be an integer in [1, P) = [1, {op.shape[0]}), got {k!r}; for all eigenvalues of "
                         "a small operator use torch.linalg.eigvalsh(A.to_dense())")
    v0 = np.random.default_rng(seed).standard_normal(op.shape[0])
    values, vecs = eigsh(op.to_scipy(), k=k, which="LA", tol=tol, v0=v0)
    order = np.argsort(values)[::-1]
    out = torch.from_numpy(values[order].copy())
    if vectors:
        return out, torch.from_numpy(vecs[:, order].copy())
    return out
