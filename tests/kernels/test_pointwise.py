"""Generated pointwise kernels (fxcurv.kernels.pointwise) against their torch references.

Every Triton kernel runs with ``force="triton"``: under the interpreter (``TRITON_INTERPRET=1``, set
in conftest) on CPU tensors, or compiled on CUDA tensors with ``pytest --device cuda``; shapes are
tiny so that each launch is one program in the interpreter.
"""

from __future__ import annotations

import inspect
import math
import operator
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

import fxcurv  # noqa: F401  (registers the rules)
from fxcurv.kernels import (
    LAUNCHES,
    Input,
    NotFusible,
    PointwiseProgram,
    PointwiseSpec,
    ProgramBuilder,
    Step,
    StepResult,
    cache_dir,
    check_fusible,
    compose,
    load_source,
    pointwise,
    pointwise_kernel,
    program_from_nodes,
    to_triton_source,
    trace_pointwise,
)
from fxcurv.kernels.torch_path import build_runner as _build_runner
from fxcurv.rules import registry as R

RTOL, ATOL = 1e-5, 1e-6

# Attributes to test each activation with (chosen so that every branch of its rules is taken).
ATTRS = {
    "relu": [{}],
    "leaky_relu": [{"negative_slope": 0.1}],
    "sigmoid": [{}],
    "tanh": [{}],
    "elu": [{"alpha": 0.7}],
    "softplus": [{"beta": 2.0, "threshold": 1.5}],
    "silu": [{}],
    "gelu": [{"approximate": "none"}, {"approximate": "tanh"}],
    "selu": [{}],
    "celu": [{"alpha": 0.7}],
    "logsigmoid": [{}],
    "mish": [{}],
    "softsign": [{}],
    "hardtanh": [{"min_val": -0.5, "max_val": 1.5}],
    "hardsigmoid": [{}],
    "hardswish": [{}],
    "pow": [{"exponent": 2}, {"exponent": 3}, {"exponent": 0}],
}
ACTIVATIONS = [(name, attrs) for name, cases in ATTRS.items() for attrs in cases]
IDS = [f"{n}-{'-'.join(str(v) for v in a.values())}" if a else n for n, a in ACTIVATIONS]


# Piecewise-linear activations have no second derivative (no d2 rule, no residual term).
PIECEWISE_LINEAR = {"relu", "leaky_relu", "hardtanh", "hardsigmoid"}
DERIVATIVES = [(name, attrs, which) for name, attrs in ACTIVATIONS for which in ("d1", "d2")
               if not (which == "d2" and name in PIECEWISE_LINEAR)]


def test_every_activation_is_covered():
    elementwise = {n for n, op in R.OPS.items() if op.family == "elementwise"}
    assert elementwise == set(ATTRS)
    for name in ATTRS:
        assert ((name, "d2") in R.DERIVED) == (name not in PIECEWISE_LINEAR), name


