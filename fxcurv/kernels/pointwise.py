"""Running a pointwise program: its generated Triton kernel on CUDA tensors, its torch path otherwise.

A fused elementwise node of the curvature program is one call ``pointwise(program, inputs)``. Two
ways to run it, always with the same meaning:

* the torch path (:mod:`.torch_path`) runs the graph op by op -- the reference semantics;
  intermediates that die are overwritten in place, which gives bitwise the same numbers with fewer
  allocations;
* the Triton path launches one kernel (:mod:`.codegen`) over the output's flat index space. Inputs
  are tensors whose shape is a suffix of the output shape (a ``[N, D]`` derivative against
  ``[K, N, D]`` factor columns is read at ``offset % (N*D)``) or Python scalars.

This module decides which runs (:func:`~fxcurv.kernels.runtime.use_triton`), plans a launch from the
inputs (:class:`~fxcurv.kernels.codegen.PointwiseSpec`: what varies between launches of one program)
and compiles one kernel per program and spec (:func:`pointwise_kernel`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.fx as fx

from .cache import cached_kernel
from .codegen import PointwiseSpec, to_triton_source
from .program import PointwiseProgram
from .runtime import (
    FLAT_BLOCK,
    INTERPRETER_MAX_FLAT_BLOCK,
    LAUNCHES,
    NotFusible,
    cdiv,
    flat_block,
    interpreting,
    is_suffix,
    use_triton,
)
from .torch_path import run_torch

__all__ = ["pointwise", "pointwise_kernel"]

# Warps per program on a GPU (the interpreter runs one).
_GPU_WARPS = 4
# From this many elements on, offsets are 64-bit: the last block's offsets (up to a block past
# ``numel``) must not overflow int32.
_INT64_NUMEL = 2**31 - max(INTERPRETER_MAX_FLAT_BLOCK, FLAT_BLOCK)


def pointwise_kernel(program: PointwiseProgram, spec: PointwiseSpec | None = None) -> Any:
    """The compiled (``@triton.jit``) kernel of ``program`` under ``spec``, cached per
    ``(program.key(), spec)``: equal programs share one kernel."""
    resolved = PointwiseSpec.dense(program) if spec is None else spec
    return cached_kernel((program.key(), resolved, interpreting()), lambda: to_triton_source(program, resolved),
                         "pw")


class _LaunchPlan(NamedTuple):
    """One launch of a pointwise kernel: its spec, its arguments (inputs, outputs, sizes), the
    outputs to return (inputs passed through included) and the size of the index space."""

    spec: PointwiseSpec
    args: list[Any]
    outputs: list[Any]
    numel: int


def _input_problem(inputs: Sequence[Any]) -> str | None:
    """Why ``inputs`` cannot be a kernel's arguments, or ``None``."""
    tensors = [a for a in inputs if isinstance(a, torch.Tensor)]
    if not tensors:
        return "no tensor input"
    device = tensors[0].device
    for a in inputs:
        if isinstance(a, torch.Tensor):
            if a.device != device:
                return "inputs on different devices"
            if not a.dtype.is_floating_point:
                return f"input of dtype {a.dtype}"
            if not a.is_contiguous():
                return "a non-contiguous input"
        elif isinstance(a, bool) or not isinstance(a, (int, float)):
            return f"input of type {type(a).__name__}"
    return None


