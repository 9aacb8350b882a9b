"""``capture="aten"`` (issue #9, items 1-2): the model captured by ``torch.export`` as ATen ops with a
symbolic batch size, canonicalized onto the hand-written ops, with every part where the batch leaves
dim 0 (``nn.MultiheadAttention``'s ``[T, N*H, hd]``, a linear on ``[N*T, d]``) one region the generic rule
proves per sample.

Exact (float64) against the torch.func references of ``tests/reference.py`` and against
``capture="fx"`` (which also checks hesscale, whose definition the fx path's tests check); one export
serves every batch size; the guards re-capture a changed model; capture errors name the user's file
and line.
"""

from __future__ import annotations

import inspect
import random
from unittest import mock

import pytest
import reference as ref
import torch
import torch.nn.functional as F
from architectures import random_cnn, random_mlp
from helpers import rel_error
from test_models import MODELS, _build, _references
from torch import nn

import fxcurv

DT = torch.float64
RTOL = 1e-8
QUANTITIES = ("diag_ggn", "diag_hessian", "hesscale")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: tests/conftest.py


def _exports() -> mock._patch:
    """Counts the calls of ``torch.export.export`` (and still exports)."""
    return mock.patch("torch.export.export", wraps=torch.export.export)


def _assert_close(got: dict, want: dict, what: str) -> None:
    for name, value in want.items():
        if value.abs().max() == 0:
            assert got[name].abs().max() < 1e-12, f"{what}[{name}] should be zero"
            continue
        err = rel_error(got[name], value)
        assert err < RTOL, f"{what}[{name}] relative error {err:.2e}"


def _check_exact(model, loss, x, y, same_graph_as_fx: bool = True) -> fxcurv.Engine:
    """grad, diag_ggn, diag_hessian equal torch.func's; hesscale is finite and, where the captured graph
    has the ops of the fx graph (no region), equals the fx path's (HesScale's diagonal backpropagation
    depends on how the graph is split into ops: a region is one op, and more exact than its parts)."""
    engine = fxcurv.compile(model, loss, quantities=QUANTITIES, capture="aten")
    out = engine(x, y)
    for quantity, values in _references(model, loss, x, y).items():
        _assert_close(out[quantity], values, f"{quantity} against torch.func")
    for name, value in out["hesscale"].items():
        assert torch.isfinite(value).all(), f"hesscale[{name}] is not finite"
    if same_graph_as_fx:
        fx_out = fxcurv.compile(model, loss, quantities=QUANTITIES)(x, y)
        for quantity in ("grad",) + QUANTITIES:
            _assert_close(out[quantity], fx_out[quantity], f"{quantity} against capture='fx'")
    return engine


# ---- the model families ----------------------------------------------------------------------------

# transformer_encoder_causal: nn.TransformerEncoder checks whether its mask is causal by comparing
# values (data-dependent control flow, which export cannot capture; test_data_dependent_... below).
FAMILIES = ["vit", "transformer_text", "resnet_eval_bn", "functional", "conv1d", "conv3d"]
# Models with nn.MultiheadAttention: one generic node on the fx path, a region, the attention and a region
# when exported (where its batch is back at dim 0, [N, H, T, hd], the attention is an op of its own).
_ATTENTION = {"vit", "transformer_text"}


@pytest.mark.parametrize("name", FAMILIES)
def test_exact_on_model_family(name):
    model, x, y, loss = _build(name)
    _check_exact(model, loss, x, y, same_graph_as_fx=name not in _ATTENTION)


