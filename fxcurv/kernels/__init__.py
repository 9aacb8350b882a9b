"""Kernels for the fused curvature program: Triton on CUDA tensors, torch references everywhere else.

* :mod:`.pointwise` -- elementwise kernels generated from fx graphs of rule functions (derivative
  epilogues: ``phi'``, ``phi''``, ``v * phi'``, HesScale's ``d phi'^2 + g phi''``);
* :mod:`.matmul` -- ``epilogue(a @ b, *extras)``: the product with a (squared) weight and the
  activation rules in front of it in one kernel (HBP B.4 / Botev eq. 29, HesScale eq. 4);
* :mod:`.reductions` -- a linear layer's parameter reductions over its input ``x``: ``g^T x`` and
  ``d^T x^2`` or ``(sum_k S_k^2)^T x^2`` in one pass (HesScale eq. 2, 5; HBP eq. S.8c).

Every entry point takes ``force="triton" | "torch" | None``. ``None`` runs Triton when an input is a
CUDA tensor (and triton imports), torch otherwise; tests force Triton on CPU tensors under
``TRITON_INTERPRET=1``. Triton is imported lazily: on a machine without it the torch paths work.
"""

from .matmul import MatmulSpec, matmul_epilogue, matmul_kernel, matmul_source, matmul_torch
from .pointwise import (
    LAUNCHES,
    Input,
    KernelValue,
    NotFusible,
    PointwiseProgram,
    PointwiseSpec,
    ProgramBuilder,
    Result,
    Step,
    cache_dir,
    check_fusible,
    compose,
    emit_program,
    load_source,
    pointwise,
    pointwise_kernel,
    program_from_nodes,
    to_triton_source,
    trace_pointwise,
    triton_available,
    use_triton,
)
from .reductions import (
    column_square_sum,
    column_square_sum_torch,
    dual_gram,
    dual_gram_torch,
)

__all__ = [
    "NotFusible", "PointwiseProgram", "PointwiseSpec", "ProgramBuilder", "Input", "Result", "Step",
    "KernelValue", "trace_pointwise", "compose", "check_fusible", "to_triton_source", "emit_program",
    "pointwise", "pointwise_kernel", "program_from_nodes", "load_source", "cache_dir", "triton_available", "use_triton",
    "LAUNCHES", "MatmulSpec", "matmul_epilogue", "matmul_torch", "matmul_source", "matmul_kernel",
    "column_square_sum", "column_square_sum_torch", "dual_gram", "dual_gram_torch",
]
