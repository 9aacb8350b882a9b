"""Normalization layers (``fxcurv/rules/norm.py``), end to end (float64): batch normalization in evaluation
mode, and the per-sample normalizations LayerNorm, RMSNorm and GroupNorm (hand rules since issue #9).

Its rules are checked one by one against torch.func in ``tests/rules/test_generic.py``; here nets
containing it are compiled and every exact quantity is compared with an independent reference:
``grad``, ``diag_ggn`` and ``diag_hessian`` with torch.func, ``hesscale`` / ``hesscale_gn`` with the
brute-force HesScale, ``diag_ggn`` with BackPACK's DiagGGNExact. Batch normalization that couples the
samples (training mode, no running statistics) and running statistics computed from a trainable
parameter are refused with errors naming the node and what to do.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, check_against_references, check_layer_net
from torch import nn

import fxcurv
from fxcurv.rules import registry

DT = torch.float64


def _randomize(model: nn.Module) -> nn.Module:
    """Random running statistics and affine parameters for every batch norm; evaluation mode."""
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.running_mean.normal_()
            mod.running_var.uniform_(0.5, 2.0)
            if mod.affine:
                mod.weight.data.normal_()
                mod.bias.data.normal_()
    return model.eval()


def _targets(n: int, loss_fn: nn.Module) -> torch.Tensor:
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return torch.arange(n) % 3
    return torch.randn(n, 3, dtype=DT)


# name: (model, input shape per sample, whether BackPACK computes it: BackPACK 1.7 implements batch
# norm with affine=True only)
NETS = {
    # BatchNorm2d after a convolution, BatchNorm1d on features [N, C]
    "conv_bn2d_bn1d": (lambda: nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 3 * 2, 4), nn.BatchNorm1d(4),
        nn.Sigmoid(), nn.Linear(4, 3)), (2, 5, 4), True),
    # BatchNorm1d on sequences [N, C, L] (on the input: only its parameters get messages)
    "bn1d_sequence": (lambda: nn.Sequential(
        nn.BatchNorm1d(2), nn.Linear(5, 4), nn.BatchNorm1d(2), nn.ELU(), nn.Flatten(), nn.Linear(8, 3)), (2, 5), True),
    # no affine parameters: messages pass, nothing is collected
    "bn_no_affine": (lambda: nn.Sequential(
        nn.Linear(5, 4), nn.BatchNorm1d(2, affine=False), nn.Softplus(), nn.Flatten(), nn.Linear(8, 3)), (2, 5), False),
    "bn3d": (lambda: nn.Sequential(
        nn.Linear(4, 3), nn.BatchNorm3d(2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 2 * 3 * 3, 3)), (2, 2, 3, 4), True),
}


@pytest.mark.parametrize("loss_fn", [nn.CrossEntropyLoss(), nn.MSELoss(reduction="sum")], ids=["ce", "mse_sum"])
@pytest.mark.parametrize("net", sorted(NETS))
def test_nets_with_batch_norm_are_exact(net, loss_fn):
    build, shape, backpack = NETS[net]
    torch.manual_seed(0)
    model = _randomize(build().to(DT))
    x = torch.randn((3,) + shape, dtype=DT)
    check_layer_net(model, loss_fn, x, _targets(3, loss_fn), backpack=backpack)


class FunctionalBatchNorm(nn.Module):
    """``F.batch_norm(..., training=False)`` with the module's own buffers and parameters."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.weight = nn.Parameter(torch.randn(3))
        self.bias = nn.Parameter(torch.randn(3))
        self.register_buffer("mean", torch.randn(3))
        self.register_buffer("var", torch.rand(3) + 0.5)
        self.out = nn.Linear(3, 3)

    def forward(self, x):
        h = F.batch_norm(self.lin(x), self.mean, self.var, self.weight, self.bias, training=False, eps=1e-3)
        return self.out(torch.tanh(h))


def test_functional_batch_norm_is_exact():
    torch.manual_seed(1)
    model = FunctionalBatchNorm().to(DT)
    x = torch.randn(3, 4, dtype=DT)
    check_against_references(model, nn.CrossEntropyLoss(), x, torch.tensor([0, 2, 1]))


