"""Pooling: the rules against torch.func, and fxcurv.compile end to end (float64): max_pool2d and
avg_pool2d in detail, the one- and three-dimensional and adaptive poolings end to end (against
torch.func, the brute-force HesScale and BackPACK).

Both poolings are linear per sample (max-pooling at its argmax), so each rule is checked against the
explicit matrix from ``torch.func.jacrev``: ``J^T v`` column by column and the HesScale diagonal
``(J o J)^T d`` -- for average pooling that is ``(A o A)^T d`` with the averaging matrix ``A``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    call_rule,
    check_against_references,
    check_hesscale_exact_at_last_layer,
    check_layer_net,
    rel_error,
)
from torch import nn
from torch.func import jacrev, vjp

import fxcurv
from fxcurv.rules import registry

DT = torch.float64

# (name, module, image size)
MAX_POOLS = [
    ("k3s2_overlap", nn.MaxPool2d(3, 2), (7, 5)),
    ("k2", nn.MaxPool2d(2), (6, 5)),
    ("k3s2_ceil", nn.MaxPool2d(3, 2, ceil_mode=True), (6, 6)),
    ("k2s1_pad1", nn.MaxPool2d(2, 1, padding=1), (4, 5)),
    ("k3_dil2", nn.MaxPool2d(2, 1, dilation=2), (5, 6)),
    ("k3x2_s21", nn.MaxPool2d((3, 2), (2, 1), padding=(1, 0), ceil_mode=True), (7, 4)),
]
AVG_POOLS = [
    ("k2", nn.AvgPool2d(2), (6, 5)),
    ("k3s2_pad1_incl", nn.AvgPool2d(3, 2, padding=1, count_include_pad=True), (7, 5)),
    ("k3s2_pad1_excl", nn.AvgPool2d(3, 2, padding=1, count_include_pad=False), (7, 5)),
    ("k3s2_ceil_incl", nn.AvgPool2d(3, 2, padding=1, ceil_mode=True), (6, 6)),
    ("k3s2_ceil_excl", nn.AvgPool2d(3, 2, padding=1, ceil_mode=True, count_include_pad=False), (6, 6)),
    ("k2x3_divisor", nn.AvgPool2d((2, 3), 1, divisor_override=4), (4, 5)),
]
MAX_IDS, AVG_IDS = [c[0] for c in MAX_POOLS], [c[0] for c in AVG_POOLS]
POOLS, POOL_IDS = MAX_POOLS + AVG_POOLS, ["max-" + i for i in MAX_IDS] + ["avg-" + i for i in AVG_IDS]


def _context(mod, x):
    """Inputs, attributes, output and saved tensors, as the compiler binds them."""
    op, canon_fn = registry.MODULE_SOURCES[type(mod)]
    canon = canon_fn(SimpleNamespace(args=(x,)), mod)
    ctx = dict(canon.attrs, x=x)
    if op.forward_saving is not None:
        out, *saved = op.forward_saving(x, **canon.attrs)
        ctx.update(zip(op.saved, saved))
    else:
        out = op.forward(x, **canon.attrs)
    ctx["out"] = out
    assert torch.equal(out, mod(x))
    return op.name, ctx


def _input(hw, n=3, c=2, seed=0):
    torch.manual_seed(seed)
    return torch.randn(n, c, *hw, dtype=DT)


def _jacobian(mod, x):
    """Per-sample Jacobians ``[N, out, in]``: the selection matrix ``Pi`` or the averaging ``A``."""
    return torch.stack([jacrev(lambda t: mod(t[None])[0])(x[n]).reshape(-1, x[n].numel())
                        for n in range(x.shape[0])])


@pytest.mark.parametrize("cfg", POOLS, ids=POOL_IDS)
def test_jac_t_matches_vjp_per_column(cfg):
    _, mod, hw = cfg
    x = _input(hw)
    op, ctx = _context(mod, x)
    k = 3
    v = torch.randn((k,) + ctx["out"].shape, dtype=DT)
    got = call_rule(registry.JAC_T, op, "x", v, **ctx)
    _, pullback = vjp(mod, x)
    want = torch.stack([pullback(v[i])[0] for i in range(k)])
    assert got.shape == want.shape
    assert rel_error(got, want) < 1e-12
    assert rel_error(call_rule(registry.JAC_T, op, "x", v[0], **ctx), want[0]) < 1e-12


@pytest.mark.parametrize("cfg", POOLS, ids=POOL_IDS)
def test_diag_is_hesscale_eq8(cfg):
    _, mod, hw = cfg
    x = _input(hw)
    op, ctx = _context(mod, x)
    d = torch.randn(ctx["out"].shape, dtype=DT)
    j = _jacobian(mod, x)
    want = torch.einsum("nji,nj->ni", j * j, d.flatten(1)).reshape(x.shape)
    got = call_rule(registry.DIAG, op, "x", d, **ctx)
    assert rel_error(got, want) < 1e-12


def test_overlapping_windows_select_an_input_twice():
    """The k3s2 config really exercises the scatter-add: some input is the max of two windows."""
    x = _input((7, 5), seed=5)
    x[0, 0, 2, 2] = 10.0  # on the border of two overlapping windows
    _, ctx = _context(nn.MaxPool2d(3, 2), x)
    idx = ctx["indices"][0, 0].flatten()
    assert len(idx.unique()) < len(idx)
    v = torch.ones(ctx["out"].shape, dtype=DT)
    got = call_rule(registry.JAC_T, "max_pool2d", "x", v, **ctx)
    assert got[0, 0, 2, 2] == (idx == 2 * 5 + 2).sum() > 1


def _averaging_matrix(h, w, k, s, p, ceil_mode, count_include_pad, divisor_override):
    """``A [out, in]`` from the definition of average pooling (one plane), independent of torch."""
    def out_size(n, k, s, p):
        size = (n + 2 * p - k + ((s - 1) if ceil_mode else 0)) // s + 1
        if ceil_mode and (size - 1) * s >= n + p:
            size -= 1
        return size

    oh, ow = out_size(h, k[0], s[0], p[0]), out_size(w, k[1], s[1], p[1])
    a = torch.zeros(oh * ow, h * w, dtype=DT)
    for i in range(oh):
        for j in range(ow):
            h0, w0 = i * s[0] - p[0], j * s[1] - p[1]
            h1, w1 = min(h0 + k[0], h + p[0]), min(w0 + k[1], w + p[1])
            pool = (h1 - h0) * (w1 - w0)  # the window clipped to the padded image
            rows = range(max(h0, 0), min(h1, h))
            cols = range(max(w0, 0), min(w1, w))
            div = divisor_override or (pool if count_include_pad else len(rows) * len(cols))
            for r in rows:
                for c in cols:
                    a[i * ow + j, r * w + c] = 1.0 / div
    return a


@pytest.mark.parametrize("cfg", AVG_POOLS, ids=AVG_IDS)
def test_avg_diag_against_explicit_averaging_matrix(cfg):
    _, mod, hw = cfg
    x = _input(hw)
    _, ctx = _context(mod, x)
    a = _averaging_matrix(*hw, ctx["kernel_size"], ctx["stride"], ctx["padding"], ctx["ceil_mode"],
                          ctx["count_include_pad"], ctx["divisor_override"])
    # The explicit A reproduces the forward, then defines the HesScale diagonal (A o A)^T d.
    assert rel_error(torch.einsum("ji,nci->ncj", a, x.flatten(2)), ctx["out"].flatten(2)) < 1e-12
    d = torch.randn(ctx["out"].shape, dtype=DT)
    want = torch.einsum("ji,ncj->nci", a * a, d.flatten(2)).reshape(x.shape)
    assert rel_error(call_rule(registry.DIAG, "avg_pool2d", "x", d, **ctx), want) < 1e-12
    inv = call_rule(registry.DERIVED, "avg_pool2d", "inv_divisor", **ctx)
    assert rel_error(inv.flatten(), a.max(dim=1).values) < 1e-12


# ---- end to end ---------------------------------------------------------------------------------

check_end_to_end = check_against_references


def _cnn(pool, hw, act=nn.Tanh, n_out=3):
    """conv -> act -> pool -> conv -> act -> linear: the pool receives and sends messages."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), act(), pool, nn.Conv2d(3, 2, 2, padding=1), act())
    size = body(torch.zeros(1, 2, *hw)).numel()
    return nn.Sequential(*body, nn.Flatten(), nn.Linear(size, n_out)).to(DT)


