"""Timing and CPU peak-memory measurement."""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

from torch.profiler import ProfilerActivity, profile


@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ start/stop chatter) for the block."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(fd, 2)
            os.close(fd)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def peak_memory(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """CPU peak of memory allocated during one call of ``fn``, relative to the start, in bytes.

    ``torch.profiler`` with ``profile_memory=True`` records one ``[memory]`` event per allocation
    (positive bytes) and per free (negative bytes) made through c10's CPU allocator (every tensor,
    including inductor's buffers). The events are summed in time order; the running maximum is the
    peak, the final sum what the call left allocated (its outputs). Frees of blocks allocated before
    the profiler started are not reported, so the peak is never underestimated by them.
    Returns ``(peak_bytes, retained_bytes, fn's result)``.
    """
    with quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
            out = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    cur = peak = 0
    for _, b in events:
        cur += b
        peak = max(peak, cur)
    return float(peak), float(cur), out


def self_test() -> dict:
    """Checks ``peak_memory`` on known allocation patterns; returns the measured MB (expected 8, 12)."""
    import torch

    def seq():
        a = torch.empty(1 << 20)  # 4 MiB
        del a
        b = torch.empty(2 << 20)  # 8 MiB
        del b

    def both():
        a = torch.empty(1 << 20)
        b = torch.empty(2 << 20)
        return a, b

    p1, _, _ = peak_memory(seq)
    p2, _, _ = peak_memory(both)
    return {"sequential_4_then_8_MiB": p1 / 2**20, "simultaneous_4_and_8_MiB": p2 / 2**20,
            "ok": abs(p1 / 2**20 - 8) < 0.01 and abs(p2 / 2**20 - 12) < 0.01}


def summarize(times: list[float]) -> dict:
    if not times:
        return {}
    ts = sorted(times)
    q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
    return {"median_s": statistics.median(ts), "min_s": ts[0], "max_s": ts[-1], "q1_s": q[0], "q3_s": q[2],
            "n": len(ts)}
