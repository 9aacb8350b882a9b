"""fxcurv as laplace-torch's curvature backend against laplace-torch's BackPACK and curvlinops backends
(float64).

For an MLP classifier and an MLP regressor fitted on a DataLoader of three batches (4, 4 and 2
samples: laplace sums the batches itself), ``Laplace(..., backend=fxcurv.laplace.Backend)`` has the
posterior precision (dense), the accumulated loss, ``log_marginal_likelihood()`` and GLM predictive
of ``BackPackGGN`` and ``CurvlinopsGGN`` to relative error < 1e-8, for ``hessian_structure="diag"``
(the exact GGN diagonal) and ``"kron"`` (KFLR: BackPACK's ``KFLR``, curvlinops' ``FisherType.TYPE2``).
``stochastic=True`` is checked in expectation against the exact diagonal and KFLR; unsupported settings are
refused with errors that say so.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import rel_error
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

laplace = pytest.importorskip("laplace", reason="laplace-torch (and its imports) not installed")

from fxcurv.errors import InputError  # noqa: E402
from fxcurv.laplace import Backend, UnsupportedSettingError  # noqa: E402  (imports laplace)

DT = torch.float64
RTOL = 1e-8
SAMPLES, BATCH = 10, 4
PRIOR_PRECISION = 0.7
SIGMA_NOISE = 0.8


def problem(likelihood: str) -> tuple[nn.Module, DataLoader]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(5)
    if likelihood == "classification":
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
        x = torch.randn(SAMPLES, 4, dtype=DT, generator=g)
        y = torch.randint(0, 3, (SAMPLES,), generator=g)
    else:
        model = nn.Sequential(nn.Linear(3, 5), nn.Sigmoid(), nn.Linear(5, 2)).to(DT)
        x = torch.randn(SAMPLES, 3, dtype=DT, generator=g)
        y = torch.randn(SAMPLES, 2, dtype=DT, generator=g)
    return model, DataLoader(TensorDataset(x, y), batch_size=BATCH)


def fitted(backend, likelihood: str, structure: str, **backend_kwargs):
    model, loader = problem(likelihood)
    kw = {"sigma_noise": SIGMA_NOISE} if likelihood == "regression" else {}
    la = laplace.Laplace(copy.deepcopy(model), likelihood, subset_of_weights="all", hessian_structure=structure,
                         backend=backend, prior_precision=PRIOR_PRECISION, backend_kwargs=backend_kwargs or None,
                         **kw)
    with warnings.catch_warnings():
        # BackPACK's "Full backward hook is firing when gradients are computed with respect to module
        # outputs since no inputs require gradients": the first layer's input is data; expected.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        la.fit(loader)
    return la


def precision(la) -> torch.Tensor:
    P = la.posterior_precision
    return P if isinstance(P, torch.Tensor) else P.to_matrix()


def predictive(la, likelihood: str) -> tuple[torch.Tensor, ...]:
    """The GLM predictive at fixed test inputs: class probabilities (probit link), or the mean and
    variance of the regression output."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(5, la.model[0].in_features, dtype=DT, generator=g)
    out = la(x, pred_type="glm")
    return (out,) if likelihood == "classification" else tuple(out)