def test_running_statistics_are_read_at_every_call():
    """The running statistics are the module's buffers, not copies: a ``load_state_dict`` (in place)
    between calls changes the results as it changes the model."""
    torch.manual_seed(2)
    model = _randomize(NETS["conv_bn2d_bn1d"][0]().to(DT))
    loss_fn, x, y = nn.CrossEntropyLoss(), torch.randn(3, 2, 5, 4, dtype=DT), torch.tensor([0, 2, 1])
    engine = fxcurv.compile(model, loss_fn, quantities=("diag_ggn",))
    engine(x, y)
    with torch.no_grad():
        model[1].running_mean.add_(0.5)
        model[5].running_var.mul_(2.0)
    import reference

    out = engine(x, y)
    assert_close(out["diag_ggn"], reference.diag_ggn(model, loss_fn, x, y), what="diag_ggn after the update")


# ---- refusals -----------------------------------------------------------------------------------

def _compile_and_call(model, x):
    fxcurv.compile(model.to(DT), nn.CrossEntropyLoss(), quantities=("diag_ggn",))(x, torch.tensor([0, 1]))


def test_training_mode_is_refused_with_a_hint():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).train()
    with pytest.raises(fxcurv.UnsupportedOpError) as info:
        _compile_and_call(model, torch.randn(2, 3, dtype=DT))
    msg = str(info.value)
    assert msg.startswith("node '") and "BatchNorm1d" in msg.split(":")[0]
    assert "couples the samples" in msg and "model.eval()" in msg


def test_engine_notices_train_after_eval():
    """A program built in evaluation mode is not reused after ``model.train()`` (guarded flag)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).to(DT).eval()
    engine = fxcurv.compile(model, nn.CrossEntropyLoss(), quantities=("diag_ggn",))
    x, y = torch.randn(2, 3, dtype=DT), torch.tensor([0, 1])
    engine(x, y)
    model.train()
    with pytest.raises(fxcurv.UnsupportedOpError, match="model.eval()"):
        engine(x, y)


def test_batch_statistics_without_running_ones_are_refused():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3, track_running_stats=False), nn.Linear(3, 2)).eval()
    with pytest.raises(fxcurv.UnsupportedOpError, match="track_running_stats=False") as info:
        _compile_and_call(model, torch.randn(2, 3, dtype=DT))
    assert "couples the samples" in str(info.value)


class _TrainingFunctional(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return F.batch_norm(self.lin(x), None, None, training=True)


class _TrainableStatistics(nn.Module):
    """Running statistics that are trainable parameters: the op has no derivative for them."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.mean = nn.Parameter(torch.zeros(2))
        self.register_buffer("var", torch.ones(2))

    def forward(self, x):
        return F.batch_norm(self.lin(x), self.mean, self.var)


def test_functional_training_is_refused():
    with pytest.raises(fxcurv.UnsupportedOpError, match="training mode") as info:
        _compile_and_call(_TrainingFunctional(), torch.randn(2, 3, dtype=DT))
    assert "batch_norm" in str(info.value).split(":")[0]


def test_trainable_running_statistics_are_refused():
    with pytest.raises(fxcurv.UnsupportedOpError, match="input 'running_mean' of batch_norm_eval"):
        _compile_and_call(_TrainableStatistics(), torch.randn(2, 3, dtype=DT))


# ---- LayerNorm, RMSNorm, GroupNorm ------------------------------------------------------------------
#
# Nonlinear in their input: diag_hessian reads their exact joint residual factor (residual_sqrt),
# hesscale its diagonal (residual), hesscale_gn and diag_ggn the closed-form jac_t / diag; their affine
# parameters take the parameter rules. BackPACK has no extension for them (no BackPACK comparison).

