"""engine.accumulate: batches of unequal sizes combine into the result of one call on their concatenation.

The reference is the engine itself on the concatenated batch (every quantity there is checked against
torch.func and BackPACK elsewhere): what is tested is the weighting and each quantity's combination.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from architectures import Residual, SharedTwice
from torch import nn

import fxcurv
from fxcurv.data import batch_weights
from fxcurv.errors import InputError, LossError, NotCombinableError
from fxcurv.operators import BlockOperator, Kronecker

DT = torch.float64
SIZES = (4, 3, 1)

# Every registered quantity whose data-set value is a function of the batches' values (exactly).
EXACT = ("diag_ggn", "diag_hessian", "hesscale", "hesscale_gn", "kflr", "block_ggn", "block_hessian",
         "batch_grad", "batch_l2_grad", "sum_grad_squared", "variance", "batch_diag_ggn", "sqrt_ggn")
MONTE_CARLO = ("diag_ggn_mc", "kfac", "batch_diag_ggn_mc", "sqrt_ggn_mc")
REFUSED = ("kfra", "hbp_hessian", "hbp_pch_abs", "hbp_pch_clip", "ggn_eigen", "ggn_eigen_mc")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5)).to(DT)


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(2 * 3 * 3, 5)).to(DT)


def _classes(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 5, (n,), generator=g)


def _real(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(n, 5, generator=g, dtype=DT)


def _log_cosh(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A loss outside the closed forms: the general path, averaged over the samples."""
    return torch.log(torch.cosh(f - y)).sum(1).mean()


# name: (loss, targets, reduction passed to accumulate)
LOSSES: dict[str, tuple[Callable[..., Any], Callable[[int, torch.Generator], torch.Tensor], str | None]] = {
    "ce_mean": (nn.CrossEntropyLoss(), _classes, None),
    "ce_ignore_index": (nn.CrossEntropyLoss(ignore_index=2), _classes, None),
    "mse_mean": (nn.MSELoss(), _real, None),
    "mse_sum": (nn.MSELoss(reduction="sum"), _real, None),
    "general_mean": (_log_cosh, _real, "mean"),
}


def _batches(targets: Callable[[int, torch.Generator], torch.Tensor], sizes: tuple[int, ...] = SIZES,
             shape: tuple[int, ...] = (3,)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn((n,) + shape, generator=g, dtype=DT), targets(n, g)) for n in sizes]


def _concatenated(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*batches)
    return torch.cat(xs), torch.cat(ys)


def assert_same(got: Any, expected: Any, where: str) -> None:
    """Equal to rtol 1e-10 (atol 1e-14 for entries that vanish): tensors, Kronecker factors, blocks as matrices."""
    if isinstance(expected, Kronecker):
        assert isinstance(got, Kronecker) and len(got.factors) == len(expected.factors), where
        assert got.param_shape == expected.param_shape and got.layout is expected.layout, where
        for a, b in zip(got.factors, expected.factors):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14, msg=lambda m: f"{where}: {m}")
        return
    if isinstance(expected, BlockOperator):
        assert isinstance(got, BlockOperator), where
        got, expected = got.to_dense(), expected.to_dense()
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-14, msg=lambda m: f"{where}: {m}")


def assert_results_equal(got: fxcurv.Result, expected: fxcurv.Result, quantities: tuple[str, ...]) -> None:
    assert_same(got.loss, expected.loss, "loss")
    assert list(got) == list(expected)
    for q in ("grad",) + quantities:
        assert list(got[q]) == list(expected[q]), q
        for name in expected[q]:
            assert_same(got[q][name], expected[q][name], f"{q}[{name}]")


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_accumulate_equals_the_concatenated_batch(loss_name):
    loss_fn, targets, reduction = LOSSES[loss_name]
    engine = fxcurv.compile(_mlp(), loss_fn, quantities=EXACT)
    batches = _batches(targets)
    got = engine.accumulate(batches, reduction=reduction)
    assert_results_equal(got, engine(*_concatenated(batches)), EXACT)


