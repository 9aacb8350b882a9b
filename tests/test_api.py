"""The user's view: fxcurv.compile, the engine, its results, caching and inspection."""

from __future__ import annotations

import pytest
import torch

import fxcurv
from fxcurv.node_info import Kind, info


def mnist_like():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 100), torch.nn.Tanh(),
                                torch.nn.Linear(100, 10))
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    return model, x, y


QUANTITIES = ("diag_ggn", "diag_ggn_mc", "diag_hessian", "hesscale", "hesscale_gn")


def test_issue_example_runs_and_matches_autograd():
    model, x, y = mnist_like()
    loss_fn = torch.nn.CrossEntropyLoss()
    engine = fxcurv.compile(model, loss_fn, quantities=QUANTITIES)
    out = engine(x, y)
    loss = loss_fn(model(x), y)
    loss.backward()
    torch.testing.assert_close(out.loss, loss.detach())
    for name, p in model.named_parameters():
        torch.testing.assert_close(out.grad[name], p.grad, rtol=1e-5, atol=1e-6)
        for q in QUANTITIES:
            assert out[q][name].shape == p.shape and out[q][name].dtype == p.dtype
    assert set(out) == {"grad", *QUANTITIES}
    assert out["diag_hessian"]["3.bias"].shape == (10,)


def test_programs_are_cached_per_signature():
    model, x, y = mnist_like()
    engine = fxcurv.compile(model, torch.nn.CrossEntropyLoss(), quantities=("diag_ggn",))
    first = engine.program(x, y)
    engine(x, y)
    assert engine.program(x, y) is first
    engine(x[:5], y[:5])  # new batch size
    assert engine.program(x[:5], y[:5]) is not first
    small = engine.program(x[:5], y[:5])
    model.double()  # new dtype of parameters and inputs
    engine(x.double(), y)
    assert engine.program(x.double(), y) not in (first, small)
    model.float()
    assert engine.program(x, y) is first and engine.program(x[:5], y[:5]) is small


def test_engine_reads_the_current_parameters():
    model, x, y = mnist_like()
    engine = fxcurv.compile(model, torch.nn.CrossEntropyLoss(), quantities=("diag_ggn",))
    before = engine(x, y).grad["1.weight"].clone()
    with torch.no_grad():
        model[1].weight.mul_(2.0)
    after = engine(x, y).grad["1.weight"]
    assert not torch.allclose(before, after)


def test_graph_listing_code_and_dot():
    model, x, y = mnist_like()
    engine = fxcurv.compile(model, torch.nn.CrossEntropyLoss(), quantities=("diag_ggn", "hesscale"))
    engine(x, y)
    listing = str(engine.graph)
    nodes = list(engine.graph.nodes)
    node_lines = [line for line in listing.splitlines() if not line.startswith("#")]
    assert len(node_lines) == len(nodes)  # one line per node
    assert "linear.jac_t[x]" in listing and "cross_entropy.sqrt_hessian" in listing
    assert "def forward" in engine.code
    dot = engine.to_dot()
    assert dot.startswith("digraph") and dot.count("->") == sum(len(n.all_input_nodes) for n in nodes)
    assert engine.graph.to_dot() == dot


def test_result_mapping_and_errors():
    model, x, y = mnist_like()
    out = fxcurv.compile(model, torch.nn.CrossEntropyLoss(), quantities=("hesscale",))(x, y)
    assert list(out) == ["grad", "hesscale"]
    try:
        out["diag_ggn"]
    except KeyError as err:
        assert "not requested" in str(err)
    else:
        raise AssertionError("expected a KeyError")
    assert "loss=" in repr(out)


def test_inspecting_before_calling_says_what_to_do():
    model, _, _ = mnist_like()
    engine = fxcurv.compile(model, torch.nn.CrossEntropyLoss())
    with pytest.raises(RuntimeError, match="call the engine"):
        _ = engine.graph


def test_only_requested_streams_are_in_the_program():
    model, x, y = mnist_like()
    engine = fxcurv.compile(model, torch.nn.CrossEntropyLoss(), quantities=("grad",))
    engine(x, y)
    kinds = {info(n).kind for n in engine.graph.nodes}
    assert Kind.SQRT not in kinds and Kind.DIAG not in kinds


def test_the_main_job_counts_the_programs_gradient_and_curvature_nodes(capsys):
    from fxcurv.__main__ import main

    assert main(["inspect", "mnist_mlp", "--batch", "4"]) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("== curvature program"))
    total, backward = (int(w) for w in header.replace(",", "").split() if w.isdigit())
    assert 0 < backward < total
