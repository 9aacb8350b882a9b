"""``pytest --device cuda``: the mode that moves the tests' tensors (tests/device_mode.py), checked on
the CPU with the CPU as its target, and what the GPU run must show (Triton kernels in the fused
program)."""

from __future__ import annotations

import os

import pytest
import torch
from device_mode import OnDevice, fxcurv_dir
from torch import nn

import fxcurv
from fxcurv.kernels import LAUNCHES

ITSELF = "tests the mode itself, with the CPU as its target device"


def _draws():
    torch.manual_seed(0)
    lin = nn.Linear(3, 4)
    conv = nn.Conv2d(2, 3, 3)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, generator=gen)
    y = torch.randint(0, 4, (2,), generator=gen)
    t = torch.empty(5).normal_(0.0, 2.0)
    leaf = torch.tensor([1.0, 2.0], requires_grad=True)
    return [lin.weight, lin.bias, conv.weight, conv.bias, x, y, t, leaf]


@pytest.mark.cpu_only(reason=ITSELF)
def test_the_tests_draw_the_cpu_numbers():
    """Factories (with CPU generators or the global seed) and nn.init fills give what the CPU gives."""
    plain = _draws()
    mode = OnDevice("cpu")
    with mode:
        moved = _draws()
    assert mode.moved >= len(plain)
    for a, b in zip(plain, moved):
        assert torch.equal(a, b)
    leaf = moved[-1]
    assert leaf.is_leaf and leaf.requires_grad


@pytest.mark.cpu_only(reason=ITSELF)
def test_callers_in_skipped_directories_are_left_alone():
    mode = OnDevice("cpu", skip_callers_in=(os.path.dirname(__file__),))
    with mode:
        torch.zeros(3)
        nn.Linear(2, 2)
    assert mode.moved == 0


@pytest.mark.cpu_only(reason=ITSELF)
def test_switched_off():
    mode = OnDevice("cpu")
    with mode:
        with mode.off():
            torch.ones(2)
        assert mode.moved == 0
        torch.ones(2)
    assert mode.moved == 1


def test_fxcurv_dir_is_the_package():
    assert fxcurv_dir() == os.path.join(os.path.realpath(os.path.dirname(fxcurv.__file__)), "")


@pytest.mark.cuda_only(reason="the fused program launches Triton kernels on CUDA tensors only")
def test_fused_program_runs_triton_kernels():
    """float32 MLP (the kernels' dtype): products with epilogues, parameter reductions and pointwise
    kernels all launch, and the numbers are the unfused program's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 16), nn.Sigmoid(), nn.Linear(16, 5))
    x, y = torch.randn(64, 20), torch.randint(0, 5, (64,))
    assert x.is_cuda and next(model.parameters()).is_cuda
    quantities = ("diag_ggn", "hesscale")
    fused = fxcurv.compile(model, nn.CrossEntropyLoss(), quantities=quantities)
    fused(x, y)  # the first call records shapes and fuses
    before = LAUNCHES.copy()
    out = fused(x, y)
    launched = {k: LAUNCHES[k] - before[k] for k in LAUNCHES if LAUNCHES[k] > before[k]}
    assert launched.get("matmul", 0) > 0 and launched.get("dual_gram", 0) > 0, launched
    eager = fxcurv.compile(model, nn.CrossEntropyLoss(), quantities=quantities, backend="eager")(x, y)
    for q in ("grad",) + quantities:
        for name, e in eager[q].items():
            torch.testing.assert_close(out[q][name], e, rtol=1e-4, atol=1e-6 * e.abs().max().item())