def _data(loss_fn, hw, n):
    torch.manual_seed(1)
    x = torch.randn(n, 2, *hw, dtype=DT)
    y = torch.randint(0, 3, (n,)) if isinstance(loss_fn, nn.CrossEntropyLoss) else torch.randn(n, 3, dtype=DT)
    return x, y


LOSSES = [(nn.CrossEntropyLoss(), nn.Tanh, 3), (nn.MSELoss(reduction="sum"), nn.Sigmoid, 1)]


@pytest.mark.parametrize("loss", LOSSES, ids=["ce_tanh_n3", "mse_sigmoid_n1"])
@pytest.mark.parametrize("cfg", POOLS, ids=POOL_IDS)
def test_compile_matches_torch_func(cfg, loss):
    _, pool, hw = cfg
    loss_fn, act, n = loss
    check_end_to_end(_cnn(pool, hw, act), loss_fn, *_data(loss_fn, hw, n))


class C3D3(nn.Module):
    """A miniature of DeepOBS' 3c3d: conv/tanh/max-pool(3, 2) blocks, then linear layers; functional
    pooling in the middle block."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.p1 = nn.MaxPool2d(3, 2, padding=1)
        self.c2 = nn.Conv2d(3, 3, 3, padding=1)
        self.c3 = nn.Conv2d(3, 2, 3, padding=1)
        self.fc1 = nn.Linear(2 * 2 * 2, 4)
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x):
        x = self.p1(torch.tanh(self.c1(x)))
        x = F.max_pool2d(torch.tanh(self.c2(x)), 3, stride=2, padding=1, ceil_mode=True)
        x = F.avg_pool2d(torch.tanh(self.c3(x)), 2, ceil_mode=True, count_include_pad=False)
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))


def test_c3d3_like_net():
    torch.manual_seed(2)
    model = C3D3().to(DT)
    x, y = torch.randn(3, 2, 9, 7, dtype=DT), torch.tensor([0, 2, 1])
    check_end_to_end(model, nn.CrossEntropyLoss(), x, y)


@pytest.mark.parametrize("quantity", ["hesscale", "hesscale_gn"])
def test_hesscale_runs_and_is_exact_at_last_layer(quantity):
    torch.manual_seed(2)
    model = C3D3().to(DT)
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(3, 2, 9, 7, dtype=DT), torch.tensor([0, 2, 1])
    check_hesscale_exact_at_last_layer(model, loss_fn, x, y, quantity, last=("fc2.weight", "fc2.bias"))


# ---- errors -------------------------------------------------------------------------------------

class _ModuleIndices(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = nn.MaxPool2d(2, return_indices=True)

    def forward(self, x):
        return self.pool(x)[0].flatten(1)


class _AdaptiveIndices(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveMaxPool2d(2, return_indices=True)

    def forward(self, x):
        return self.pool(x)[0].flatten(1)


class _FunctionalIndices(nn.Module):
    def forward(self, x):
        return F.max_pool2d(x, 2, return_indices=True)[0].flatten(1)


@pytest.mark.parametrize("model, source", [(_ModuleIndices(), "nn.MaxPool2d"),
                                           (_FunctionalIndices(), "max_pool2d_with_indices"),
                                           (_AdaptiveIndices(), "nn.AdaptiveMaxPool2d")],
                         ids=["module", "functional", "adaptive"])
def test_return_indices_is_rejected(model, source):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 1, 1), model).to(DT)
    with pytest.raises(fxcurv.UnsupportedOpError) as info:
        fxcurv.compile(net, nn.CrossEntropyLoss())(torch.randn(2, 1, 4, 4, dtype=DT), torch.tensor([0, 1]))
    msg = str(info.value)
    assert msg.startswith("node '") and source in msg.split(":")[0]
    assert "return_indices=True" in msg and "supported: return_indices=False" in msg


# ---- one and three dimensions, adaptive average pooling -----------------------------------------

# name: (net, input shape per sample, whether BackPACK computes it: its adaptive average pooling takes
# output sizes that divide the input only, it has no adaptive max-pooling). Linear layers on the last
# axis put parameters before the pools.
ND_NETS = {
    "pool1d": (lambda: nn.Sequential(
        nn.Linear(9, 8), nn.Tanh(), nn.MaxPool1d(3, 2, padding=1), nn.AvgPool1d(2, ceil_mode=True),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(2, 3)), (2, 9), True),
    "pool1d_adaptive_overlap": (lambda: nn.Sequential(
        nn.Linear(7, 7), nn.Sigmoid(), nn.AdaptiveMaxPool1d(5), nn.AdaptiveAvgPool1d(3), nn.Flatten(),
        nn.Linear(6, 3)), (2, 7), False),
    "pool3d": (lambda: nn.Sequential(
        nn.Linear(5, 4), nn.Sigmoid(), nn.MaxPool3d(2, 1, padding=1), nn.AvgPool3d(2),
        nn.AdaptiveAvgPool3d((1, 2, 1)), nn.Flatten(), nn.Linear(4, 3)), (2, 3, 4, 5), True),
    "adaptive2d": (lambda: nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.Tanh(), nn.AdaptiveAvgPool2d((2, None)), nn.Flatten(), nn.Linear(3 * 2 * 3, 3)),
        (2, 6, 5), True),
    "adaptive2d_overlap": (lambda: nn.Sequential(
        nn.Conv2d(2, 3, 2), nn.Tanh(), nn.AdaptiveMaxPool2d((4, 3)), nn.AdaptiveAvgPool2d((3, 2)), nn.Flatten(),
        nn.Linear(3 * 3 * 2, 3)),
        (2, 6, 4), False),
}


@pytest.mark.parametrize("net", sorted(ND_NETS))
def test_nd_and_adaptive_pools_are_exact(net):
    build, shape, backpack = ND_NETS[net]
    torch.manual_seed(0)
    model = build().to(DT)
    x = torch.randn((3,) + shape, dtype=DT)
    check_layer_net(model, nn.CrossEntropyLoss(), x, torch.tensor([0, 2, 1]), backpack=backpack)


class FunctionalPools(nn.Module):
    """The functional spellings: ``F.max_pool1d``, ``F.adaptive_avg_pool2d``, ``F.avg_pool3d``."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.out = nn.Linear(2, 3)

    def forward(self, x):  # x [N, 2, 3, 6]
        h = torch.tanh(self.lin(x))
        a = F.max_pool1d(h.flatten(1, 2), 3, 2, 1)  # [N, 6, 3]
        b = F.adaptive_avg_pool2d(a.unflatten(1, (2, 3)), (1, 2))  # [N, 2, 1, 2]
        c = F.avg_pool3d(b.reshape(b.shape[0], 1, 2, 1, 2), (2, 1, 1))  # [N, 1, 1, 1, 2]
        return self.out(c.flatten(1))


