"""fxcurv gives BackPACK's numbers on a table of problems like BackPACK's own test suite.

The problems (``tests/backpack_problems.py``) cover the layers BackPACK's second-order tests cover:
convolutions (1-D, 2-D, 3-D, transposed, grouped), pooling (max, average, adaptive), BatchNorm with
running statistics, embeddings, slicing, scaling, padding, dropout, identities, residual blocks,
elementwise activations, and the losses cross-entropy (also over extra dimensions), squared error and
binary cross-entropy with logits. On each, BackPACK 1.7.1 (``extend`` on the model and the loss, one
``loss.backward()`` inside ``with backpack(...)``) and fxcurv (``fxcurv.compile``) compute, in
float64, every quantity BackPACK computes for it:

=====================  ===================  ===================================================
fxcurv                 BackPACK             compared
=====================  ===================  ===================================================
``batch_grad``         ``BatchGrad``        per parameter, relative error < ``RTOL``
``batch_l2_grad``      ``BatchL2Grad``      the same
``sum_grad_squared``   ``SumGradSquared``   the same
``variance``           ``Variance``         relative to the second moment it is a difference of
``diag_ggn``           ``DiagGGNExact``     per parameter
``diag_hessian``       ``DiagHessian``      per parameter
``kflr``               ``KFLR``             each Kronecker factor
``diag_ggn_mc``        ``DiagGGNMC``        per parameter, the same draws (seeded)
``kfac``               ``KFAC``             each factor, the same draws (seeded)
=====================  ===================  ===================================================

What BackPACK refuses on a problem is written down (:data:`BACKPACK_LACKS`) and checked
(``test_backpack_refuses``), so the comparison cannot shrink unnoticed. Problems with a layer fxcurv
does not support yet are marked ``xfail(strict=True)`` with the exact error (:data:`FXCURV_GAPS`, empty
since transposed convolutions got their Kronecker factors): when the layer lands the mark must go.
Recurrent layers get a clear fxcurv error (``test_recurrent_layers_are_refused``).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import backpack_reference as br
import pytest
import torch
from backpack_problems import PROBLEMS, N, Problem, build, inputs
from helpers import rel_error
from torch import nn

import fxcurv
import fxcurv.backpack
from fxcurv.errors import UnsupportedOpError

pytestmark = [pytest.mark.cpu_only(reason="float64 comparison with BackPACK, which runs on CPU tensors here"),
              pytest.mark.skipif(not br.available(), reason=br.SKIP_REASON)]

RTOL = 1e-8
MC_SAMPLES = 2
SEED = 5
EXACT = ("batch_grad", "batch_l2_grad", "sum_grad_squared", "variance", "diag_ggn", "diag_hessian", "kflr")
SAMPLED = ("diag_ggn_mc", "kfac")
KRONECKER = ("kflr", "kfac")


def extension(quantity: str):
    """BackPACK's extension object computing fxcurv's ``quantity``."""
    from backpack import extensions

    name = fxcurv.backpack.FIELDS[quantity].extension
    cls = getattr(extensions, name)
    return cls(mc_samples=MC_SAMPLES) if quantity in SAMPLED else cls()


# ---- what BackPACK 1.7.1 does not compute ------------------------------------------------------

@dataclass(frozen=True)
class Lack:
    """BackPACK 1.7.1 refuses ``quantities`` on a problem, raising ``NotImplementedError`` (or
    ``ValueError``) with a message matching ``match``."""

    quantities: frozenset[str]
    match: str


_KRON = frozenset(KRONECKER)
_SECOND = frozenset({"diag_ggn", "diag_hessian", "kflr", "diag_ggn_mc", "kfac"})
GROUPED = ("conv1d_grouped", "conv2d_grouped", "conv2d_depthwise", "conv3d_grouped", "conv_transpose2d_grouped")


def _no_module(quantities: frozenset[str], module: str) -> Lack:
    return Lack(quantities, f"does not have an extension for Module <class '[\\w.]*{module}'>")


BACKPACK_LACKS: dict[str, Lack] = {
    "act_elu": _no_module(_KRON, "ELU"),
    "act_leakyrelu": _no_module(_KRON, "LeakyReLU"),
    "act_selu": _no_module(_KRON, "SELU"),
    "act_logsigmoid": _no_module(_KRON, "LogSigmoid"),
    **{name: Lack(_KRON, "groups ≠ 1 is not supported") for name in GROUPED},
    "maxpool1d": _no_module(_KRON, "MaxPool1d"),
    "avgpool1d": _no_module(_KRON, "AvgPool1d"),
    "maxpool3d": _no_module(_KRON, "MaxPool3d"),
    "avgpool3d": _no_module(_KRON, "AvgPool3d"),
    **{f"adaptive_avgpool{d}d": _no_module(_KRON, f"AdaptiveAvgPool{d}d") for d in (1, 2, 3)},
    **{f"batchnorm{d}d_eval": _no_module(_KRON | {"diag_hessian"}, f"BatchNorm{d}d") for d in (1, 2, 3)},
    **{name: _no_module(_KRON | {"diag_hessian"}, "Embedding") for name in ("embedding", "embedding_sequence")},
    "identity": _no_module(frozenset({"diag_hessian"}), "Identity"),
    "scale": _no_module(frozenset({"diag_hessian"}), "ScaleModule"),
    "slicing": _no_module(_KRON, "Slicing"),
    # DiagHessian has no SumModule (the merge of a branch); KFLR cannot add two backpropagated factors
    **{name: Lack(frozenset({"diag_hessian", "kflr"}), "SumModule|No accumulation rule for backpropagated")
       for name in ("residual_linear", "residual_conv", "residual_plain_linear", "residual_plain_conv")},
    "bce_multilabel": Lack(_SECOND, "Only scalar-valued predictions are currently supported"),
    "ce_multidim_permute": _no_module(_KRON | {"diag_hessian"}, "Permute"),
    "mse_multidim": Lack(_SECOND, "Only 2D inputs are currently supported for MSELoss"),
}


# problem -> quantities where BackPACK 1.7.1's number is wrong (checked by test_backpack_is_wrong): there
# fxcurv is compared with the value BackPACK's own other extensions define
BACKPACK_WRONG: dict[str, frozenset[str]] = {name: frozenset({"batch_l2_grad"}) for name in GROUPED}


def batch_l2_from_batch_grad(grad_batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``||g_n||^2`` per sample from the per-sample gradients ``g_n`` (BatchL2Grad's definition)."""
    return {name: g.flatten(start_dim=1).square().sum(1) for name, g in grad_batch.items()}