def _random_affine(model: nn.Module) -> nn.Module:
    """Random affine parameters for every LayerNorm / RMSNorm / GroupNorm (their defaults are 1 and 0)."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)):
                for p in mod.parameters():
                    p.normal_()
    return model


class PreNormBlock(nn.Module):
    """``h + W2 tanh(W1 LN(h))``: a pre-norm residual block (fan-out around the LayerNorm)."""

    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.inner = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d))

    def forward(self, h):
        return h + self.inner(self.norm(h))


class FunctionalNorms(nn.Module):
    """``F.layer_norm``, ``F.rms_norm`` and ``F.group_norm`` with the module's parameters."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.ln_w, self.ln_b = nn.Parameter(torch.randn(6)), nn.Parameter(torch.randn(6))
        self.rms_w = nn.Parameter(torch.randn(6))
        self.gn_w, self.gn_b = nn.Parameter(torch.randn(2)), nn.Parameter(torch.randn(2))
        self.out = nn.Linear(12, 3)

    def forward(self, x):
        h = torch.tanh(F.layer_norm(self.lin(x), (6,), self.ln_w, self.ln_b, 1e-3))
        h = torch.sigmoid(F.rms_norm(h, (6,), self.rms_w))
        h = F.group_norm(h, 2, self.gn_w, self.gn_b)  # [N, C = 2 tokens, 6 positions]
        return self.out(h.flatten(1))


# name: (model, input shape per sample, whether the brute-force HesScale reference applies: an
# nn.Sequential of layers it knows, not a block of several ops)
NORM_NETS = {
    # LayerNorm over the features of two tokens
    "layer_norm_tokens": (lambda: nn.Sequential(
        nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Flatten(), nn.Linear(10, 3)), (2, 4), True),
    # LayerNorm over two trailing dims, without bias; on the input (only its parameters get messages)
    "layer_norm_two_dims": (lambda: nn.Sequential(
        nn.LayerNorm(4), nn.Linear(4, 3), nn.LayerNorm((2, 3), bias=False), nn.Sigmoid(), nn.Flatten(),
        nn.Linear(6, 3)), (2, 4), True),
    # a pre-norm residual block and a final LayerNorm without affine parameters
    "pre_norm_residual": (lambda: nn.Sequential(
        nn.Linear(4, 5), PreNormBlock(5), nn.LayerNorm(5, elementwise_affine=False), nn.Flatten(),
        nn.Linear(10, 3)), (2, 4), False),
    "rms_norm": (lambda: nn.Sequential(
        nn.Linear(4, 5), nn.RMSNorm(5), nn.GELU(), nn.RMSNorm(5, eps=1e-3, elementwise_affine=False), nn.Flatten(),
        nn.Linear(10, 3)), (2, 4), True),
    # GroupNorm after a convolution (two groups of two channels over 3 x 2 positions), and on sequences
    "group_norm_conv": (lambda: nn.Sequential(
        nn.Conv2d(2, 4, 2), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 3 * 2, 3)), (2, 4, 3), True),
    "group_norm_sequence": (lambda: nn.Sequential(
        nn.Conv1d(2, 6, 2), nn.GroupNorm(3, 6, affine=False), nn.ELU(), nn.GroupNorm(6, 6), nn.Flatten(),
        nn.Linear(6 * 3, 3)), (2, 4), True),
    "functional": (FunctionalNorms, (2, 4), False),
}


@pytest.mark.parametrize("loss_fn", [nn.CrossEntropyLoss(), nn.MSELoss(reduction="sum")], ids=["ce", "mse_sum"])
@pytest.mark.parametrize("net", sorted(NORM_NETS))
def test_nets_with_per_sample_norms_are_exact(net, loss_fn):
    """grad, diag_ggn, diag_hessian (torch.func), hesscale and hesscale_gn (brute-force HesScale, where it
    applies)."""
    build, shape, layerwise = NORM_NETS[net]
    torch.manual_seed(4)
    model = _random_affine(build().to(DT))
    x, y = torch.randn((3,) + shape, dtype=DT), _targets(3, loss_fn)
    if layerwise:
        check_layer_net(model, loss_fn, x, y)
    else:
        check_against_references(model, loss_fn, x, y)


_NORM_SOURCES = ((registry.MODULE_SOURCES, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)),
                 (registry.FUNCTION_SOURCES, (F.layer_norm, F.rms_norm, F.group_norm)))