def _forward_inputs(name, attrs, dtype=torch.float32, shape=(4, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(shape, generator=g, dtype=dtype)
    x[0, 0] = 0.0  # the kink of relu-like activations
    out = R.OPS[name].forward(x, **attrs)
    return x, out


def _by_name(fn, available: dict, attrs: dict, skip: int = 0):
    """Positional tensor refs and keyword constants for a rule, bound by parameter name."""
    params = list(inspect.signature(fn).parameters)[skip:]
    kwargs = {}
    for p in params:
        if p in available:
            kwargs[p] = available[p]
        elif p in attrs:
            kwargs[p] = attrs[p]
    return kwargs


def _close(actual, expected, rtol=RTOL, atol=ATOL):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


# ---- the real derivative rules -----------------------------------------------------------------------

@pytest.mark.parametrize("name,attrs,which", DERIVATIVES,
                         ids=[f"{w}-{i}" for (_, _, w), i in zip(DERIVATIVES, [IDS[ACTIVATIONS.index((n, a))]
                                                                              for n, a, _ in DERIVATIVES])])
def test_derivative_rule(name, attrs, which):
    fn = R.DERIVED[(name, which)].fn
    x, out = _forward_inputs(name, attrs)
    tensor_args = [p for p in inspect.signature(fn).parameters if p in ("x", "out")]
    program = trace_pointwise(fn, len(tensor_args), {k: v for k, v in attrs.items()
                                                   if k in inspect.signature(fn).parameters})
    vals = {"x": x, "out": out}
    inputs = [vals[p] for p in tensor_args]
    expected = fn(**{p: vals[p] for p in tensor_args}, **{k: v for k, v in attrs.items()
                                                          if k in inspect.signature(fn).parameters})
    (ref,) = pointwise(program, inputs, force="torch")
    torch.testing.assert_close(ref, expected, rtol=0, atol=0)  # the torch path is the rule itself
    before = LAUNCHES["pointwise"]
    (got,) = pointwise(program, inputs, force="triton")
    assert LAUNCHES["pointwise"] == before + 1
    _close(got, expected)


def _chain(name, attrs):
    """The activation's message rules composed with its derivatives, as the fusion pass builds them.

    Inputs ``x, out [N, D]``, ``v [K, N, D]`` (gradient and factor columns), ``d, g [N, D]``.
    Outputs: ``J^T v = v * d1`` (``[K, N, D]``), HesScale's ``d * d1^2 (+ g * d2)`` and ``d1``
    (``[N, D]``).
    """
    avail = {"x": Input(0), "out": Input(1)}
    d1 = R.DERIVED[(name, "d1")].fn
    steps = [Step(d1, (), _by_name(d1, avail, attrs))]
    steps.append(Step(R.JAC_T[(name, "x")].fn, (Input(2),), {"d1": StepResult(0)}))
    steps.append(Step(R.DIAG[(name, "x")].fn, (Input(3),), {"d1": StepResult(0)}))
    hess = StepResult(2)
    if (name, "d2") in R.DERIVED:
        d2 = R.DERIVED[(name, "d2")].fn
        steps.append(Step(d2, (), _by_name(d2, avail, attrs)))
        steps.append(Step(R.RESIDUAL[(name, "x")].fn, (Input(4),), {"d2": StepResult(3)}))
        steps.append(Step(operator.add, (StepResult(2), StepResult(4))))
        hess = StepResult(5)
    return compose(steps, outputs=[StepResult(1), hess, StepResult(0)], n_inputs=5,
                   input_names=["x", "out", "v", "d", "g"])


def _chain_expected(name, attrs, x, out, v, d, g):
    def call(fn, **avail):
        return fn(**_by_name(fn, avail, attrs))

    d1 = call(R.DERIVED[(name, "d1")].fn, x=x, out=out)
    jv = R.JAC_T[(name, "x")].fn(v, d1=d1)
    hess = R.DIAG[(name, "x")].fn(d, d1=d1)
    if (name, "d2") in R.DERIVED:
        d2 = call(R.DERIVED[(name, "d2")].fn, x=x, out=out)
        hess = hess + R.RESIDUAL[(name, "x")].fn(g, d2=d2)
    return jv, hess, d1


def _chain_inputs(name, attrs, dtype, K=3):
    x, out = _forward_inputs(name, attrs, dtype)
    gen = torch.Generator().manual_seed(1)
    v = torch.randn((K,) + x.shape, generator=gen, dtype=dtype)
    d = torch.rand(x.shape, generator=gen, dtype=dtype)
    g = torch.randn(x.shape, generator=gen, dtype=dtype)
    return [x, out, v, d, g]


@pytest.mark.parametrize("name,attrs", ACTIVATIONS, ids=IDS)
def test_rule_chain_triton_matches_torch(name, attrs):
    program = _chain(name, attrs)
    assert program.n_inputs == 5 and program.n_outputs == 3
    inputs = _chain_inputs(name, attrs, torch.float32)
    expected = _chain_expected(name, attrs, *inputs)
    got = pointwise(program, inputs, force="triton")
    assert [t.shape for t in got] == [inputs[2].shape, inputs[0].shape, inputs[0].shape]
    for a, e in zip(got, expected):
        _close(a, e)


@pytest.mark.parametrize("name,attrs", ACTIVATIONS, ids=IDS)
def test_rule_chain_torch_path_float64(name, attrs):
    program = _chain(name, attrs)
    inputs = _chain_inputs(name, attrs, torch.float64)
    copies = [t.clone() for t in inputs]
    got = pointwise(program, inputs, force="torch")  # what CPU tensors run
    for a, e in zip(got, _chain_expected(name, attrs, *inputs)):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, e, rtol=1e-14, atol=1e-15)
    for t, c in zip(inputs, copies):  # overwriting intermediates never touches an input
        assert torch.equal(t, c)


@pytest.mark.parametrize("name,attrs", [("tanh", {}), ("gelu", {"approximate": "tanh"}),
                                        ("softplus", {"beta": 2.0, "threshold": 1.5})])
def test_rule_chain_triton_float64(name, attrs):
    """float64 inputs are computed in float64 (constants included) on the Triton path too."""
    program = _chain(name, attrs)
    inputs = _chain_inputs(name, attrs, torch.float64)
    got = pointwise(program, inputs, force="triton")
    for a, e in zip(got, _chain_expected(name, attrs, *inputs)):
        _close(a, e, rtol=1e-12, atol=1e-14)


def test_tanh_accuracy():
    x = torch.cat([torch.linspace(-12, 12, 4001), torch.logspace(-30, 0.3, 500),
                   -torch.logspace(-30, 0.3, 500), torch.tensor([0.0, 60.0, -60.0])])
    (got,) = pointwise(trace_pointwise(torch.tanh), [x], force="triton")
    ref = torch.tanh(x.double())
    ulp = torch.finfo(torch.float32).eps * ref.abs().clamp_min(torch.finfo(torch.float32).tiny)
    assert ((got.double() - ref).abs() / ulp).max() < 8


# ---- op coverage -------------------------------------------------------------------------------------

def _softclip(x):
    return torch.clamp(x, min=-0.5, max=1.0) + torch.maximum(x, x * 0.3) - torch.minimum(x, -x)


OPS = {
    "arith": lambda x, y: (x + y) * (x - y) / (y.abs() + 1) - (-x),
    "scalars_left": lambda x, y: 2 - x + 3 * y - 1 / (1 + y * y),
    "pow_int": lambda x, y: x ** 3 + x ** 2 - y ** 4 + 1 / (1 + x ** -2),
    "pow_float": lambda x, y: (y.abs() + 0.1) ** 1.7 + (y.abs() + 0.1) ** 0.5 + (y.abs() + 1) ** -0.5,
    "pow_base": lambda x, y: 2 ** x + x ** 0,
    "unary": lambda x, y: torch.exp(x) + torch.log(y.abs() + 1) + torch.sqrt(y.abs()) + torch.erf(x)
    + torch.rsqrt(y.abs() + 1) + torch.reciprocal(y + 10),
    "signs": lambda x, y: torch.sign(x) + torch.abs(y) + torch.relu(x) + F.relu(y) + torch.neg(x)
    + torch.square(y),
    "methods": lambda x, y: x.tanh() + y.sigmoid() + x.exp() + x.mul(y) + y.add(x, alpha=2) + x.pow(2),
    "compare": lambda x, y: ((x > y).to(x.dtype) + (x < 0).float() + (x >= y).to(torch.float32)
                             + (y <= 0.5).to(y.dtype) + (x == 0).to(x.dtype) + (x != y).type_as(x)),
    "where": lambda x, y: torch.where(x > 0, x, 0.5) + torch.where(y < x, torch.ones_like(x),
                                                                   torch.full_like(x, -2.0)),
    "logic": lambda x, y: torch.where((x > 0) & (y > 0) | ~(x < -1), torch.zeros_like(y), y),
    "clamps": lambda x, y: _softclip(x) + y.clamp_min(0.2) + y.clamp(max=0.1),
    "bool_out": lambda x, y: (x > y, x * y),
}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # x ** -2 at 0 is inf, in numpy too
@pytest.mark.parametrize("case", sorted(OPS))
def test_supported_ops(case):
    fn = OPS[case]
    program = trace_pointwise(fn)
    check_fusible(program)
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    x[0, :3] = 0.0
    y[0, 1] = 0.0
    expected = fn(x, y)
    expected = expected if isinstance(expected, tuple) else (expected,)
    ref = pointwise(program, [x, y], force="torch")
    got = pointwise(program, [x, y], force="triton")
    for r, g, e in zip(ref, got, expected):
        torch.testing.assert_close(r, e, rtol=0, atol=0)
        _close(g, e)


def test_broadcast_scalars_and_0d():
    """[N, D] against [K, N, D], a Python scalar (kernel argument) and a 0-d tensor."""
    program = trace_pointwise(lambda v, d1, s, t: (v * d1 * s + t, d1 - s))
    v, d1, t = torch.randn(3, 4, 5), torch.randn(4, 5), torch.tensor(0.25)
    got = pointwise(program, [v, d1, 1.5, t], force="triton")
    _close(got[0], v * d1 * 1.5 + t)
    _close(got[1], d1 - 1.5)
    assert got[1].shape == (4, 5)
    spec_src = to_triton_source(program, PointwiseSpec(("full", "bcast", "scalar", "one"), ("full", "prefix")))
    assert "offs % n_in1" in spec_src and "offs < n_out1" in spec_src


def test_passthrough_and_repeated_outputs():
    program = trace_pointwise(lambda x, y: (x, y * 2, y * 2))
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    got = pointwise(program, [x, y], force="triton")
    assert got[0] is x
    assert got[1] is got[2]
    _close(got[1], y * 2)


def test_output_dtype_follows_torch():
    program = trace_pointwise(lambda x, y: x * y)
    x, y = torch.randn(3, 4, dtype=torch.float16), torch.randn(4)
    (got,) = pointwise(program, [x, y], force="triton")
    assert got.dtype == torch.float32
    _close(got, x * y, rtol=1e-3, atol=1e-3)


def test_empty_tensors():
    program = trace_pointwise(lambda x: torch.tanh(x) * 2)
    (got,) = pointwise(program, [torch.empty(0, 3)], force="triton")
    assert got.shape == (0, 3)


# ---- what is not fusible --------------------------------------------------------------------------

NOT_FUSIBLE = {
    "sin": lambda x: torch.sin(x),
    "matmul": lambda x: x @ x,
    "sum": lambda x: x.sum(-1),
    "floordiv": lambda x: x // 2,
    "pow_tensor": lambda x: x ** x,
    "int_cast": lambda x: x.to(torch.int32),
}


@pytest.mark.parametrize("case", sorted(NOT_FUSIBLE))
def test_not_fusible(case):
    program = trace_pointwise(NOT_FUSIBLE[case])
    with pytest.raises(NotFusible):
        to_triton_source(program)
    with pytest.raises(NotFusible):
        check_fusible(program)
    x = torch.rand(4, 4) + 0.5
    with pytest.raises(NotFusible):
        pointwise(program, [x], force="triton")
    (ref,) = pointwise(program, [x])  # not forced: the torch graph, on any device
    torch.testing.assert_close(ref, NOT_FUSIBLE[case](x))


def test_untraceable_function_is_not_fusible():
    def branchy(x):
        return x if x.sum() > 0 else -x

    with pytest.raises(NotFusible):
        trace_pointwise(branchy)
    with pytest.raises(NotFusible):
        trace_pointwise(lambda x: math.exp(x))


@pytest.mark.parametrize("inputs", ["non_contiguous", "non_suffix", "integer"])
def test_inputs_the_kernel_does_not_take(inputs):
    program = trace_pointwise(lambda x, y: x * y + 1)
    if inputs == "non_contiguous":
        x, y = torch.randn(4, 3).t(), torch.randn(3, 4)
    elif inputs == "non_suffix":
        x, y = torch.randn(1, 4), torch.randn(3, 4)
    else:
        x, y = torch.arange(12).reshape(3, 4), torch.randn(3, 4)
    with pytest.raises(NotFusible):
        pointwise(program, [x, y], force="triton")
    (ref,) = pointwise(program, [x, y])
    torch.testing.assert_close(ref, x * y + 1)


# ---- building, keys, caching -------------------------------------------------------------------------

def test_builder_inlines_programs_and_merges_common_terms():
    b = ProgramBuilder()
    x = b.input("x")
    attrs = {"beta": 2.0, "threshold": 1.5}
    d1 = b.call(R.DERIVED[("softplus", "d1")].fn, x, **attrs)
    d2 = b.call(R.DERIVED[("softplus", "d2")].fn, x, **attrs)
    v = b.input("v")  # an input made after calls still comes first in the graph
    inner = trace_pointwise(lambda a, s: a * s)
    jv = b.call(inner, v, d1)
    program = b.build([jv, d2])
    assert program.input_names == ("x", "v")
    sigmoids = [n for n in program.graph.nodes if n.target is torch.sigmoid]
    assert len(sigmoids) == 1  # d1 and d2 share sigmoid(beta * x)
    xx, vv = torch.randn(4, 5), torch.randn(2, 4, 5)
    got = pointwise(program, [xx, vv], force="triton")
    _close(got[0], vv * R.DERIVED[("softplus", "d1")].fn(xx, **attrs))
    _close(got[1], R.DERIVED[("softplus", "d2")].fn(xx, **attrs))


def test_compose_accepts_tuples_programs_and_multi_output_steps():
    two = trace_pointwise(lambda a: (a * 2, a + 1))
    program = compose([(two, (Input(0),)), (operator.mul, (StepResult(0, 0), StepResult(0, 1))),
                       (torch.tanh, (StepResult(1),))])
    assert program.n_inputs == 1 and program.n_outputs == 1
    x = torch.randn(6)
    _close(program(x, force="triton")[0], torch.tanh((x * 2) * (x + 1)))


def test_program_from_curvature_nodes():
    """Nodes as the curvature program holds them: rule targets, messages positional, context by name."""
    g = fx.Graph()
    out, v, d = g.placeholder("out"), g.placeholder("v"), g.placeholder("d")
    d1 = g.call_function(R.DERIVED[("tanh", "d1")].fn, (), {"out": out})
    jv = g.call_function(R.JAC_T[("tanh", "x")].fn, (v,), {"d1": d1})
    dd = g.call_function(R.DIAG[("tanh", "x")].fn, (d,), {"d1": d1})
    total = g.call_function(torch.sum, (jv,))
    g.output((total, dd))
    program, inputs = program_from_nodes([d1, jv, dd])
    assert inputs == [out, v, d]
    assert program.n_outputs == 2  # jv and dd leave the group; d1 does not
    o, vv, ddd = torch.tanh(torch.randn(4, 5)), torch.randn(3, 4, 5), torch.rand(4, 5)
    got = pointwise(program, [o, vv, ddd], force="triton")
    _close(got[0], vv * (1 - o * o))
    _close(got[1], ddd * ((1 - o * o) * (1 - o * o)))
    bad = g.call_function(torch.cumsum, (d1, 0))
    with pytest.raises(NotFusible):
        program_from_nodes([d1, bad], outputs=[bad])


def test_program_key_is_stable_and_names_do_not_matter():
    p1 = trace_pointwise(R.DERIVED[("tanh", "d2")].fn)
    p2 = trace_pointwise(lambda y: -2 * y * (1 - y * y))
    p3 = trace_pointwise(R.DERIVED[("tanh", "d1")].fn)
    assert p1.key() == p2.key() and p1 == p2 and hash(p1) == hash(p2)
    assert p1.key() != p3.key()
    assert isinstance(p1, PointwiseProgram) and "forward" in p1.code


def test_same_program_same_kernel():
    p1 = trace_pointwise(lambda a, b: a * (1 - b * b))
    p2 = trace_pointwise(lambda u, w: u * (1 - w * w))
    assert pointwise_kernel(p1) is pointwise_kernel(p2)
    src = to_triton_source(p1)
    assert load_source(src, "pw") is load_source(src, "pw")
    files = os.listdir(cache_dir())
    assert any(f.endswith(".py") and f.startswith("fxcurv_gen_pw_") for f in files)
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    spec = PointwiseSpec(("full", "full"), ("full",))
    k = pointwise_kernel(p1, spec)
    pointwise(p2, [x, y], force="triton")
    assert pointwise_kernel(p2, spec) is k


def test_torch_path_overwrites_dead_intermediates():
    program = _chain("tanh", {})
    inputs = _chain_inputs("tanh", {}, torch.float32)
    runner = _build_runner(program, inputs, frozenset())
    assert "mul_(" in runner.source or "add_(" in runner.source
    got = runner(*inputs)
    plain = program.module(*inputs)
    for a, e in zip(got, plain):
        assert torch.equal(a, e)  # in-place twins: bitwise the same numbers


def test_torch_path_keeps_aliases_alive():
    """``.to(same dtype)`` returns its input: that input must not be overwritten while the alias lives."""
    program = trace_pointwise(lambda x: ((x * 2).to(torch.float32), (x * 2) * 3))
    x = torch.randn(5)
    a, b = pointwise(program, [x], force="torch")
    torch.testing.assert_close(a, x * 2, rtol=0, atol=0)
    torch.testing.assert_close(b, x * 6, rtol=0, atol=0)


def test_autograd_inputs_keep_their_graph():
    """Unforced, inputs that need gradients run the plain torch graph (no in-place, no kernel)."""
    program = _chain("tanh", {})
    inputs = [t.clone().requires_grad_() for t in _chain_inputs("tanh", {}, torch.float64)]
    jv, hess, d1 = pointwise(program, inputs)
    (jv.sum() + hess.sum() + d1.sum()).backward()
    ref = [t.detach().clone().requires_grad_() for t in inputs]
    e = _chain_expected("tanh", {}, *ref)
    (e[0].sum() + e[1].sum() + e[2].sum()).backward()
    for t, r in zip(inputs, ref):
        if r.grad is not None:
            torch.testing.assert_close(t.grad, r.grad)


@pytest.mark.cpu_only(reason="checks the CPU torch paths of a Python without triton, in a subprocess")
def test_import_without_triton():
    """The torch paths never need triton (e.g. macOS)."""
    code = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # make `import triton` fail
        import torch, fxcurv
        from fxcurv.kernels import (trace_pointwise, pointwise, matmul_epilogue, dual_gram,
                                    column_square_sum, to_triton_source, triton_available)
        assert not triton_available()
        p = trace_pointwise(lambda a, b: a * b)
        x = torch.randn(3, 4)
        assert torch.equal(pointwise(p, [x, x])[0], x * x)
        assert "tl.load" in to_triton_source(p)
        assert torch.allclose(matmul_epilogue(x, x.t(), p, [torch.ones(3)]), x @ x.t())
        assert dual_gram(x, x)[0].shape == (4, 4)
        assert column_square_sum(torch.randn(2, 3, 4)).shape == (3, 4)
        try:
            pointwise(p, [x, x], force="triton")
        except RuntimeError:
            pass
        else:
            raise AssertionError("force='triton' without triton must fail")
        assert "triton" not in [m for m in sys.modules if sys.modules[m] is not None]
    """)
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]


# ---- compiled mode ---------------------------------------------------------------------------------

COMPILE_PRELUDE = """
import os, sys, warnings
warnings.filterwarnings("ignore")
sys.path[:0] = [{here!r}, {tests!r}]
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)


