"""The small passes: sharing products, dead code, liveness."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

import fxcurv
from fxcurv.node_info import Kind, info
from fxcurv.passes import eliminate_dead_code, free_messages, share_products


def _graph():
    g = fx.Graph()
    a = g.placeholder("a")
    s1 = g.call_function(torch.sin, (a,))
    s2 = g.call_function(torch.sin, (a,))  # same product
    unused = g.call_function(torch.cos, (a,))  # noqa: F841 - dead
    out = g.call_function(operator.add, (s1, s2))
    g.output(out)
    return g


def test_share_products_merges_identical_nodes():
    g = share_products(_graph())
    assert sum(1 for n in g.nodes if n.target is torch.sin) == 1
    gm = fx.GraphModule(torch.nn.Module(), g)
    a = torch.randn(3)
    torch.testing.assert_close(gm(a), 2 * torch.sin(a))


def test_sampling_nodes_are_never_merged():
    g = fx.Graph()
    gen = g.placeholder("generator")
    r1 = g.call_function(torch.randn, (3,), {"generator": gen})
    r2 = g.call_function(torch.randn, (3,), {"generator": gen})
    g.output((r1, r2))
    share_products(g)
    assert sum(1 for n in g.nodes if n.target is torch.randn) == 2


def test_dead_code_is_removed_and_placeholders_stay():
    g = eliminate_dead_code(_graph())
    assert not any(n.target is torch.cos for n in g.nodes)
    assert [n.name for n in g.nodes if n.op == "placeholder"] == ["a"]


def test_liveness_frees_each_value_at_its_last_use():
    g = free_messages(share_products(eliminate_dead_code(_graph())))
    add = next(n for n in g.nodes if n.target is operator.add)
    assert info(add).frees == ("sin",)


def test_program_has_no_duplicate_products_and_no_dead_nodes():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Sigmoid(), torch.nn.Linear(4, 3))
    engine = fxcurv.compile(model, torch.nn.CrossEntropyLoss(),
                            quantities=("diag_ggn", "diag_hessian", "hesscale", "hesscale_gn"))
    engine(torch.randn(4, 5), torch.tensor([0, 1, 2, 0]))
    graph = engine.graph.fx_graph
    keys = [(n.target, n.args, tuple(sorted(n.kwargs.items(), key=lambda kv: kv[0])))
            for n in graph.nodes if n.op == "call_function"]
    assert len(keys) == len(set(map(repr, keys)))
    assert all(n.users for n in graph.nodes if n.op == "call_function")
    # f'(x) of the sigmoid is computed once, read by the bundle [g; S] (gradient and loss factor
    # in one product) and by HesScale's diagonal (one node serving hesscale and hesscale_gn).
    d1 = [n for n in graph.nodes if n.name.endswith("_d1")]
    assert len(d1) == 1 and len(d1[0].users) == 2
    bundles = [n for n in graph.nodes if info(n).kind is Kind.BUNDLE and info(n).of == "sigmoid"]
    assert len(bundles) == 1 and info(bundles[0]).shape[0] == 1 + 2  # g and C - 1 = 2 factor columns