# BackPACK's Jacobians (its backend's predictive): the same expected hook warning as in fitted()
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("structure", ["diag", "kron"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_equals_laplace_backends(likelihood, structure):
    from laplace.curvature import BackPackGGN, CurvlinopsGGN

    mine = fitted(Backend, likelihood, structure)
    P, lml, loss = precision(mine), mine.log_marginal_likelihood(), torch.as_tensor(mine.loss)
    assert P.shape[0] == sum(p.numel() for p in mine.model.parameters())
    for reference in (BackPackGGN, CurvlinopsGGN):
        theirs = fitted(reference, likelihood, structure)
        what = f"{reference.__name__} {likelihood} {structure}"
        err = rel_error(P, precision(theirs))
        assert err < RTOL, f"{what}: posterior precision, relative error {err:.2e}"
        err = rel_error(loss, torch.as_tensor(theirs.loss))
        assert err < RTOL, f"{what}: loss, relative error {err:.2e}"
        err = rel_error(lml, theirs.log_marginal_likelihood())
        assert err < RTOL, f"{what}: log marginal likelihood, relative error {err:.2e}"
        for a, b in zip(predictive(mine, likelihood), predictive(theirs, likelihood)):
            err = rel_error(a, b)
            assert err < RTOL, f"{what}: GLM predictive, relative error {err:.2e}"


def test_kron_factors_are_laplaces():
    """The Kronecker factors themselves (before laplace decomposes them): ``[G, A]`` per weight and
    ``[G]`` per bias in laplace's order, summed over the batches, equal BackPACK's backend's."""
    from laplace.curvature import BackPackGGN

    mine, theirs = fitted(Backend, "classification", "kron"), fitted(BackPackGGN, "classification", "kron")
    assert len(mine.H_facs.kfacs) == len(theirs.H_facs.kfacs) == 4
    for i, (a, b) in enumerate(zip(mine.H_facs.kfacs, theirs.H_facs.kfacs)):
        assert len(a) == len(b), f"block {i}: {len(a)} factors, expected {len(b)}"
        for j, (u, v) in enumerate(zip(a, b)):
            assert u.shape == v.shape and rel_error(u, v) < RTOL, f"block {i} factor {j}"


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_stochastic_in_expectation(structure):
    """``stochastic=True`` (diag_ggn_mc, kfac) with many Monte Carlo columns approaches the exact
    diagonal and KFLR's output factors; KFAC's input factors are KFLR's (not sampled)."""
    exact = fitted(Backend, "classification", structure)
    mc = fitted(Backend, "classification", structure, stochastic=True, num_samples=20000, seed=0)
    if structure == "diag":
        pairs = [(mc.H, exact.H)]
    else:
        pairs = [(a[0], b[0]) for a, b in zip(mc.H_facs.kfacs, exact.H_facs.kfacs)]
        for a, b in zip(mc.H_facs.kfacs, exact.H_facs.kfacs):
            assert len(a) == len(b) and (len(a) == 1 or rel_error(a[1], b[1]) < 1e-12)
    for i, (a, b) in enumerate(pairs):
        err = rel_error(a, b)
        assert 0 < err < 0.05, f"{structure} {i}: Monte Carlo vs exact, relative error {err:.3f} (drawn: > 0)"


def test_refuses_unsupported_settings():
    model, loader = problem("classification")
    la = laplace.Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure="diag",
                         backend=Backend)
    with pytest.raises(UnsupportedSettingError, match="last-layer"):
        la.fit(loader)
    backend = Backend(model, "classification")
    x, y = next(iter(loader))
    with pytest.raises(InputError, match="one class index per sample"):
        backend.diag(x, y[:, None])
    with pytest.raises(UnsupportedSettingError, match="mc_samples"):
        backend.kron(x, y, N=SAMPLES, mc_samples=3)
    with pytest.raises(ValueError, match="positive integer"):
        backend.kron(x, y, N=0)


def test_kron_of_transposed_convolution_is_refused():
    """A transposed convolution's factors split weight.transpose(0, 1) (KroneckerLayout.TRANSPOSED), which
    laplace's Kron would read as weight.reshape(shape[0], -1): refused, naming the parameter; diag works."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose1d(2, 3, 2), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)).to(DT)
    x, y = torch.randn(4, 2, 3, dtype=DT), torch.tensor([0, 2, 1, 1])
    backend = Backend(model, "classification")
    with pytest.raises(UnsupportedSettingError, match=r"0\.weight.*transpose\(0, 1\)"):
        backend.kron(x, y, N=SAMPLES)
    _, diagonal = backend.diag(x, y)
    assert diagonal.numel() == sum(p.numel() for p in model.parameters())
