"""Bad input gets a clear error: the right fxcurv.errors type, naming the node or argument at fault
and saying what is supported."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcurv
from fxcurv.errors import FxcurvError, InputError, LossError, TraceError, UnsupportedOpError

DTYPE = torch.float64
QUANTITIES = ("diag_ggn", "hesscale")


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DTYPE)


X = torch.randn(2, 3, dtype=DTYPE)
Y = torch.tensor([0, 2])


def run(model, loss_fn, x=X, y=Y, quantities=QUANTITIES, **kw):
    return fxcurv.compile(model, loss_fn, quantities=quantities, **kw)(x, y)


def message(excinfo) -> str:
    return str(excinfo.value)


def assert_phrases(msg: str, *phrases: str) -> None:
    for p in phrases:
        assert p in msg, f"{p!r} not in message:\n{msg}"


def test_error_hierarchy():
    for cls in (TraceError, UnsupportedOpError, LossError, InputError):
        assert issubclass(cls, FxcurvError)
    assert issubclass(UnsupportedOpError, NotImplementedError)
    assert issubclass(LossError, ValueError) and issubclass(InputError, ValueError)


# ---- unsupported ops in forward -----------------------------------------------------------------

class WithLinear(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.lin = nn.Linear(3, 3).to(DTYPE)
        self.body = body

    def forward(self, x):
        return self.body(self.lin(x))


@pytest.mark.parametrize("body, node, source", [
    (lambda h: torch.sort(h, dim=0).values, "'sort'", "torch.sort"),
    (lambda h: torch.cumsum(h, 0), "'cumsum'", "torch.cumsum"),
    (lambda h: h - h.mean(0), "'mean'", "Tensor.mean"),
], ids=["torch.sort over the batch", "torch.cumsum over the batch", "mean over the batch"])
def test_op_mixing_samples_names_node(body, node, source):
    """Every op has the generic rule, but only an op that treats samples independently has per-sample
    curvature: one whose output for a sample depends on the others is refused, naming it."""
    with pytest.raises(UnsupportedOpError) as exc:
        run(WithLinear(body), nn.CrossEntropyLoss(), x=torch.randn(3, 3, dtype=DTYPE), y=torch.tensor([0, 2, 1]))
    # Named with the user's file and line (the lambda above, called from WithLinear.forward).
    assert_phrases(message(exc), node, source, "mixes samples", "per sample", f"{__file__}:")


def test_op_dropping_the_batch_names_node():
    with pytest.raises(UnsupportedOpError) as exc:
        run(WithLinear(lambda h: h.sum(0, keepdim=True)), lambda f, y: (f ** 2).sum())
    assert_phrases(message(exc), "'sum", "Tensor.sum", "does not keep the batch")


def test_batchnorm_in_training_mode():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).to(DTYPE).train()
    with pytest.raises(UnsupportedOpError) as exc:
        run(model, nn.CrossEntropyLoss())
    # eval-mode batch norm is supported (tests/rules/test_norm.py); training mode couples the samples
    assert_phrases(message(exc), "BatchNorm1d", "'_1'", "training mode", "couples the samples", "model.eval()")


@pytest.mark.parametrize("kind", ["module", "functional"])
def test_dropout_in_training_mode(kind):
    if kind == "module":
        model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 3)).to(DTYPE).train()
        phrases = ("Dropout", "training mode", "eval()", "'_1'")
    else:
        model = WithLinear(lambda h: F.dropout(h, 0.5))
        phrases = ("dropout", "training=True", "training=False", "'dropout'")
    with pytest.raises(UnsupportedOpError) as exc:
        run(model, nn.CrossEntropyLoss())
    assert_phrases(message(exc), *phrases)


def test_dropout_in_eval_mode_is_fine():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 3)).to(DTYPE).eval()
    out = run(model, nn.CrossEntropyLoss())
    assert set(out["diag_ggn"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}


@pytest.mark.parametrize("body", [
    lambda h: h.view(-1),
    lambda h: h.reshape(-1, 2),
    lambda h: h.flatten(),
], ids=["view(-1)", "reshape(-1, 2)", "flatten()"])
def test_reshape_merging_the_batch_axis(body):
    with pytest.raises(UnsupportedOpError) as exc:
        run(WithLinear(body), lambda f, y: (f ** 2).sum(), x=torch.randn(4, 3, dtype=DTYPE),
            y=torch.zeros(4))
    assert_phrases(message(exc), "does not keep the batch axis", "(4, 3)", "x.flatten(1)")


# ---- tracing --------------------------------------------------------------------------------------

class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3).to(DTYPE)

    def forward(self, x):
        if x.sum() > 0:  # the line the error must name
            return self.lin(x)
        return -self.lin(x)


def test_data_dependent_control_flow_names_file_and_line():
    lines, start = inspect.getsourcelines(DataDependent.forward)
    line = start + next(i for i, text in enumerate(lines) if "if x.sum() > 0" in text)
    with pytest.raises(TraceError) as exc:
        fxcurv.compile(DataDependent(), nn.CrossEntropyLoss())
    assert_phrases(message(exc), f"{__file__}:{line}", "if x.sum() > 0", "control flow", "model")


def test_data_dependent_control_flow_in_the_loss():
    def loss(f, y):
        if f.sum() > 0:
            return (f ** 2).sum()
        return f.sum()

    with pytest.raises(TraceError) as exc:
        fxcurv.compile(mlp(), loss)
    assert_phrases(message(exc), __file__, "if f.sum() > 0", "cannot trace the loss")


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3).to(DTYPE)

    def forward(self, x, z):
        return self.lin(x) + z


def test_model_with_two_inputs():
    with pytest.raises(TraceError) as exc:
        fxcurv.compile(TwoInputs(), nn.CrossEntropyLoss())
    assert_phrases(message(exc), "2 inputs", "x, z", "one input")


# ---- losses ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss, node", [
    (lambda f, y: ((f.argmax(1) - y).to(f.dtype) ** 2).mean() + (f ** 2).mean(), "'argmax'"),
    (lambda f, y: (f.detach() * f).sum(), "'detach'"),
    (lambda f, y: (torch.round(f) * f).sum(), "'round"),
    (lambda f, y: (torch.floor(f) * f).sum(), "'floor'"),
    (lambda f, y: (f.long().to(f.dtype) * f).sum(), "'long'"),
], ids=["argmax", "detach", "round", "floor", "long"])
def test_loss_not_twice_differentiable(loss, node):
    with pytest.raises(LossError) as exc:
        run(mlp(), loss)
    assert_phrases(message(exc), f"loss node {node}", "not differentiable w.r.t. the model output",
                   "Supported")


@pytest.mark.parametrize("loss", [
    lambda f, y: F.cross_entropy(f / f.std(), y),
    lambda f, y: F.cross_entropy(f / f.std(0), y),
    lambda f, y: ((f - f.mean(0)) ** 2).sum(),
], ids=["f / f.std()", "f / f.std(0)", "centered over the batch"])
def test_loss_that_couples_samples(loss):
    with pytest.raises(LossError) as exc:
        run(mlp(), loss)
    assert_phrases(message(exc), "couples samples", "block diagonal", "per-sample")


def test_loss_returning_a_vector():
    with pytest.raises(LossError) as exc:
        run(mlp(), lambda f, y: (f ** 2).sum(1))
    assert_phrases(message(exc), "scalar", "(2,)")


@pytest.mark.parametrize("loss_fn", [nn.CrossEntropyLoss(reduction="none"), nn.MSELoss(reduction="none")],
                         ids=["ce", "mse"])
def test_loss_without_reduction(loss_fn):
    y = Y if isinstance(loss_fn, nn.CrossEntropyLoss) else torch.zeros(2, 3, dtype=DTYPE)
    with pytest.raises(UnsupportedOpError) as exc:
        run(mlp(), loss_fn, y=y)
    assert_phrases(message(exc), "reduction='none'", "'mean', 'sum'")


def test_mc_with_a_general_loss():
    with pytest.raises(UnsupportedOpError) as exc:
        run(mlp(), lambda f, y: F.cross_entropy(f, y) + (f ** 2).mean(), quantities=("diag_ggn_mc",))
    assert_phrases(message(exc), "diag_ggn_mc", "nn.CrossEntropyLoss", "nn.MSELoss")


# ---- targets --------------------------------------------------------------------------------------

@pytest.mark.parametrize("y, phrases", [
    # class indices as floats, shape [N]
    (torch.tensor([0.0, 2.0], dtype=DTYPE), ("class", "(2,)")),
    # long of shape [N, 1]
    (torch.tensor([[0], [2]]), ("class", "(2, 1)")),
    # class probabilities of the wrong width
    (torch.full((2, 4), 0.25, dtype=DTYPE), ("class", "(2, 4)")),
    # class probabilities of the wrong dtype
    (torch.full((2, 3), 1 / 3, dtype=torch.float32), ("float32", "float64")),
], ids=["float[N]", "long[N,1]", "float[N,C+1]", "float32[N,C]"])
def test_cross_entropy_bad_target(y, phrases):
    """The error names the target and says which targets cross-entropy takes (fxcurv's own check
    in rules/losses.py, not torch's error from deep inside the loss)."""
    with pytest.raises(InputError) as exc:
        run(mlp(), nn.CrossEntropyLoss(), y=y)
    assert_phrases(message(exc), "target y", *phrases)


@pytest.mark.parametrize("shape", [(2, 1), (2, 1, 3), (1, 3)])
def test_mse_broadcastable_target(shape):
    with pytest.raises(InputError) as exc:
        run(mlp(), nn.MSELoss(), y=torch.randn(shape, dtype=DTYPE))
    assert_phrases(message(exc), "target y", str(tuple(shape)))


def test_mse_target_dtype():
    with pytest.raises(InputError) as exc:
        run(mlp(), nn.MSELoss(), y=torch.randn(2, 3, dtype=torch.float32))
    assert_phrases(message(exc), "target y", "float32", "float64")


def test_batch_size_mismatch():
    with pytest.raises(InputError) as exc:
        run(mlp(), nn.CrossEntropyLoss(), y=torch.tensor([0, 1, 2]))
    assert_phrases(message(exc), "target y", "(3,)", "2 samples")


# ---- inputs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("x_dtype, p_dtype", [(torch.float32, torch.float64), (torch.float64, torch.float32)])
def test_input_dtype_differs_from_parameters(x_dtype, p_dtype):
    with pytest.raises(InputError) as exc:
        run(mlp().to(p_dtype), nn.CrossEntropyLoss(), x=X.to(x_dtype))
    assert_phrases(message(exc), "input x", str(x_dtype), str(p_dtype))


def test_wrong_feature_size_names_the_node():
    with pytest.raises(InputError) as exc:
        run(mlp(), nn.CrossEntropyLoss(), x=torch.randn(2, 5, dtype=DTYPE))
    assert_phrases(message(exc), "'_0'", "nn.Linear", "(2, 5)")


def test_input_not_a_tensor():
    with pytest.raises(InputError) as exc:
        run(mlp(), nn.CrossEntropyLoss(), x=[[1.0, 2.0, 3.0]] * 2)
    assert_phrases(message(exc), "input x", "tensor", "list")


def test_input_without_batch_axis():
    with pytest.raises(InputError) as exc:
        run(mlp(), nn.CrossEntropyLoss(), x=torch.tensor(1.0, dtype=DTYPE))
    assert_phrases(message(exc), "input x", "batch")


# ---- arguments of compile ---------------------------------------------------------------------------

def test_unknown_quantity_lists_the_known_ones():
    with pytest.raises(ValueError) as exc:
        fxcurv.compile(mlp(), nn.CrossEntropyLoss(), quantities=("diag_gnn",))
    assert_phrases(message(exc), "'diag_gnn'", *fxcurv.QUANTITIES)


@pytest.mark.parametrize("mc_samples", [0, -1, 2.5])
def test_bad_mc_samples(mc_samples):
    with pytest.raises(ValueError) as exc:
        fxcurv.compile(mlp(), nn.CrossEntropyLoss(), quantities=("diag_ggn_mc",), mc_samples=mc_samples)
    assert_phrases(message(exc), "mc_samples", repr(mc_samples))


class _HardGate(nn.Module):
    """``x * hardsigmoid(x)`` in a forward torch.fx cannot trace (a check on the input's rank): kept
    whole, a generic node; torch has no second derivative for hardsigmoid."""

    def forward(self, x):
        if x.dim() != 2:
            raise ValueError("expects [N, features]")
        return x * F.hardsigmoid(x)


def test_op_without_derivative_names_node_and_line():
    with pytest.raises(UnsupportedOpError) as exc:
        run(WithLinear(lambda h: torch.igamma(h.abs() + 1, torch.ones_like(h))), nn.CrossEntropyLoss())
    assert_phrases(message(exc), "'igamma'", "torch.igamma", "has no derivative in torch", f"{__file__}:")


def test_op_without_second_derivative_serves_the_ggn_and_names_itself_for_the_hessian():
    model = nn.Sequential(nn.Linear(3, 4), _HardGate(), nn.Linear(4, 3)).to(DTYPE)
    out = run(model, nn.CrossEntropyLoss(), quantities=("diag_ggn",))
    import reference

    want = reference.diag_ggn(model, nn.CrossEntropyLoss(), X, Y)
    for name, value in want.items():
        assert torch.allclose(out["diag_ggn"][name], value, rtol=1e-10, atol=1e-12)
    with pytest.raises(UnsupportedOpError) as exc:
        run(model, nn.CrossEntropyLoss(), quantities=("diag_hessian",))
    assert_phrases(message(exc), "_HardGate", "no second derivative", "diag_hessian")
