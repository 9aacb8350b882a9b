"""fxcurv.operators.Kronecker and its inverses against dense torch computations (float64).

References are formed densely: ``torch.kron`` for the block, ``torch.linalg.solve`` / ``inv`` for the
damped inverse (Botev eq. 35), ``eigvalsh`` / ``slogdet`` for spectra; the factored approximation is
checked against its own defining formula (Botev eq. 36-38), and against the exact inverse only to
show that the two differ.
"""

from __future__ import annotations

import math
import pathlib

import pytest
import torch
from helpers import rel_error

from fxcurv.operators import (
    DENSE_MAX_BYTES,
    CurvatureOperator,
    DenseSizeError,
    FactoredApproxInverse,
    Kronecker,
    KroneckerInverse,
    KroneckerLayout,
    SingularOperatorError,
)

F64 = torch.float64
TIGHT = 1e-10  # float64 dense-vs-structured agreement (the brief's bar for the inverse)

# (parameter shape, factor sizes): a linear weight, a conv weight [C_out, C_in, k1, k2] with
# A of size C_in * k1 * k2, a bias with one factor.
SHAPES = {
    "linear": ((3, 5), (3, 5)),
    "conv": ((4, 2, 3, 2), (4, 12)),
    "bias": ((6,), (6,)),
}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def spd(n: int, g: torch.Generator, dtype=F64) -> torch.Tensor:
    """A random symmetric positive definite [n, n] matrix (full-rank Gram matrix)."""
    X = torch.randn(n, n + 3, generator=g, dtype=dtype)
    return X @ X.T / (n + 3)


def psd(n: int, rank: int, g: torch.Generator, dtype=F64) -> torch.Tensor:
    """A random positive semi-definite [n, n] matrix of rank ``rank`` (n - rank zero eigenvalues), as
    KFAC factors from fewer samples than their size are."""
    X = torch.randn(n, rank, generator=g, dtype=dtype)
    return X @ X.T / rank


