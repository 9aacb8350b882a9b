"""What every kernel family shares when it runs: the choice between Triton and torch, and the
arithmetic of a launch.

Triton is optional (``import fxcurv`` works without it, e.g. on macOS): it is imported on first
need, and every entry point -- pointwise programs, matmul epilogues, parameter reductions -- decides
by one rule, :func:`use_triton`, whether a call runs its generated kernel or its torch reference.
:class:`NotFusible` is how any of them says "not on the Triton path"; :data:`LAUNCHES` counts
launches so that tests can tell which path ran.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence

import torch

__all__ = [
    "FLAT_BLOCK", "INTERPRETER_MAX_FLAT_BLOCK", "LAUNCHES", "NotFusible", "cdiv", "dot_precision",
    "flat_block", "interpreting", "is_suffix", "next_pow2", "triton_available", "use_triton",
]


class NotFusible(Exception):
    """A program (or its inputs) cannot become a Triton kernel; keep the unfused nodes."""


# Kernel launches per kind ("pointwise", "matmul", ...): lets tests assert the Triton path ran.
LAUNCHES: Counter[str] = Counter()

# Triton reads this variable when a kernel is *defined*: set, its interpreter runs kernels on CPU
# tensors (numpy), which is how CI without a GPU tests them.
_INTERPRET_VARIABLE = "TRITON_INTERPRET"

# Elements per program of a kernel over a flat index space, on a GPU.
FLAT_BLOCK = 1024
# Under the interpreter, which pays per program and not per element, one block covers the tensor, up
# to this many elements.
INTERPRETER_MAX_FLAT_BLOCK = 1 << 16
# The smallest flat block launched (blocks are powers of two: tl.arange needs one).
_MIN_BLOCK = 16

_triton_importable: bool | None = None


def triton_available() -> bool:
    """Whether ``import triton`` works. Imported lazily so that ``import fxcurv`` never needs it."""
    global _triton_importable
    if _triton_importable is None:
        try:
            import triton  # noqa: F401
        except ImportError:
            _triton_importable = False
        else:
            _triton_importable = True
    return _triton_importable


def interpreting() -> bool:
    """Whether Triton's interpreter runs the kernels (on CPU tensors) instead of a GPU."""
    return os.environ.get(_INTERPRET_VARIABLE, "0") not in ("", "0")


def use_triton(tensors: Sequence[torch.Tensor], force: str | None) -> bool:
    """The dispatch rule shared by every kernel: Triton for CUDA tensors, torch otherwise.

    ``force="triton"`` runs the kernel whatever the device (CPU tensors need ``TRITON_INTERPRET=1``);
    ``force="torch"`` runs the reference. Unforced, inputs that need gradients (grad mode on) stay
    on torch: the kernels are forward-only.
    """
    if force == "torch":
        return False
    if force == "triton":
        if not triton_available():
            raise RuntimeError("force='triton' but triton cannot be imported")
        return True
    if force is not None:
        raise ValueError(f"force must be 'triton', 'torch' or None, not {force!r}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False  # the kernels have no backward; torch ops keep the autograd graph
    return any(t.is_cuda for t in tensors) and triton_available()


def next_pow2(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``): block sizes must be powers of two."""
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for a launch grid: the number of blocks of ``b`` covering ``a`` elements."""
    return -(-a // b)


def flat_block(numel: int) -> int:
    """Elements per program of a kernel over ``numel`` flat elements."""
    if interpreting():
        return min(next_pow2(max(numel, _MIN_BLOCK)), INTERPRETER_MAX_FLAT_BLOCK)
    return FLAT_BLOCK


def dot_precision(dtype: torch.dtype) -> str | None:
    """``tl.dot``'s input precision: follow torch's own TF32 switch, so kernel and reference agree."""
    if dtype != torch.float32:
        return None
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def is_suffix(shape: Sequence[int], full: Sequence[int]) -> bool:
    """Whether ``shape`` is a suffix of ``full``: the only broadcasting the kernels read (flat
    offset ``i`` of the output reads element ``i % numel`` of the input)."""
    return len(shape) <= len(full) and tuple(full[len(full) - len(shape):]) == tuple(shape)
