"""Generated kernel source to an imported module, once per source and process.

``triton.jit`` reads a kernel's source file (for its AST and line numbers), so generated code cannot
simply be ``exec``-ed: each source is written under :func:`cache_dir`, named by its hash, and
imported from there (:func:`load_source`). :func:`cached_kernel` adds the step before: the source is
generated once per key, and a :class:`~fxcurv.kernels.runtime.NotFusible` raised while generating it
is remembered, so that a program that cannot become a kernel is tried once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Hashable
from types import ModuleType
from typing import Any

from .runtime import NotFusible, interpreting, triton_available

__all__ = ["CACHE_VARIABLE", "cache_dir", "cached_kernel", "load_source"]

# Overrides where generated modules are written (default: the user's cache directory).
CACHE_VARIABLE = "FXCURV_KERNEL_CACHE"

# Hex digits of a source's SHA-256 in its module name: unique among any cache's kernels, short
# enough for readable file names.
_DIGEST_CHARS = 20

# Guards both tables below; re-entrant because cached_kernel holds it while it calls load_source.
_LOCK = threading.RLock()
# (source digest, interpreter or jit) -> module: Triton binds the mode when a kernel is defined.
_MODULES: dict[tuple[str, str], ModuleType] = {}
# cached_kernel's key -> the kernel, or the NotFusible its source generation raised.
_KERNELS: dict[Hashable, Any | NotFusible] = {}


def cache_dir() -> str:
    """Where generated kernel modules are written: ``$FXCURV_KERNEL_CACHE``, else
    ``$XDG_CACHE_HOME/fxcurv/kernels`` (``~/.cache``), else a per-user temporary directory when that
    one is not writable."""
    d = os.environ.get(CACHE_VARIABLE)
    if not d:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        d = os.path.join(base, "fxcurv", "kernels")
    try:
        os.makedirs(d, exist_ok=True)
        if not os.access(d, os.W_OK):
            raise OSError(d)
    except OSError:
        user = os.getuid() if hasattr(os, "getuid") else 0
        d = os.path.join(tempfile.gettempdir(), f"fxcurv-kernels-{user}")
        os.makedirs(d, exist_ok=True)
    return d


def load_source(source: str, prefix: str = "k") -> ModuleType:
    """Import generated source as a module (written once under :func:`cache_dir`, named by its hash);
    the same source always gives the same module object within a process."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:_DIGEST_CHARS]
    key = (digest, "interp" if interpreting() else "jit")
    with _LOCK:
        mod = _MODULES.get(key)
        if mod is not None:
            return mod
        if not triton_available():
            raise RuntimeError("triton is not installed")
        name = f"fxcurv_gen_{prefix}_{digest}"
        path = os.path.join(cache_dir(), name + ".py")
        _write_if_changed(path, source)
        mod = _import_file(name, path)
        _MODULES[key] = mod
        return mod


def _write_if_changed(path: str, source: str) -> None:
    try:
        with open(path) as f:
            same = f.read() == source
    except OSError:
        same = False
    if not same:
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "w") as f:
            f.write(source)
        os.replace(tmp, path)  # atomic: concurrent processes never import half a file


def _import_file(name: str, path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import the generated kernel module {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(name, None)  # no half-initialized module left behind; the error propagates
        raise
    return mod


def cached_kernel(key: Hashable, source: Callable[[], str], prefix: str) -> Any:
    """The ``kernel`` of the module compiled from ``source()``, once per ``key``; a
    :class:`NotFusible` raised while generating the source is cached too (and raised again), so a
    program is tried once."""
    with _LOCK:
        hit = _KERNELS.get(key)
        if hit is None:
            try:
                hit = load_source(source(), prefix).kernel
            except NotFusible as e:
                hit = e
            _KERNELS[key] = hit
    if isinstance(hit, NotFusible):
        raise hit
    return hit
