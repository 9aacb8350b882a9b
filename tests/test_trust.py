"""The engine answers for the model as it is now, or says why it cannot (the issue "Trust").

Each case compares with the independent torch.func references of :mod:`reference` (float64) after
the model or loss changed between calls: replaced parameters and modules, changed hyperparameters,
train()/eval(), and the structural cases (result order, parameters used as data, copies, memory).
"""

from __future__ import annotations

import copy
import pickle

import pytest
import reference
import torch
import torch.nn.functional as F
from helpers import assert_close
from torch import nn

import fxcurv
from fxcurv.errors import MemoryBudgetError, UnsupportedOpError

DT = torch.float64
QUANTITIES = ("diag_ggn", "diag_hessian")


def mlp(slope: float = 0.1) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.LeakyReLU(slope), nn.Linear(6, 3)).to(DT)


def data(n: int = 5, d: int = 4, classes: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=DT), torch.randint(0, classes, (n,), generator=g)


def check(engine, model, loss_fn, x, y):
    """The engine's grad, diag_ggn and diag_hessian equal torch.func's for the model as it is."""
    out = engine(x, y)
    torch.testing.assert_close(out.loss, loss_fn(model(x), y), rtol=1e-12, atol=1e-12)
    assert_close(out.grad, reference.grad(model, loss_fn, x, y), what="grad")
    assert_close(out["diag_ggn"], reference.diag_ggn(model, loss_fn, x, y), what="diag_ggn")
    assert_close(out["diag_hessian"], reference.diag_hessian(model, loss_fn, x, y), what="diag_hessian")
    return out


# ---- replaced parameters -------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["attribute", "load_state_dict_assign", "module", "module_new_shape"])
def test_replaced_parameters_are_read(how):
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    x, y = data()
    engine = fxcurv.compile(model, loss_fn, quantities=QUANTITIES)
    check(engine, model, loss_fn, x, y)
    torch.manual_seed(5)
    if how == "attribute":
        model[2].weight = nn.Parameter(torch.randn(3, 6, dtype=DT))
    elif how == "load_state_dict_assign":
        new = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
        model.load_state_dict(new, assign=True)
    elif how == "module":
        model[2] = nn.Linear(6, 3).to(DT)
    else:
        model[2] = nn.Linear(6, 5).to(DT)
        y = y % 5
    check(engine, model, loss_fn, x, y)


def test_parameter_replaced_before_the_first_call():
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    engine = fxcurv.compile(model, loss_fn, quantities=QUANTITIES)
    model[0].weight = nn.Parameter(torch.randn(6, 4, dtype=DT))
    check(engine, model, loss_fn, *data())


def test_in_place_updates_keep_the_program():
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    x, y = data()
    engine = fxcurv.compile(model, loss_fn, quantities=QUANTITIES)
    first = engine.program(x, y)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss_fn(model(x), y).backward()
    opt.step()
    model.load_state_dict({k: v + 0.1 for k, v in model.state_dict().items()})
    with torch.no_grad():
        model[0].bias.data = torch.randn(6, dtype=DT)
    check(engine, model, loss_fn, x, y)
    assert engine.program(x, y) is first


def test_untying_weights_retraces():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)
            self.c = self.a

        def forward(self, x):
            return self.b(torch.tanh(self.c(torch.tanh(self.a(x)))))

    torch.manual_seed(0)
    model, loss_fn = Tied().to(DT), nn.CrossEntropyLoss()
    x, y = data()
    engine = fxcurv.compile(model, loss_fn, quantities=QUANTITIES)
    check(engine, model, loss_fn, x, y)
    model.c = nn.Linear(4, 4).to(DT)  # now two weights
    out = check(engine, model, loss_fn, x, y)
    assert "c.weight" in out.grad


# ---- mutated model and loss ----------------------------------------------------------------------

def test_swapped_activation():
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    x, y = data()
    engine = fxcurv.compile(model, loss_fn, quantities=QUANTITIES)
    check(engine, model, loss_fn, x, y)
    model[1] = nn.Tanh()
    check(engine, model, loss_fn, x, y)


