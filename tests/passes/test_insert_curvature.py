"""insert_curvature on small canonical graphs: the structure of the program it writes.

The numbers of the programs are tested end to end against torch.func elsewhere; here the pass is
read as a reader of ``fxcurv/passes/insert_curvature.py`` and ``fxcurv/curvature/`` expects it to
work, from the node records alone (``info(node).kind``, ``.stream``, ``.of``, and the rule a node's
target is): the gradient and the loss's factor columns travel stacked, one ``W^T [g; S]`` product per
linear layer (DESIGN.md, "Messages"); each quantity set carries exactly the streams its quantities
declare; residual origins (HBP eq. S.9, second term) exist only for ``diag_hessian``, one per smooth
activation; mixed-term columns (HBP eq. S.6, second term) only where a weight is used twice; the
output holds one entry per trainable parameter in ``named_parameters()`` order.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch import nn

from fxcurv import factors
from fxcurv.curvature.accumulate import MixedColumns
from fxcurv.node_info import GENERATOR, Kind, info
from fxcurv.passes.canonicalize import canonicalize
from fxcurv.passes.insert_curvature import insert_curvature
from fxcurv.quantities import QUANTITIES
from fxcurv.rules import registry
from fxcurv.trace import trace


class MLP(nn.Module):
    """Two hidden layers: a smooth activation (tanh) and a piecewise-linear one (ReLU)."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.l3(torch.relu(self.l2(torch.tanh(self.l1(x)))))


class Residual(nn.Module):
    """``c(h + sigmoid(b(h)))`` with ``h = tanh(a(x))``: ``h`` fans out to the skip and the branch."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.c(h + torch.sigmoid(self.b(h)))


class Tied(nn.Module):
    """``out(lin(tanh(lin(x))))``: ``lin`` is used twice, the second time on data computed from it."""

    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.lin(torch.tanh(self.lin(x))))


MODELS = {"mlp": MLP, "residual": Residual, "tied": Tied}
# Per model: the activations whose residual starts an origin under diag_hessian (smooth ones whose
# input depends on a parameter), the number of linear layers whose input depends on a parameter,
# and the weights used twice.
SMOOTH = {"mlp": {"tanh"}, "residual": {"tanh", "sigmoid"}, "tied": {"tanh"}}
LINEAR_WITH_MESSAGES = {"mlp": 2, "residual": 2, "tied": 2}
USED_TWICE = {"mlp": set(), "residual": set(), "tied": {"lin.weight"}}

QUANTITY_SETS = [(), ("diag_ggn",), ("diag_ggn_mc",), ("diag_hessian",), ("hesscale",), ("hesscale_gn",),
                 ("diag_ggn", "diag_ggn_mc", "diag_hessian", "hesscale", "hesscale_gn")]
QS_IDS = ["grad"] + ["+".join(qs) for qs in QUANTITY_SETS[1:-1]] + ["all"]

# The message streams each quantity declares (stream labels up to their ":<origin node>").
STREAMS = {"grad": set(), "diag_ggn": {"loss"}, "diag_ggn_mc": {"mc"},
           "diag_hessian": {"loss", "residual", "mixed"}, "hesscale": {"hesscale"},
           "hesscale_gn": {"hesscale_gn"}}


def program(name: str, quantities: tuple[str, ...], mc_samples: int = 2) -> tuple[nn.Module, fx.Graph]:
    torch.manual_seed(0)
    model = MODELS[name]()
    canon = canonicalize(trace(model, nn.CrossEntropyLoss()), torch.randn(3, 4), torch.tensor([0, 2, 1]))
    qs = tuple(QUANTITIES[q] for q in ("grad",) + quantities)
    return model, insert_curvature(canon, qs, mc_samples)


def backward(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if info(n).kind.is_backward]


def rule_label(node: fx.Node) -> str:
    rule = registry.rule_of(node.target)
    return rule.label if rule is not None else ""


def forward_op(graph: fx.Graph, name: str) -> str:
    """The canonical op of the forward node called ``name``."""
    return next(info(n).op for n in graph.nodes if n.name == name and info(n).kind is Kind.FORWARD)


# ---- the bundle --------------------------------------------------------------------------------------

@pytest.mark.parametrize("quantities", QUANTITY_SETS, ids=QS_IDS)
@pytest.mark.parametrize("name", list(MODELS))
def test_one_bundle_product_per_linear_layer(name, quantities):
    """The gradient and the loss's exact and Monte Carlo columns pass each linear layer in one
    ``W^T [g; S]`` product, whatever the quantities; the first layer's input (data) gets none."""
    _, graph = program(name, quantities)
    products = [n for n in backward(graph) if rule_label(n) == "linear.jac_t[x]"]
    bundles = [n for n in products if info(n).kind is Kind.BUNDLE]
    assert len(bundles) == LINEAR_WITH_MESSAGES[name]
    assert len({info(n).of for n in bundles}) == len(bundles), "two bundle products at one layer"
    # Loss-origin columns never travel outside the bundle.
    assert not [n for n in products if info(n).kind is Kind.SQRT and info(n).stream.split(":")[0] in ("loss", "mc")]
    # One bundle is seeded at the loss: the gradient and the factors stacked.
    seeds = [n for n in backward(graph) if n.target is factors.stack_columns]
    assert len(seeds) == 1 and info(seeds[0].args[0]).kind is Kind.GRAD
    heads = [info(a).stream for a in seeds[0].args[1:]]
    assert heads == [s for s in ("loss", "mc") if any(s in STREAMS[q] for q in quantities)]


