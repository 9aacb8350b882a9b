"""Fresh result buffers for large per-sample outputs, with transparent huge pages advised on Linux CPUs.

A quantity such as ``batch_grad`` writes far more than it computes: on the MNIST MLP (N = 128) its
per-sample weight gradients are 658 MB, one outer product per entry. Written into fresh memory, the time
goes to the kernel, not the arithmetic: every 4 KiB page faults on its first write and is zeroed. Measured
(one thread, ``[128, 1000, 784]`` float32 outer product): 45 ms into memory already mapped, 320 ms into a
fresh buffer, 100 ms into a fresh buffer advised ``MADV_HUGEPAGE`` (one fault per 2 MiB page).

:func:`fresh` allocates such a result with ``torch.empty`` and, on a Linux CPU whose transparent huge
pages are ``madvise`` or ``always`` (``/sys/kernel/mm/transparent_hugepage/enabled``), advises the
2 MiB-aligned interior of a buffer of at least :data:`MIN_BYTES` before anything touches it. The advice
changes no value and no allocation size (only whole huge pages inside the buffer are advised); where it is
unavailable or refused, the buffer is returned as it is. Where the kernel's THP ``defrag`` setting is
``madvise`` (the default), a fault in an advised range compacts memory when no free huge page is at hand,
which can cost more than it saves on a fragmented machine: ``fxcurv.buffers.HUGE_PAGES = False`` turns the
advice off. (torch's own switch for this, ``THP_MEM_ALLOC_ENABLE=1``, applies to every allocation of the
process and must be set before torch allocates anything, so a library cannot use it.)
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import is_fake

HUGE_PAGE = 2 << 20
# Whether fresh() advises huge pages at all (module docstring).
HUGE_PAGES = True
# Below this a buffer has at most a few huge pages: not worth a system call.
MIN_BYTES = 16 << 20
_MADV_HUGEPAGE = 14  # linux/mman.h
_THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    """libc's ``madvise`` where transparent huge pages can be advised, else ``None``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        setting = _THP_SETTING.read_text()
    except OSError:  # no THP support in this kernel, or /sys not mounted
        return None
    if "[never]" in setting:
        return None
    fn = ctypes.CDLL(None, use_errno=True).madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def huge_page_span(address: int, nbytes: int) -> tuple[int, int]:
    """``(start, length)`` of the whole 2 MiB pages inside ``[address, address + nbytes)`` (length 0 if none)."""
    start = -(-address // HUGE_PAGE) * HUGE_PAGE
    end = (address + nbytes) // HUGE_PAGE * HUGE_PAGE
    return start, max(end - start, 0)


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Advise transparent huge pages for the storage of the CPU tensor ``t`` (before its first write);
    whether the advice was given."""
    fn = _madvise()
    if fn is None or t.device.type != "cpu" or is_fake(t):  # shape propagation runs rules on fake tensors
        return False
    start, length = huge_page_span(t.data_ptr(), t.untyped_storage().nbytes())
    return length > 0 and fn(start, length, _MADV_HUGEPAGE) == 0


def fresh(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialized contiguous result buffer; huge pages advised where large (module docstring)."""
    t = torch.empty(tuple(shape), dtype=dtype, device=device)
    # Under torch.compile (the inductor backend) buffers are the compiler's: nothing to advise, and no
    # system call to trace.
    if HUGE_PAGES and not torch.compiler.is_compiling() and t.numel() * t.element_size() >= MIN_BYTES:
        advise_huge_pages(t)
    return t