def backpack_quantities(name: str) -> tuple[str, ...]:
    lack = BACKPACK_LACKS.get(name)
    lacks = lack.quantities if lack is not None else frozenset()
    return tuple(q for q in EXACT + SAMPLED if q not in lacks)


# ---- where fxcurv does not match BackPACK yet --------------------------------------------------

@dataclass(frozen=True)
class Gap:
    """fxcurv refuses a problem today: ``error`` is raised (strict xfail) for the ``quantities``
    (``None``: all of them) because of ``reason``."""

    error: type[Exception]
    reason: str
    quantities: frozenset[str] | None = None


def _vocabulary(what: str) -> Gap:
    return Gap(UnsupportedOpError, f"{what} is outside fxcurv's op vocabulary")


FXCURV_GAPS: dict[str, Gap] = {}


def marks(name: str, quantities: tuple[str, ...]) -> list[Any]:
    gap = FXCURV_GAPS.get(name)
    if gap is None or (gap.quantities is not None and not gap.quantities & set(quantities)):
        return []
    return [pytest.mark.xfail(strict=True, raises=gap.error, reason=gap.reason)]


def cases(group: tuple[str, ...]) -> list[Any]:
    out = []
    for name in PROBLEMS:
        quantities = tuple(q for q in backpack_quantities(name) if q in group)
        if quantities:
            out.append(pytest.param(name, quantities, id=name, marks=marks(name, quantities)))
    return out


# ---- running both ------------------------------------------------------------------------------

