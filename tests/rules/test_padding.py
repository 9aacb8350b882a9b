"""pad (constant padding): the rules against torch.func, and fxcurv.compile end to end (float64).

Padding is a transposed index selection ``z = Pi^T x + c``; its rules are checked against
``torch.func.vjp`` column by column and against ``(J o J)^T d`` from the explicit Jacobian.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import reference
import torch
import torch.nn.functional as F
from helpers import assert_close, call_rule, check_against_references, rel_error
from torch import nn
from torch.func import jacrev, vjp

import fxcurv
from fxcurv.rules import registry

DT = torch.float64
OP = "pad"

# (name, module, per-sample input shape)
PADS = [
    ("zero_0101", nn.ZeroPad2d((0, 1, 0, 1)), (2, 4, 3)),
    ("zero_1", nn.ZeroPad2d(1), (2, 3, 3)),
    ("const_2011", nn.ConstantPad2d((2, 0, 1, 1), 0.5), (2, 3, 4)),
    ("const1d_features", nn.ConstantPad1d((1, 2), -1.0), (5,)),
    ("zero_crop", nn.ZeroPad2d((-1, 1, 0, -1)), (2, 4, 4)),
]
IDS = [c[0] for c in PADS]



def _call_rule(table, key, *messages, **ctx):
    return call_rule(table, OP, key, *messages, **ctx)

def _context(mod, x):
    op, canon_fn = registry.MODULE_SOURCES[type(mod)]
    assert op.name == OP
    canon = canon_fn(SimpleNamespace(args=(x,)), mod)
    ctx = dict(canon.attrs, x=x)
    ctx["out"] = op.forward(x, **canon.attrs)
    assert torch.equal(ctx["out"], mod(x))
    return ctx


@pytest.mark.parametrize("cfg", PADS, ids=IDS)
def test_jac_t_matches_vjp_per_column(cfg):
    _, mod, shape = cfg
    torch.manual_seed(0)
    x = torch.randn((3,) + shape, dtype=DT)
    ctx = _context(mod, x)
    k = 3
    v = torch.randn((k,) + ctx["out"].shape, dtype=DT)
    _, pullback = vjp(mod, x)
    want = torch.stack([pullback(v[i])[0] for i in range(k)])
    got = _call_rule(registry.JAC_T, "x", v, **ctx)
    assert got.shape == want.shape and rel_error(got, want) < 1e-14
    assert rel_error(_call_rule(registry.JAC_T, "x", v[0], **ctx), want[0]) < 1e-14


@pytest.mark.parametrize("cfg", PADS, ids=IDS)
def test_diag_is_hesscale_eq8(cfg):
    _, mod, shape = cfg
    torch.manual_seed(0)
    x = torch.randn((2,) + shape, dtype=DT)
    ctx = _context(mod, x)
    d = torch.randn(ctx["out"].shape, dtype=DT)
    j = torch.stack([jacrev(lambda t: mod(t[None])[0])(x[n]).reshape(-1, x[n].numel()) for n in range(2)])
    want = torch.einsum("nji,nj->ni", j * j, d.flatten(1)).reshape(x.shape)
    assert rel_error(_call_rule(registry.DIAG, "x", d, **ctx), want) < 1e-14


# ---- end to end ---------------------------------------------------------------------------------

check_end_to_end = check_against_references


class PadNet(nn.Module):
    """conv -> act -> pad -> conv -> act -> F.pad -> linear: both pads receive and send messages."""

    def __init__(self, pad, act, hw):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.act = act()
        self.pad = pad
        self.c2 = nn.Conv2d(3, 2, 3, stride=2)
        with torch.no_grad():
            size = self.body(torch.zeros(1, 2, *hw)).numel()
        self.fc = nn.Linear(size, 3)

    def body(self, x):
        x = self.c2(self.pad(self.act(self.c1(x))))
        return F.pad(self.act(x), (1, 0, 0, 1), mode="constant", value=0.25)

    def forward(self, x):
        return self.fc(self.body(x).flatten(1))


CNN_PADS = [("zero_0101", nn.ZeroPad2d((0, 1, 0, 1))), ("const_1", nn.ConstantPad2d(1, 0.5)),
            ("zero_crop", nn.ZeroPad2d((-1, 0, 1, 1)))]
LOSSES = [(nn.CrossEntropyLoss(), nn.Tanh, 3), (nn.MSELoss(reduction="sum"), nn.Sigmoid, 1)]


@pytest.mark.parametrize("loss", LOSSES, ids=["ce_tanh_n3", "mse_sigmoid_n1"])
@pytest.mark.parametrize("pad", CNN_PADS, ids=[p[0] for p in CNN_PADS])
def test_compile_matches_torch_func(pad, loss):
    loss_fn, act, n = loss
    hw = (7, 5)
    torch.manual_seed(0)
    model = PadNet(pad[1], act, hw).to(DT)
    torch.manual_seed(1)
    x = torch.randn(n, 2, *hw, dtype=DT)
    y = torch.randint(0, 3, (n,)) if isinstance(loss_fn, nn.CrossEntropyLoss) else torch.randn(n, 3, dtype=DT)
    check_end_to_end(model, loss_fn, x, y)


def test_pad_of_features_in_an_mlp():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(4, 3), nn.Linear(6, 2)

        def forward(self, x):
            return self.l2(F.pad(torch.tanh(self.l1(x)), (2, 1)))

    torch.manual_seed(0)
    model = Net().to(DT)
    x, y = torch.randn(3, 4, dtype=DT), torch.tensor([0, 1, 1])
    check_end_to_end(model, nn.CrossEntropyLoss(), x, y)


@pytest.mark.parametrize("quantity", ["hesscale", "hesscale_gn"])
def test_hesscale_runs_and_is_exact_at_last_layer(quantity):
    torch.manual_seed(0)
    model = PadNet(nn.ZeroPad2d((0, 1, 0, 1)), nn.Tanh, (7, 5)).to(DT)
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(3, 2, 7, 5, dtype=DT), torch.tensor([1, 0, 2])
    out = fxcurv.compile(model, loss_fn, quantities=(quantity,))(x, y)
    exact = reference.diag_hessian(model, loss_fn, x, y)
    for name, value in out[quantity].items():
        assert value.shape == exact[name].shape and torch.isfinite(value).all()
    last = ("fc.weight", "fc.bias")
    assert_close({k: out[quantity][k] for k in last}, {k: exact[k] for k in last}, what=quantity)


# ---- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_non_constant_mode_is_rejected(mode):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 1)

        def forward(self, x):
            return F.pad(self.conv(x), (1, 1, 1, 1), mode=mode).flatten(1)

    with pytest.raises(fxcurv.UnsupportedOpError) as info:
        fxcurv.compile(Net().to(DT), nn.CrossEntropyLoss())(torch.randn(2, 1, 3, 3, dtype=DT),
                                                             torch.tensor([0, 1]))
    msg = str(info.value)
    assert msg.startswith("node 'pad") and "F.pad" in msg.split(":")[0]
    assert f"mode={mode!r}" in msg and "supported: mode='constant'" in msg


def test_padding_the_batch_axis_is_rejected():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            # Pads a zero sample, then crops it off: the batch keeps its size, the first pad is rejected.
            return F.pad(F.pad(self.lin(x), (0, 0, 1, 0)), (0, 0, -1, 0))

    with pytest.raises(fxcurv.UnsupportedOpError, match="batch axis"):
        fxcurv.compile(Net().to(DT), nn.CrossEntropyLoss())(torch.randn(2, 3, dtype=DT), torch.tensor([0, 1]))
