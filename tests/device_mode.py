"""Run the test suite on another device without editing the tests: ``pytest --device cuda``.

:class:`OnDevice` is a torch function mode that puts every tensor *the tests* make on the target
device. A factory call without a ``device`` (``torch.randn``, ``torch.tensor``, ``torch.zeros``, ...)
runs as written, on the CPU, and its result is moved; an in-place random fill of a tensor already
on the device (``nn.init.kaiming_uniform_``, ``Tensor.normal_``, ...) draws on the CPU and copies in.
So every number a test draws is the one the CPU run draws (CPU generators and ``torch.manual_seed``
keep working, and the statistical bounds measured on the CPU still apply), and the code under test
receives device tensors.

Calls made while fxcurv is on the stack are left alone: fxcurv must place its own tensors (as it
must for a user, who has no such mode), so a factory it calls without ``device`` stays on the CPU
here too. ``torch.set_default_device`` would move those as well, and would reject the tests' CPU
generators (``torch.randn(..., generator=torch.Generator())`` on a CUDA default device raises).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

# Factories that take ``device=``, less the sparse/nested/quantized ones (no test makes them, and
# ``.to(device)`` is not how they move).
_FACTORIES = frozenset(f for f in _device_constructors()
                       if not f.__name__.startswith(("sparse", "nested", "empty_quantized")))

# In-place random fills (the Tensor methods, and the nn.init functions that dispatch as a whole).
_FILLS = frozenset(
    [getattr(torch.Tensor, n) for n in ("uniform_", "normal_", "bernoulli_", "random_", "exponential_",
                                         "cauchy_", "log_normal_", "geometric_")]
    + [getattr(torch.nn.init, n) for n in ("uniform_", "normal_", "kaiming_uniform_")]
)


def fxcurv_dir() -> str:
    """The fxcurv package's directory, found without importing it (importing it early is harmless,
    but the conftest decides ``TRITON_INTERPRET`` first)."""
    spec = importlib.util.find_spec("fxcurv")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("fxcurv is not importable")
    return os.path.join(os.path.realpath(list(spec.submodule_search_locations)[0]), "")


def _cpu_generator(kwargs: dict) -> bool:
    gen = kwargs.get("generator")
    return gen is None or gen.device.type == "cpu"


class OnDevice(TorchFunctionMode):
    """Moves what the tests create to ``device`` (see the module docstring).

    ``skip_callers_in``: directories whose code is left alone when on the stack (fxcurv's).
    ``moved`` counts the calls redirected, ``active`` switches the mode off without leaving the
    mode stack (tests marked ``cpu_only`` run with it off).
    """

    def __init__(self, device: str, skip_callers_in: tuple[str, ...] = ()):
        super().__init__()
        self.device = torch.device(device)
        self.skip_callers_in = tuple(os.path.join(os.path.realpath(d), "") for d in skip_callers_in)
        self.active = True
        self.moved = 0

    def _from_skipped_caller(self) -> bool:
        if not self.skip_callers_in:
            return False
        frame = sys._getframe(2)
        while frame is not None:
            if frame.f_code.co_filename.startswith(self.skip_callers_in):
                return True
            frame = frame.f_back
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.active:
            return func(*args, **kwargs)
        if func in _FACTORIES and kwargs.get("device") is None and "out" not in kwargs:
            if not _cpu_generator(kwargs):
                # a device generator says where to draw (torch would refuse it on the CPU)
                return func(*args, **{**kwargs, "device": kwargs["generator"].device})
            if not self._from_skipped_caller():
                return self._factory(func, args, kwargs)
        elif (func in _FILLS and args and isinstance(args[0], torch.Tensor)
              and args[0].device.type == self.device.type and _cpu_generator(kwargs)
              and not any(isinstance(a, torch.Tensor) for a in args[1:])
              and not self._from_skipped_caller()):
            return self._fill(func, args, kwargs)
        return func(*args, **kwargs)

    def _factory(self, func, args, kwargs):
        requires_grad = kwargs.pop("requires_grad", False)
        out = func(*args, **kwargs)  # the CPU draw of the CPU run
        if isinstance(out, torch.Tensor):
            out = out.to(self.device)
            if requires_grad:
                out.requires_grad_(True)  # a leaf, as the test asked for
        self.moved += 1
        return out

    def _fill(self, func, args, kwargs):
        target = args[0]
        scratch = target.detach().to("cpu", copy=True)
        func(scratch, *args[1:], **kwargs)
        with torch.no_grad():
            target.copy_(scratch)
        self.moved += 1
        return target

    @contextlib.contextmanager
    def off(self):
        """The mode passes everything through inside the block."""
        before, self.active = self.active, False
        try:
            yield
        finally:
            self.active = before
