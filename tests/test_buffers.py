"""fxcurv.buffers: the huge-page span of a buffer, and the advice given exactly where it can be."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fxcurv import buffers

MB2 = buffers.HUGE_PAGE


@pytest.mark.parametrize(("address", "nbytes", "expected"), [
    (0, 3 * MB2, (0, 3 * MB2)),  # aligned: every page
    (100, 3 * MB2, (MB2, 2 * MB2)),  # unaligned start: the partial pages at both ends left out
    (MB2 - 1, MB2 + 1, (MB2, MB2)),
    (1, MB2, (MB2, 0)),  # no whole huge page inside
])
def test_huge_page_span_is_the_whole_pages_inside(address, nbytes, expected):
    start, length = buffers.huge_page_span(address, nbytes)
    assert (start, length) == expected
    assert start % MB2 == 0 and length % MB2 == 0
    assert length == 0 or (start >= address and start + length <= address + nbytes)


def _thp_advisable() -> bool:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return sys.platform.startswith("linux") and path.exists() and "[never]" not in path.read_text()


def test_fresh_buffers_and_the_advice():
    small = buffers.fresh((3, 4), torch.float64, torch.device("cpu"))
    assert small.shape == (3, 4) and small.dtype == torch.float64 and small.is_contiguous()
    big = buffers.fresh((buffers.MIN_BYTES // 4 + 5,), torch.float32, torch.device("cpu"))
    assert big.is_contiguous() and big.numel() * 4 >= buffers.MIN_BYTES
    assert buffers.advise_huge_pages(big) == _thp_advisable()
    with FakeTensorMode():
        fake = torch.empty(buffers.MIN_BYTES, dtype=torch.uint8)
    assert not buffers.advise_huge_pages(fake)


def test_the_advice_can_be_turned_off(monkeypatch):
    given: list[int] = []
    monkeypatch.setattr(buffers, "advise_huge_pages", lambda t: given.append(t.numel()) or True)
    n = buffers.MIN_BYTES // 4
    buffers.fresh((n,), torch.float32, torch.device("cpu"))
    buffers.fresh((n - 1,), torch.float32, torch.device("cpu"))  # below the size: no advice
    monkeypatch.setattr(buffers, "HUGE_PAGES", False)
    buffers.fresh((n,), torch.float32, torch.device("cpu"))
    assert given == [n]
