"""Tracing and canonicalization: module, functional and method forms become one op vocabulary."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fxcurv.node_info import info
from fxcurv.passes.canonicalize import canonicalize
from fxcurv.trace import trace


def ops_of(model, x, y, loss=torch.nn.CrossEntropyLoss()):
    canon = canonicalize(trace(model, loss), x, y)
    return canon, [info(n).op for n in canon.graph.nodes if n.op == "call_function"]


class ThreeSpellings(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 3)
        self.act = torch.nn.Tanh()

    def forward(self, x):
        h = self.act(self.a(x))
        h = torch.tanh(F.linear(h, self.b.weight, self.b.bias))
        return self.c(h.tanh())


def test_module_function_and_method_forms_canonicalize_alike():
    _, ops = ops_of(ThreeSpellings(), torch.randn(2, 4), torch.tensor([0, 1]))
    assert ops == ["linear", "tanh", "linear", "tanh", "tanh", "linear", "cross_entropy"]


class Views(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(12, 3)

    def forward(self, x):
        h = x.view(x.size(0), -1).reshape(x.shape[0], 2, 6)
        return self.lin(torch.flatten(h, 1))


def test_shape_queries_fold_and_reshapes_keep_per_sample_shapes():
    canon, ops = ops_of(Views(), torch.randn(5, 3, 4), torch.zeros(5, dtype=torch.long))
    assert ops == ["reshape", "reshape", "reshape", "linear", "cross_entropy"]
    shapes = [n.kwargs["shape"] for n in canon.graph.nodes if info(n).op == "reshape"]
    assert shapes == [(12,), (2, 6), (12,)]


def test_parameters_become_inputs_and_a_shared_weight_is_one_node():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(torch.sigmoid(self.lin(x)))

    canon, _ = ops_of(Tied(), torch.randn(2, 3), torch.tensor([0, 2]))
    assert list(canon.params) == ["lin.weight", "lin.bias"]
    assert len(canon.params["lin.weight"].users) == 2


def test_identity_and_eval_dropout_disappear():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Identity(), torch.nn.Dropout(0.3),
                                torch.nn.ReLU(), torch.nn.Linear(3, 2)).eval()
    _, ops = ops_of(model, torch.randn(2, 3), torch.tensor([0, 1]))
    assert ops == ["linear", "relu", "linear", "cross_entropy"]


def test_closed_form_and_general_losses():
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    _, ops = ops_of(model, x, y, loss=lambda f, t: F.cross_entropy(f, t, reduction="sum"))
    assert ops[-1] == "cross_entropy"
    _, ops = ops_of(model, x, y, loss=lambda f, t: F.cross_entropy(f, t) + (f**2).mean())
    assert ops[-1] == "general_loss"
