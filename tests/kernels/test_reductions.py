"""Linear-layer reductions (fxcurv.kernels.reductions): Triton (under the interpreter, or compiled with
``pytest --device cuda``) against torch, and the torch paths against the rules' own formulas in float64."""

from __future__ import annotations

import pytest
import torch

import fxcurv  # noqa: F401
from fxcurv.factors import signed_square_sum
from fxcurv.kernels import LAUNCHES, NotFusible, column_square_sum, dual_gram
from fxcurv.rules.linear import linear_diag_diag_weight, linear_diag_sqrt_weight, linear_grad_weight

RTOL, ATOL = 1e-5, 1e-5
K, R, O, I = 4, 37, 11, 13  # nothing a multiple of a block


def _rand(*shape, seed=0, dtype=torch.float32, positive=False):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=dtype) if positive else torch.randn(shape, generator=g, dtype=dtype)


def _sign(*shape, seed=5, dtype=torch.float32):
    return torch.where(_rand(*shape, seed=seed) > 0, 1.0, -1.0).to(dtype)


def _close(actual, expected, rtol=RTOL, atol=ATOL):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def _css(S, sign):
    sq = S * S
    if sign is not None:
        sq = sq * sign[..., None]
    return sq.sum(0)


@pytest.mark.parametrize("signed", [False, True])
def test_column_square_sum_triton(signed):
    S = _rand(K, R, O)
    sign = _sign(K, R) if signed else None
    before = LAUNCHES["column_square_sum"]
    got = column_square_sum(S, sign, force="triton")
    assert LAUNCHES["column_square_sum"] == before + 1
    _close(got, _css(S, sign))


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("shape", [(K, R, O), (3, 64, 160), (50, 3, 2)], ids=["small", "wide", "many_k"])
def test_column_square_sum_torch_float64(signed, shape):
    """Both torch strategies (k-by-k accumulation for wide columns, one pass for small ones)."""
    S = _rand(*shape, dtype=torch.float64)
    sign = _sign(*shape[:2], dtype=torch.float64) if signed else None
    got = column_square_sum(S, sign)
    _close(got, _css(S, sign), rtol=1e-13, atol=1e-13)
    # summed over samples it is signed_square_sum, the bias diagonal (HBP eq. S.8b)
    _close(got.sum(0), signed_square_sum(S, sign, 1), rtol=1e-12, atol=1e-12)


def test_column_square_sum_flattens_middle_dims():
    S, sign = _rand(K, 3, 5, O), _sign(K, 3, 5)
    _close(column_square_sum(S, sign, force="triton"), _css(S.reshape(K, 15, O), sign.reshape(K, 15)))


VARIANTS = {
    "a": dict(a=True),
    "b": dict(b=True),
    "S": dict(S=True),
    "S_sign": dict(S=True, sign=True),
    "a_b": dict(a=True, b=True),
    "a_S": dict(a=True, S=True),
    "a_S_sign": dict(a=True, S=True, sign=True),
}


def _variant(v, dtype=torch.float32):
    x = _rand(R, I, dtype=dtype)
    a = _rand(R, O, seed=1, dtype=dtype) if v.get("a") else None
    b = _rand(R, O, seed=2, dtype=dtype, positive=True) if v.get("b") else None
    S = _rand(K, R, O, seed=3, dtype=dtype) if v.get("S") else None
    sign = _sign(K, R, dtype=dtype) if v.get("sign") else None
    return a, x, b, S, sign


