"""conv2d: the rules against torch.func, and fxcurv.compile end to end on small CNNs (float64).

The rule tests build each sample's Jacobian explicitly (``torch.func.jacrev``) and compare against
the defining equations: ``J^T v`` column by column, per-sample ``J_W^T v``, the exact
``sum_{k,n} sign (J_W^T S)^2`` and the HesScale diagonals ``(J o J)^T d`` (eq. 8-9).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import call_rule, check_against_references, check_hesscale_exact_at_last_layer, rel_error
from torch import nn
from torch.func import jacrev, vjp

from fxcurv.rules import registry

DT = torch.float64
OP = "conv2d"

# (name, nn.Conv2d kwargs, input channels, image size, batch)
CONVS = [
    ("s1_p0", dict(kernel_size=3), 2, (7, 5), 3),
    ("s2_p1", dict(kernel_size=3, stride=2, padding=1), 2, (7, 5), 3),
    ("dil2", dict(kernel_size=3, padding=1, dilation=2), 2, (7, 6), 1),
    ("groups2", dict(kernel_size=3, padding=1, groups=2), 4, (5, 5), 3),
    ("nobias", dict(kernel_size=3, bias=False), 2, (6, 5), 3),
    ("k3x2", dict(kernel_size=(3, 2), stride=(2, 1)), 2, (7, 5), 3),
    ("out1x1", dict(kernel_size=(5, 4)), 2, (5, 4), 3),
    ("large_out", dict(kernel_size=2, padding=1), 2, (6, 7), 1),
    ("same", dict(kernel_size=3, padding="same"), 2, (5, 6), 3),
]
IDS = [c[0] for c in CONVS]



def _call_rule(table, key, *messages, **ctx):
    return call_rule(table, OP, key, *messages, **ctx)

def _conv(cfg, cout=4, seed=0):
    _, kw, cin, _, _ = cfg
    torch.manual_seed(seed)
    return nn.Conv2d(cin, cout, **kw).to(DT)


def _input(cfg, seed=1):
    _, _, cin, hw, n = cfg
    torch.manual_seed(seed)
    return torch.randn(n, cin, *hw, dtype=DT)


def _context(mod, x):
    """The op's inputs and attributes, as the module's canonicalizer produces them."""
    op, canon_fn = registry.MODULE_SOURCES[type(mod)]
    assert op.name == OP
    canon = canon_fn(SimpleNamespace(args=(x,)), mod)
    ctx = dict(canon.attrs)
    ctx.update(x=x, weight=mod.weight.detach(),
               bias=None if mod.bias is None else mod.bias.detach())
    ctx["out"] = registry.OPS[OP].forward(x, ctx["weight"], ctx["bias"], **canon.attrs)
    return ctx


def _forward(ctx):
    attrs = {k: ctx[k] for k in ("stride", "padding", "dilation", "groups")}
    return lambda x, w, b: F.conv2d(x, w, b, **attrs)


def _jacobians(ctx):
    """Per-sample Jacobians ``[N, out, in]``, ``[N, out, W]``, ``[N, out, b]`` from jacrev."""
    f = _forward(ctx)
    x, w, b = ctx["x"], ctx["weight"], ctx["bias"]
    jx, jw, jb = [], [], []
    for n in range(x.shape[0]):
        xn = x[n:n + 1]
        m = ctx["out"][n].numel()
        jx.append(jacrev(lambda t: f(t, w, b))(xn).reshape(m, -1))
        jw.append(jacrev(lambda t, xn=xn: f(xn, t, b))(w).reshape(m, -1))
        if b is not None:
            jb.append(jacrev(lambda t, xn=xn: f(xn, w, t))(b).reshape(m, -1))
    stack = lambda js: torch.stack(js) if js else None  # noqa: E731
    return stack(jx), stack(jw), stack(jb)


# ---- rules --------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", CONVS, ids=IDS)
def test_jac_t_x_matches_vjp_per_column(cfg):
    mod, x = _conv(cfg), _input(cfg)
    ctx = _context(mod, x)
    k = 3
    v = torch.randn((k,) + ctx["out"].shape, dtype=DT)
    got = _call_rule(registry.JAC_T, "x", v, **ctx)
    f = _forward(ctx)
    _, pullback = vjp(lambda t: f(t, ctx["weight"], ctx["bias"]), x)
    want = torch.stack([pullback(v[i])[0] for i in range(k)])
    assert got.shape == want.shape
    assert rel_error(got, want) < 1e-10
    # Gradients carry no leading dim.
    assert rel_error(_call_rule(registry.JAC_T, "x", v[0], **ctx), want[0]) < 1e-10


@pytest.mark.parametrize("cfg", CONVS, ids=IDS)
def test_diag_x_is_hesscale_eq8(cfg):
    mod, x = _conv(cfg), _input(cfg)
    ctx = _context(mod, x)
    d = torch.randn(ctx["out"].shape, dtype=DT)
    jx, _, _ = _jacobians(ctx)
    # (J o J)^T d per sample: the diagonal of J^T diag(d) J.
    want = torch.einsum("nji,nj->ni", jx * jx, d.flatten(1)).reshape(x.shape)
    got = _call_rule(registry.DIAG, "x", d, **ctx)
    assert rel_error(got, want) < 1e-10


@pytest.mark.parametrize("cfg", CONVS, ids=IDS)
def test_per_sample_matches_jacrev(cfg):
    mod, x = _conv(cfg), _input(cfg)
    ctx = _context(mod, x)
    k = 2
    v = torch.randn((k,) + ctx["out"].shape, dtype=DT)
    _, jw, jb = _jacobians(ctx)
    want_w = torch.einsum("nji,knj->kni", jw, v.flatten(2)).reshape((k, x.shape[0]) + mod.weight.shape)
    got_w = _call_rule(registry.PER_SAMPLE, "weight", v, **ctx)
    assert got_w.shape == want_w.shape
    assert rel_error(got_w, want_w) < 1e-10
    if jb is not None:
        want_b = torch.einsum("nji,knj->kni", jb, v.flatten(2))
        assert rel_error(_call_rule(registry.PER_SAMPLE, "bias", v, **ctx), want_b) < 1e-10


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("cfg", CONVS, ids=IDS)
def test_diag_sqrt_is_exact(cfg, signed):
    mod, x = _conv(cfg), _input(cfg)
    ctx = _context(mod, x)
    k, n = 3, x.shape[0]
    s = torch.randn((k,) + ctx["out"].shape, dtype=DT)
    sign = torch.randint(0, 2, (k, n)).to(DT) * 2 - 1 if signed else None
    _, jw, jb = _jacobians(ctx)
    w = sign if sign is not None else torch.ones(k, n, dtype=DT)
    for name, j, shape in (("weight", jw, mod.weight.shape), ("bias", jb, None)):
        if j is None:
            continue
        # The squares come after the sum over output positions: (J_W^T S_k)^2 per sample.
        jts = torch.einsum("nji,knj->kni", j, s.flatten(2))
        want = torch.einsum("kn,kni->i", w, jts * jts)
        got = _call_rule(registry.DIAG_SQRT, name, s, sign, **ctx)
        assert rel_error(got, want.reshape(got.shape)) < 1e-10, name
        assert got.shape == (shape if shape is not None else mod.bias.shape)


@pytest.mark.parametrize("cfg", CONVS, ids=IDS)
def test_diag_diag_is_hesscale_eq9(cfg):
    mod, x = _conv(cfg), _input(cfg)
    ctx = _context(mod, x)
    d = torch.randn(ctx["out"].shape, dtype=DT)
    _, jw, jb = _jacobians(ctx)
    want_w = torch.einsum("nji,nj->i", jw * jw, d.flatten(1)).reshape(mod.weight.shape)
    assert rel_error(_call_rule(registry.DIAG_DIAG, "weight", d, **ctx), want_w) < 1e-10
    if jb is not None:
        want_b = torch.einsum("nji,nj->i", jb * jb, d.flatten(1))
        assert rel_error(_call_rule(registry.DIAG_DIAG, "bias", d, **ctx), want_b) < 1e-10


@pytest.mark.parametrize("cfg", CONVS, ids=IDS)
def test_grad_matches_autograd(cfg):
    mod, x = _conv(cfg), _input(cfg)
    ctx = _context(mod, x)
    g = torch.randn(ctx["out"].shape, dtype=DT)
    (mod(x) * g).sum().backward()
    assert rel_error(_call_rule(registry.GRAD, "weight", g, **ctx), mod.weight.grad) < 1e-10
    if mod.bias is not None:
        assert rel_error(_call_rule(registry.GRAD, "bias", g, **ctx), mod.bias.grad) < 1e-10


# ---- end to end ---------------------------------------------------------------------------------

def _net(cfg, act=nn.Tanh):
    """A 3x3 conv and ``act`` feeding the conv under test, so that it receives and sends messages."""
    _, kw, cin, hw, n = cfg
    torch.manual_seed(0)
    head = nn.Sequential(nn.Conv2d(2, cin, 3, padding=1), act(), nn.Conv2d(cin, 4, **kw), nn.Sigmoid())
    out = head(torch.zeros(1, 2, *hw)).numel()
    return nn.Sequential(*head, nn.Flatten(), nn.Linear(out, 3)).to(DT)


def _data(cfg, loss):
    _, _, _, hw, n = cfg
    torch.manual_seed(2)
    x = torch.randn(n, 2, *hw, dtype=DT)
    y = torch.randint(0, 3, (n,)) if isinstance(loss, nn.CrossEntropyLoss) else torch.randn(n, 3, dtype=DT)
    return x, y


LOSSES = [nn.CrossEntropyLoss(), nn.MSELoss(reduction="sum")]


check_end_to_end = check_against_references


@pytest.mark.parametrize("loss_fn", LOSSES, ids=["ce", "mse_sum"])
@pytest.mark.parametrize("cfg", CONVS, ids=IDS)
def test_compile_matches_torch_func(cfg, loss_fn):
    model = _net(cfg, act=nn.Tanh if isinstance(loss_fn, nn.CrossEntropyLoss) else nn.Sigmoid)
    check_end_to_end(model, loss_fn, *_data(cfg, loss_fn))


def test_functional_conv2d():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(4, 1, 3, 3, dtype=DT) * 0.5)
            self.w2 = nn.Parameter(torch.randn(4, 2, 2, 3, dtype=DT) * 0.5)
            self.b2 = nn.Parameter(torch.randn(4, dtype=DT))
            self.lin = nn.Linear(4 * 3 * 3, 2).to(DT)

        def forward(self, x):
            h = torch.tanh(F.conv2d(x, self.w1, None, 1, "same", 1, 1))
            h = torch.sigmoid(F.conv2d(h, self.w2, bias=self.b2, stride=2, padding=(1, 0), groups=2))
            return self.lin(h.flatten(1))

    torch.manual_seed(3)
    model = Net()
    x, y = torch.randn(3, 1, 5, 7, dtype=DT), torch.tensor([0, 1, 1])
    check_end_to_end(model, nn.CrossEntropyLoss(), x, y)


def test_conv_weight_used_twice():
    """A weight used twice takes the per-sample route (and, for the Hessian, the mixed term)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1, groups=2)
            self.lin = nn.Linear(2 * 4 * 3, 3)

        def forward(self, x):
            h = torch.tanh(self.conv(x))
            h = torch.sigmoid(self.conv(h))
            return self.lin(h.flatten(1))

    torch.manual_seed(4)
    model = Net().to(DT)
    x, y = torch.randn(2, 2, 4, 3, dtype=DT), torch.tensor([2, 0])
    check_end_to_end(model, nn.CrossEntropyLoss(), x, y)


