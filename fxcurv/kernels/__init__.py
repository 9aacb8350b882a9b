"""Kernels for the fused curvature program: Triton on CUDA tensors, torch references everywhere else.

Three kernel families, each beside its torch reference:

* :mod:`.pointwise` -- elementwise kernels generated from fx graphs of rule functions (derivative
  epilogues: ``phi'``, ``phi''``, ``v * phi'``, HesScale's ``d phi'^2 + g phi''``), built from
  :mod:`.program` (the programs), :mod:`.torch_path` (their torch reference) and :mod:`.codegen`
  (their Triton source, over the op vocabulary of :mod:`.vocabulary`);
* :mod:`.matmul` -- ``epilogue(a @ b, *extras)``: the product with a (squared) weight and the
  activation rules in front of it in one kernel (HBP B.4 / Botev eq. 29, HesScale eq. 4);
* :mod:`.reductions` -- a linear layer's parameter reductions over its input ``x``: ``g^T x`` and
  ``d^T x^2`` or ``(sum_k S_k^2)^T x^2`` in one pass (HesScale eq. 2, 5; HBP eq. S.8c).

All share :mod:`.runtime` (the dispatch rule, :class:`NotFusible`, launch counters) and :mod:`.cache`
(generated source to an imported module). Every entry point takes ``force="triton" | "torch" | None``.
``None`` runs Triton when an input is a CUDA tensor (and triton imports), torch otherwise; tests force
Triton on CPU tensors under ``TRITON_INTERPRET=1``. Triton is imported lazily: on a machine without it
the torch paths work.
"""

from .cache import cache_dir, load_source
from .codegen import KernelValue, PointwiseSpec, emit_program, to_triton_source
from .matmul import MatmulSpec, matmul_epilogue, matmul_kernel, matmul_source, matmul_torch

# The function shadows its submodule: ``kernels.pointwise(...)`` runs a program.
from .pointwise import pointwise, pointwise_kernel
from .program import (
    Input,
    PointwiseProgram,
    ProgramBuilder,
    Step,
    StepResult,
    check_fusible,
    compose,
    program_from_nodes,
    trace_pointwise,
)
from .reductions import (
    column_square_sum,
    column_square_sum_torch,
    dual_gram,
    dual_gram_torch,
)
from .runtime import LAUNCHES, NotFusible, triton_available, use_triton

__all__ = [
    "NotFusible", "PointwiseProgram", "PointwiseSpec", "ProgramBuilder", "Input", "StepResult", "Step",
    "KernelValue", "trace_pointwise", "compose", "check_fusible", "to_triton_source", "emit_program",
    "pointwise", "pointwise_kernel", "program_from_nodes", "load_source", "cache_dir", "triton_available", "use_triton",
    "LAUNCHES", "MatmulSpec", "matmul_epilogue", "matmul_torch", "matmul_source", "matmul_kernel",
    "column_square_sum", "column_square_sum_torch", "dual_gram", "dual_gram_torch",
]