def run_backpack(problem: Problem, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 quantities: tuple[str, ...], seed: int = SEED) -> dict[str, dict[str, Any]]:
    """BackPACK's ``{quantity: {parameter name: value}}``: one ``loss.backward()`` with every
    extension of ``quantities``, right after ``torch.manual_seed(seed)`` (the global generator is
    restored afterwards), on deep copies of the model and loss (``extend`` installs hooks), float64
    as the default dtype (BackPACK builds some constants in it)."""
    from backpack import backpack, extend

    net = copy.deepcopy(model)
    loss_fn = problem.loss()
    exts = [extension(q) for q in quantities]
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            # the first layer's input is data: the full backward hook says it fires on outputs only
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            warnings.filterwarnings("ignore", message="Encountered node that may break second-order extensions")
            # transposed convolutions: the factors describe weight.transpose(0, 1), as fxcurv's (KroneckerLayout)
            warnings.filterwarnings("ignore", message="The Kronecker factors stored in the weight parameters")
            net = extend(net, use_converter=problem.converter)
            loss_fn = extend(loss_fn)
            loss = loss_fn(net(x), y)
            torch.manual_seed(seed)
            with backpack(*exts):
                loss.backward()
    finally:
        torch.set_default_dtype(old)
    params = dict(net.named_parameters())
    names = [name for name, _ in model.named_parameters()]
    if sorted(params) != sorted(names):
        raise RuntimeError(f"BackPACK's parameters {sorted(params)} are not the model's {sorted(names)}")
    return {q: {name: getattr(params[name], ext.savefield) for name in names} for q, ext in zip(quantities, exts)}


def run_fxcurv(model: nn.Module, problem: Problem, x: torch.Tensor, y: torch.Tensor,
               quantities: tuple[str, ...], seed: int = SEED) -> fxcurv.Result:
    engine = fxcurv.compile(model, problem.loss(), quantities=quantities, mc_samples=MC_SAMPLES)
    return engine(x, y, generator=torch.Generator().manual_seed(seed))


def compare(quantity: str, got: Mapping[str, Any], want: Mapping[str, Any],
            second_moment: Mapping[str, Any] | None, what: str) -> None:
    """``got`` (fxcurv) equals ``want`` (BackPACK) parameter by parameter; a variance relative to the
    second moment ``sum_grad_squared / N`` it is a difference of (it vanishes for ``N = 1`` or equal
    per-sample gradients, up to their rounding)."""
    assert list(got) == list(want), f"{what}: parameters {list(got)} != {list(want)}"
    for name, w in want.items():
        g = got[name]
        pairs = list(zip(g.factors, w)) if quantity in KRONECKER else [(g, w)]
        if quantity in KRONECKER:
            assert len(g.factors) == len(w), f"{what} {name}: {len(g.factors)} factors, BackPACK {len(w)}"
        for i, (a, b) in enumerate(pairs):
            assert a.shape == b.shape, f"{what} {name}[{i}]: shape {tuple(a.shape)} != BackPACK's {tuple(b.shape)}"
            if quantity == "variance":
                assert second_moment is not None, "a variance is compared with its second moment"
                scale = max(b.abs().max().item(), second_moment[name].abs().max().item() / N)
                err = (a - b).abs().max().item() / scale
            else:
                err = rel_error(a, b)
            assert err < RTOL, f"{what} {name}[{i}]: relative error {err:.2e}"


def check(name: str, quantities: tuple[str, ...]) -> None:
    problem = PROBLEMS[name]
    model = build(problem)
    x, y = inputs(problem)
    out = run_fxcurv(model, problem, x, y, quantities)
    if any(q in SAMPLED for q in quantities):
        # each sampled extension draws right after the seed in BackPACK: one backward each
        want = {q: v for q0 in quantities for q, v in run_backpack(problem, model, x, y, (q0,)).items()}
    else:
        want = run_backpack(problem, model, x, y, quantities)
    second = (run_backpack(problem, model, x, y, ("sum_grad_squared",))["sum_grad_squared"]
              if "variance" in quantities and "sum_grad_squared" not in quantities else want.get("sum_grad_squared"))
    if "batch_l2_grad" in quantities and "batch_l2_grad" in BACKPACK_WRONG.get(name, ()):
        want["batch_l2_grad"] = batch_l2_from_batch_grad(want["batch_grad"])
    for q in quantities:
        compare(q, out[q], want[q], second, f"{name} {q}")