def factors_for(kind: str, g: torch.Generator, definite: bool = True, dtype=F64) -> tuple[torch.Tensor, ...]:
    _, sizes = SHAPES[kind]
    return tuple(spd(n, g, dtype) if definite else psd(n, max(1, n // 2), g, dtype) for n in sizes)


def make(kind: str, seed: int = 0, definite: bool = True, dtype=F64) -> Kronecker:
    shape, _ = SHAPES[kind]
    return Kronecker(factors_for(kind, gen(seed), definite, dtype), shape, label=kind)


def dense_reference(k: Kronecker) -> torch.Tensor:
    """The block from the factors by ``torch.kron`` (independent of Kronecker's own to_dense)."""
    return torch.kron(*k.factors) if len(k.factors) == 2 else k.factors[0]


def eye(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(n, dtype=like.dtype, device=like.device)


# ---- conventions ---------------------------------------------------------------------------------

def test_row_major_index_convention():
    """kron(G, A)[o*I + i, p*I + j] = G[o, p] A[i, j], and kron(G, A) vec_r(W) = vec_r(G W A^T): the
    block acts on W.reshape(-1) (BackPACK's order), not on the column-stacked vec(W)."""
    g = gen(1)
    G, A = torch.randn(3, 3, generator=g, dtype=F64), torch.randn(4, 4, generator=g, dtype=F64)
    W = torch.randn(3, 4, generator=g, dtype=F64)
    K = torch.kron(G, A)
    assert K[1 * 4 + 2, 2 * 4 + 3] == G[1, 2] * A[2, 3]
    assert rel_error(K @ W.reshape(-1), (G @ W @ A.T).reshape(-1)) < TIGHT
    k = Kronecker((G, A))
    assert rel_error(k @ W, G @ W @ A.T) < TIGHT  # no symmetry needed for products
    # the column-stacked convention would be kron(A, G) on W.T.reshape(-1): a different matrix
    assert rel_error(k.to_dense(), torch.kron(A, G)) > 0.1


@pytest.mark.parametrize("kind", SHAPES)
def test_to_dense_is_torch_kron(kind):
    k = make(kind)
    assert k.shape == (k.numel, k.numel) and k.param_shape == torch.Size(SHAPES[kind][0])
    assert torch.equal(k.to_dense(), dense_reference(k))


def test_to_dense_takes_transposed_factors():
    """Factors from einsum can be transposed views (its opt_einsum path), which torch.kron refuses."""
    g, a = torch.randn(3, 3, dtype=F64), torch.randn(4, 4, dtype=F64)
    g, a = g @ g.T, a @ a.T
    k = Kronecker((g.T, a.T), (3, 4))
    assert not k.factors[0].is_contiguous()
    assert torch.equal(k.to_dense(), torch.kron(g.T.contiguous(), a.T.contiguous()))


def test_conv_weight_flattening():
    """A conv weight [C_out, C_in, k1, k2] flattens to [C_out, C_in*k1*k2] row-major: A indexes
    (c_in, k1, k2) in that order."""
    k = make("conv", seed=2)
    G, A = k.factors
    W = torch.randn(4, 2, 3, 2, generator=gen(3), dtype=F64)
    expected = (G @ W.reshape(4, 12) @ A.T).reshape(4, 2, 3, 2)
    assert rel_error(k @ W, expected) < TIGHT
    assert rel_error(k.to_dense() @ W.reshape(-1), expected.reshape(-1)) < TIGHT


def test_default_shape_and_shape_checks():
    g = gen(4)
    G, A = spd(3, g), spd(5, g)
    assert Kronecker((G, A)).param_shape == torch.Size([3, 5])
    assert Kronecker([G]).param_shape == torch.Size([3])
    with pytest.raises(ValueError, match="do not fit a parameter of shape"):
        Kronecker((G, A), (5, 3))
    with pytest.raises(ValueError, match="do not fit"):
        Kronecker((G,), (4,))
    with pytest.raises(ValueError, match="square"):
        Kronecker((G, torch.randn(5, 4, generator=g, dtype=F64)))
    with pytest.raises(ValueError, match=r"\(G, A\) for a weight or \(G,\) for a bias"):
        Kronecker((G, A, A))
    with pytest.raises(ValueError, match="share dtype and device"):
        Kronecker((G, A.float()))


# ---- products ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", SHAPES)
def test_matmul_shapes_match_dense(kind):
    k = make(kind, seed=5)
    K = dense_reference(k)
    P, g = k.numel, gen(6)
    W = torch.randn(k.param_shape, generator=g, dtype=F64)
    out = k @ W
    assert out.shape == k.param_shape
    assert rel_error(out.reshape(-1), K @ W.reshape(-1)) < TIGHT
    flat = k @ W.reshape(-1)
    assert flat.shape == (P,) and rel_error(flat, K @ W.reshape(-1)) < TIGHT
    V = torch.randn(P, 7, generator=g, dtype=F64)
    assert rel_error(k @ V, K @ V) < TIGHT
    assert (k @ V[:, :0]).shape == (P, 0)
    assert torch.equal(k.matvec(V), k @ V)


def test_matmul_refuses_wrong_operands():
    k = make("linear")
    with pytest.raises(ValueError, match=r"shaped like the parameter \(3, 5\), flat \[15\], or a matrix"):
        k @ torch.zeros(5, 3, dtype=F64)
    with pytest.raises(TypeError, match="pass v.to"):
        k @ torch.zeros(3, 5, dtype=torch.float32)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        k @ [1.0] * 15


# ---- summaries -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", SHAPES)
@pytest.mark.parametrize("definite", [True, False], ids=["spd", "psd"])
def test_diag_trace_norm_eigvals(kind, definite):
    k = make(kind, seed=7, definite=definite)
    K = dense_reference(k)
    assert k.diag().shape == k.param_shape
    assert rel_error(k.diag().reshape(-1), K.diagonal()) < TIGHT
    if len(k.factors) == 2:  # the brief's formula: outer(diag G, diag A)
        assert torch.equal(k.diag().reshape(k.sizes), torch.outer(k.factors[0].diagonal(), k.factors[1].diagonal()))
    assert rel_error(k.trace(), K.trace()) < TIGHT
    assert rel_error(k.frobenius_norm(), torch.linalg.matrix_norm(K)) < TIGHT
    ev = k.eigvals()
    assert ev.shape == (k.numel,) and bool((ev[1:] >= ev[:-1]).all())
    assert rel_error(ev, torch.linalg.eigvalsh(K)) < TIGHT


@pytest.mark.parametrize("kind", SHAPES)
def test_logdet(kind):
    k = make(kind, seed=8)
    K = dense_reference(k)
    for damping in (0.0, 0.3):
        sign, expected = torch.linalg.slogdet(K + damping * eye(k.numel, K))
        assert sign == 1 and rel_error(k.logdet(damping), expected) < TIGHT


def test_logdet_refuses_singular_and_indefinite():
    k = make("linear", definite=False)
    with pytest.raises(SingularOperatorError, match="not positive definite.*pass damping > 0"):
        k.logdet()
    sign, expected = torch.linalg.slogdet(dense_reference(k) + 0.1 * eye(k.numel, k.factors[0]))
    assert rel_error(k.logdet(0.1), expected) < TIGHT
    G, A = make("linear").factors
    with pytest.raises(SingularOperatorError, match="not positive definite.*indefinite.*use a damping above"):
        Kronecker((-G, A)).logdet(0.01)


# ---- exact inverse -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", SHAPES)
@pytest.mark.parametrize("definite", [True, False], ids=["spd", "psd"])
def test_inverse_equals_dense_solve(kind, definite):
    """(kron(G, A) + d I)^{-1} v through the eigenbases equals a dense solve (Botev eq. 35)."""
    k = make(kind, seed=9, definite=definite)
    damping = 0.05
    D = dense_reference(k) + damping * eye(k.numel, k.factors[0])
    inv = k.inverse(damping)
    assert isinstance(inv, KroneckerInverse) and isinstance(inv, CurvatureOperator)
    g = gen(10)
    V = torch.randn(k.numel, 4, generator=g, dtype=F64)
    assert rel_error(inv @ V, torch.linalg.solve(D, V)) < TIGHT
    W = torch.randn(k.param_shape, generator=g, dtype=F64)
    out = inv @ W
    assert out.shape == k.param_shape
    assert rel_error(out.reshape(-1), torch.linalg.solve(D, W.reshape(-1))) < TIGHT
    assert rel_error((k @ out) + damping * out, W) < TIGHT  # (K + d I) applied to the solution
    D_inv = torch.linalg.inv(D)
    assert rel_error(inv.to_dense(), D_inv) < TIGHT
    assert rel_error(inv.diag().reshape(-1), D_inv.diagonal()) < TIGHT
    assert rel_error(inv.trace(), D_inv.trace()) < TIGHT


def test_inverse_without_damping_of_definite_factors():
    k = make("conv", seed=11)
    V = torch.randn(k.numel, 3, generator=gen(12), dtype=F64)
    assert rel_error(k.inverse(0.0) @ V, torch.linalg.solve(dense_reference(k), V)) < 1e-9


def test_inverse_refusals():
    psd_k = make("linear", definite=False)
    with pytest.raises(SingularOperatorError, match=r"not invertible.*pass damping > 0"):
        psd_k.inverse(0.0)
    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        psd_k.inverse(-0.1)
    with pytest.raises(ValueError, match="damping must be"):
        psd_k.inverse(float("nan"))
    # a damping lost in the rounding of the eigenvalues is refused, not silently amplified
    with pytest.raises(SingularOperatorError, match="at or below that rounding level"):
        psd_k.inverse(1e-30)
    G, A = make("linear").factors
    with pytest.raises(ValueError, match="factor A is not symmetric"):
        Kronecker((G, A + torch.triu(torch.ones_like(A), 1))).inverse(0.1)


def test_inverse_of_indefinite_factors_is_exact():
    """HBP blocks can be indefinite: the exact inverse only needs g_i a_j + d != 0."""
    G, A = make("linear", seed=13).factors
    G = G - 0.5 * G.diagonal().mean() * eye(3, G)  # some negative eigenvalues
    k = Kronecker((G, A))
    V = torch.randn(k.numel, 2, generator=gen(14), dtype=F64)
    D = torch.kron(G, A) + 0.2 * eye(k.numel, G)
    assert rel_error(k.inverse(0.2) @ V, torch.linalg.solve(D, V)) < 1e-9
    # ... and is refused where the damping cancels a negative eigenvalue g_i a_j = -1
    cancel = Kronecker(tuple(torch.diag(torch.tensor(d, dtype=F64)) for d in ([-1.0, 2.0], [1.0, 3.0])))
    with pytest.raises(SingularOperatorError, match=r"not invertible.*indefinite \(smallest eigenvalue -3"):
        cancel.inverse(1.0)


def test_eigendecompositions_computed_once(monkeypatch):
    calls = []
    real = torch.linalg.eigh

    def counting(x, *args, **kwargs):
        calls.append(tuple(x.shape))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", counting)
    k = make("linear", seed=15)
    V = torch.randn(k.numel, 2, generator=gen(16), dtype=F64)
    for damping in (0.1, 0.01, 1.0):
        k.inverse(damping) @ V
    k.eigvals(), k.logdet(0.1)
    assert calls == [(3, 3), (5, 5)]
    assert k.factor_eigh() is k.factor_eigh()


# ---- factored approximation (Botev eq. 36-38) -----------------------------------------------------

@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("definite", [True, False], ids=["spd", "psd"])
def test_factored_inverse_is_its_defining_formula(kind, definite):
    k = make(kind, seed=17, definite=definite)
    G, A = k.factors
    O, I = k.sizes
    damping = 0.04
    pi = math.sqrt((G.trace().item() / O) / (A.trace().item() / I))  # eq. 38 with trace norms
    assert k.optimal_pi() == pytest.approx(pi, rel=1e-12)
    for given in ("optimal", 0.7):
        p = pi if given == "optimal" else given
        approx = k.inverse_factored(damping, pi=given)
        assert isinstance(approx, FactoredApproxInverse) and approx.pi == pytest.approx(p, rel=1e-12)
        damped = torch.kron(G + p * math.sqrt(damping) * eye(O, G), A + math.sqrt(damping) / p * eye(I, A))
        V = torch.randn(k.numel, 3, generator=gen(18), dtype=F64)
        assert rel_error(approx @ V, torch.linalg.solve(damped, V)) < TIGHT
        assert rel_error(approx.to_dense(), torch.linalg.inv(damped)) < TIGHT
        assert rel_error(approx.diag().reshape(-1), torch.linalg.inv(damped).diagonal()) < TIGHT


def test_factored_residual_and_optimal_pi():
    """Eq. 37: the damped approximation minus the damped block is (sqrt(d)/pi) kron(G, I) +
    pi sqrt(d) kron(I, A), whose trace-norm bound pi minimizes (eq. 38)."""
    k = make("linear", seed=19)
    G, A = k.factors
    O, I = k.sizes
    d = 0.09
    pi = k.optimal_pi()
    damped = torch.kron(G + pi * math.sqrt(d) * eye(O, G), A + math.sqrt(d) / pi * eye(I, A))
    residual = damped - (torch.kron(G, A) + d * eye(O * I, G))
    expected = math.sqrt(d) / pi * torch.kron(G, eye(I, A)) + pi * math.sqrt(d) * torch.kron(eye(O, G), A)
    assert rel_error(residual, expected) < TIGHT

    def bound(p: float) -> float:  # trace norms of the two residual terms (PSD: norm = trace)
        return math.sqrt(d) / p * (G.trace() * I).item() + p * math.sqrt(d) * (A.trace() * O).item()

    assert bound(pi) < min(bound(pi * 1.05), bound(pi / 1.05))


def test_factored_differs_from_exact():
    """The factored approximation is not the damped inverse: a G with unequal eigenvalues and d > 0
    gives a relative difference of order one, while the exact inverse matches the dense solve."""
    G = torch.diag(torch.tensor([10.0, 0.1], dtype=F64))
    A = torch.diag(torch.tensor([1.0, 0.01, 5.0], dtype=F64))
    k = Kronecker((G, A))
    d = 0.1
    exact = torch.linalg.inv(torch.kron(G, A) + d * eye(6, G))
    assert rel_error(k.inverse(d).to_dense(), exact) < TIGHT
    approx = k.inverse_factored(d).to_dense()
    assert rel_error(approx, exact) > 0.1
    assert "APPROXIMATION" in repr(k.inverse_factored(d)) and "exact" in repr(k.inverse(d))


def test_factored_inverse_edge_cases():
    k = make("linear", seed=20)
    # without damping both are kron(G^-1, A^-1): exact, whatever pi
    V = torch.randn(k.numel, 2, generator=gen(21), dtype=F64)
    assert rel_error(k.inverse_factored(0.0, pi=3.0) @ V, k.inverse(0.0) @ V) < 1e-9
    # a bias has one factor: nothing to split, the result is the exact (G + d I)^{-1}
    b = make("bias", seed=22)
    exact = torch.linalg.inv(b.factors[0] + 0.3 * eye(b.numel, b.factors[0]))
    approx = b.inverse_factored(0.3)
    assert approx.pi is None and rel_error(approx.to_dense(), exact) < TIGHT
    with pytest.raises(ValueError, match="nothing to split"):
        b.optimal_pi()
    with pytest.raises(ValueError, match="pi must be 'optimal' or a finite number > 0"):
        k.inverse_factored(0.1, pi=-1.0)
    G, A = k.factors
    with pytest.raises(ValueError, match="needs positive traces"):
        Kronecker((G, torch.zeros_like(A))).optimal_pi()
    with pytest.raises(SingularOperatorError, match="not positive definite.*use the exact inverse"):
        Kronecker((-G, A)).inverse_factored(0.01, pi=1.0)
    with pytest.raises(SingularOperatorError, match="not positive definite"):
        make("linear", definite=False).inverse_factored(0.0)


# ---- sizes, dtypes, devices ------------------------------------------------------------------------

def test_to_dense_size_limit():
    k = make("linear")
    need = k.numel**2 * 8
    with pytest.raises(DenseSizeError, match=rf"\[15, 15\] torch.float64 matrix: 1.76 KiB \({need} bytes\).*"
                                             rf"max_bytes={need}"):
        k.to_dense(max_bytes=need - 1)
    with pytest.raises(DenseSizeError, match="max_bytes="):
        k.inverse(0.1).to_dense(max_bytes=100)
    assert k.to_dense(max_bytes=need).shape == (15, 15)
    # the default limit refuses large blocks before allocating anything (factors of a 4096 x 4096 weight)
    big = Kronecker((torch.eye(4096, dtype=torch.float32), torch.eye(4096, dtype=torch.float32)))
    assert 4096**4 * 4 > DENSE_MAX_BYTES
    with pytest.raises(DenseSizeError, match="GiB"):
        big.to_dense()
    assert isinstance(DenseSizeError("x"), MemoryError)


def test_float32():
    k32 = make("conv", seed=23, dtype=torch.float32)
    k64 = Kronecker(tuple(f.double() for f in k32.factors), k32.param_shape)
    V = torch.randn(k32.numel, 3, generator=gen(24))
    for op32, op64 in ((k32, k64), (k32.inverse(0.1), k64.inverse(0.1)),
                       (k32.inverse_factored(0.1), k64.inverse_factored(0.1))):
        out = op32 @ V
        assert out.dtype == torch.float32
        assert rel_error(out.double(), op64 @ V.double()) < 1e-4
    assert rel_error(k32.eigvals().double(), k64.eigvals()) < 1e-4


def test_sources_are_device_agnostic():
    """The operators allocate on their factors' / the given device and never name one; the whole file
    runs on CUDA tensors under ``pytest --device cuda`` (tests/conftest.py). (A meta-device check would
    also do, but its first matmul loads torch's meta registrations for seconds.)"""
    source = "".join(p.read_text() for p in (pathlib.Path(__file__).parents[1] / "fxcurv" / "operators").glob("*.py"))
    for pattern in (".cuda(", ".cpu(", "device=\"cuda\"", "device='cuda'", "import scipy"):
        assert pattern not in source


def test_repr_says_what_it_is():
    k = make("conv")
    text = repr(k)
    assert "kron(G [4, 4], A [12, 12])" in text and "parameter [4, 2, 3, 2]" in text and "P=48" in text
    assert "conv" in text and "float64" in text
    assert "G [6, 6]" in repr(make("bias"))
    assert "exact via eigendecompositions" in repr(k.inverse(0.1))
    assert "Botev eq. 36" in repr(k.inverse_factored(0.1))


def test_damped_products_ea_cg():
    """EA-CG eq. 10b: ((1 - alpha) K + alpha I) v without forming K."""
    k = make("linear", seed=25)
    alpha = 0.2
    op = k.damped(alpha, scale=1 - alpha)
    D = (1 - alpha) * dense_reference(k) + alpha * eye(k.numel, k.factors[0])
    W = torch.randn(k.param_shape, generator=gen(26), dtype=F64)
    assert rel_error((op @ W).reshape(-1), D @ W.reshape(-1)) < TIGHT
    assert rel_error(op.to_dense(), D) < TIGHT
    assert rel_error(op.diag().reshape(-1), D.diagonal()) < TIGHT
    assert rel_error(op.trace(), D.trace()) < TIGHT


# ---- the TRANSPOSED layout (a transposed convolution's weight) ------------------------------------

# a ConvTranspose2d weight [C_in, C_out, k1, k2] = [2, 4, 3, 2]: G over C_out = 4, A over C_in*k1*k2 = 12
TRANSPOSED_SHAPE = (2, 4, 3, 2)


def make_transposed(seed: int = 0, definite: bool = True) -> Kronecker:
    factors = factors_for("conv", gen(seed), definite)  # sizes (4, 12)
    return Kronecker(factors, TRANSPOSED_SHAPE, label="kflr", layout=KroneckerLayout.TRANSPOSED)


def transposed_dense_reference(k: Kronecker) -> torch.Tensor:
    """The block over W.reshape(-1) entry by entry: ``[(c, o, t), (c', o', t')] = G[o, o'] A[(c, t), (c', t')]``
    for ``W [C_in, C_out, *k]`` (``t`` the kernel taps), independent of the operator's permutations."""
    G, A = k.factors
    c_in, c_out = TRANSPOSED_SHAPE[:2]
    taps = math.prod(TRANSPOSED_SHAPE[2:])
    # [o, c, t, o', c', t'] -> [c, o, t, c', o', t']
    kron = (G[:, None, None, :, None, None] * A.reshape(c_in, taps, c_in, taps)[None, :, :, None, :, :])
    return kron.permute(1, 0, 2, 4, 3, 5).reshape(c_in * c_out * taps, -1)


def test_transposed_layout_refers_to_weight_transpose():
    """With layout TRANSPOSED the factors split ``W.transpose(0, 1)`` and the block is a matrix over
    ``W.reshape(-1)``: ``K @ W = (G W^T01_mat A^T)`` arranged back like ``W``; to_dense, diag and products
    agree with the entrywise definition."""
    k = make_transposed(seed=4)
    G, A = k.factors
    W = torch.randn(TRANSPOSED_SHAPE, generator=gen(5), dtype=F64)
    expected = (G @ W.transpose(0, 1).reshape(4, 12) @ A.T).reshape(4, 2, 3, 2).transpose(0, 1)
    assert rel_error(k @ W, expected) < TIGHT
    dense = transposed_dense_reference(k)
    assert rel_error(k.to_dense(), dense) < TIGHT
    assert rel_error(dense @ W.reshape(-1), expected.reshape(-1)) < TIGHT
    assert k.diag().shape == W.shape and rel_error(k.diag().reshape(-1), dense.diagonal()) < TIGHT
    V = torch.randn(W.numel(), 3, generator=gen(6), dtype=F64)
    assert rel_error(k @ V, dense @ V) < TIGHT
    # the ROWS reading of the same factors would be a different matrix (and does not fit [2, ...])
    with pytest.raises(ValueError, match="do not fit"):
        Kronecker(k.factors, TRANSPOSED_SHAPE)
    assert "transpose(0, 1)" in repr(k)


@pytest.mark.parametrize("definite", [True, False])
def test_transposed_layout_inverses(definite):
    """The exact damped inverse is ``(dense + d I)^{-1}`` over W.reshape(-1); the factored one is its own
    Kronecker product in the same layout; spectra do not depend on the layout."""
    k = make_transposed(seed=7, definite=definite)
    dense = transposed_dense_reference(k)
    d = 0.3
    want = torch.linalg.inv(dense + d * eye(dense.shape[0], dense))
    inv = k.inverse(d)
    W = torch.randn(TRANSPOSED_SHAPE, generator=gen(8), dtype=F64)
    assert rel_error(inv.to_dense(), want) < TIGHT
    assert rel_error(inv @ W, (want @ W.reshape(-1)).reshape(W.shape)) < TIGHT
    assert rel_error(inv.diag().reshape(-1), want.diagonal()) < TIGHT
    approx = k.inverse_factored(d)
    assert approx.layout is KroneckerLayout.TRANSPOSED
    assert rel_error(approx.to_dense(), transposed_dense_reference(approx)) < TIGHT
    assert rel_error(k.eigvals(), torch.linalg.eigvalsh(dense)) < 1e-9
    assert rel_error(k.logdet(d), torch.linalg.slogdet(dense + d * eye(dense.shape[0], dense))[1]) < TIGHT


def test_transposed_layout_refusals():
    G = spd(4, gen(9))
    with pytest.raises(ValueError, match="TRANSPOSED swaps"):
        Kronecker((G,), (4,), layout=KroneckerLayout.TRANSPOSED)  # a bias has no second axis
    with pytest.raises(ValueError, match="do not fit"):
        Kronecker((G, spd(12, gen(10))), (4, 2, 3, 2), layout=KroneckerLayout.TRANSPOSED)  # O is axis 1
    with pytest.raises(TypeError, match="KroneckerLayout"):
        Kronecker((G, spd(12, gen(10))), (2, 4, 3, 2), layout="transposed")  # type: ignore[arg-type]