def test_changed_slope():
    model, loss_fn = mlp(0.1), nn.CrossEntropyLoss()
    x, y = data()
    engine = fxcurv.compile(model, loss_fn, quantities=QUANTITIES)
    check(engine, model, loss_fn, x, y)
    model[1].negative_slope = 0.7
    check(engine, model, loss_fn, x, y)


def test_appended_layer():
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    x, y = data()
    engine = fxcurv.compile(model, loss_fn, quantities=QUANTITIES)
    check(engine, model, loss_fn, x, y)
    model.append(nn.Sigmoid())
    model.append(nn.Linear(3, 3).to(DT))
    check(engine, model, loss_fn, x, y)


def test_changed_loss_configuration():
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    x, y = data()
    engine = fxcurv.compile(model, loss_fn, quantities=QUANTITIES)
    check(engine, model, loss_fn, x, y)
    loss_fn.label_smoothing = 0.2
    check(engine, model, loss_fn, x, y)
    loss_fn.reduction = "sum"
    check(engine, model, loss_fn, x, y)


def test_changed_closure_of_a_functional_loss():
    model = mlp()
    x, y = data()
    scale = [1.0]

    def loss(f, t, smoothing=0.0):
        return F.cross_entropy(f, t, label_smoothing=smoothing)

    engine = fxcurv.compile(model, loss, quantities=QUANTITIES)
    check(engine, model, loss, x, y)
    loss.__defaults__ = (0.3,)
    check(engine, model, loss, x, y)
    assert scale == [1.0]


# ---- train() / eval() ----------------------------------------------------------------------------

class FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(F.dropout(torch.tanh(self.a(x)), 0.5, self.training))


@pytest.mark.parametrize("make", [lambda: nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3)),
                                  FunctionalDropout], ids=["module", "functional"])
def test_train_mode_is_not_the_compiled_eval_mode(make):
    torch.manual_seed(0)
    model, loss_fn = make().to(DT).eval(), nn.CrossEntropyLoss()
    x, y = data()
    engine = fxcurv.compile(model, loss_fn, quantities=QUANTITIES)
    check(engine, model, loss_fn, x, y)
    model.train()
    with pytest.raises(UnsupportedOpError, match="dropout|Dropout"):
        engine(x, y)
    model.eval()
    check(engine, model, loss_fn, x, y)


# ---- result order ----------------------------------------------------------------------------------

def test_results_follow_named_parameters_order():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.late = nn.Linear(6, 3)  # defined first, used last
            self.early = nn.Linear(4, 6)
            self.spare = nn.Linear(2, 2)  # never used

        def forward(self, x):
            return self.late(torch.tanh(self.early(x)))

    torch.manual_seed(0)
    model, loss_fn = Odd().to(DT), nn.CrossEntropyLoss()
    x, y = data()
    out = fxcurv.compile(model, loss_fn, quantities=("diag_ggn", "hesscale"))(x, y)
    names = [n for n, _ in model.named_parameters()]
    for q in out:
        assert list(out[q]) == names, q
    flat = torch.cat([g.reshape(-1) for g in out.grad.values()])
    loss_fn(model(x), y).backward()
    grads = torch.nn.utils.parameters_to_vector([p.grad if p.grad is not None else torch.zeros_like(p)
                                                 for p in model.parameters()])
    torch.testing.assert_close(flat, grads)


# ---- parameters used as data -------------------------------------------------------------------------

class AddsParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.p = nn.Parameter(torch.randn(5, 3))

    def forward(self, x):
        return self.lin(x) + self.p


class TransformsParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        return F.linear(x, torch.tanh(self.p))


@pytest.mark.parametrize("model", [AddsParameter, TransformsParameter])
def test_parameter_used_as_data_is_a_clear_error(model):
    x, y = data()
    with pytest.raises(UnsupportedOpError) as err:
        fxcurv.compile(model().to(DT), nn.CrossEntropyLoss(), quantities=QUANTITIES)(x, y)
    assert "parameter p is used as data" in str(err.value) and "requires_grad_(False)" in str(err.value)


def test_frozen_parameter_used_as_data_is_a_constant():
    torch.manual_seed(0)
    model = AddsParameter().to(DT)
    model.p.requires_grad_(False)
    loss_fn = nn.CrossEntropyLoss()
    out = check(fxcurv.compile(model, loss_fn, quantities=QUANTITIES), model, loss_fn, *data())
    assert "p" not in out.grad