def test_functional_nd_pools_are_exact():
    torch.manual_seed(1)
    model = FunctionalPools().to(DT)
    x = torch.randn(3, 2, 3, 6, dtype=DT)
    check_end_to_end(model, nn.CrossEntropyLoss(), x, torch.tensor([0, 2, 1]))


@pytest.mark.parametrize(("kernel_size", "stride", "padding", "dilation", "ceil_mode"), [
    (3, 2, 0, 1, False),  # the c3d3's pools
    ((3, 2), (1, 2), 1, 1, False),
    (2, 2, 0, 2, True),
    (3, 2, 1, 1, True),
])
def test_max_pool2d_channels_last_route_equals_the_contiguous_kernel(kernel_size, stride, padding, dilation,
                                                                      ceil_mode):
    """The saving forward's channels-last route (CPU, >= 16 channels) gives the contiguous kernel's values
    and indices exactly, on inputs full of ties (integers in {0, 1, 2} and -inf) where a different scan
    order would pick another argmax."""
    from fxcurv.rules import pooling

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 3, (3, 16, 9, 11), generator=g).to(torch.float64)
    x[:, :, ::4] = -float("inf")
    assert pooling.channels_last_pays(x) and not pooling.channels_last_pays(x[:, :3].contiguous())
    out, idx = pooling.max_pool2d_with_indices(x, kernel_size, stride, padding, dilation, ceil_mode)
    ref_out, ref_idx = F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices=True)
    assert torch.equal(out, ref_out) and torch.equal(idx, ref_idx)
    assert out.is_contiguous() and idx.is_contiguous()
