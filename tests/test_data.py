"""Batches adding up to a data set: the weights of fxcurv.data against the loss of the concatenated data."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxcurv
from fxcurv.data import LossReduction, LossScale, batch_weights
from fxcurv.errors import LossError

DT = torch.float64


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5)).to(DT)


def _ce_targets(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 5, (n,), generator=g)


LOSSES = {
    "ce_mean": (nn.CrossEntropyLoss(), _ce_targets),
    "ce_ignore": (nn.CrossEntropyLoss(ignore_index=2), _ce_targets),
    "ce_sum": (nn.CrossEntropyLoss(reduction="sum"), _ce_targets),
    "ce_probabilities": (nn.CrossEntropyLoss(label_smoothing=0.1),
                         lambda n, g: torch.softmax(torch.randn(n, 5, generator=g, dtype=DT), 1)),
    "mse_mean": (nn.MSELoss(), lambda n, g: torch.randn(n, 5, generator=g, dtype=DT)),
    "mse_sum": (nn.MSELoss(reduction="sum"), lambda n, g: torch.randn(n, 5, generator=g, dtype=DT)),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_weighted_batch_losses_equal_the_concatenated_loss(name):
    loss_fn, targets = LOSSES[name]
    model = _model()
    engine = fxcurv.compile(model, loss_fn)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 3, generator=g, dtype=DT), targets(n, g)) for n in (4, 3, 1)]
    weights = batch_weights([engine.loss_scale(x, y) for x, y in batches])
    combined = sum(w * loss_fn(model(x), y) for w, (x, y) in zip(weights, batches))
    x_all, y_all = (torch.cat(t) for t in zip(*batches))
    torch.testing.assert_close(combined, loss_fn(model(x_all), y_all), rtol=1e-12, atol=0)


def test_ignored_targets_are_not_counted():
    engine = fxcurv.compile(_model(), nn.CrossEntropyLoss(ignore_index=2))
    scale = engine.loss_scale(torch.randn(4, 3, dtype=DT), torch.tensor([0, 2, 1, 2]))
    assert scale == LossScale(LossReduction.MEAN, 2.0)


def test_a_general_loss_needs_its_reduction_stated():
    engine = fxcurv.compile(_model(), lambda f, y: ((f - y) ** 2).sum(1).mean())
    x, y = torch.randn(4, 3, dtype=DT), torch.randn(4, 5, dtype=DT)
    with pytest.raises(LossError, match="reduction='mean'"):
        engine.loss_scale(x, y)
    assert engine.loss_scale(x, y, reduction="mean") == LossScale(LossReduction.MEAN, 4.0)
    assert engine.loss_scale(x, y, reduction="sum") == LossScale(LossReduction.SUM)


def test_a_contradicting_reduction_is_refused():
    engine = fxcurv.compile(_model(), nn.MSELoss(reduction="sum"))
    with pytest.raises(LossError, match="contradicts"):
        engine.loss_scale(torch.randn(2, 3, dtype=DT), torch.randn(2, 5, dtype=DT), reduction="mean")


def test_batch_weights_refuse_mixed_reductions_and_nothing_to_average():
    with pytest.raises(ValueError, match="reduce differently"):
        batch_weights([LossScale(LossReduction.MEAN, 2.0), LossScale(LossReduction.SUM)])
    with pytest.raises(ValueError, match="averages over nothing"):
        batch_weights([LossScale(LossReduction.MEAN, 0.0)])
    with pytest.raises(ValueError, match="no batches"):
        batch_weights([])
    assert batch_weights([LossScale(LossReduction.SUM)] * 2) == [1.0, 1.0]
