"""matmul_epilogue (fxcurv.kernels.matmul): the Triton kernel (under the interpreter, or compiled with
``pytest --device cuda``) against torch."""

from __future__ import annotations

import operator

import pytest
import torch

import fxcurv  # noqa: F401  (registers the rules)
from fxcurv.kernels import (
    LAUNCHES,
    Input,
    MatmulSpec,
    NotFusible,
    Step,
    StepResult,
    compose,
    matmul_epilogue,
    matmul_source,
    trace_pointwise,
)
from fxcurv.kernels.torch_path import build_runner as _build_runner
from fxcurv.rules import registry as R

RTOL, ATOL = 1e-5, 1e-5


def _rand(*shape, seed=0, dtype=torch.float32, positive=False):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(shape, generator=g, dtype=dtype) if positive else torch.randn(shape, generator=g, dtype=dtype)
    return t


def _close(actual, expected, rtol=RTOL, atol=ATOL):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


MUL = trace_pointwise(lambda acc, e: acc * e)


@pytest.mark.parametrize("a_shape", [(37, 19), (3, 37, 19), (2, 3, 5, 19), (19,)],
                         ids=["2d", "lead1", "lead2", "vector"])
@pytest.mark.parametrize("square_b", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
def test_plain_product(a_shape, square_b, trans_b):
    a = _rand(*a_shape)
    b = _rand(19, 23, seed=1)
    bb = b.t().contiguous() if trans_b else b
    expected = a @ (b * b if square_b else b)
    before = LAUNCHES["matmul"]
    got = matmul_epilogue(a, bb, trans_b=trans_b, square_b=square_b, force="triton")
    assert LAUNCHES["matmul"] == before + 1
    _close(got, expected)
    _close(matmul_epilogue(a, bb, trans_b=trans_b, square_b=square_b, force="torch"), expected)


@pytest.mark.parametrize("extra", ["bcast", "full", "row", "one", "scalar"])
def test_multiply_epilogue(extra):
    """``(V W) * e`` with ``e`` suffix-aligned: a [N, D] derivative broadcast over K columns reads
    row ``r % N`` of the flattened output."""
    a, b = _rand(3, 37, 19), _rand(19, 23, seed=1)
    e = {"bcast": _rand(37, 23, seed=2), "full": _rand(3, 37, 23, seed=2), "row": _rand(23, seed=2),
         "one": torch.tensor(0.7), "scalar": 0.7}[extra]
    got = matmul_epilogue(a, b, MUL, [e], force="triton")
    _close(got, (a @ b) * e)


def test_bigger_than_one_block():
    """Several tiles in each direction and a K loop of several steps (masks on every edge)."""
    a, b, e = _rand(2, 150, 140), _rand(140, 133, seed=1), _rand(150, 133, seed=2)
    _close(matmul_epilogue(a, b, MUL, [e], force="triton"), (a @ b) * e, rtol=1e-4, atol=1e-4)


def _activation_linear_epilogue(name):
    """``J^T`` through an activation after the linear product: ``(V W) * phi'(out)``; the derivative
    is computed inside the epilogue from the activation output."""
    d1 = R.DERIVED[(name, "d1")].fn
    return compose([Step(d1, (), {"out": Input(1)}),
                    Step(R.JAC_T[(name, "x")].fn, (Input(0),), {"d1": StepResult(0)})],
                   input_names=["acc", "out"])


@pytest.mark.parametrize("name", ["tanh", "sigmoid"])
def test_activation_composite_hbp_b4(name):
    """HBP B.4 / Botev eq. 29: ``(W^T [g; S]) * phi'(x)`` for the whole bundle in one kernel."""
    K, N, O, I = 4, 37, 19, 23
    V, W = _rand(K, N, O), _rand(O, I, seed=1)
    out = R.OPS[name].forward(_rand(N, I, seed=2))
    expected = (V @ W) * R.DERIVED[(name, "d1")].fn(out)
    program = _activation_linear_epilogue(name)
    _close(matmul_epilogue(V, W, program, [out], force="triton"), expected)
    _close(matmul_epilogue(V, W, program, [out], force="torch"), expected, rtol=0, atol=0)


def _hesscale_epilogue(name):
    """HesScale eq. 4 behind a linear layer: ``((W o W)^T d) * phi'^2 + g_z * phi''`` with
    ``g_z`` the gradient at the activation output."""
    return compose([
        Step(R.DERIVED[(name, "d1")].fn, (), {"out": Input(1)}),
        Step(R.DERIVED[(name, "d2")].fn, (), {"out": Input(1)}),
        Step(R.DIAG[(name, "x")].fn, (Input(0),), {"d1": StepResult(0)}),
        Step(R.RESIDUAL[(name, "x")].fn, (Input(2),), {"d2": StepResult(1)}),
        Step(operator.add, (StepResult(2), StepResult(3))),
    ], input_names=["acc", "out", "g"])


def test_hesscale_squared_weight_epilogue():
    N, O, I = 37, 19, 23
    d, W = _rand(N, O, positive=True), _rand(O, I, seed=1)
    out, g = torch.tanh(_rand(N, I, seed=2)), _rand(N, I, seed=3)
    d1, d2 = R.DERIVED[("tanh", "d1")].fn(out), R.DERIVED[("tanh", "d2")].fn(out)
    expected = (d @ (W * W)) * d1 * d1 + g * d2
    program = _hesscale_epilogue("tanh")
    _close(matmul_epilogue(d, W, program, [out, g], square_b=True, force="triton"), expected)
    _close(matmul_epilogue(d, W, program, [out, g], square_b=True, force="torch"), expected)


def test_multi_output_epilogue():
    """One product, two messages: ``g_x = g_z * phi'`` and the residual ``g_z * phi''``."""
    program = compose([
        Step(R.DERIVED[("tanh", "d1")].fn, (), {"out": Input(1)}),
        Step(R.DERIVED[("tanh", "d2")].fn, (), {"out": Input(1)}),
        Step(R.JAC_T[("tanh", "x")].fn, (Input(0),), {"d1": StepResult(0)}),
        Step(R.RESIDUAL[("tanh", "x")].fn, (Input(0),), {"d2": StepResult(1)}),
    ], outputs=[StepResult(2), StepResult(3)], input_names=["acc", "out"])
    g, W, out = _rand(37, 19), _rand(19, 23, seed=1), torch.tanh(_rand(37, 23, seed=2))
    gz = g @ W
    got = matmul_epilogue(g, W, program, [out], force="triton")
    assert isinstance(got, tuple) and len(got) == 2
    _close(got[0], gz * (1 - out * out))
    _close(got[1], gz * (-2 * out * (1 - out * out)))


@pytest.mark.parametrize("square_b", [False, True])
def test_torch_path_float64(square_b):
    a, b, e = _rand(3, 7, 5, dtype=torch.float64), _rand(5, 6, seed=1, dtype=torch.float64), \
        _rand(7, 6, seed=2, dtype=torch.float64)
    bb = b * b if square_b else b
    got = matmul_epilogue(a, b, MUL, [e], square_b=square_b)  # float64: the torch path, on any device
    torch.testing.assert_close(got, (a @ bb) * e, rtol=0, atol=0)
    plain = matmul_epilogue(a, b, None, square_b=square_b)
    torch.testing.assert_close(plain, a @ bb, rtol=0, atol=0)
    # float64 on the Triton path is not a tl.dot type: forced, it refuses rather than round
    with pytest.raises(NotFusible):
        matmul_epilogue(a, b, MUL, [e], force="triton")


def test_torch_path_multiplies_in_place():
    """The product is fresh: a one-multiply epilogue writes into it (no second output buffer)."""
    a, b, e = _rand(7, 5), _rand(5, 6, seed=1), _rand(7, 6, seed=2)
    run = _build_runner(MUL, [a @ b, e], frozenset({0}))
    assert "a0.mul_(a1)" in run.source
    got = matmul_epilogue(a, b, MUL, [e], force="torch")
    _close(got, (a @ b) * e, rtol=0, atol=0)
    assert e.equal(_rand(7, 6, seed=2))  # the extra is read, never written


def test_not_fusible_epilogue_and_shapes():
    a, b = _rand(7, 5), _rand(5, 6, seed=1)
    sin = trace_pointwise(lambda acc: torch.sin(acc))
    with pytest.raises(NotFusible):
        matmul_epilogue(a, b, sin, [], force="triton")
    _close(matmul_epilogue(a, b, sin, []), torch.sin(a @ b))
    # an extra that broadcasts other than by a shape suffix
    e = _rand(7, 1, seed=2)
    with pytest.raises(NotFusible):
        matmul_epilogue(a, b, MUL, [e], force="triton")
    _close(matmul_epilogue(a, b, MUL, [e]), (a @ b) * e)
    with pytest.raises(ValueError):
        matmul_epilogue(a, _rand(4, 6), force="triton")


def test_strided_operands():
    """``a`` and ``b`` are read through their strides (a transposed weight view needs no copy)."""
    a = _rand(19, 37).t()  # non-contiguous [37, 19]
    w = _rand(23, 19, seed=1)
    _close(matmul_epilogue(a, w.t(), force="triton"), a @ w.t())


def test_source_shows_the_epilogue():
    src = matmul_source(_activation_linear_epilogue("tanh"), MatmulSpec(("bcast",), 1))
    assert "tl.dot(a, b, acc" in src and "rm % rows_e0" in src and "1.0 - " in src


def test_generated_matmul_kernels_compile_for_a_gpu():
    """The interpreter is lenient (numpy types); the compiler checks what a GPU would run."""
    from test_pointwise import compile_for_gpu

    compile_for_gpu("""
        import test_matmul as T
        from fxcurv.kernels import MatmulSpec, load_source, matmul_source
        from fxcurv.kernels.matmul import matmul_params as _matmul_params

        for ep, spec in [(None, MatmulSpec((), 1)), (T._activation_linear_epilogue("tanh"), MatmulSpec(("bcast",), 1)),
                         (T._hesscale_epilogue("tanh"), MatmulSpec(("full", "row"), 1)),
                         (T.MUL, MatmulSpec(("scalar",), 1)), (T.MUL, MatmulSpec(("one",), 1))]:
            for dt, prec in (("fp32", "ieee"), ("fp32", "tf32"), ("fp16", None)):
                sig = {}
                for p in _matmul_params(spec):
                    if p in ("a_ptr", "b_ptr"):
                        sig[p] = "*" + dt
                    elif p.endswith("_ptr"):
                        sig[p] = "*fp32"
                    else:
                        sig[p] = "fp32" if p.startswith("e") else "i32"
                consts = dict(SQUARE_B=True, PRECISION=prec, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8)
                sig.update({c: "constexpr" for c in consts})
                compile_fn(load_source(matmul_source(ep, spec), "mm").kernel, sig, consts)
    """)


@pytest.mark.parametrize("a_shape", [(4, 37, 19), (37, 19)], ids=["bundle", "2d"])
def test_torch_path_in_row_chunks(a_shape, monkeypatch):
    """Above EPILOGUE_WHOLE_BYTES (0 here) the torch path finishes the product a chunk of rows at a
    time (5 rows: a partial last chunk): one and two extras, two outputs, equal to the whole product's
    epilogue; the extras are read, never written."""
    from fxcurv.kernels import matmul

    whole_single = matmul_epilogue(_rand(*a_shape), _rand(19, 23, seed=1), _activation_linear_epilogue("tanh"),
                                   [torch.tanh(_rand(37, 23, seed=2))], force="torch")
    monkeypatch.setattr(matmul, "EPILOGUE_WHOLE_BYTES", 0)
    lead = 4 if len(a_shape) == 3 else 1
    monkeypatch.setattr(matmul, "EPILOGUE_CHUNK_ELEMENTS", 5 * 23 * lead)
    monkeypatch.setattr(matmul, "EPILOGUE_MIN_ROWS", 1)
    a, W = _rand(*a_shape), _rand(19, 23, seed=1)
    out, g = torch.tanh(_rand(37, 23, seed=2)), _rand(37, 23, seed=3)
    kept = out.clone()
    single = matmul_epilogue(a, W, _activation_linear_epilogue("tanh"), [out], force="torch")
    _close(single, whole_single, rtol=1e-6, atol=1e-6)
    _close(single, (a @ W) * (1 - out * out))
    d = a.abs()
    two = matmul_epilogue(d, W, _hesscale_epilogue("tanh"), [out, g], square_b=True, force="torch")
    d1, d2 = R.DERIVED[("tanh", "d1")].fn(out), R.DERIVED[("tanh", "d2")].fn(out)
    _close(two, (d @ (W * W)) * d1 * d1 + g * d2)
    program = compose([
        Step(R.DERIVED[("tanh", "d1")].fn, (), {"out": Input(1)}),
        Step(R.DERIVED[("tanh", "d2")].fn, (), {"out": Input(1)}),
        Step(R.JAC_T[("tanh", "x")].fn, (Input(0),), {"d1": StepResult(0)}),
        Step(R.RESIDUAL[("tanh", "x")].fn, (Input(0),), {"d2": StepResult(1)}),
    ], outputs=[StepResult(2), StepResult(3)], input_names=["acc", "out"])
    got = matmul_epilogue(a, W, program, [out], force="torch")
    assert isinstance(got, tuple) and len(got) == 2
    gz = a @ W
    _close(got[0], gz * (1 - out * out))
    _close(got[1], gz * (-2 * out * (1 - out * out)))
    assert out.equal(kept)


def test_products_of_many_columns_are_formed_whole(monkeypatch):
    """A bundle whose chunk would hold fewer than EPILOGUE_MIN_ROWS rows (many leading columns, as
    diag_hessian's residual bundles) is not chunked; one with enough rows is."""
    from fxcurv.kernels import matmul

    monkeypatch.setattr(matmul, "EPILOGUE_WHOLE_BYTES", 0)
    monkeypatch.setattr(matmul, "EPILOGUE_CHUNK_ELEMENTS", 64 * 23)
    W, out = _rand(19, 23, seed=1), _rand(37, 23, seed=2)
    assert not matmul._row_chunks(_rand(8, 37, 19), W, [out])  # 8 rows per chunk
    assert matmul._row_chunks(_rand(2, 37, 19), W, [out])  # 32 rows per chunk
