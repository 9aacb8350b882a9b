"""Results written where optimizers and BackPACK code look (float64).

* ``Result.write_grad``: SGD with momentum steps to the same parameters as after ``loss.backward()``;
  gradients accumulate in place like autograd's across calls; the result's tensors stay its own; a
  result of another model is refused before anything is written.
* ``fxcurv.backpack``: every attribute name is the ``savefield`` of the installed BackPACK's extension;
  a BackPACK-style training loop that reads ``p.grad``, ``p.diag_ggn_exact``, ``p.grad_batch``,
  ``p.batch_l2``, ``p.sum_grad_squared``, ``p.variance``, ``p.kflr`` and ``p.diag_h`` runs unchanged
  with ``fxcurv.backpack.write`` in place of ``with backpack(...): loss.backward()`` and sees BackPACK's
  numbers at every step (relative error < 1e-10), on the same trajectory.
"""

from __future__ import annotations

import copy
import warnings

import backpack_reference as bp
import pytest
import torch
from helpers import rel_error
from torch import nn

import fxcurv
import fxcurv.backpack
from fxcurv.errors import InputError

DT = torch.float64
RTOL = 1e-10
DAMPING = 0.1
LR = 0.05
STEPS = 3
# the quantities of the loop, and what it reads
LOOP_QUANTITIES = ("diag_ggn", "batch_grad", "batch_l2_grad", "sum_grad_squared", "variance", "kflr",
                   "diag_hessian")
LOOP_ATTRIBUTES = ("grad", "diag_ggn_exact", "grad_batch", "batch_l2", "sum_grad_squared", "variance", "kflr",
                   "diag_h")


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)


def batches(n: int = 6, count: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(n, 5, dtype=DT, generator=g), torch.randint(0, 3, (n,), generator=g)) for _ in range(count)]


def params_close(a: nn.Module, b: nn.Module, rtol: float) -> None:
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        err = rel_error(p.detach(), q.detach())
        assert err < rtol, f"{name}: relative error {err:.2e}"


# ---- p.grad ------------------------------------------------------------------------------------

