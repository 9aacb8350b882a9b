"""What the four optimizers share (fxcurv.optim.base): steps reuse one compiled program, frozen parameters
stay put, closures are refused, torch's state_dict and LR schedulers work, an engine can be shared,
options are validated; and a few steps of each decrease a small deterministic regression loss."""

from __future__ import annotations

import copy

import pytest
import reference
import torch
from helpers import assert_close
from optim_problems import DT, PROBLEMS, params, step_delta
from torch import nn

import fxcurv
from fxcurv.optim import AdaHesScale, DampedNewton, DiagonalNewton, KroneckerNewton
from fxcurv.quantities import GGNEigen

pytestmark = pytest.mark.usefixtures("one_thread")

# One configuration of each optimizer that trains the regression problem below.
OPTIMIZERS = {
    "DampedNewton": lambda m, f: DampedNewton(m, f, lr=1.0, damping=0.1),
    "DampedNewton-bootstrap-layers": lambda m, f: DampedNewton(m, f, lr=1.0, damping="bootstrap",
                                                               curvature=GGNEigen(groups="layer"),
                                                               generator=torch.Generator().manual_seed(0)),
    "KroneckerNewton": lambda m, f: KroneckerNewton(m, f, lr=0.5, damping=0.01),
    "KroneckerNewton-quadratic": lambda m, f: KroneckerNewton(m, f, lr=1.0, damping=0.01, step_size="quadratic"),
    "AdaHesScale": lambda m, f: AdaHesScale(m, f, lr=0.05),
    "DiagonalNewton": lambda m, f: DiagonalNewton(m, f, lr=0.1, damping=0.01),
}


def regression() -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """A 4-8-2 tanh MLP fitting a fixed linear-plus-sine target from 32 samples (float64, seeded)."""
    torch.manual_seed(0)
    x = torch.randn(32, 4, dtype=DT)
    y = torch.stack([x[:, 0] - 0.5 * x[:, 1], torch.sin(x[:, 2]) + 0.3 * x[:, 3]], dim=1)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(DT)
    return model, nn.MSELoss(), x, y


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_training_decreases_the_loss_with_one_program(name):
    model, loss_fn, x, y = regression()
    opt = OPTIMIZERS[name](model, loss_fn)
    first = opt.step(x, y).loss.item()
    program = opt.engine.program(x, y)
    losses = [opt.step(x, y).loss.item() for _ in range(7)]
    assert losses[-1] < 0.5 * first, f"{name}: loss {first:.4f} -> {losses}"
    # The in-place updates changed no guard: every step ran the program built at the first.
    assert opt.engine.program(x, y) is program
    assert "programs=1" in repr(opt.engine)


def test_step_needs_the_batch():
    model, loss_fn, x, y = PROBLEMS["mlp-N4"]()
    opt = DiagonalNewton(model, loss_fn, lr=0.1)
    for call in (lambda: opt.step(), lambda: opt.step(lambda: loss_fn(model(x), y)), lambda: opt.step(x)):
        with pytest.raises(TypeError, match=r"step\(x, y\)"):
            call()


def test_frozen_parameters_are_left_alone():
    model, loss_fn, x, y = PROBLEMS["mlp-N4"]()
    model[0].bias.requires_grad_(False)
    opt = KroneckerNewton(model, loss_fn, lr=0.5)
    assert all(p is not model[0].bias for p in opt.param_groups[0]["params"])
    delta = step_delta(opt, x, y)
    assert not delta["0.bias"].any() and delta["0.weight"].any() and delta["2.bias"].any()
    model[2].bias.requires_grad_(False)  # frozen after construction: skipped from then on
    delta = step_delta(opt, x, y)
    assert not delta["2.bias"].any() and delta["2.weight"].any()


def test_state_dict_round_trip():
    """Two optimizers, one restored from the other's state_dict after two steps, take the same third step."""
    model, loss_fn, x, y = PROBLEMS["mlp-N4"]()
    opt = AdaHesScale(model, loss_fn, lr=0.1, betas=(0.5, 0.6))
    opt.step(x, y)
    opt.step(x, y)
    twin, _, _, _ = PROBLEMS["mlp-N4"]()
    twin.load_state_dict(model.state_dict())
    restored = AdaHesScale(twin, loss_fn, lr=0.1, betas=(0.5, 0.6))
    # A copy, as torch.save/torch.load make: load_state_dict keeps the given tensors where their dtype and
    # device fit, so without it both optimizers would share (and both advance) the moments.
    restored.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert restored.state[twin[0].weight]["step"] == 2
    opt.step(x, y)
    restored.step(x, y)
    assert_close(params(twin), params(model), rtol=1e-14)


def test_lr_scheduler_sets_the_step():
    model, loss_fn, x, y = PROBLEMS["mlp-N4"]()
    opt = DiagonalNewton(model, loss_fn, lr=0.4, damping=0.1)
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.25)
    step_delta(opt, x, y)
    schedule.step()
    g, d = reference.grad(model, loss_fn, x, y), reference.diag_ggn(model, loss_fn, x, y)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    assert_close(step_delta(opt, x, y), {n: -0.1 * g[n] / (d[n] + 0.1) for n in g}, rtol=1e-10)


