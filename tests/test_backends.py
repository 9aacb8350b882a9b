"""Every backend gives the same numbers (README "Backends"): the unfused program run op by op
(``eager``), handed to ``torch.compile`` (``inductor``), and the fused program (``fused``).

One graph with every op family whose messages alias or are views: padding (its transposed Jacobian
is a crop, a view), max-pooling (a scatter at saved indices), a residual block (both branches get the
same message), a convolution used twice (a shared weight), and every quantity in one program.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from torch import nn

import fxcurv

QUANTITIES = ("hesscale", "hesscale_gn", "diag_ggn", "diag_hessian")


class _ConvResidual(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, h):
        return h + torch.tanh(self.conv(h))


class _ConvTwice(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, h):
        return torch.sigmoid(self.conv(torch.tanh(self.conv(h))))


def _cnn(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Sigmoid(), nn.ZeroPad2d((1, 0, 0, 1)), nn.MaxPool2d(2, stride=1),
                          _ConvResidual(3), _ConvTwice(3), nn.Flatten(), nn.Linear(3 * 5 * 5, 4))
    x, y = torch.randn(3, 2, 7, 7, dtype=dtype), torch.tensor([0, 3, 1])
    return model.to(dtype).eval(), x, y


def _results(backend, model, x, y, quantities=QUANTITIES):
    engine = fxcurv.compile(model, nn.CrossEntropyLoss(), quantities=quantities, backend=backend, seed=0)
    engine(x, y)
    return engine(x, y)


def _assert_agree(actual, expected, quantities, rtol):
    assert torch.allclose(actual.loss, expected.loss, rtol=rtol, atol=0)
    for q in ("grad",) + quantities:
        assert_close(actual[q], expected[q], rtol=rtol, what=q)


def test_fused_and_eager_agree_on_every_quantity():
    model, x, y = _cnn(torch.float64)
    quantities = QUANTITIES + ("diag_ggn_mc",)  # one seed: the same draws
    eager = _results("eager", model, x, y, quantities)
    _assert_agree(_results("fused", model, x, y, quantities), eager, quantities, rtol=1e-10)


def test_fused_and_eager_agree_in_float32():
    model, x, y = _cnn(torch.float32)
    _assert_agree(_results("fused", model, x, y), _results("eager", model, x, y), QUANTITIES, rtol=1e-5)


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-6)])
def test_inductor_and_eager_agree_on_every_quantity(dtype, rtol):
    """torch.compile sees the same unfused program as eager; it compiles for seconds, so one graph."""
    model, x, y = _cnn(dtype)
    _assert_agree(_results("inductor", model, x, y), _results("eager", model, x, y), QUANTITIES, rtol=rtol)