def compile_fn(fn, sig, consts):
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=TARGET)


@triton.jit
def _probe(x_ptr, BLOCK: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, BLOCK), tl.zeros([BLOCK], tl.float32))


try:
    compile_fn(_probe, {{"x_ptr": "*fp32", "BLOCK": "constexpr"}}, {{"BLOCK": 16}})
except Exception as e:
    print("no CUDA compiler toolchain:", e)
    sys.exit(77)
"""


def compile_for_gpu(body: str) -> None:
    """Run ``body`` in a fresh process without the interpreter: it compiles generated kernels for an
    sm_90 GPU (Triton's frontend and ptxas need no device). Skips where the toolchain is missing."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = COMPILE_PRELUDE.format(here=here, tests=os.path.dirname(here)) + textwrap.dedent(body)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # a file, not `python -c`: triton.jit reads the probe kernel's source
    with tempfile.TemporaryDirectory() as d:
        script = os.path.join(d, "compile_check.py")
        with open(script, "w") as f:
            f.write(code)
        res = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=300)
    if res.returncode == 77:
        pytest.skip(res.stdout.strip())
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]


def test_generated_pointwise_kernels_compile_for_a_gpu():
    """The interpreter is lenient (numpy types); the compiler checks what a GPU would run."""
    compile_for_gpu("""
        import test_pointwise as T
        from fxcurv.kernels import PointwiseSpec, load_source, to_triton_source, trace_pointwise
        from fxcurv.kernels.codegen import pointwise_params as _pointwise_params

        def sig(spec, outs):
            ptr = "*fp64" if spec.compute == "float64" else "*fp32"
            s, it = {}, iter(outs)
            for p in _pointwise_params(spec):
                if p.startswith("out"):
                    s[p] = next(it)
                elif p.endswith("_ptr"):
                    s[p] = ptr
                elif p.startswith("in"):
                    s[p] = "fp32"
                else:
                    s[p] = "i64" if spec.int64 else "i32"
            s["BLOCK"] = "constexpr"
            return s

        for name, attrs in [("tanh", {}), ("gelu", {"approximate": "tanh"}), ("softplus", T.ATTRS["softplus"][0]),
                            ("leaky_relu", T.ATTRS["leaky_relu"][0]), ("elu", T.ATTRS["elu"][0])]:
            program = T._chain(name, attrs)
            for compute, int64 in (("float32", False), ("float64", True)):
                spec = PointwiseSpec(("full", "full", "full", "bcast", "one"), ("full", "prefix", "prefix"),
                                     compute, int64)
                out = "*fp64" if compute == "float64" else "*bf16"
                kernel = load_source(to_triton_source(program, spec), "pw").kernel
                compile_fn(kernel, sig(spec, [out] * 3), {"BLOCK": 1024})
        for case, fn in T.OPS.items():
            program = trace_pointwise(fn)
            spec = PointwiseSpec(("full", "scalar"), ("full",) * program.n_outputs)
            outs = ["*i1" if case == "bool_out" and j == 0 else "*fp32" for j in range(program.n_outputs)]
            compile_fn(load_source(to_triton_source(program, spec), "pw").kernel, sig(spec, outs), {"BLOCK": 1024})
    """)