@pytest.mark.parametrize("seed", [0, 1])
def test_exact_on_random_mlp_and_cnn(seed):
    """Residual, weight-tied (shared twice) and functional blocks; convolutions with strides, groups and
    dilations, pools, padding, tied kernels."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    mlp = random_mlp(rng)
    _check_exact(mlp, nn.CrossEntropyLoss(), torch.randn(3, 5, dtype=DT), torch.randint(0, 3, (3,)))
    cnn = random_cnn(rng)
    _check_exact(cnn, nn.MSELoss(), torch.randn(2, 2, 7, 6, dtype=DT), torch.randn(2, 3, dtype=DT))


def test_hand_ops_for_aten_linear_conv_relu():
    """ATen linear, conv2d, relu, batch_norm (eval), pools and reshapes become the hand-written ops."""
    model, x, y, loss = _build("resnet_eval_bn")  # exact: test_exact_on_model_family[resnet_eval_bn]
    engine = fxcurv.compile(model, loss, capture="aten")
    engine(x, y)
    forward = str(engine.graph).split("# backward")[0]
    for op in ("= conv2d(", "= relu(", "= linear(", "= batch_norm_eval(", "= adaptive_avg_pool2d(",
               "= add(", "= reshape("):
        assert op in forward, op
    assert "generic(" not in forward
    assert "aten.conv2d.default" in forward  # the source: what the graph was captured from


class Spellings(nn.Module):
    """One call of each hand op's ATen spelling not covered by the model families."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(2, 2, 2)
        self.lin = nn.Linear(8, 6)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):  # [N, 2, 3, 3]
        h = F.pad(self.up(x), (1, 1, 1, 1), value=0.5)  # [N, 2, 6, 6]
        h = F.max_pool2d(F.avg_pool2d(h, 2), 2, 1).flatten(1)  # [N, 8]
        h = self.drop(self.lin(h))
        # (not F.hardsigmoid: torch.func's Hessian, the reference, has no forward derivative of its backward)
        for act in (F.leaky_relu, F.silu, F.selu, F.celu, F.logsigmoid, F.mish, F.hardtanh, F.relu6, F.hardswish,
                    F.softplus):
            h = act(h) + 0.5 * h.contiguous().clone()
        return (1 - (-h)) ** 2 / 3


_SPELLED_OPS = ("conv_transpose2d", "pad", "avg_pool2d", "max_pool2d", "reshape", "linear", "leaky_relu", "silu",
                "selu", "celu", "logsigmoid", "mish", "hardtanh", "hardswish", "softplus",
                "scalar_affine", "add", "pow")


def test_aten_spellings_become_the_hand_ops():
    torch.manual_seed(0)
    engine = _check_exact(Spellings().to(DT).eval(), nn.MSELoss(), torch.randn(3, 2, 3, 3, dtype=DT),
                          torch.randn(3, 6, dtype=DT))
    forward = str(engine.graph).split("# backward")[0]
    missing = [op for op in _SPELLED_OPS if f"= {op}(" not in forward and f"= {op}+saved(" not in forward]
    assert not missing and "generic(" not in forward, (missing, forward)


# ---- sample structure: regions -----------------------------------------------------------------------

class SequenceLinear(nn.Module):
    """A linear layer on a sequence by folding the batch with the tokens: ``[N, T, d] -> [N*T, d]``."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 5)
        self.head = nn.Linear(15, 2)

    def forward(self, x):
        n, t, d = x.shape
        h = torch.tanh(self.lin(x.reshape(n * t, d))).reshape(n, t, -1)
        return self.head(h.flatten(1))


class BatchFirstAttention(nn.Module):
    """Attention written batch-first on ``[N, H, T, hd]``: the batch stays at dim 0 but for the split
    of the stacked ``q, k, v`` (``permute(2, 0, ...)``)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        n, t, _ = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, 2, 2).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1) * 0.5).softmax(-1) @ v
        return self.head(a.transpose(1, 2).reshape(n, t, 4).mean(1))


def _generic_sources(engine: fxcurv.Engine) -> list[str]:
    forward = str(engine.graph).split("# backward")[0]
    return [line.rsplit("#", 1)[-1].strip() for line in forward.splitlines() if "= generic(" in line]