def test_fan_out_sums_the_bundle_once():
    """At ``h`` (used by the skip and the branch) the two bundles are summed in one node; a chain has
    no such sum."""
    for name, expected in (("residual", 1), ("mlp", 0)):
        _, graph = program(name, ("diag_ggn",))
        sums = [n for n in backward(graph) if info(n).kind is Kind.BUNDLE and n.target is factors.add_all]
        assert len(sums) == expected
        if expected:
            assert forward_op(graph, info(sums[0]).of) == "tanh" and len(sums[0].args) == 2


# ---- streams per quantity set ------------------------------------------------------------------------

@pytest.mark.parametrize("quantities", QUANTITY_SETS, ids=QS_IDS)
@pytest.mark.parametrize("name", list(MODELS))
def test_streams_present_exactly_for_the_quantities_that_declare_them(name, quantities):
    _, graph = program(name, quantities)
    nodes = backward(graph)
    present = {info(n).stream.split(":")[0] for n in nodes if info(n).stream}
    declared = set().union(*(STREAMS[q] for q in quantities)) if quantities else set()
    if not SMOOTH[name]:
        declared.discard("residual")
    if not USED_TWICE[name]:
        declared.discard("mixed")
    assert present == declared
    kinds = {info(n).kind for n in nodes}
    assert (Kind.SQRT in kinds) == bool(declared & {"loss", "mc", "residual", "mixed"})
    assert (Kind.DIAG in kinds) == bool(declared & {"hesscale", "hesscale_gn"})
    # phi''(x) g is computed where diag_hessian (residual columns) or hesscale (d += r) needs it.
    assert (Kind.RESIDUAL in kinds) == bool({"diag_hessian", "hesscale"} & set(quantities))
    # Monte Carlo columns take the generator as a program input.
    placeholders = [n.name for n in graph.nodes if n.op == "placeholder"]
    assert (GENERATOR in placeholders) == ("diag_ggn_mc" in quantities)
    # Every quantity collects the gradient message; only the requested ones collect more.
    params = {info(n).stream.split(":")[0] for n in nodes if info(n).kind is Kind.PARAM and info(n).stream}
    assert params == declared


@pytest.mark.parametrize("quantities", QUANTITY_SETS, ids=QS_IDS)
@pytest.mark.parametrize("name", list(MODELS))
def test_residual_origins_only_for_diag_hessian(name, quantities):
    """HBP eq. S.9: one residual origin per smooth activation, carried only for diag_hessian; ReLU has
    none. Each origin starts as one diagonal ``r = phi''(x) g`` (a RESIDUAL node of that activation)."""
    _, graph = program(name, quantities)
    origins = {info(n).stream.split(":", 1)[1] for n in backward(graph) if info(n).stream.startswith("residual:")}
    activations = {forward_op(graph, at) for at in origins}
    assert activations == (SMOOTH[name] if "diag_hessian" in quantities else set())
    for at in origins:
        starts = [n for n in backward(graph) if info(n).kind is Kind.RESIDUAL and info(n).of == at]
        assert len(starts) == 1 and rule_label(starts[0]) == f"{forward_op(graph, at)}.residual[x]"


def test_residual_columns_pass_ops_outside_the_bundle():
    """Residual origins never mix with the bundle: the sigmoid's columns cross the branch's linear layer
    in a product of their own (and the tanh's reach ``a`` as a diagonal, HesScale eq. 5, no product)."""
    _, graph = program("residual", ("diag_hessian",))
    sqrt_products = [n for n in backward(graph) if info(n).kind is Kind.SQRT and rule_label(n) == "linear.jac_t[x]"]
    assert [forward_op(graph, info(n).stream.split(":", 1)[1]) for n in sqrt_products] == ["sigmoid"]
    diag_diag = {info(n).stream for n in backward(graph) if rule_label(n).startswith("linear.diag_diag")}
    assert {forward_op(graph, s.split(":", 1)[1]) for s in diag_diag} == {"tanh", "sigmoid"}


