"""Test configuration.

Triton reads ``TRITON_INTERPRET`` when a ``@triton.jit`` function is *defined*, so it is set here,
before any kernel module is imported: CI has no GPU, and the interpreter runs every kernel on CPU
tensors.
"""

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

import fxcurv.passes.pipeline  # noqa: E402

# Every program the tests build is linted after every pass.
fxcurv.passes.pipeline.CHECK = True