# ---- the tests ---------------------------------------------------------------------------------

def test_the_table_names_known_problems():
    for table in (BACKPACK_LACKS, FXCURV_GAPS):
        unknown = set(table) - set(PROBLEMS)
        assert not unknown, f"entries for problems that do not exist: {sorted(unknown)}"


@pytest.mark.parametrize(("name", "quantities"), cases(EXACT))
def test_exact_quantities_equal_backpack(name, quantities):
    check(name, quantities)


@pytest.mark.parametrize(("name", "quantities"), cases(SAMPLED))
def test_sampled_quantities_equal_backpack(name, quantities):
    """The Monte Carlo quantities from the same draws: BackPACK draws its targets right after
    ``torch.manual_seed(SEED)``, fxcurv from ``generator=torch.Generator().manual_seed(SEED)``."""
    check(name, quantities)


@pytest.mark.parametrize("name", sorted(BACKPACK_LACKS))
def test_backpack_refuses(name):
    """Each quantity :data:`BACKPACK_LACKS` leaves out is one BackPACK 1.7.1 refuses on the problem."""
    problem = PROBLEMS[name]
    model = build(problem)
    x, y = inputs(problem)
    lack = BACKPACK_LACKS[name]
    for q in sorted(lack.quantities):
        with pytest.raises((NotImplementedError, ValueError), match=lack.match):
            run_backpack(problem, model, x, y, (q,))


@pytest.mark.parametrize("name", sorted(BACKPACK_WRONG))
def test_backpack_is_wrong(name):
    """BackPACK 1.7.1's BatchL2Grad of a grouped convolution's weight is not the squared norm of its own
    BatchGrad (which agrees with torch.func's per-sample gradients and with fxcurv): it contracts the
    output gradient with every input channel's patches, ``sum_{m,k} (sum_p dY_nmp X_nkp)^2``, as if
    ``groups = 1``, where the weight only couples output channel ``m`` with its own group's inputs. The problems of
    :data:`BACKPACK_WRONG` compare fxcurv with ``||grad_batch||^2`` instead. Fails when BackPACK is
    fixed: then drop the entry."""
    problem = PROBLEMS[name]
    model = build(problem)
    x, y = inputs(problem)
    bp = run_backpack(problem, model, x, y, ("batch_grad", "batch_l2_grad"))
    defined = batch_l2_from_batch_grad(bp["batch_grad"])
    errors = {k: rel_error(bp["batch_l2_grad"][k], v) for k, v in defined.items()}
    assert errors["0.weight"] > 1e-2, errors  # the grouped convolution is layer 0 of every such problem
    assert all(e < RTOL for k, e in errors.items() if k != "0.weight"), errors


class Recurrent(nn.Module):
    """A recurrent layer (``batch_first``) and a linear read-out of its last state."""

    def __init__(self, cell: type[nn.Module]):
        super().__init__()
        self.rnn = cell(3, 4, batch_first=True)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(x)
        return self.out(h[:, -1])


@pytest.mark.parametrize("cell", [nn.RNN, nn.LSTM], ids=lambda c: c.__name__)
def test_recurrent_layers_are_exact(cell):
    """BackPACK computes DiagGGN for RNN and LSTM with rules of their own; fxcurv takes them through the
    generic rule (a batch-first recurrent layer treats samples independently): the GGN and Hessian
    diagonals equal torch.func's."""
    import reference as ref

    torch.manual_seed(0)
    model = Recurrent(cell).to(torch.float64)
    x, y, loss = torch.randn(3, 4, 3, dtype=torch.float64), torch.tensor([0, 1, 1]), nn.CrossEntropyLoss()
    out = fxcurv.compile(model, loss, quantities=("diag_ggn", "diag_hessian"))(x, y)
    for quantity, want in (("diag_ggn", ref.diag_ggn(model, loss, x, y)),
                           ("diag_hessian", ref.diag_hessian(model, loss, x, y))):
        for name, value in want.items():
            assert rel_error(out[quantity][name], value) < RTOL, f"{quantity}[{name}]"