# ---- crashes that became correct -------------------------------------------------------------------

def test_one_class_with_a_weight_used_twice():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.o = nn.Linear(3, 3), nn.Linear(3, 1)

        def forward(self, h):
            return self.o(torch.tanh(self.a(torch.tanh(self.a(h)))))

    torch.manual_seed(0)
    model, loss_fn = Tied().to(DT), nn.CrossEntropyLoss()
    x, y = torch.randn(4, 3, dtype=DT), torch.zeros(4, dtype=torch.long)
    out = check(fxcurv.compile(model, loss_fn, quantities=QUANTITIES), model, loss_fn, x, y)
    assert all(v.abs().max() == 0 for v in out["diag_ggn"].values())


def test_pool_size_computed_from_a_shape():
    class GlobalPool(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.lin = nn.Conv2d(1, 2, 3), nn.Linear(2, 3)

        def forward(self, h):
            h = torch.sigmoid(self.c(h))
            return self.lin(F.avg_pool2d(h, h.shape[2:]).flatten(1))

    torch.manual_seed(0)
    model, loss_fn = GlobalPool().to(DT), nn.CrossEntropyLoss()
    x, y = torch.randn(4, 1, 5, 5, dtype=DT), torch.tensor([0, 1, 2, 0])
    check(fxcurv.compile(model, loss_fn, quantities=QUANTITIES), model, loss_fn, x, y)


@pytest.mark.parametrize("called_first", [False, True])
def test_pickle_and_deepcopy(called_first):
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    x, y = data()
    engine = fxcurv.compile(model, loss_fn, quantities=QUANTITIES, backend="fused")
    if called_first:
        engine(x, y)
    for clone in (pickle.loads(pickle.dumps(engine)), copy.deepcopy(engine)):
        assert clone.model is not model and clone.quantity_names == engine.quantity_names
        check(clone, clone.model, clone.loss_fn, x, y)


# ---- compile-time errors and memory ------------------------------------------------------------------

def test_every_unsupported_node_is_listed_at_compile_time():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            h = self.lin(x)
            return h * F.mse_loss(h, torch.zeros_like(h)) + F.cross_entropy(h, h.softmax(1))

    # Every call has a hand-written or the generic rule; a loss inside the model is the one thing that
    # is refused before shapes are known.
    with pytest.raises(UnsupportedOpError) as err:
        fxcurv.compile(Two(), nn.CrossEntropyLoss())
    msg = str(err.value)
    assert msg.startswith("2 node(s)") and "'mse_loss'" in msg and "'cross_entropy'" in msg


def test_memory_estimate_and_budget():
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    x, y = data(n=64)
    engine = fxcurv.compile(model, loss_fn, quantities=QUANTITIES)
    estimate = engine.memory_estimate(x, y)
    # At least the bundle [g; S] at the first hidden layer lives at the peak: (1 + C - 1) x N x 6.
    assert estimate.peak_bytes >= 3 * 64 * 6 * 8 and estimate.at
    assert estimate.input_bytes >= x.numel() * 8 + sum(p.numel() for p in model.parameters()) * 8
    tight = fxcurv.compile(model, loss_fn, quantities=QUANTITIES, memory_budget=estimate.peak_bytes - 1)
    with pytest.raises(MemoryBudgetError) as err:
        tight(x, y)
    assert estimate.at in str(err.value) and "memory_budget" in str(err.value)
    fxcurv.compile(model, loss_fn, quantities=QUANTITIES, memory_budget=estimate.peak_bytes)(x, y)


def test_memory_estimate_bounds_the_measured_growth():
    """A program's values at their peak are what the estimate says: a large bundle dominates."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(50, 400), nn.Tanh(), nn.Linear(400, 100)).float()
    x, y = torch.randn(256, 50), torch.randint(0, 100, (256,))
    engine = fxcurv.compile(model, nn.CrossEntropyLoss(), quantities=("diag_ggn",), backend="eager")
    estimate = engine.memory_estimate(x, y)
    bundle = 100 * 256 * 400 * 4  # [1 + 99 columns, N, 400] at the hidden layer
    assert bundle <= estimate.peak_bytes <= 4 * bundle