def test_a_shared_engine():
    model, loss_fn, x, y = PROBLEMS["mlp-N4"]()
    engine = fxcurv.compile(model, loss_fn, quantities=("kflr", "diag_ggn"))
    opt = KroneckerNewton(model, loss_fn, lr=0.5, engine=engine)
    assert opt.engine is engine
    opt.step(x, y)
    assert DiagonalNewton(model, loss_fn, lr=0.1, engine=engine).engine is engine
    with pytest.raises(ValueError, match="does not compute 'hesscale'.*'kflr'"):
        AdaHesScale(model, loss_fn, lr=0.1, engine=engine)
    other, _, _, _ = PROBLEMS["mlp-N1"]()
    with pytest.raises(ValueError, match="another model"):
        KroneckerNewton(other, loss_fn, lr=0.5, engine=engine)
    with pytest.raises(ValueError, match="compile_options"):
        KroneckerNewton(model, loss_fn, lr=0.5, engine=engine, compile_options={"seed": 0})


@pytest.mark.parametrize("make, match", [
    (lambda m, f: DiagonalNewton(m, f, lr=0.1, curvature="kflr"), "one of 'diag_ggn', 'diag_ggn_mc'"),
    (lambda m, f: DiagonalNewton(m, f, lr=0.1, damping=0.0), "damping must be a finite number > 0"),
    (lambda m, f: DiagonalNewton(m, f, lr=-1.0), "lr must be a finite number >= 0"),
    (lambda m, f: AdaHesScale(m, f, lr=0.1, betas=(0.9, 1.0)), r"betas must be in \[0, 1\)"),
    (lambda m, f: KroneckerNewton(m, f, lr=1.0, curvature="diag_ggn"), "one of 'kflr', 'kfra', 'kfac'"),
    (lambda m, f: KroneckerNewton(m, f, lr=1.0, damping=0.0), "damping \\+ weight_decay must be > 0"),
    (lambda m, f: KroneckerNewton(m, f, lr=1.0, step_size="line"), "one of 'fixed', 'quadratic'"),
    (lambda m, f: DampedNewton(m, f, lr=1.0, curvature="kflr"), "one of 'ggn_eigen', 'ggn_eigen_mc'"),
    (lambda m, f: DampedNewton(m, f, lr=1.0, damping="auto"), "a number or 'bootstrap'"),
    (lambda m, f: DampedNewton(m, f, lr=1.0, damping="bootstrap", restrict=False), "needs restrict=True"),
    (lambda m, f: DampedNewton(m, f, lr=1.0, damping=0.0, restrict=False), "damping must be a finite number > 0"),
    (lambda m, f: DampedNewton(m, f, lr=1.0, curvature=GGNEigen(vectors=False)), "vectors=True"),
])
def test_options_are_validated(make, match):
    model, loss_fn, _, _ = PROBLEMS["mlp-N1"]()
    with pytest.raises(ValueError, match=match):
        make(model, loss_fn)


def test_no_trainable_parameters():
    model, loss_fn, _, _ = PROBLEMS["mlp-N1"]()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        DiagonalNewton(model, loss_fn, lr=0.1)


def test_param_groups_with_their_own_hyperparameters():
    """``params=`` as torch takes it: per-group lr and damping enter each group's formula; a parameter in
    no group is left alone."""
    model, loss_fn, x, y = PROBLEMS["mlp-N4"]()
    groups = [{"params": [model[0].weight], "lr": 0.2, "damping": 0.5}, {"params": [model[2].weight]}]
    opt = DiagonalNewton(model, loss_fn, lr=0.1, damping=0.05, params=groups)
    g, d = reference.grad(model, loss_fn, x, y), reference.diag_ggn(model, loss_fn, x, y)
    delta = step_delta(opt, x, y)
    want = {"0.weight": -0.2 * g["0.weight"] / (d["0.weight"] + 0.5),
            "2.weight": -0.1 * g["2.weight"] / (d["2.weight"] + 0.05),
            "0.bias": torch.zeros(4, dtype=DT), "2.bias": torch.zeros(3, dtype=DT)}
    assert_close(delta, want, rtol=1e-10)


def test_param_groups_are_validated():
    model, loss_fn, x, y = PROBLEMS["mlp-N4"]()
    with pytest.raises(ValueError, match="not parameters of the model"):
        DiagonalNewton(model, loss_fn, lr=0.1, params=[nn.Parameter(torch.zeros(2))])
    opt = DiagonalNewton(model, loss_fn, lr=0.1, params=[model[0].weight])
    with pytest.raises(ValueError, match="damping must be a finite number > 0"):
        opt.add_param_group({"params": [model[0].bias], "damping": 0.0})
    quadratic = KroneckerNewton(model, loss_fn, lr=1.0, step_size="quadratic",
                                params=[{"params": [model[0].weight], "weight_decay": 0.1},
                                        {"params": [model[2].weight]}])
    with pytest.raises(ValueError, match="one weight_decay for all parameters"):
        quadratic.step(x, y)
