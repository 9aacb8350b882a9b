"""The fusion pass: fused programs compute the same numbers, and fuse what the design says."""

from __future__ import annotations

import operator
import random

import pytest
import torch
import torch.fx as fx

import fxcurv
import reference as ref
from architectures import random_cnn, random_mlp
from fxcurv.node_info import Kind, info, set_info
from fxcurv.passes.fuse import fuse, pointwise_regions
from fxcurv.targets import declare_target
from helpers import assert_close

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