def test_write_grad_sgd_steps_as_after_backward():
    """SGD with momentum and weight decay over three batches: the same parameters from
    ``write_grad`` as from ``loss.backward()`` (zero_grad sets p.grad to None: the fresh-tensor path)."""
    loss_fn = nn.CrossEntropyLoss()
    auto, mine = mlp(), mlp()
    engine = fxcurv.compile(mine, loss_fn)
    opt_auto = torch.optim.SGD(auto.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    opt_mine = torch.optim.SGD(mine.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    for x, y in batches():
        opt_auto.zero_grad()
        loss_fn(auto(x), y).backward()
        opt_auto.step()
        opt_mine.zero_grad()
        engine(x, y).write_grad(mine)
        opt_mine.step()
    params_close(mine, auto, 1e-12)
    assert rel_error(mlp()[0].weight, mine[0].weight) > 1e-3  # the steps moved the parameters


def test_write_grad_accumulates_like_autograd():
    """Without zero_grad, two calls sum into the same ``p.grad`` tensor, as two ``backward()`` calls do;
    the result's gradient is not aliased by ``p.grad``."""
    loss_fn = nn.CrossEntropyLoss()
    auto, mine = mlp(), mlp()
    engine = fxcurv.compile(mine, loss_fn)
    (x1, y1), (x2, y2) = batches(count=2)
    loss_fn(auto(x1), y1).backward()
    loss_fn(auto(x2), y2).backward()
    first = engine(x1, y1)
    first.write_grad(mine)
    kept = {name: g.clone() for name, g in first.grad.items()}
    grads = {name: p.grad for name, p in mine.named_parameters()}
    engine(x2, y2).write_grad(mine)
    for name, p in mine.named_parameters():
        assert p.grad is grads[name], f"{name}: p.grad was replaced, not accumulated in place"
        assert torch.equal(first.grad[name], kept[name]), f"{name}: writing changed the result's gradient"
    want = dict(auto.named_parameters())
    for name, p in mine.named_parameters():
        assert rel_error(p.grad, want[name].grad) < 1e-12, name


def test_write_refuses_results_of_another_model():
    loss_fn = nn.CrossEntropyLoss()
    x, y = batches(count=1)[0]
    out = fxcurv.compile(mlp(), loss_fn)(x, y)
    other = nn.Sequential(nn.Linear(5, 3)).to(DT)
    with pytest.raises(InputError, match="does not have"):
        out.write_grad(other)
    with pytest.raises(InputError, match="does not have"):
        fxcurv.backpack.write(other, out)
    # same names, other shapes
    wider = nn.Sequential(nn.Linear(5, 6), nn.Sigmoid(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    with pytest.raises(InputError, match="shapes"):
        out.write_grad(wider)
    assert all(p.grad is None for p in wider.parameters())
    # a parameter frozen when the result was computed, trainable now
    model = mlp()
    model[0].bias.requires_grad_(False)
    frozen = fxcurv.compile(model, loss_fn)(x, y)
    model[0].bias.requires_grad_(True)
    with pytest.raises(InputError, match="0.bias"):
        frozen.write_grad(model)
    assert all(p.grad is None for p in model.parameters())  # nothing written before the refusal


# ---- BackPACK's attributes ---------------------------------------------------------------------

def backpack_extension(name: str):
    """The installed BackPACK's extension class ``name``, built with default options (HBP with the
    options fxcurv's hbp quantities follow)."""
    import backpack.extensions as ext

    if name == "HBP":
        return bp.make_extension("hbp")
    return getattr(ext, name)()


@pytest.mark.skipif(not bp.available(), reason=bp.SKIP_REASON)
@pytest.mark.parametrize("quantity", sorted(fxcurv.backpack.FIELDS))
def test_attribute_is_backpacks_savefield(quantity):
    field = fxcurv.backpack.FIELDS[quantity]
    assert field.quantity == quantity and quantity in fxcurv.QUANTITIES
    assert backpack_extension(field.extension).savefield == field.attribute


def test_write_sets_every_per_parameter_quantity():
    """Types and shapes as BackPACK stores them; quantities BackPACK lacks under fxcurv's name; the
    whole-network ``ggn_eigen`` on no parameter; two HBP variants refused (one attribute)."""
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    x, y = batches(count=1)[0]
    n = x.shape[0]
    q = ("batch_diag_ggn", "sqrt_ggn", "kfra", "hbp_hessian", "hesscale", "block_ggn", "ggn_eigen")
    out = fxcurv.compile(model, loss_fn, quantities=q)(x, y)
    fxcurv.backpack.write(model, out, grad=False)
    for name, p in model.named_parameters():
        assert p.grad is None
        assert torch.equal(p.diag_ggn_exact_batch, out["batch_diag_ggn"][name])
        assert p.diag_ggn_exact_batch.shape == (n, *p.shape)
        assert p.sqrt_ggn_exact.shape == (2, n, *p.shape)  # C - 1 = 2 columns per sample
        for attr, quantity in (("kfra", "kfra"), ("hbp", "hbp_hessian")):
            stored = getattr(p, attr)
            assert isinstance(stored, list) and len(stored) == (2 if p.dim() == 2 else 1)
            assert all(a is b for a, b in zip(stored, out[quantity][name].factors))
        assert torch.equal(p.hesscale, out["hesscale"][name])
        assert p.block_ggn is out["block_ggn"][name]
        assert not hasattr(p, "ggn_eigen")
    two = fxcurv.compile(model, loss_fn, quantities=("hbp_hessian", "hbp_pch_abs"))(x, y)
    with pytest.raises(InputError, match="'hbp'"):
        fxcurv.backpack.write(model, two)


def test_write_a_result_without_the_gradient():
    """A curvature-only result (compile(..., grad=False)) writes its quantities with grad=False; asked to
    write the gradient it has not, it refuses before writing anything."""
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    x, y = batches(count=1)[0]
    out = fxcurv.compile(model, loss_fn, quantities=("diag_ggn",), grad=False)(x, y)
    with pytest.raises(InputError, match="grad=False"):
        fxcurv.backpack.write(model, out)
    assert not any(hasattr(p, "diag_ggn_exact") for p in model.parameters())
    fxcurv.backpack.write(model, out, grad=False)
    for name, p in model.named_parameters():
        assert p.grad is None and torch.equal(p.diag_ggn_exact, out["diag_ggn"][name])
    other = nn.Sequential(nn.Linear(5, 3)).to(DT)
    with pytest.raises(InputError, match="another model"):
        fxcurv.backpack.write(other, out, grad=False)


def preconditioned_training(model: nn.Module, backward, data) -> list[dict[str, dict[str, object]]]:
    """A BackPACK-style loop: ``backward(model, x, y)`` leaves BackPACK's attributes on the parameters,
    the loop reads them (a damped diagonal-GGN step, the others recorded) and steps with SGD."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    seen = []
    for x, y in data:
        opt.zero_grad()
        backward(model, x, y)
        record = {}
        for name, p in model.named_parameters():
            record[name] = {attr: _copy(getattr(p, attr)) for attr in LOOP_ATTRIBUTES}
            p.grad /= p.diag_ggn_exact + DAMPING  # as BackPACK's examples precondition
        seen.append(record)
        opt.step()
    return seen


def _copy(value):
    return [t.detach().clone() for t in value] if isinstance(value, list) else value.detach().clone()


@pytest.mark.skipif(not bp.available(), reason=bp.SKIP_REASON)
def test_backpack_loop_runs_unchanged_with_fxcurv():
    from backpack import backpack, extend
    from backpack.extensions import (
        KFLR,
        BatchGrad,
        BatchL2Grad,
        DiagGGNExact,
        DiagHessian,
        SumGradSquared,
        Variance,
    )

    data = batches()
    loss_fn = nn.CrossEntropyLoss()

    theirs = extend(mlp())
    their_loss = extend(copy.deepcopy(loss_fn))

    def backpack_backward(model, x, y):
        loss = their_loss(model(x), y)
        with backpack(DiagGGNExact(), BatchGrad(), BatchL2Grad(), SumGradSquared(), Variance(), KFLR(),
                      DiagHessian()):
            loss.backward()

    mine = mlp()
    engine = fxcurv.compile(mine, loss_fn, quantities=LOOP_QUANTITIES)

    def fxcurv_backward(model, x, y):
        fxcurv.backpack.write(model, engine(x, y))

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        want = preconditioned_training(theirs, backpack_backward, data)
    got = preconditioned_training(mine, fxcurv_backward, data)
    for step, (g, w) in enumerate(zip(got, want)):
        for name in w:
            for attr in LOOP_ATTRIBUTES:
                a, b = g[name][attr], w[name][attr]
                pairs = list(zip(a, b)) if isinstance(b, list) else [(a, b)]
                assert not isinstance(b, list) or len(a) == len(b), f"step {step} {name}.{attr}: factors"
                for i, (u, v) in enumerate(pairs):
                    assert u.shape == v.shape, f"step {step} {name}.{attr}[{i}]: {tuple(u.shape)} != {tuple(v.shape)}"
                    err = rel_error(u, v)
                    assert err < RTOL, f"step {step} {name}.{attr}[{i}]: relative error {err:.2e}"
    params_close(mine, theirs, RTOL)


# ---- the drop-in front: extend(...) and with backpack(...) ---------------------------------------------

_DROP_IN = ("BatchGrad", "BatchL2Grad", "SumGradSquared", "Variance", "DiagGGNExact", "DiagHessian", "KFLR",
            "BatchDiagGGNExact")


def _backpack_step(backpack_fn, extend_fn, extensions, model, x, y):
    """A BackPACK training step as its users write it, with the given ``backpack``/``extend``."""
    model, lossfunc = extend_fn(model), extend_fn(nn.CrossEntropyLoss())
    loss = lossfunc(model(x), y)
    with backpack_fn(*extensions):
        loss.backward()
    return loss


def test_drop_in_front_gives_backpacks_attributes():
    """The same step with ``from fxcurv.backpack import backpack, extend, ...`` in place of BackPACK's
    imports: p.grad from autograd, every extension's attribute equal to BackPACK's (1e-10)."""
    pytest.importorskip("backpack")
    import backpack as bp_lib
    import backpack.extensions as bp_ext

    torch.manual_seed(0)
    ours, theirs = mlp(), mlp()
    theirs.load_state_dict(ours.state_dict())
    x, y = batches(7, 1)[0]
    _backpack_step(fxcurv.backpack.backpack, fxcurv.backpack.extend,
                   [getattr(fxcurv.backpack, name)() for name in _DROP_IN], ours, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _backpack_step(bp_lib.backpack, bp_lib.extend, [getattr(bp_ext, name)() for name in _DROP_IN], theirs, x, y)
    attributes = ["grad"] + [fxcurv.backpack.FIELDS[getattr(fxcurv.backpack, name).quantity].attribute
                             for name in _DROP_IN]
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        for attr in attributes:
            got, want = getattr(p, attr), getattr(q, attr)
            pairs = zip(got, want) if isinstance(want, list) else [(got, want)]
            for g, w in pairs:
                assert rel_error(g, w) < RTOL, f"{name}.{attr}"


def test_drop_in_front_needs_an_extended_model_and_loss():
    """Without a recorded ``lossfunc(model(x), y)`` of extended modules the block's end says what to do;
    an object that is not an extension is refused."""
    model = mlp()
    fxcurv.backpack._calls.clear()
    loss = nn.CrossEntropyLoss()(model(torch.randn(3, 5, dtype=DT)), torch.tensor([0, 1, 2]))
    with pytest.raises(InputError, match="extend both"):
        with fxcurv.backpack.backpack(fxcurv.backpack.BatchGrad()):
            loss.backward()
    with pytest.raises(TypeError, match="extensions"):
        with fxcurv.backpack.backpack("BatchGrad"):
            pass
