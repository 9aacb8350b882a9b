"""The fusion pass: fused programs compute the same numbers, and fuse what the design says."""

from __future__ import annotations

import operator
import random

import pytest
import reference as ref
import torch
import torch.fx as fx
from architectures import random_cnn, random_mlp
from helpers import assert_close

import fxcurv
from fxcurv.node_info import Kind, info, set_info
from fxcurv.passes.fuse import fuse, pointwise_regions
from fxcurv.targets import declare_target

ALL = ("diag_ggn", "diag_ggn_mc", "diag_hessian", "hesscale", "hesscale_gn")


def fused_result(model, loss_fn, x, y, quantities=ALL):
    engine = fxcurv.compile(model, loss_fn, quantities=quantities, seed=0)
    engine(x, y)  # the first call records shapes; fusion takes over from the second
    out = engine(x, y)
    fused = [n for n in engine.graph.nodes if info(n).kind is Kind.FUSED and info(n).contains]
    return engine, out, fused


@pytest.mark.parametrize("seed", range(6))
def test_fused_programs_are_exact_on_random_mlps(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model = random_mlp(rng, in_dim=4, out_dim=3, depth=3)
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 2, 1])
    loss_fn = torch.nn.CrossEntropyLoss()
    _, out, fused = fused_result(model, loss_fn, x, y)
    assert fused, "nothing was fused"
    assert_close(out.grad, ref.grad(model, loss_fn, x, y), what="grad")
    assert_close(out["diag_ggn"], ref.diag_ggn(model, loss_fn, x, y), what="diag_ggn")
    assert_close(out["diag_hessian"], ref.diag_hessian(model, loss_fn, x, y), what="diag_hessian")


@pytest.mark.parametrize("seed", range(4))
def test_fused_programs_are_exact_on_random_cnns(seed):
    rng = random.Random(100 + seed)
    torch.manual_seed(seed)
    model = random_cnn(rng, in_shape=(2, 7, 6), out_dim=3, depth=3)
    x, y = torch.randn(3, 2, 7, 6, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    loss_fn = torch.nn.MSELoss(reduction="sum")
    _, out, _ = fused_result(model, loss_fn, x, y, quantities=("diag_ggn", "diag_hessian"))
    assert_close(out["diag_ggn"], ref.diag_ggn(model, loss_fn, x, y), what="diag_ggn")
    assert_close(out["diag_hessian"], ref.diag_hessian(model, loss_fn, x, y), what="diag_hessian")


def test_backends_agree():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Sigmoid(), torch.nn.Linear(8, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 4))
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 3, 0])
    results = {}
    for backend in ("eager", "fused"):
        engine = fxcurv.compile(model, torch.nn.CrossEntropyLoss(), quantities=ALL, backend=backend, seed=0)
        engine(x, y)
        results[backend] = engine(x, y)
    for q in ("grad",) + ALL:
        assert_close(results["fused"][q], results["eager"][q], rtol=1e-5, what=q)