# ---- weights used twice ------------------------------------------------------------------------------

@pytest.mark.parametrize("quantities", QUANTITY_SETS, ids=QS_IDS)
@pytest.mark.parametrize("name", list(MODELS))
def test_mixed_columns_only_where_a_weight_is_used_twice(name, quantities):
    """HBP eq. S.6 (second term): unit columns start at the data input of the second use of a weight,
    and pair with the op's mixed derivative ``B^T E`` at that weight; nowhere else, and only for
    diag_hessian."""
    _, graph = program(name, quantities)
    nodes = backward(graph)
    units = [n for n in nodes if n.target is factors.unit_columns]
    partners = [n for n in nodes if isinstance(n.target, MixedColumns)]
    if "diag_hessian" not in quantities or not USED_TWICE[name]:
        assert not units and not partners and not any(info(n).stream.startswith("mixed") for n in nodes)
        return
    assert len(units) == 1 and len(partners) == 1
    assert info(units[0]).stream == info(partners[0]).stream
    assert partners[0].target.param == "weight" and info(partners[0]).of == info(units[0]).of
    # Its contribution is collected for the tied weight only.
    mixed = [n for n in nodes if n.target is factors.mixed_contribution]
    assert len(mixed) == 1 and info(mixed[0]).of == "p_lin_weight"


def used_param(graph: fx.Graph, node: fx.Node) -> str:
    """The parameter a parameter-rule node works for: the rule's input of the op node it is ``of``."""
    rule = registry.rule_of(node.target)
    op_node = next(n for n in graph.nodes if n.name == info(node).of and info(n).kind is Kind.FORWARD)
    return info(op_node.args[registry.OPS[rule.op].inputs.index(rule.key)]).param


def test_a_weight_used_twice_sums_per_sample_products_before_squaring():
    """A shared parameter's factor diagonal needs ``sum_uses J^T S`` per sample before the square:
    ``per_sample`` at each use, never the single-use ``diag_sqrt`` shortcut; other weights keep it."""
    _, graph = program("tied", ("diag_ggn",))
    nodes = backward(graph)
    per_sample = sorted(used_param(graph, n) for n in nodes if registry.rule_of(n.target) is not None
                        and registry.rule_of(n.target).kind is registry.RuleKind.PER_SAMPLE)
    diag_sqrt = sorted(used_param(graph, n) for n in nodes if registry.rule_of(n.target) is not None
                       and registry.rule_of(n.target).kind is registry.RuleKind.DIAG_SQRT)
    assert per_sample == ["lin.bias", "lin.bias", "lin.weight", "lin.weight"]
    assert diag_sqrt == ["out.bias", "out.weight"]
    squares = [n for n in nodes if n.target is factors.signed_square_sum]
    assert sorted(info(n).of for n in squares) == ["p_lin_bias", "p_lin_weight"]


# ---- the output ------------------------------------------------------------------------------------

class Unordered(nn.Module):
    """Parameters declared in another order than used, one never used, one frozen."""

    def __init__(self):
        super().__init__()
        self.late = nn.Linear(4, 3)
        self.unused = nn.Parameter(torch.zeros(2))
        self.early = nn.Linear(4, 4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.weight.requires_grad_(False)

    def forward(self, x):
        return self.late(torch.tanh(self.frozen(torch.tanh(self.early(x)))))


@pytest.mark.parametrize("quantities", QUANTITY_SETS, ids=QS_IDS)
def test_output_is_loss_then_quantities_keyed_in_named_parameters_order(quantities):
    torch.manual_seed(0)
    model = Unordered()
    canon = canonicalize(trace(model, nn.CrossEntropyLoss()), torch.randn(3, 4), torch.tensor([0, 2, 1]))
    graph = insert_curvature(canon, tuple(QUANTITIES[q] for q in ("grad",) + quantities), 1)
    out = graph.output_node().args[0]
    assert list(out) == ["loss", "grad", *quantities]
    assert out["loss"] is next(n for n in graph.nodes if n.name == canon.loss.name)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    for q in ("grad",) + quantities:
        assert list(out[q]) == trainable, q
        # The parameter the loss never reaches gets zeros shaped like it.
        assert out[q]["unused"].target is factors.zeros_like_param
        assert all(info(v).kind is Kind.PARAM for v in out[q].values())
