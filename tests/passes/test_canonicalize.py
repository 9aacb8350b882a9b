"""Canonicalization: the traced graph becomes fxcurv's op vocabulary (fxcurv/passes/canonicalize.py).

Module, function and method spellings of an op become the same canonical node (same op, inputs and
attributes); shape queries fold into the arguments that read them; parameters become placeholders,
one per parameter of ``named_parameters()``, used or not; a trainable parameter used as data is
refused with an error naming it and the node.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import fxcurv
from fxcurv.node_info import info, param_placeholder
from fxcurv.passes.canonicalize import canonicalize
from fxcurv.trace import trace


def ops_of(model, x, y, loss=None):
    canon = canonicalize(trace(model, loss or torch.nn.CrossEntropyLoss()), x, y)
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

    class Functional(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(F.dropout(F.dropout(x, 0.5, training=False), p=0.0))

    canon, ops = ops_of(Functional(), torch.randn(2, 3), torch.tensor([0, 1]))
    assert ops == ["linear", "cross_entropy"]
    linear = next(n for n in canon.graph.nodes if info(n).op == "linear")
    assert linear.args[0].name == "x"  # the dropouts' input, directly


def test_closed_form_and_general_losses():
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    _, ops = ops_of(model, x, y, loss=lambda f, t: F.cross_entropy(f, t, reduction="sum"))
    assert ops[-1] == "cross_entropy"
    _, ops = ops_of(model, x, y, loss=lambda f, t: F.cross_entropy(f, t) + (f**2).mean())
    assert ops[-1] == "general_loss"


# ---- every spelling of an op is one canonical node ---------------------------------------------------

class Spelled(nn.Module):
    """``body(self, x)`` with the given submodules (shared between spellings, so that parameter names
    agree), flattened for a squared-error loss."""

    def __init__(self, body, **modules):
        super().__init__()
        for name, mod in modules.items():
            setattr(self, name, mod)
        self.body = body

    def forward(self, x):
        return self.body(self, x).flatten(1)


def _conv():
    return nn.Conv2d(2, 2, 3, stride=2, padding=1)


# family: (expected canonical op, submodule factories, spellings body(m, h) on h [N, 2, 6, 5])
SPELLINGS = {
    "linear": ("linear", {"lin": lambda: nn.Linear(5, 4)}, [
        lambda m, h: m.lin(h),
        lambda m, h: F.linear(h, m.lin.weight, m.lin.bias),
        lambda m, h: F.linear(input=h, weight=m.lin.weight, bias=m.lin.bias)]),
    "conv2d": ("conv2d", {"conv": _conv}, [
        lambda m, h: m.conv(h),
        lambda m, h: F.conv2d(h, m.conv.weight, m.conv.bias, 2, 1),
        lambda m, h: F.conv2d(h, m.conv.weight, bias=m.conv.bias, stride=(2, 2), padding=(1, 1), dilation=1,
                              groups=1)]),
    "relu": ("relu", {"act": nn.ReLU}, [
        lambda m, h: m.act(h), lambda m, h: F.relu(h), lambda m, h: torch.relu(h), lambda m, h: h.relu()]),
    "leaky_relu": ("leaky_relu", {"act": lambda: nn.LeakyReLU(0.2)}, [
        lambda m, h: m.act(h), lambda m, h: F.leaky_relu(h, 0.2), lambda m, h: F.leaky_relu(h, negative_slope=0.2)]),
    "sigmoid": ("sigmoid", {"act": nn.Sigmoid}, [
        lambda m, h: m.act(h), lambda m, h: torch.sigmoid(h), lambda m, h: F.sigmoid(h), lambda m, h: h.sigmoid()]),
    "tanh": ("tanh", {"act": nn.Tanh}, [
        lambda m, h: m.act(h), lambda m, h: torch.tanh(h), lambda m, h: F.tanh(h), lambda m, h: h.tanh()]),
    "elu": ("elu", {"act": lambda: nn.ELU(0.5)}, [
        lambda m, h: m.act(h), lambda m, h: F.elu(h, 0.5), lambda m, h: F.elu(h, alpha=0.5)]),
    "softplus": ("softplus", {"act": lambda: nn.Softplus(2.0, 10.0)}, [
        lambda m, h: m.act(h), lambda m, h: F.softplus(h, 2.0, 10.0),
        lambda m, h: F.softplus(h, beta=2.0, threshold=10.0)]),
    "silu": ("silu", {"act": nn.SiLU}, [lambda m, h: m.act(h), lambda m, h: F.silu(h)]),
    "gelu": ("gelu", {"act": lambda: nn.GELU("tanh")}, [
        lambda m, h: m.act(h), lambda m, h: F.gelu(h, approximate="tanh")]),
    "max_pool2d": ("max_pool2d", {"pool": lambda: nn.MaxPool2d(3, 2, 1)}, [
        lambda m, h: m.pool(h), lambda m, h: F.max_pool2d(h, 3, 2, 1),
        lambda m, h: F.max_pool2d(h, kernel_size=(3, 3), stride=2, padding=1),
        lambda m, h: torch.max_pool2d(h, 3, 2, 1)]),
    "avg_pool2d": ("avg_pool2d", {"pool": lambda: nn.AvgPool2d(3, 2, 1, count_include_pad=False)}, [
        lambda m, h: m.pool(h), lambda m, h: F.avg_pool2d(h, 3, 2, 1, False, False),
        lambda m, h: F.avg_pool2d(h, (3, 3), stride=(2, 2), padding=1, count_include_pad=False)]),
    "adaptive_avg_pool2d": ("adaptive_avg_pool2d", {"pool": lambda: nn.AdaptiveAvgPool2d((3, None))}, [
        lambda m, h: m.pool(h), lambda m, h: F.adaptive_avg_pool2d(h, (3, 5)),
        lambda m, h: F.adaptive_avg_pool2d(h, output_size=[3, None])]),
    # the running statistics are the module's buffers in every spelling (one constant each)
    "batch_norm_eval": ("batch_norm_eval", {"bn": lambda: nn.BatchNorm2d(2, eps=1e-3).eval()}, [
        lambda m, h: m.bn(h),
        lambda m, h: F.batch_norm(h, m.bn.running_mean, m.bn.running_var, m.bn.weight, m.bn.bias, False, 0.1, 1e-3),
        lambda m, h: F.batch_norm(h, m.bn.running_mean, m.bn.running_var, weight=m.bn.weight, bias=m.bn.bias,
                                  eps=1e-3)]),
    "pad": ("pad", {"pad": lambda: nn.ZeroPad2d((1, 0, 2, 1)), "cpad": lambda: nn.ConstantPad2d((1, 0, 2, 1), 0.0)}, [
        lambda m, h: m.pad(h), lambda m, h: m.cpad(h), lambda m, h: F.pad(h, (1, 0, 2, 1)),
        lambda m, h: F.pad(h, [1, 0, 2, 1], mode="constant", value=0.0)]),
    "reshape": ("reshape", {"flat": nn.Flatten}, [
        lambda m, h: m.flat(h), lambda m, h: torch.flatten(h, 1), lambda m, h: h.flatten(1),
        lambda m, h: h.view(h.size(0), -1), lambda m, h: h.reshape(h.shape[0], -1),
        lambda m, h: torch.reshape(h, (h.shape[0], -1)), lambda m, h: h.view(-1, 60)]),
    "add": ("add", {"act": nn.Tanh}, [
        lambda m, h: m.act(h) + h, lambda m, h: torch.add(m.act(h), h), lambda m, h: m.act(h).add(h),
        lambda m, h: operator.add(torch.tanh(h), h)]),
}


def _canonical_ops(model: nn.Module, x: torch.Tensor) -> list[tuple]:
    """``(op, inputs, attributes)`` of every canonical node of the model (the loss left out); inputs
    by placeholder name or position of the node they come from."""
    y = torch.zeros_like(model(x))
    canon = canonicalize(trace(model, nn.MSELoss(reduction="sum")), x, y)
    nodes = [n for n in canon.graph.nodes if n.op == "call_function" and n is not canon.loss]
    position = {n: i for i, n in enumerate(nodes)}

    def name(a):
        if isinstance(a, fx.Node):
            if a.op == "get_attr":  # a constant: by the memory it reads (the module's buffer, not a copy)
                return ("constant", getattr(canon.root, str(a.target)).data_ptr())
            return a.name if a.op == "placeholder" else position[a]
        return a

    return [(info(n).op, tuple(name(a) for a in n.args), dict(n.kwargs)) for n in nodes]


@pytest.mark.parametrize("family", list(SPELLINGS))
def test_every_spelling_is_the_same_canonical_node(family):
    op, factories, bodies = SPELLINGS[family]
    torch.manual_seed(0)
    modules = {name: make() for name, make in factories.items()}
    x = torch.randn(2, 2, 6, 5)
    canonical = [_canonical_ops(Spelled(body, **modules), x) for body in bodies]
    ops = [o for o, _, _ in canonical[0]]
    assert op in ops and ops[-1] == "reshape"  # the op, then the flatten before the loss
    for i, other in enumerate(canonical[1:], 1):
        assert other == canonical[0], f"{family}: spelling {i} canonicalizes differently"


def test_attributes_are_canonical_values():
    """Attributes are normalized (pairs, defaults filled in), whatever the spelling left out."""
    model = Spelled(lambda m, h: F.max_pool2d(m.conv(h), 2), conv=_conv())
    (conv, inputs, attrs), (pool, _, pool_attrs), _ = _canonical_ops(model, torch.randn(2, 2, 6, 5))
    assert conv == "conv2d" and inputs == ("x", "p_conv_weight", "p_conv_bias")
    assert attrs == {"stride": (2, 2), "padding": (1, 1), "dilation": (1, 1), "groups": 1}
    assert pool == "max_pool2d"
    assert pool_attrs == {"kernel_size": (2, 2), "stride": (2, 2), "padding": (0, 0), "dilation": (1, 1),
                          "ceil_mode": False}


# ---- shape queries ----------------------------------------------------------------------------------

class ShapeArguments(nn.Module):
    """Shape queries read as arguments of other calls: a global pooling over ``h.shape[2:]``, a pad
    computed from ``h.size(-1)``, a view from products of sizes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        h = F.pad(h, (0, h.size(-1) // 2, h.dim() - 4, 0))
        h = F.avg_pool2d(h, h.shape[2:])
        return h.view(h.size(0), h.size(1) * h.size(2) * h.size(3))


def test_shape_queries_fold_into_the_arguments_that_read_them():
    model = ShapeArguments()
    x = torch.randn(2, 2, 5, 4)
    canon = canonicalize(trace(model, nn.MSELoss()), x, torch.zeros(2, 3))
    ops = {info(n).op: n for n in canon.graph.nodes if n.op == "call_function"}
    assert list(ops) == ["conv2d", "tanh", "pad", "avg_pool2d", "reshape", "mse_loss"]
    # Only the ops remain: no size/dim/getattr/getitem/arithmetic nodes.
    assert all(info(n).op for n in canon.graph.nodes if n.op == "call_function")
    assert not [n for n in canon.graph.nodes if n.op in ("call_method", "call_module")]
    assert ops["pad"].kwargs["pad"] == (0, 2, 0, 0)
    assert tuple(ops["avg_pool2d"].kwargs["kernel_size"]) == (5, 6)
    assert ops["reshape"].kwargs["shape"] == (3,) and ops["reshape"].kwargs["in_shape"] == (3, 1, 1)
    for n in ops.values():
        computed: list[fx.Node] = []
        fx.map_arg(n.kwargs, computed.append)
        assert not computed, f"{n.name}: attributes computed at run time from {computed}"
    torch.testing.assert_close(fx.GraphModule(canon.root, canon.graph)(x, torch.zeros(2, 3),
                                                                       *[p.detach() for p in model.parameters()]),
                               nn.MSELoss()(model(x), torch.zeros(2, 3)))


# ---- parameters -------------------------------------------------------------------------------------

class Declared(nn.Module):
    """Parameters declared in another order than used: two never used, one frozen."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(2))
        self.late = nn.Linear(4, 3)
        self.spare = nn.Linear(2, 2)
        self.early = nn.Linear(3, 4)
        self.early.bias.requires_grad_(False)

    def forward(self, x):
        return self.late(torch.tanh(self.early(x)))


def test_every_parameter_gets_a_placeholder_in_named_parameters_order():
    model = Declared()
    canon = canonicalize(trace(model, nn.CrossEntropyLoss()), torch.randn(2, 3), torch.tensor([0, 2]))
    names = [name for name, _ in model.named_parameters()]
    assert list(canon.params) == names
    placeholders = {n.name: n for n in canon.graph.nodes if n.op == "placeholder"}
    for name, p in model.named_parameters():
        node = canon.params[name]
        assert placeholders[param_placeholder(name)] is node
        record = info(node)
        assert record.param == name and record.shape == tuple(p.shape) and record.requires_grad == p.requires_grad
    unused = {name for name, node in canon.params.items() if not node.users}
    assert unused == {"unused", "spare.weight", "spare.bias"}
    assert len(placeholders) == len(names) + 2  # and x, y


class ParameterAsData(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.memory = nn.Parameter(torch.randn(2, 3))

    def forward(self, x):
        return self.lin(x) + torch.tanh(self.memory) + self.memory


def test_a_trainable_parameter_used_as_data_is_refused_naming_it_and_every_node():
    """Every use is listed at once, each naming the parameter, the op input and the node (that the error
    reaches users of fxcurv.compile, and that a frozen parameter compiles, is tests/test_trust.py's)."""
    x, y = torch.randn(2, 3), torch.tensor([0, 2])
    with pytest.raises(fxcurv.UnsupportedOpError) as exc:
        canonicalize(trace(ParameterAsData(), nn.CrossEntropyLoss()), x, y)
    lines = str(exc.value).splitlines()
    assert len(lines) == 2, "both uses are reported at once"
    assert "parameter memory is used as data: it is input 'x' of node 'tanh'" in lines[0]
    assert "parameter memory is used as data: it is input 'b' of node 'add_1'" in lines[1]
    assert all("requires_grad_(False)" in line and "weight or bias" in line for line in lines)
    # Frozen, it is a constant input of the canonical graph.
    model = ParameterAsData()
    model.memory.requires_grad_(False)
    canon = canonicalize(trace(model, nn.CrossEntropyLoss()), x, y)
    memory = canon.params["memory"]
    assert not info(memory).requires_grad and {info(u).op for u in memory.users} == {"tanh", "add"}