def test_folded_batch_is_one_region_exact_for_every_batch_size_from_one_export():
    torch.manual_seed(0)
    model, loss = SequenceLinear().to(DT), nn.CrossEntropyLoss()
    with _exports() as exports:
        engine = fxcurv.compile(model, loss, quantities=("diag_ggn", "diag_hessian"), capture="aten")
        assert exports.call_count == 0  # captured at the first call
        for n in (1, 3, 5):  # a first batch of one: exported on two copies (export would fix a size of 1)
            x, y = torch.randn(n, 3, 4, dtype=DT), torch.randint(0, 2, (n,))
            out = engine(x, y)
            for quantity, values in _references(model, loss, x, y).items():
                _assert_close(out[quantity], values, f"N={n}: {quantity}")
        assert exports.call_count == 1
    sources = _generic_sources(engine)
    assert len(sources) == 1 and sources[0].startswith("region_0[reshape, linear, tanh"), sources


class TokenLinear(nn.Module):
    """``reshape(N*T, d) -> linear -> reshape(N, T, k)`` alone: the hand-written linear op on ``[N, T, d]``."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 5)
        self.head = nn.Linear(15, 2)

    def forward(self, x):
        n, t, d = x.shape
        h = self.lin(x.reshape(n * t, d)).view(n, t, -1)
        return self.head(torch.tanh(h).flatten(1))


def test_linear_on_folded_batch_is_the_hand_linear_op():
    torch.manual_seed(0)
    engine = _check_exact(TokenLinear().to(DT), nn.CrossEntropyLoss(), torch.randn(3, 3, 4, dtype=DT),
                          torch.randint(0, 2, (3,)), same_graph_as_fx=False)
    forward = str(engine.graph).split("# backward")[0]
    assert "generic(" not in forward and forward.count("= linear(") == 2, forward


def test_linops_run_the_captured_model():
    """fxcurv.linops differentiate the captured graph itself (regions included): GGN and Hessian exact."""
    from fxcurv.linops import GGN, Hessian

    torch.manual_seed(0)
    model, loss = SequenceLinear().to(DT), nn.CrossEntropyLoss()
    x, y = torch.randn(3, 3, 4, dtype=DT), torch.randint(0, 2, (3,))
    engine = fxcurv.compile(model, loss, capture="aten")
    assert rel_error(GGN(engine, [(x, y)]).to_dense(), ref.ggn(model, loss, x, y)) < RTOL
    assert rel_error(Hessian(engine, [(x, y)]).to_dense(), ref.full_hessian(model, loss, x, y)) < RTOL


def test_multihead_attention_in_regions_batch_first_attention_op_by_op():
    """nn.MultiheadAttention: its in-projection and head split, and its head merge and out-projection, are
    regions (the batch moved to dim 1 or folded); the attention between them is on [N, H, T, hd]."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(4, 2, batch_first=True).to(DT)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha, self.head = mha, nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.mha(x, x, x, need_weights=False)[0].mean(1))

    engine = _check_exact(Attention().to(DT), nn.CrossEntropyLoss(), torch.randn(3, 3, 4, dtype=DT),
                          torch.randint(0, 2, (3,)), same_graph_as_fx=False)
    regions = [s for s in _generic_sources(engine) if s.startswith("region_")]
    assert regions and all("linear" in s or "permute" in s or "transpose" in s for s in regions), regions

    engine = _check_exact(BatchFirstAttention().to(DT), nn.CrossEntropyLoss(), torch.randn(3, 3, 4, dtype=DT),
                          torch.randint(0, 2, (3,)), same_graph_as_fx=False)
    sources = _generic_sources(engine)
    # Only the split of q, k, v moves the batch; the products and the softmax are hand ops of their own.
    assert sum(s.startswith("region_") for s in sources) == 3, sources  # q, k, v of one region
    assert not any("matmul" in s or "softmax" in s for s in sources), sources
    forward = str(engine.graph).split("# backward")[0]
    assert forward.count("= matmul(") == 2 and "= softmax(" in forward, forward


# ---- guards, errors ------------------------------------------------------------------------------------

