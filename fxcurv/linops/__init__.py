"""Matrix-free curvature operators of a data set's loss over all (or chosen) trainable parameters, and
estimators on top of them.

| name | what |
| --- | --- |
| :class:`GGN` | ``sum_b w_b J_b^T H_b J_b``, exact |
| :class:`Hessian` | ``sum_b w_b d2L_b/dtheta2``, exact |
| :class:`EmpiricalFisher` | ``(1/W) sum_n grad l_n grad l_n^T`` (curvlinops' ``EFLinearOperator`` scaling) |
| :class:`MCFisher` | ``J^T S_mc S_mc^T J`` with sampled loss columns, ``E = GGN`` |
| :func:`hutchinson_trace`, :func:`hutchinson_diagonal`, :func:`hutchpp_trace` | stochastic trace/diagonal |
| :func:`top_eigenvalues` | the largest eigenvalues by Lanczos (``scipy.sparse.linalg.eigsh``) |

``op = GGN(engine, data)`` with ``engine = fxcurv.compile(model, loss_fn)`` and ``data`` an iterable of
``(x, y)`` batches; ``op @ v`` for ``v [P]`` or ``[P, K]``, ``op.to_scipy()``. SciPy is imported only by
``to_scipy()`` and :func:`top_eigenvalues`.
"""

from .base import DataSet, LinearOperator, ParameterSpace
from .curvature import GGN, EmpiricalFisher, Hessian, MCFisher
from .estimators import (
    DiagonalEstimate,
    TraceEstimate,
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
    top_eigenvalues,
)

__all__ = [
    "GGN", "Hessian", "EmpiricalFisher", "MCFisher", "LinearOperator", "ParameterSpace", "DataSet",
    "hutchinson_trace", "hutchinson_diagonal", "hutchpp_trace", "top_eigenvalues", "TraceEstimate",
    "DiagonalEstimate",
]