def _expected(a, x, b, S, sign):
    first = a.T @ x if a is not None else None
    c = b if b is not None else (_css(S, sign) if S is not None else None)
    second = c.T @ (x * x) if c is not None else None
    return first, second


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_dual_gram_triton(variant):
    a, x, b, S, sign = _variant(VARIANTS[variant])
    before = LAUNCHES["dual_gram"]
    got = dual_gram(a, x, b=b, S=S, sign=sign, force="triton")
    assert LAUNCHES["dual_gram"] == before + 1
    for g, e in zip(got, _expected(a, x, b, S, sign)):
        if e is None:
            assert g is None
        else:
            _close(g, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_dual_gram_torch_float64_matches_the_linear_rules(variant):
    """The torch path gives what the linear layer's rules give: HesScale eq. 2 (``g^T x``), eq. 5
    (``d^T x^2``) and the exact GGN/Hessian diagonal (HBP eq. S.8c)."""
    a, x, b, S, sign = _variant(VARIANTS[variant], torch.float64)
    first, second = dual_gram(a, x, b=b, S=S, sign=sign)
    if a is not None:
        _close(first, linear_grad_weight(a, x), rtol=1e-12, atol=1e-12)
    else:
        assert first is None
    if b is not None:
        _close(second, linear_diag_diag_weight(b, x * x), rtol=1e-12, atol=1e-12)
    elif S is not None:
        _close(second, linear_diag_sqrt_weight(S, sign, x, x * x), rtol=1e-12, atol=1e-12)
    else:
        assert second is None
    # a precomputed x o x (the rules' shared x_sq node) gives the same
    again = dual_gram(a, x, b=b, S=S, sign=sign, x_sq=x * x)
    for p, q in zip(again, (first, second)):
        assert (p is None and q is None) or torch.equal(p, q)


def test_dual_gram_nothing_requested():
    assert dual_gram(None, _rand(R, I), force="triton") == (None, None)


def test_dual_gram_larger_than_one_tile():
    x, a, S = _rand(300, 150), _rand(300, 140, seed=1), _rand(2, 300, 140, seed=2)
    got = dual_gram(a, x, S=S, force="triton")
    for g, e in zip(got, _expected(a, x, None, S, None)):
        _close(g, e, rtol=1e-4, atol=1e-3)


def test_dual_gram_flattens_leading_dims():
    x, a, b = _rand(2, 5, I), _rand(2, 5, O, seed=1), _rand(2, 5, O, seed=2)
    got = dual_gram(a, x, b=b, force="triton")
    exp = _expected(a.reshape(-1, O), x.reshape(-1, I), b.reshape(-1, O), None, None)
    for g, e in zip(got, exp):
        _close(g, e)


def test_dual_gram_strided_inputs():
    x = _rand(I, R).t()  # non-contiguous
    a = _rand(O, R, seed=1).t()
    S = _rand(R, K, O, seed=2).permute(1, 0, 2)
    got = dual_gram(a, x, S=S, force="triton")
    for g, e in zip(got, _expected(a, x, None, S, None)):
        _close(g, e, rtol=1e-4, atol=1e-4)


def test_dual_gram_no_columns():
    x, a, S = _rand(R, I), _rand(R, O, seed=1), _rand(0, R, O)
    first, second = dual_gram(a, x, S=S, force="triton")
    _close(first, a.T @ x)
    assert torch.equal(second, torch.zeros(O, I))


def test_float64_refuses_the_triton_path():
    x = _rand(R, I, dtype=torch.float64)
    with pytest.raises(NotFusible):
        dual_gram(x[:, :O], x, force="triton")
    with pytest.raises(NotFusible):
        column_square_sum(_rand(K, R, O, dtype=torch.float64), force="triton")


def test_reduction_kernels_compile_for_a_gpu():
    """The interpreter is lenient (numpy types); the compiler checks what a GPU would run."""
    from test_pointwise import compile_for_gpu

    compile_for_gpu("""
        from fxcurv.kernels import reductions

        mod = reductions._kernels()
        sig = dict(s_ptr="*fp32", sign_ptr="*fp32", out_ptr="*fp32", numel="i32", O="i32", K="i32",
                   stride_sk="i32", stride_gk="i32", HAS_SIGN="constexpr", BLOCK="constexpr")
        for has_sign in (True, False):
            compile_fn(mod.column_square_sum_kernel, sig, dict(HAS_SIGN=has_sign, BLOCK=1024))
        names = ("a_ptr c_ptr s_ptr sign_ptr x_ptr out1_ptr out2_ptr R O I K stride_ar stride_ao stride_cr "
                 "stride_co stride_sk stride_sr stride_so stride_gk stride_gr stride_xr stride_xi").split()
        for has_a, mode, has_sign in [(True, 1, False), (False, 2, True), (True, 2, False)]:
            sig = {n: ("*fp32" if n.endswith("ptr") else "i32") for n in names}
            consts = dict(HAS_A=has_a, MODE=mode, HAS_SIGN=has_sign, PRECISION="ieee", BLOCK_O=64, BLOCK_I=64,
                          BLOCK_R=32)
            sig.update({c: "constexpr" for c in consts})
            compile_fn(mod.dual_gram_kernel, sig, consts)
    """)