def test_changed_model_is_captured_anew():
    torch.manual_seed(0)
    model, loss = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT), nn.CrossEntropyLoss()
    x, y = torch.randn(4, 3, dtype=DT), torch.randint(0, 2, (4,))
    with _exports() as exports:
        engine = fxcurv.compile(model, loss, quantities=("diag_ggn",), capture="aten")
        engine(x, y)
        model[0].weight = nn.Parameter(torch.randn(4, 3, dtype=DT))  # a parameter replaced
        out = engine(x, y)
        _assert_close(out["diag_ggn"], ref.diag_ggn(model, loss, x, y), "replaced parameter")
        model[1] = nn.Sigmoid()  # a module swapped
        out = engine(x, y)
        _assert_close(out["diag_ggn"], ref.diag_ggn(model, loss, x, y), "swapped module")
        assert "= sigmoid(" in str(engine.graph)
        with torch.no_grad():
            model[0].weight.mul_(2)  # values change in place: the same capture reads them
        _assert_close(engine(x, y)["diag_ggn"], ref.diag_ggn(model, loss, x, y), "in-place update")
        assert exports.call_count == 3


def _line_of(text: str, obj) -> int:
    lines, start = inspect.getsourcelines(obj)
    return start + next(i for i, line in enumerate(lines) if text in line)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        if x.sum() > 0:
            return self.lin(x)
        return self.lin(-x)


class FixedBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x.view(4, -1))


class MixesSamples(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        h = self.lin(x)
        return h - h.mean(0)


class TrainBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.bn = nn.Linear(3, 2), nn.BatchNorm1d(2)

    def forward(self, x):
        return self.bn(self.lin(x))


@pytest.mark.parametrize("model, error, text, hint", [
    (DataDependent, fxcurv.TraceError, "if x.sum() > 0:", "control flow"),
    (FixedBatch, fxcurv.TraceError, "return self.lin(x.view(4, -1))", "specialized it to be a constant (4)"),
    (MixesSamples, fxcurv.UnsupportedOpError, "return h - h.mean(0)", "mixes samples"),
    (TrainBatchNorm, fxcurv.UnsupportedOpError, "return self.bn(self.lin(x))", "model.eval()"),
])
def test_capture_errors_name_the_users_line(model, error, text, hint):
    engine = fxcurv.compile(model().to(DT), nn.CrossEntropyLoss(), capture="aten")  # no error yet
    with pytest.raises(error) as info:
        engine(torch.randn(4, 3, dtype=DT), torch.randint(0, 2, (4,)))
    message = str(info.value)
    assert f"{__file__}:{_line_of(text, model.forward)}" in message, message
    assert hint in message, message


def test_capture_is_validated():
    with pytest.raises(ValueError, match="'fx', 'aten'"):
        fxcurv.compile(nn.Linear(2, 2), nn.MSELoss(), capture="onnx")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fxcurv.compile(lambda x: x, nn.MSELoss(), capture="aten")  # what needs no input is checked at once
    engine = fxcurv.compile(nn.Linear(2, 2), nn.MSELoss(), capture="aten")
    with pytest.raises(RuntimeError, match="first call"):
        engine.traced()  # nothing captured yet


def test_models_table_covers_the_families():
    assert set(FAMILIES) <= set(MODELS)


def test_inspect_command_takes_the_capture(capsys):
    """``python -m fxcurv inspect ... --capture aten``: the same numbers as the default capture."""
    import json

    from fxcurv.__main__ import main

    outs = []
    for capture in ("fx", "aten"):
        argv = ["inspect", "text_tiny", "-n", "3", "-q", "diag_ggn", "--json", "--repeats", "0", "--dtype",
                "float64", "--capture", capture]
        assert main(argv) == 0
        outs.append(json.loads(capsys.readouterr().out))
    fx_out, aten_out = outs
    assert aten_out["capture"] == "aten" and aten_out["loss_value"] == pytest.approx(fx_out["loss_value"], rel=1e-12)
    for name, values in fx_out["per_parameter"].items():
        for quantity, value in values.items():
            assert aten_out["per_parameter"][name][quantity] == pytest.approx(value, rel=1e-9), (name, quantity)