def test_hbp_composite_and_parameter_reductions_are_fused():
    """diag_ggn on an MLP: each hidden layer's [g; S] product carries the activation's derivative as
    its epilogue (HBP B.4), and each layer's gradient and GGN diagonal share one reduction node."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    engine, _, fused = fused_result(model, torch.nn.CrossEntropyLoss(), torch.randn(5, 6),
                                    torch.tensor([0, 1, 2, 3, 0]), quantities=("diag_ggn",))
    contents = [tuple(info(n).contains) for n in fused]
    assert ("linear.jac_t[x]", "tanh'", "tanh.jac_t[x]") in contents
    reductions = [c for c in contents if c[0] == "linear.grad[weight]"]
    assert len(reductions) == 2 and all("linear.diag_sqrt[weight]" in c for c in reductions)
    assert "fuses: linear.jac_t[x] -> tanh' -> tanh.jac_t[x]" in str(engine.graph)
    assert "tanh.jac_t[x](" not in str(engine.graph)  # no unfused activation product is left


def test_hesscale_squares_the_weight_in_the_kernel():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Sigmoid(), torch.nn.Linear(8, 4))
    engine, _, fused = fused_result(model, torch.nn.CrossEntropyLoss(), torch.randn(5, 6),
                                    torch.tensor([0, 1, 2, 3, 0]), quantities=("hesscale_gn",))
    names = [n.name for n in engine.graph.nodes]
    assert not any(name.endswith("weight_sq") for name in names)  # (W o W) never materialized
    assert any(c[0] == "linear.diag[x]" for c in (info(n).contains for n in fused))


def _sigmoid(v):
    return torch.sigmoid(v)


def _tanh(v):
    return torch.tanh(v)


declare_target(_sigmoid, pointwise=True)
declare_target(_tanh, pointwise=True)


def test_regions_respect_external_users_and_toposort_repairs_order():
    """A region's member read outside the region is an output of the fused node; a user that stood
    between members is moved after the fused node."""
    g = fx.Graph()
    a = g.placeholder("a")
    t1 = g.call_function(_sigmoid, (a,))
    between = g.call_function(operator.neg, (t1,))  # an outside user of t1, between members
    t2 = g.call_function(_tanh, (t1,))
    g.output((between, t2))
    for n in (a, t1, between, t2):
        set_info(n, shape=(3,), dtype=torch.float32)
    regions = pointwise_regions(g)
    assert len(regions) == 1 and set(regions[0]["outputs"]) == {t1, t2}
    fuse(g)
    assert sum(1 for n in g.nodes if info(n).kind is Kind.FUSED) == 1
    g.lint()
    gm = fx.GraphModule(torch.nn.Module(), g)
    v = torch.randn(3)
    neg, tanh = gm(v)
    torch.testing.assert_close(neg, -torch.sigmoid(v))
    torch.testing.assert_close(tanh, torch.tanh(torch.sigmoid(v)))


# ---- regions never form a cycle together --------------------------------------------------------

def _mul(a, b):
    return a * b


def _add(a, b):
    return a + b


def _neg(v):
    return -v


declare_target(_mul, pointwise=True)
declare_target(_add, pointwise=True)
declare_target(_neg, pointwise=True)


def _first_row(v):
    """Not pointwise (like the bundle's gradient column): ``[..., D] -> [D]``."""
    return v.reshape(-1, v.shape[-1])[0] * 1.0


def _column0(v):
    """Not pointwise (like the bundle's gradient column ``[g; S][0]``)."""
    return v[0] * 1.0


def _product(v, weight):
    return v @ weight


# a matmul rule: a pointwise region it alone feeds becomes its epilogue
declare_target(_product, matmul="weight")

_SHAPES = ((3,), (1, 3), (2, 3))  # equal-sized [1, 3] and [3] tie for the iteration space


def _random_program(rng: random.Random) -> tuple[fx.Graph, list]:
    """A random dataflow graph of pointwise ops of broadcasting shapes, non-pointwise reads and
    matmul prologues, like the HesScale and bundle streams of a residual block."""
    g = fx.Graph()
    values = []
    for i, shape in enumerate(_SHAPES):
        p = g.placeholder(f"in{i}")
        set_info(p, shape=shape, dtype=torch.float64)
        values.append(p)
    w = g.placeholder("weight")
    set_info(w, shape=(3, 3), dtype=torch.float64)
    for _ in range(rng.randint(6, 20)):
        kind = rng.random()
        if kind < 0.2:
            a = rng.choice(values)
            n, shape = g.call_function(rng.choice([_sigmoid, _tanh, _neg]), (a,)), info(a).shape
        elif kind < 0.7:
            a, b = rng.choice(values), rng.choice(values)
            n = g.call_function(rng.choice([_mul, _add]), (a, b))
            shape = max(info(a).shape, info(b).shape, key=lambda s: (s[0] if len(s) == 2 else 0, len(s)))
        elif kind < 0.85:
            a = rng.choice(values)
            if len(info(a).shape) == 2 and rng.random() < 0.7:
                n, shape = g.call_function(_column0, (a,)), (3,)
            else:
                n, shape = g.call_function(_first_row, (a,)), (3,)
        else:
            a = rng.choice(values)
            n, shape = g.call_function(_product, (a,), {"weight": w}), info(a).shape
        set_info(n, shape=shape, dtype=torch.float64)
        values.append(n)
    g.output(tuple(v for v in values[3:] if not v.users) + tuple(rng.sample(values[3:], 2)))
    return g, [torch.randn(s, dtype=torch.float64) for s in _SHAPES] + [torch.randn(3, 3, dtype=torch.float64)]


@pytest.mark.parametrize("seed", range(60))
def test_regions_contract_to_an_acyclic_program_together(seed):
    """Each region can be acyclic alone and two regions still feed each other (a bundle region reads
    phi'(x) from a HesScale region that reads g from the bundle region, "the program has a cycle"):
    contracting every region with its prologue at once must leave a DAG, and the fused program must
    compute what the unfused one does."""
    import networkx as nx

    g, inputs = _random_program(random.Random(seed))
    expected = fx.GraphModule(torch.nn.Module(), g)(*inputs)
    dfg = nx.DiGraph()
    for n in g.nodes:
        dfg.add_node(n)
        dfg.add_edges_from((a, n) for a in n.all_input_nodes)
    block = {}
    for i, region in enumerate(pointwise_regions(g)):
        for n in region["nodes"] | ({region["prologue"]} if region["prologue"] is not None else set()):
            assert n not in block, "regions overlap"
            block[n] = i
    quotient = nx.DiGraph()
    quotient.add_nodes_from(block.get(n, n) for n in dfg.nodes)
    quotient.add_edges_from((block.get(a, a), block.get(b, b)) for a, b in dfg.edges
                            if block.get(a, a) != block.get(b, b))
    assert nx.is_directed_acyclic_graph(quotient)
    fuse(g)
    g.lint()
    actual = fx.GraphModule(torch.nn.Module(), g)(*inputs)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)


