"""conv1d, conv3d and the transposed convolutions end to end, and the configurations the convolution
family leaves to the generic rule (float64).

Every rule of these ops is checked against its torch.func derivation in tests/rules/test_generic.py;
here ``fxcurv.compile`` runs them on small nets: grad, diag_ggn and diag_hessian against the torch.func
references (tests/reference.py), hesscale against the brute-force HesScale of its defining equations
(tests/hesscale_reference.py), and diag_ggn against BackPACK's ``DiagGGNExact`` where BackPACK takes the
layer.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import backpack_reference as bp
import hesscale_reference as hs_ref
import pytest
import torch
import torch.nn.functional as F
from checks import check_backends_agree
from helpers import assert_close, check_against_references, rel_error
from torch import nn

import fxcurv
from fxcurv import KroneckerLayout
from fxcurv.errors import UnsupportedOpError
from fxcurv.rules import registry

DT = torch.float64


def _with_head(body: nn.Sequential, in_shape: tuple[int, ...], out: int = 3) -> nn.Sequential:
    """``body``, a flatten and a linear layer to ``out`` outputs (sized by a forward of zeros), float64."""
    width = body(torch.zeros((1,) + in_shape)).numel()
    return nn.Sequential(*body, nn.Flatten(), nn.Linear(width, out)).to(DT)


def conv1d_net() -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv1d(2, 4, 3, stride=2, padding=1), nn.Tanh(),
                         nn.Conv1d(4, 4, 3, dilation=2, groups=2), nn.Sigmoid())
    return _with_head(body, (2, 11)), (2, 11)


def conv3d_net() -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(1)
    body = nn.Sequential(nn.Conv3d(2, 2, 2, padding=1), nn.Tanh(),
                         nn.Conv3d(2, 4, (2, 2, 1), stride=2, groups=2), nn.Sigmoid())
    return _with_head(body, (2, 3, 3, 2)), (2, 3, 3, 2)


def conv_transpose2d_net(output_padding: int = 1) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(2)
    body = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2), nn.Tanh(),
                         nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=output_padding, groups=2),
                         nn.Sigmoid(),
                         nn.ConvTranspose2d(2, 2, (2, 1), dilation=(1, 2)), nn.Tanh())
    return _with_head(body, (2, 5, 4)), (2, 5, 4)


def conv_transpose1d_net() -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(3)
    body = nn.Sequential(nn.ConvTranspose1d(2, 3, 3, stride=2, output_padding=1), nn.Sigmoid())
    return _with_head(body, (2, 4)), (2, 4)


NETS = {"conv1d": conv1d_net, "conv3d": conv3d_net, "conv_transpose2d": conv_transpose2d_net,
        "conv_transpose1d": conv_transpose1d_net}


def _data(in_shape: tuple[int, ...], loss_fn: nn.Module, n: int = 3, seed: int = 5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n,) + in_shape, generator=gen, dtype=DT)
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return x, torch.randint(0, 3, (n,), generator=gen)
    return x, torch.randn(n, 3, generator=gen, dtype=DT)


LOSSES: dict[str, Callable[[], nn.Module]] = {"ce_mean": nn.CrossEntropyLoss,
                                              "mse_sum": lambda: nn.MSELoss(reduction="sum")}


def _ops_of(model: nn.Module) -> set[str]:
    return {registry.MODULE_SOURCES[type(m)][0].name for m in model.modules() if type(m) in registry.MODULE_SOURCES}


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("net", sorted(NETS))
def test_exact_quantities_on_small_nets(net, loss):
    """grad, diag_ggn and diag_hessian equal torch.func's; hesscale and hesscale_gn equal the brute-force
    HesScale (HesScale eq. 4-9 with explicit per-sample Jacobians)."""
    model, in_shape = NETS[net]()
    assert net in _ops_of(model)
    loss_fn = LOSSES[loss]()
    x, y = _data(in_shape, loss_fn)
    check_against_references(model, loss_fn, x, y)
    out = fxcurv.compile(model, loss_fn, quantities=("hesscale", "hesscale_gn"))(x, y)
    assert_close(out["hesscale"], hs_ref.hesscale(model, loss_fn, x, y), what="hesscale")
    assert_close(out["hesscale_gn"], hs_ref.hesscale_gn(model, loss_fn, x, y), what="hesscale_gn")


@pytest.mark.parametrize("net", ["conv3d", "conv_transpose2d"])
def test_backends_agree(net):
    """The eager and fused backends give the same numbers for the exact, HesScale, per-sample and ViViT
    quantities (the fused one merges these ops' reductions and pointwise epilogues)."""
    model, in_shape = NETS[net]()
    loss_fn = nn.CrossEntropyLoss()
    x, y = _data(in_shape, loss_fn, seed=8)
    quantities = ("diag_ggn", "diag_hessian", "hesscale", "batch_l2_grad", "batch_diag_ggn", "sum_grad_squared")
    check_backends_agree(model, loss_fn, x, y, quantities)


def test_backends_agree_on_transposed_kronecker_factors():
    """kflr and kfra of a transposed convolution (stride, padding, output padding): the same factors and
    layout from the eager and fused backends."""
    torch.manual_seed(4)
    in_shape = (2, 3, 2)
    model = _with_head(nn.Sequential(nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1), nn.Tanh()),
                       in_shape)
    loss_fn = nn.CrossEntropyLoss()
    x, y = _data(in_shape, loss_fn, seed=8)
    eager, fused = (fxcurv.compile(model, loss_fn, quantities=("kflr", "kfra"), backend=b)(x, y)
                    for b in ("eager", "fused"))
    for q in ("kflr", "kfra"):
        for name, block in eager[q].items():
            assert fused[q][name].layout is block.layout
            for a, b in zip(fused[q][name].factors, block.factors):
                assert rel_error(a, b) < 1e-10, (q, name)