@pytest.mark.parametrize("quantity", ["hesscale", "hesscale_gn"])
def test_hesscale_runs_and_is_exact_at_last_layer(quantity):
    cfg = CONVS[1]
    model = _net(cfg)
    loss_fn = nn.CrossEntropyLoss()
    x, y = _data(cfg, loss_fn)
    check_hesscale_exact_at_last_layer(model, loss_fn, x, y, quantity, last=("5.weight", "5.bias"))


# ---- configurations without a hand rule ---------------------------------------------------------

def test_padding_mode_is_left_to_the_generic_rule():
    """No hand rule for reflect/replicate/circular padding: the canonicalizer answers ``None`` (the
    generic rule's case; tests/rules/test_conv_family.py covers the other dimensions)."""
    mod = nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect").to(DT)
    _, canon = registry.MODULE_SOURCES[nn.Conv2d]
    assert canon(SimpleNamespace(args=(torch.randn(2, 1, 3, 3, dtype=DT),)), mod) is None


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_asymmetric_same_padding_is_left_to_the_generic_rule():
    mod = nn.Conv2d(1, 2, 2, padding="same").to(DT)
    _, canon = registry.MODULE_SOURCES[nn.Conv2d]
    assert canon(SimpleNamespace(args=(torch.randn(2, 1, 3, 3, dtype=DT),)), mod) is None


def test_same_padding_resolves_to_ints():
    mod = nn.Conv2d(1, 1, (3, 5), padding="same", dilation=(2, 1)).to(DT)
    ctx = _context(mod, torch.randn(1, 1, 6, 6, dtype=DT))
    assert ctx["padding"] == (2, 2) and ctx["stride"] == (1, 1) and ctx["dilation"] == (2, 1)
    ctx = _context(nn.Conv2d(1, 1, 3, padding="valid").to(DT), torch.randn(1, 1, 6, 6, dtype=DT))
    assert ctx["padding"] == (0, 0)