def test_accumulate_on_a_convolution_equals_the_concatenated_batch():
    """Kronecker input factors of a convolution (summed over positions, averaged over samples), its
    per-sample rules and HesScale's diagonals through it."""
    quantities = ("diag_ggn", "hesscale", "kflr", "batch_grad", "batch_l2_grad", "sum_grad_squared", "variance",
                  "sqrt_ggn")
    engine = fxcurv.compile(_cnn(), nn.CrossEntropyLoss(), quantities=quantities)
    batches = _batches(_classes, shape=(1, 5, 5))
    assert_results_equal(engine.accumulate(iter(batches)), engine(*_concatenated(batches)), quantities)


def test_accumulate_on_a_transposed_convolution_keeps_its_kronecker_layout():
    """A transposed convolution's factors (of weight.transpose(0, 1)) combine like a convolution's and keep
    KroneckerLayout.TRANSPOSED."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.ConvTranspose2d(1, 2, 2, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(72, 5)).to(DT)
    engine = fxcurv.compile(model, nn.CrossEntropyLoss(), quantities=("kflr",))
    batches = _batches(_classes, shape=(1, 3, 3))
    got = engine.accumulate(iter(batches))
    assert got["kflr"]["0.weight"].layout is fxcurv.KroneckerLayout.TRANSPOSED
    assert_results_equal(got, engine(*_concatenated(batches)), ("kflr",))


def test_accumulate_on_residual_and_tied_weights_equals_the_concatenated_batch():
    """Parameters used twice (per-sample sums over uses, mixed Hessian terms) and a skip connection."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), Residual(4, "tanh"), SharedTwice(4, "sigmoid"), nn.Linear(4, 5)).to(DT)
    quantities = ("diag_hessian", "block_hessian", "batch_l2_grad", "sum_grad_squared", "batch_diag_ggn", "sqrt_ggn")
    engine = fxcurv.compile(model, nn.MSELoss(), quantities=quantities)
    batches = _batches(_real)
    assert_results_equal(engine.accumulate(batches), engine(*_concatenated(batches)), quantities)


def test_a_batch_whose_targets_are_all_ignored_weighs_nothing():
    engine = fxcurv.compile(_mlp(), nn.CrossEntropyLoss(ignore_index=2), quantities=("diag_ggn", "batch_grad"))
    batches = _batches(_classes)
    batches[1] = (batches[1][0], torch.full_like(batches[1][1], 2))
    assert_results_equal(engine.accumulate(batches), engine(*_concatenated(batches)), ("diag_ggn", "batch_grad"))


@pytest.mark.parametrize("loss_name", ["ce_mean", "mse_sum"])
def test_monte_carlo_quantities_combine_each_batchs_draws(loss_name):
    """With the same draws per batch (one seeded generator, batch after batch), the data-set value is
    ``sum_b w_b Q_b`` (``batch_weights``), per-sample values scaled by ``w_b`` (``sqrt(w_b)`` for square-root
    factors) and concatenated; Kronecker ``A`` factors averaged over all samples."""
    loss_fn, targets, _ = LOSSES[loss_name]
    batches = _batches(targets)
    engine = fxcurv.compile(_mlp(), loss_fn, quantities=MONTE_CARLO, mc_samples=3)
    got = engine.accumulate(batches, generator=torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)
    parts = [engine(x, y, generator=generator) for x, y in batches]
    w = batch_weights([engine.loss_scale(x, y) for x, y in batches])
    n = [x.shape[0] for x, _ in batches]
    for name in parts[0]["diag_ggn_mc"]:
        assert_same(got["diag_ggn_mc"][name], sum(wb * p["diag_ggn_mc"][name] for wb, p in zip(w, parts)), name)
        assert_same(got["batch_diag_ggn_mc"][name],
                    torch.cat([wb * p["batch_diag_ggn_mc"][name] for wb, p in zip(w, parts)]), name)
        assert_same(got["sqrt_ggn_mc"][name],
                    torch.cat([wb ** 0.5 * p["sqrt_ggn_mc"][name] for wb, p in zip(w, parts)], 1), name)
        factors = [p["kfac"][name].factors for p in parts]
        expected = (sum(wb * f[0] for wb, f in zip(w, factors)),)
        if len(factors[0]) == 2:
            expected += (sum(nb * f[1] for nb, f in zip(n, factors)) / sum(n),)
        assert_same(got["kfac"][name], Kronecker(expected, parts[0]["kfac"][name].param_shape), name)