def test_functional_forms():
    """F.conv1d / F.conv_transpose1d / F.conv3d with keyword arguments and 'same' padding."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Parameter(0.5 * torch.randn(4, 2, 3, dtype=DT))
            self.w2 = nn.Parameter(0.5 * torch.randn(4, 2, 2, dtype=DT))
            self.b2 = nn.Parameter(torch.randn(4, dtype=DT))
            self.w3 = nn.Parameter(0.5 * torch.randn(2, 4, 1, 2, 1, dtype=DT))
            self.lin = nn.Linear(2 * 3 * 4, 3).to(DT)

        def forward(self, x):
            h = torch.tanh(F.conv1d(x, self.w1, None, 1, "same", 2))
            h = torch.sigmoid(F.conv_transpose1d(h, self.w2, self.b2, stride=2, output_padding=1, groups=2))
            h = F.conv3d(h.reshape(h.shape[0], 4, 3, 3, 1), self.w3, padding=(0, 1, 0))
            return self.lin(h.flatten(1))

    torch.manual_seed(6)
    model = Net()
    x, y = torch.randn(3, 2, 4, dtype=DT), torch.tensor([0, 2, 1])
    out = check_against_references(model, nn.CrossEntropyLoss(), x, y)
    assert set(out["diag_ggn"]) == {"w1", "w2", "b2", "w3", "lin.weight", "lin.bias"}
    engine = fxcurv.compile(model, nn.CrossEntropyLoss(), quantities=("diag_ggn",))
    engine(x, y)
    listing = engine.listing()
    # the hand rules, not the generic one, run these calls
    for label in ("= conv1d(", "= conv_transpose1d(", "= conv3d(", "conv1d.diag_sqrt[weight]",
                  "conv_transpose1d.jac_t[x]", "conv_transpose1d.diag_sqrt[weight]", "conv3d.jac_t[x]"):
        assert label in listing, f"{label} not in the program"


# ---- BackPACK --------------------------------------------------------------------------------------

# BackPACK 1.7.1's DiagGGNExact fails on a transposed convolution with output_padding (an einsum shape
# error in backpack/utils/conv_transpose.py): its ConvTranspose2d net has none (stride, padding, groups
# and dilation stay); output_padding is checked against torch.func above.
BACKPACK_NETS = {"conv1d": conv1d_net, "conv_transpose2d": lambda: conv_transpose2d_net(output_padding=0)}


@pytest.mark.skipif(not bp.available(), reason="BackPACK is not installed")
@pytest.mark.parametrize("net", sorted(BACKPACK_NETS))
def test_diag_ggn_equals_backpack(net):
    """fxcurv's diag_ggn equals BackPACK's DiagGGNExact on a Conv1d and a ConvTranspose2d net."""
    from backpack.extensions import DiagGGNExact

    model, in_shape = BACKPACK_NETS[net]()
    loss_fn = nn.CrossEntropyLoss()
    x, y = _data(in_shape, loss_fn, seed=7)
    want = bp.run_extension(model, loss_fn, x, y, DiagGGNExact())
    got = fxcurv.compile(model, loss_fn, quantities=("diag_ggn",))(x, y)["diag_ggn"]
    assert_close(got, {k: v.detach() for k, v in want.items()}, rtol=1e-10, what=f"diag_ggn vs BackPACK ({net})")


def per_sample_net() -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(12)
    body = nn.Sequential(nn.Conv1d(2, 4, 3, stride=2, padding=1), nn.Tanh(),
                         nn.ConvTranspose1d(4, 2, 3, stride=2, groups=2, dilation=2), nn.Sigmoid())
    return _with_head(body, (2, 7)), (2, 7)


PER_SAMPLE = {"batch_grad": "BatchGrad", "sum_grad_squared": "SumGradSquared", "batch_diag_ggn": "BatchDiagGGNExact"}


@pytest.mark.skipif(not bp.available(), reason="BackPACK is not installed")
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_per_sample_quantities_equal_backpack(loss):
    """batch_grad, sum_grad_squared and batch_diag_ggn of a Conv1d and a grouped, dilated ConvTranspose1d
    equal BackPACK's BatchGrad, SumGradSquared and BatchDiagGGNExact; batch_l2_grad equals the squared
    norms of BackPACK's BatchGrad. (BackPACK 1.7.1's BatchL2Grad of a grouped ConvTranspose1d disagrees
    with its own BatchGrad -- measured 54% relative on ConvTranspose1d(4, 2, 3, groups=2) -- and agrees
    without groups: it is not the reference for that layer.)"""
    from backpack import extensions

    model, in_shape = per_sample_net()
    loss_fn = LOSSES[loss]()
    x, y = _data(in_shape, loss_fn, seed=13)
    out = fxcurv.compile(model, loss_fn, quantities=tuple(PER_SAMPLE) + ("batch_l2_grad",))(x, y)
    for q, ext in PER_SAMPLE.items():
        want = bp.run_extension(model, loss_fn, x, y, getattr(extensions, ext)())
        assert_close(out[q], {k: v.detach() for k, v in want.items()}, rtol=1e-10, what=f"{q} vs BackPACK {ext}")
        if q == "batch_grad":
            norms = {k: (v.detach() ** 2).flatten(1).sum(1) for k, v in want.items()}
            assert_close(out["batch_l2_grad"], norms, rtol=1e-10, what="batch_l2_grad vs BackPACK BatchGrad norms")


KRON_CONVS = {"conv1d": (lambda: nn.Conv1d(2, 3, 3, stride=2, padding=1), (2, 7)),
              "conv3d": (lambda: nn.Conv3d(2, 3, 2, dilation=(1, 1, 2)), (2, 3, 3, 3)),
              "conv_transpose1d": (lambda: nn.ConvTranspose1d(3, 2, 3, stride=2, padding=1), (3, 4)),
              "conv_transpose2d": (lambda: nn.ConvTranspose2d(2, 3, (3, 2), stride=(2, 1), padding=(2, 0),
                                                              dilation=(1, 2)), (2, 3, 3)),
              "conv_transpose3d": (lambda: nn.ConvTranspose3d(2, 3, 2, stride=(1, 2, 1)), (2, 2, 2, 3))}


@pytest.mark.skipif(not bp.available(), reason="BackPACK is not installed")
@pytest.mark.filterwarnings("ignore:The Kronecker factors stored in the weight parameters of transpose")
@pytest.mark.parametrize("quantity", ["kflr", "kfra"])
@pytest.mark.parametrize("conv", sorted(KRON_CONVS))
def test_kronecker_factors_equal_backpack(conv, quantity):
    """The Kronecker factors (G, A) of Conv1d, Conv3d and ConvTranspose1d/2d/3d layers equal BackPACK's KFLR
    and KFRA (a transposed convolution's split ``weight.transpose(0, 1)``: ``KroneckerLayout.TRANSPOSED``)."""
    make, in_shape = KRON_CONVS[conv]
    torch.manual_seed(10)
    model = _with_head(nn.Sequential(make(), nn.Tanh()), in_shape)
    loss_fn = nn.CrossEntropyLoss()
    x, y = _data(in_shape, loss_fn, seed=11)
    want = bp.run_backpack(model, loss_fn, x, y, quantity)
    got = fxcurv.compile(model, loss_fn, quantities=(quantity,))(x, y)[quantity]
    transposed = conv.startswith("conv_transpose")
    for name, factors in want.items():
        layout = KroneckerLayout.TRANSPOSED if transposed and name == "0.weight" else KroneckerLayout.ROWS
        assert got[name].layout is layout and len(got[name].factors) == len(factors)
        for a, b in zip(got[name].factors, factors):
            assert a.shape == b.shape and rel_error(a, b) < 1e-10, (name, quantity)


@pytest.mark.skipif(not bp.available(), reason="BackPACK is not installed")
@pytest.mark.filterwarnings("ignore:The Kronecker factors stored in the weight parameters of transpose")
def test_backpack_input_factor_ignores_output_padding():
    """BackPACK 1.7.1 unfolds a transposed convolution's input with ``output_padding=0`` (a TODO in its
    ``unfold_by_conv_transpose``): where the appended output positions receive input, its ``A`` misses them.
    fxcurv's ``A`` keeps them (it equals its torch.func definition, tests/quantities/test_kronecker.py); the
    two agree without output padding (test_kronecker_factors_equal_backpack) and differ here."""
    torch.manual_seed(3)
    conv = nn.ConvTranspose2d(2, 3, (3, 2), stride=2, padding=1, output_padding=1, dilation=(1, 2))
    model = _with_head(nn.Sequential(conv, nn.Tanh()), (2, 3, 3))
    loss_fn = nn.CrossEntropyLoss()
    x, y = _data((2, 3, 3), loss_fn, seed=11)
    want = bp.run_backpack(model, loss_fn, x, y, "kflr")["0.weight"]
    got = fxcurv.compile(model, loss_fn, quantities=("kflr",))(x, y)["kflr"]["0.weight"].factors
    assert rel_error(got[0], want[0]) < 1e-10  # G: the columns at the output, positions summed
    assert rel_error(got[1], want[1]) > 0.1


# ---- configurations left to the generic rule ---------------------------------------------------------

def _module_match(mod: nn.Module, x: torch.Tensor):
    _, canon = registry.MODULE_SOURCES[type(mod)]
    out = mod(x)
    return canon(SimpleNamespace(args=(x,), kwargs={}, meta={"val": out}), mod)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_padding_modes_are_left_to_the_generic_rule(dims, mode):
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    mod = conv(2, 2, 3, padding=1, padding_mode=mode).to(DT)
    x = torch.randn((2, 2) + (4,) * dims, dtype=DT)
    assert _module_match(mod, x) is None
    # the same layer with zero padding has its hand rule
    zeros = conv(2, 2, 3, padding=1).to(DT)
    match = _module_match(zeros, x)
    assert match is not None and match.attrs["padding"] == (1,) * dims


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_asymmetric_same_padding_is_left_to_the_generic_rule():
    # dilation * (kernel - 1) odd in one dim: torch pads one more at the end
    mod = nn.Conv3d(1, 2, (3, 2, 3), padding="same").to(DT)
    assert _module_match(mod, torch.randn(2, 1, 4, 4, 4, dtype=DT)) is None
    _, canon = registry.FUNCTION_SOURCES[F.conv1d]
    x, w = torch.randn(2, 1, 5, dtype=DT), torch.randn(2, 1, 4, dtype=DT)
    assert canon(SimpleNamespace(args=(x, w), kwargs={}), registry.Args((x, w, None, 1, "same"), {})) is None
    # an even total padding is symmetric: explicit ints
    match = canon(SimpleNamespace(args=(x, w), kwargs={}), registry.Args((x, w, None, 1, "same", 2), {}))
    assert match is not None and match.attrs["padding"] == (3,) and match.attrs["dilation"] == (2,)


def test_unbatched_input_is_refused():
    with pytest.raises(UnsupportedOpError, match=r"conv_transpose1d of an input with shape \(2, 4\)"):
        _module_match(nn.ConvTranspose1d(2, 2, 3).to(DT), torch.randn(2, 4, dtype=DT))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_configurations_without_hand_rule_are_exact_through_the_generic_rule():
    """Reflect padding and an asymmetric 'same' padding run as generic nodes (torch.func), exact."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1, padding_mode="reflect"), nn.Tanh(),
                          nn.Conv1d(3, 2, 2, padding="same"), nn.Sigmoid(),
                          nn.Conv1d(2, 2, 3), nn.Flatten(), nn.Linear(2 * 4, 3)).to(DT)
    x, y = _data((2, 6), nn.CrossEntropyLoss())
    out = check_against_references(model, nn.CrossEntropyLoss(), x, y)
    assert set(out["diag_ggn"]) == {name for name, _ in model.named_parameters()}
    engine = fxcurv.compile(model, nn.CrossEntropyLoss(), quantities=("diag_ggn",))
    engine(x, y)
    listing = engine.listing()
    assert listing.count("# the generic call of") == 2 and "= conv1d(" in listing  # two generic calls, one hand op