def test_two_regions_that_feed_each_other_are_not_both_formed():
    """A residual block's backward in miniature: the bundle region ``{a, b}`` reads ``phi'`` (``c``)
    from the HesScale region ``{c, z}``, which reads ``g`` (``column0(a)``, through ``r``) from the
    bundle region. Each region alone contracts without a cycle; both together do not."""
    g = fx.Graph()
    bundle, out = g.placeholder("bundle"), g.placeholder("out")
    a = g.call_function(_neg, (bundle,))  # the bundle sum          [2, N, D]
    grad = g.call_function(_column0, (a,))  # g, not pointwise       [N, D]
    r = g.call_function(_tanh, (grad,))  # the residual phi'' g       [N, D]
    c = g.call_function(_sigmoid, (out,))  # phi'                    [N, D]
    b = g.call_function(_mul, (a, c))  # the bundle's jac_t        [2, N, D]
    z = g.call_function(_add, (c, r))  # HesScale's d + r            [N, D]
    q = g.call_function(_column0, (c,))  # another reader of phi'
    g.output((b, z, q))
    for n in (bundle, a, b):
        set_info(n, shape=(2, 4, 3), dtype=torch.float64)
    for n in (out, grad, r, c, z):
        set_info(n, shape=(4, 3), dtype=torch.float64)
    set_info(q, shape=(3,), dtype=torch.float64)
    inputs = (torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64))
    expected = fx.GraphModule(torch.nn.Module(), g)(*inputs)
    regions = [r["nodes"] for r in pointwise_regions(g) if len(r["nodes"]) > 1]
    assert {a, b} in regions and {c, z} not in regions
    fuse(g)
    g.lint()
    for actual, e in zip(fx.GraphModule(torch.nn.Module(), g)(*inputs), expected):
        torch.testing.assert_close(actual, e)


class _Residual(torch.nn.Module):
    def __init__(self, width, act):
        super().__init__()
        self.inner, self.act = torch.nn.Linear(width, width), act

    def forward(self, h):
        return h + self.act(self.inner(h))


@pytest.mark.parametrize("quantities", [("hesscale",), ("hesscale", "hesscale_gn"),
                                        ("hesscale", "hesscale_gn", "diag_ggn", "diag_hessian")])
def test_residual_hesscale_fuses_and_agrees_with_eager(quantities):
    """The issue's net: ``h + tanh(Linear(h))`` with fused HesScale raised "the program has a cycle"."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), _Residual(6, torch.nn.Tanh()),
                                _Residual(6, torch.nn.Sigmoid()), _Residual(6, torch.nn.GELU()),
                                torch.nn.Linear(6, 3)).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    results = {}
    for backend in ("eager", "fused"):
        engine = fxcurv.compile(model, torch.nn.CrossEntropyLoss(), quantities=quantities, backend=backend)
        engine(x, y)
        results[backend] = engine(x, y)
    assert any(info(n).kind is Kind.FUSED for n in engine.graph.nodes)
    for q in ("grad",) + quantities:
        assert_close(results["fused"][q], results["eager"][q], rtol=1e-12, what=q)
