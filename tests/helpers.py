"""Comparison helpers shared by the tests."""

from __future__ import annotations

import torch


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |a - e| / max |e|`` (absolute where ``e`` vanishes)."""
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    return err / scale if scale > 0 else err


def assert_close(actual: dict, expected: dict, rtol: float = 1e-6, what: str = "") -> None:
    """Every tensor of ``expected`` matches ``actual`` (same keys, shapes) to relative error ``rtol``."""
    assert set(actual) == set(expected), f"{what}: keys {sorted(actual)} != {sorted(expected)}"
    for name, e in expected.items():
        a = actual[name]
        assert a.shape == e.shape, f"{what} {name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        err = rel_error(a, e)
        assert err < rtol, f"{what} {name}: relative error {err:.3e} >= {rtol:.0e}"