def _launch_plan(program: PointwiseProgram, inputs: Sequence[Any]) -> _LaunchPlan | str:
    """The launch of ``program`` on ``inputs`` (outputs allocated), or a string saying why the inputs
    do not fit a kernel."""
    problem = _input_problem(inputs)
    if problem is not None:
        return problem
    tensors = [a for a in inputs if isinstance(a, torch.Tensor)]
    device = tensors[0].device
    meta = program.meta(inputs)
    if meta is None:
        return "torch cannot run the program on these inputs"
    try:
        full = tuple(torch.broadcast_shapes(*[a.shape for a in tensors]))
    except RuntimeError:
        return "inputs do not broadcast"
    numel = math.prod(full)
    out_meta = [meta[o] for o in program.output_nodes]
    if any(m is None for m in out_meta):
        return "an output is not a tensor"
    dtypes = [a.dtype for a in tensors] + [m[1] for m in out_meta if m is not None]
    compute = "float64" if torch.float64 in dtypes else "float32"
    in_spec: list[str] = []
    args: list[Any] = []
    extra: list[int] = []
    for i, a in enumerate(inputs):
        if not isinstance(a, torch.Tensor):
            if compute == "float64":
                # kernels take Python floats as float32 arguments; keep float64 values exact
                args.append(torch.tensor(float(a), dtype=torch.float64, device=device))
                in_spec.append("one")
            else:
                args.append(float(a))
                in_spec.append("scalar")
            continue
        if not is_suffix(tuple(a.shape), full):
            return f"input {i} of shape {tuple(a.shape)} is not a suffix of {full}"
        args.append(a)
        n = a.numel()
        if n == numel:
            in_spec.append("full")
        elif n == 1:
            in_spec.append("one")
        else:
            in_spec.append("bcast")
            extra.append(n)
    out_spec: list[str] = []
    outs: list[Any] = []
    out_args: list[torch.Tensor] = []
    out_extra: list[int] = []
    made: dict[fx.Node, torch.Tensor] = {}
    for o, m in zip(program.output_nodes, out_meta):
        assert m is not None  # checked above
        shape, dtype = m
        if o.op == "placeholder":
            out_spec.append("skip")
            outs.append(inputs[program.input_nodes.index(o)])
            continue
        if o in made:
            out_spec.append("skip")
            outs.append(made[o])
            continue
        if not (dtype.is_floating_point or dtype == torch.bool):
            return f"output of dtype {dtype}"
        if not is_suffix(shape, full):
            return f"output of shape {shape} is not a suffix of {full}"
        t = torch.empty(shape, dtype=dtype, device=device)
        made[o] = t
        outs.append(t)
        out_args.append(t)
        if t.numel() == numel:
            out_spec.append("full")
        else:
            out_spec.append("prefix")
            out_extra.append(t.numel())
    spec = PointwiseSpec(tuple(in_spec), tuple(out_spec), compute, numel >= _INT64_NUMEL)
    return _LaunchPlan(spec, args + out_args + [numel] + extra + out_extra, outs, numel)


def pointwise(program: PointwiseProgram, inputs: Sequence[Any], force: str | None = None,
              owned: frozenset[int] = frozenset()) -> tuple[Any, ...]:
    """Run ``program`` on ``inputs``: Triton on CUDA tensors, the torch graph otherwise.

    ``owned``: positions of inputs the caller will not read again (fresh buffers at their last use);
    the torch path may write results into them instead of allocating, which on the CPU also saves
    the page faults of fresh large allocations.

    Triton path: one kernel, outputs allocated contiguous with the broadcast shape of the inputs.
    Inputs that do not fit it (non-contiguous, non-float, broadcasting other than by a shape suffix,
    mixed devices) and programs with an unsupported op run the torch graph instead -- unless
    ``force="triton"``, which raises :class:`NotFusible` so that tests never pass by falling back.
    """
    inputs = list(inputs)
    if len(inputs) != program.n_inputs:
        raise TypeError(f"program takes {program.n_inputs} inputs, got {len(inputs)}")
    tensors = [a for a in inputs if isinstance(a, torch.Tensor)]
    if not use_triton(tensors, force):
        return run_torch(program, inputs, owned)
    plan = _launch_plan(program, inputs)
    if isinstance(plan, str):
        if force == "triton":
            raise NotFusible(f"cannot run on the Triton path: {plan}")
        return run_torch(program, inputs, owned)
    try:
        kernel = pointwise_kernel(program, plan.spec)
    except NotFusible:
        if force == "triton":
            raise
        return run_torch(program, inputs, owned)
    if plan.numel:
        block = flat_block(plan.numel)
        grid = (cdiv(plan.numel, block),)
        kernel[grid](*plan.args, BLOCK=block, num_warps=1 if interpreting() else _GPU_WARPS)
        LAUNCHES["pointwise"] += 1
    return tuple(plan.outputs)
