"""fxcurv.operators.BlockOperator (exact blocks known through products) and the common base, against
dense torch computations (float64): a random symmetric block, and a real per-parameter Hessian block
of a small layer whose products come from autograd (double backward) and whose dense reference is
its closed form.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import rel_error

from fxcurv.operators import (
    DIAG_MAX_COLUMNS,
    BlockOperator,
    CurvatureOperator,
    DampedOperator,
    DenseSizeError,
    Kronecker,
)

F64 = torch.float64
TIGHT = 1e-12


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_symmetric(P: int, seed: int = 0) -> torch.Tensor:
    X = torch.randn(P, P, generator=gen(seed), dtype=F64)
    return X + X.T


class Recorder:
    """``matvec`` of a dense matrix that records the column counts it was called with."""

    def __init__(self, D: torch.Tensor):
        self.D = D
        self.calls: list[int] = []

    def __call__(self, V: torch.Tensor) -> torch.Tensor:
        self.calls.append(V.shape[1])
        return self.D @ V


def block(D: torch.Tensor, shape=(3, 4), **kw) -> tuple[BlockOperator, Recorder]:
    mv = Recorder(D)
    return BlockOperator(mv, shape, D.dtype, D.device, **kw), mv


def unreachable(V: torch.Tensor) -> torch.Tensor:
    raise AssertionError("the operator must refuse before any product")


# ---- products ------------------------------------------------------------------------------------

def test_products_shaped_like_their_operand():
    D = random_symmetric(12)
    op, mv = block(D)
    g = gen(1)
    W = torch.randn(3, 4, generator=g, dtype=F64)
    out = op @ W
    assert out.shape == (3, 4) and rel_error(out.reshape(-1), D @ W.reshape(-1)) < TIGHT
    flat = op @ W.reshape(-1)
    assert flat.shape == (12,) and rel_error(flat, D @ W.reshape(-1)) < TIGHT
    V = torch.randn(12, 5, generator=g, dtype=F64)
    assert rel_error(op @ V, D @ V) < TIGHT
    assert mv.calls == [1, 1, 5]  # parameter-shaped and flat operands are one column
    with pytest.raises(ValueError, match=r"shaped like the parameter \(3, 4\), flat \[12\]"):
        op @ torch.zeros(4, 3, dtype=F64)
    with pytest.raises(TypeError, match="pass v.to"):
        op @ W.float()


def test_matvec_and_diag_results_are_checked():
    D = random_symmetric(12)
    wrong_shape = BlockOperator(lambda V: (D @ V)[:-1], (12,), F64, D.device, label="block_ggn")
    with pytest.raises(ValueError, match=r"block_ggn.*returned \(11, 2\); it must return a tensor \[12, 2\]"):
        wrong_shape @ torch.zeros(12, 2, dtype=F64)
    wrong_dtype = BlockOperator(lambda V: (D @ V).float(), (12,), F64, D.device)
    with pytest.raises(TypeError, match="returned torch.float32"):
        wrong_dtype @ torch.zeros(12, dtype=F64)
    bad_diag = BlockOperator(lambda V: D @ V, (12,), F64, D.device, diag=lambda: D.diagonal()[:5])
    with pytest.raises(ValueError, match="diag callable returned"):
        bad_diag.diag()
    with pytest.raises(TypeError, match="matvec must be callable"):
        BlockOperator(D, (12,), F64, D.device)
    with pytest.raises(ValueError, match="chunk_columns must be >= 1"):
        BlockOperator(lambda V: V, (12,), F64, D.device, chunk_columns=0)
    with pytest.raises(TypeError, match="real floating point"):
        BlockOperator(lambda V: V, (12,), torch.int64, D.device)


# ---- dense, diagonal, trace -----------------------------------------------------------------------

def test_to_dense_by_identity_chunks():
    D = random_symmetric(12, seed=2)
    op, mv = block(D, chunk_columns=5)
    assert torch.equal(op.to_dense(), D @ torch.eye(12, dtype=F64, device=D.device))
    assert mv.calls == [5, 5, 2]


def test_diag_and_trace_from_columns():
    D = random_symmetric(12, seed=3)
    op, mv = block(D, chunk_columns=7)
    d = op.diag()
    assert d.shape == (3, 4) and rel_error(d.reshape(-1), D.diagonal()) < TIGHT
    assert mv.calls == [7, 5]
    assert rel_error(op.trace(), D.trace()) < TIGHT


def test_diag_callable_is_used():
    D = random_symmetric(12, seed=4)
    mv = Recorder(D)
    op = BlockOperator(mv, (3, 4), F64, D.device, diag=lambda: D.diagonal().clone())
    assert torch.equal(op.diag(), D.diagonal().reshape(3, 4))
    assert op.trace() == D.trace()
    assert mv.calls == []
    assert "its own diagonal" in repr(op)


def test_size_limits_refuse_before_any_product():
    P = 20_000  # a float64 dense block of 3.2 GB
    op = BlockOperator(unreachable, (100, 200), F64, "cpu", label="block_hessian")
    need = P * P * 8
    with pytest.raises(DenseSizeError, match=rf"block_hessian.*\[{P}, {P}\] torch.float64 matrix: 2.98 GiB "
                                             rf"\({need} bytes\).*max_bytes={need}"):
        op.to_dense()
    with pytest.raises(DenseSizeError, match=rf"{P} products, above the limit of {DIAG_MAX_COLUMNS}.*diag="):
        op.diag()
    with pytest.raises(DenseSizeError, match="products"):
        op.trace()
    small, _ = block(random_symmetric(12))
    with pytest.raises(DenseSizeError, match="max_bytes=1152"):
        small.to_dense(max_bytes=1000)
    with pytest.raises(DenseSizeError, match="max_columns=12"):
        small.diag(max_columns=11)
    assert small.diag(max_columns=12).shape == (3, 4)


def test_asymmetry_helper():
    D = random_symmetric(12, seed=5)
    assert block(D)[0].asymmetry() < 1e-14
    N = D + torch.triu(torch.ones_like(D))
    assert block(N)[0].asymmetry() > 1e-2
    assert block(N)[0].asymmetry() == block(N)[0].asymmetry(seed=0) != block(N)[0].asymmetry(seed=1)  # seeded


def test_attributes_and_repr():
    D = random_symmetric(24)
    op, _ = block(D, shape=(2, 3, 4), label="block_ggn")
    assert op.shape == (24, 24) and op.param_shape == torch.Size([2, 3, 4]) and op.numel == 24
    assert op.dtype == F64 and op.device == D.device
    assert BlockOperator(unreachable, (3,), F64, "cpu").device == torch.device("cpu")  # normalized like a tensor's
    text = repr(op)
    assert "block_ggn" in text and "matrix-free" in text and "parameter [2, 3, 4]" in text and "P=24" in text


# ---- a real block: the Hessian of a layer's loss w.r.t. its weight --------------------------------

def test_hessian_block_of_a_layer():
    """The matrix-free operator an exact block quantity returns: products by double backward (autograd's
    Hessian-vector product, column by column) against the closed-form Hessian of
    ``L(W) = 1/2 sum_n ||tanh(W x_n) - y_n||^2``: ``H = sum_n kron(diag(c_n), x_n x_n^T)`` with
    ``c_n = (1 - a_n^2)^2 - 2 r_n a_n (1 - a_n^2)``, ``a_n = tanh(W x_n)``, ``r_n = a_n - y_n``
    (GGN plus the residual term, HBP eq. S.9, in row-major order)."""
    g = gen(6)
    x = torch.randn(8, 4, generator=g, dtype=F64)
    y = torch.randn(8, 3, generator=g, dtype=F64)
    W0 = torch.randn(3, 4, generator=g, dtype=F64)

    def matvec(V: torch.Tensor) -> torch.Tensor:
        W = W0.detach().requires_grad_()
        (grad,) = torch.autograd.grad(((torch.tanh(x @ W.T) - y) ** 2).sum() / 2, W, create_graph=True)
        cols = [torch.autograd.grad(grad, W, v.reshape(3, 4), retain_graph=True)[0].reshape(-1) for v in V.T]
        return torch.stack(cols, dim=1) if cols else V.new_zeros(V.shape)

    op = BlockOperator(matvec, W0.shape, F64, W0.device, label="block_hessian", chunk_columns=5)
    a = torch.tanh(x @ W0.T)
    c = (1 - a**2) ** 2 - 2 * (a - y) * a * (1 - a**2)
    H = sum(torch.kron(torch.diag(c[n]), torch.outer(x[n], x[n])) for n in range(8))
    assert rel_error(op.to_dense(), H) < TIGHT
    assert rel_error(op.diag().reshape(-1), H.diagonal()) < TIGHT
    assert rel_error(op.trace(), H.trace()) < TIGHT
    V = torch.randn(12, 3, generator=g, dtype=F64)
    assert rel_error(op @ V, H @ V) < TIGHT
    assert op.asymmetry() < 1e-12
    # a Hessian block can be indefinite: the damping of EA-CG eq. 9 shifts its spectrum for CG
    lowest = torch.linalg.eigvalsh(H).min().item()
    assert lowest < 0
    assert torch.linalg.eigvalsh(op.damped(-lowest + 0.1).to_dense()).min() > 0.09


# ---- the common base ---------------------------------------------------------------------------------

def test_kronecker_and_block_share_the_base():
    """A Kronecker block and a BlockOperator made from its products answer every base call alike."""
    g = gen(7)
    G = torch.randn(3, 5, generator=g, dtype=F64)
    A = torch.randn(4, 6, generator=g, dtype=F64)
    k = Kronecker((G @ G.T, A @ A.T), (3, 2, 2))
    op = BlockOperator(lambda V: k @ V, (3, 2, 2), F64, G.device, chunk_columns=5)
    assert isinstance(k, CurvatureOperator) and isinstance(op, CurvatureOperator)
    assert (k.shape, k.param_shape, k.dtype, k.device) == (op.shape, op.param_shape, op.dtype, op.device)
    assert rel_error(op.to_dense(), k.to_dense()) < TIGHT
    assert rel_error(op.diag(), k.diag()) < TIGHT
    assert rel_error(op.trace(), k.trace()) < TIGHT
    W = torch.randn(3, 2, 2, generator=g, dtype=F64)
    assert rel_error(op @ W, k @ W) < TIGHT


def test_damped_operator():
    D = random_symmetric(12, seed=8)
    op, mv = block(D)
    damped = op.damped(0.3, scale=0.7)
    assert isinstance(damped, DampedOperator)
    expected = 0.7 * D + 0.3 * torch.eye(12, dtype=F64, device=D.device)
    V = torch.randn(12, 2, generator=gen(9), dtype=F64)
    assert rel_error(damped @ V, expected @ V) < TIGHT
    assert rel_error(damped.to_dense(), expected) < TIGHT
    assert rel_error(damped.diag().reshape(-1), expected.diagonal()) < TIGHT
    assert rel_error(damped.trace(), expected.trace()) < TIGHT
    assert "0.7 * K + 0.3 * I" in repr(damped)
    assert math.isclose(damped.damping, 0.3) and damped.base is op