@pytest.mark.parametrize("net", ["pre_norm_residual", "functional", "group_norm_sequence"])
def test_hesscale_equals_the_generic_rule(net, monkeypatch):
    """Where no brute-force HesScale applies (a residual block, functional calls), ``hesscale`` and
    ``hesscale_gn`` through the hand rules equal those through the generic rule (the norms' sources
    removed, so that they become generic nodes; tests/rules/test_generic.py checks the generic rule)."""
    build, shape, _ = NORM_NETS[net]
    torch.manual_seed(5)
    model = _random_affine(build().to(DT))
    x, y, loss_fn = torch.randn((3,) + shape, dtype=DT), torch.tensor([0, 2, 1]), nn.CrossEntropyLoss()
    quantities = ("hesscale", "hesscale_gn")
    hand = fxcurv.compile(model, loss_fn, quantities=quantities)
    out = hand(x, y)
    assert "generic" not in hand.listing()
    for table, sources in _NORM_SOURCES:
        for source in sources:
            monkeypatch.delitem(table, source)
    generic = fxcurv.compile(model, loss_fn, quantities=quantities)
    want = generic(x, y)
    assert "generic" in generic.listing()
    for q in quantities:
        assert_close(out[q], want[q], rtol=1e-10, what=f"{q} vs the generic rule")


def test_per_sample_norms_are_hand_ops():
    """LayerNorm, RMSNorm and GroupNorm compile to their hand ops, not to generic nodes."""
    model = NORM_NETS["functional"][0]().to(DT)
    engine = fxcurv.compile(model, nn.CrossEntropyLoss(), quantities=("diag_ggn",))
    engine(torch.randn(3, 2, 4, dtype=DT), torch.tensor([0, 2, 1]))
    listing = engine.listing()
    for op in ("layer_norm", "rms_norm", "group_norm"):
        assert op in listing
    assert "generic" not in listing


class _NormalizesTheBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return F.layer_norm(self.lin(x), (2, 2))


def test_layer_norm_over_the_batch_is_refused():
    with pytest.raises(fxcurv.UnsupportedOpError, match="normalizes across samples") as info:
        _compile_and_call(_NormalizesTheBatch(), torch.randn(2, 3, dtype=DT))
    assert "layer_norm" in str(info.value).split(":")[0]


class _NormTwice(nn.Module):
    """One normalization module applied to its own (activated) output: its weight computes its input."""

    def __init__(self, norm: nn.Module, width: int):
        super().__init__()
        self.lin, self.norm, self.head = nn.Linear(4, width), norm, nn.Linear(2 * width, 3)

    def forward(self, x):
        return self.head(self.norm(torch.tanh(self.norm(self.lin(x)))).flatten(1))


_NORMS_OF_TWO_BY_FIVE = {"layer_norm": lambda: nn.LayerNorm(5), "rms_norm": lambda: nn.RMSNorm(5),
                         "group_norm": lambda: nn.GroupNorm(1, 2), "batch_norm": lambda: nn.BatchNorm1d(2)}


@pytest.mark.parametrize("norm", list(_NORMS_OF_TWO_BY_FIVE.values()), ids=list(_NORMS_OF_TWO_BY_FIVE))
def test_norm_weight_computing_its_own_input_is_refused_for_the_hessian(norm):
    """``d2z / (dx dw) != 0`` and not bilinear: the Hessian's mixed term has no rule, so diag_hessian is
    refused (naming the node and the parameter) instead of dropping it; the GGN needs no mixed term."""
    torch.manual_seed(6)
    model = _randomize(_random_affine(_NormTwice(norm(), 5).to(DT)))
    x, y, loss_fn = torch.randn(3, 2, 4, dtype=DT), torch.tensor([0, 2, 1]), nn.CrossEntropyLoss()
    with pytest.raises(fxcurv.UnsupportedOpError, match="mixed second derivative") as info:
        fxcurv.compile(model, loss_fn, quantities=("diag_hessian",))(x, y)
    assert "norm.weight" in str(info.value) and str(info.value).startswith("node '")
    check_against_references(model, loss_fn, x, y, quantities=("diag_ggn",))