def test_weights_differ_from_a_naive_mean():
    """The 4-and-3 example: the batches' mean loss is off, the accumulated one is not."""
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    engine = fxcurv.compile(model, loss_fn)
    batches = _batches(_classes, sizes=(4, 3))
    naive = sum(engine(x, y).loss for x, y in batches) / 2
    exact = engine(*_concatenated(batches)).loss
    assert abs(naive - exact) > 1e-3 * abs(exact)
    assert_same(engine.accumulate(batches).loss, exact, "loss")


def _untouched(batches: list[Any], seen: list[int]) -> Iterator[Any]:
    for i, b in enumerate(batches):
        seen.append(i)
        yield b


@pytest.mark.parametrize("quantity", REFUSED)
def test_quantities_without_an_exact_combination_are_refused_before_any_batch(quantity):
    engine = fxcurv.compile(_mlp(), nn.CrossEntropyLoss(), quantities=(quantity,))
    seen: list[int] = []
    with pytest.raises(NotCombinableError, match=f"^{quantity} cannot be accumulated"):
        engine.accumulate(_untouched(_batches(_classes), seen))
    assert seen == []


def test_bad_loaders_are_refused():
    engine = fxcurv.compile(_mlp(), nn.CrossEntropyLoss())
    with pytest.raises(InputError, match="no batches"):
        engine.accumulate([])
    x, y = _batches(_classes)[0]
    with pytest.raises(InputError, match=r"batch 1 of the loader is a tuple of 3 items"):
        engine.accumulate([(x, y), (x, y, y)])
    with pytest.raises(InputError, match="distributed=True"):
        engine.accumulate([(x, y)], distributed=True)
    general = fxcurv.compile(_mlp(), _log_cosh)
    with pytest.raises(LossError, match="reduction='mean'"):
        general.accumulate(_batches(_real))
    ignored = fxcurv.compile(_mlp(), nn.CrossEntropyLoss(ignore_index=2))
    with pytest.raises(InputError, match="averages over nothing"):
        ignored.accumulate([(x, torch.full_like(y, 2))])


def test_progress_bar(monkeypatch):
    pytest.importorskip("tqdm")
    engine = fxcurv.compile(_mlp(), nn.CrossEntropyLoss())
    batches = _batches(_classes)
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    engine.accumulate(batches)  # progress=None: not a terminal, no bar
    assert err.getvalue() == ""
    engine.accumulate(batches, progress=True)
    assert "fxcurv.accumulate" in err.getvalue() and "3/3" in err.getvalue()


def test_a_torch_data_loader():
    """A DataLoader's batches (lists [x, y], the last one smaller), with its length for the progress default."""
    x, y = _concatenated(_batches(_classes))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=3)
    engine = fxcurv.compile(_mlp(), nn.CrossEntropyLoss(), quantities=("diag_ggn", "variance"))
    assert_results_equal(engine.accumulate(loader), engine(x, y), ("diag_ggn", "variance"))


def test_a_data_parallel_wrapper_is_compiled_as_its_module():
    """The wrapper's forward is not traced; results are keyed by the wrapped module's parameter names."""
    model = _mlp()
    x, y = _concatenated(_batches(_classes))
    wrapped = fxcurv.compile(nn.DataParallel(model), nn.CrossEntropyLoss(), quantities=("diag_ggn",))(x, y)
    plain = fxcurv.compile(model, nn.CrossEntropyLoss(), quantities=("diag_ggn",))(x, y)
    assert list(wrapped.grad) == [name for name, _ in model.named_parameters()]
    assert_results_equal(wrapped, plain, ("diag_ggn",))


def test_the_default_combination_of_a_quantity():
    """A quantity shaped like the parameter sums with the loss weights; any other must declare its own."""

    class Shaped(fxcurv.Quantity):
        name, description = "shaped", "a sum over samples shaped like the parameter"

    class Other(fxcurv.Quantity):
        name, description, shaped_like_parameter = "other", "something else", False

    from fxcurv.quantities.combine import BatchShare, DataSetTotal

    acc = Shaped().accumulator()
    acc.add(torch.ones(2, dtype=DT), BatchShare(4.0, 4, {}))
    acc.add(torch.full((2,), 3.0, dtype=DT), BatchShare(2.0, 2, {}))
    torch.testing.assert_close(acc.result(DataSetTotal(6.0, 6)), torch.full((2,), (4 + 6) / 6, dtype=DT))
    with pytest.raises(NotCombinableError, match="^other cannot be accumulated.*declares no combination"):
        Other().accumulator()
