"""Matrix products with a generated pointwise epilogue: a message through a linear layer and the
activation in front of it in one kernel.

Backpropagating through ``z = phi(x)``, ``y = z W^T`` takes a product with the weight followed by
elementwise factors of ``phi``:

* every gradient and square-root factor column: ``(V W) * phi'(x)`` -- HBP eq. S.8a then S.9, the
  ``W^T [g; S]`` product of the activation+linear composite (HBP B.4, Botev eq. 29);
* HesScale (eq. 4-5): ``((W o W)^T d) * phi'(x)^2 + (W^T g) * phi''(x)``, the squared weight being
  squared on the fly (``square_b=True``) instead of stored.

Without fusion the product is written to memory and read back by each elementwise rule;
:func:`matmul_epilogue` applies the rules (a :class:`~fxcurv.kernels.program.PointwiseProgram`)
to the accumulator tile while it is still in registers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from .cache import cached_kernel
from .codegen import KernelValue, emit_program, module_source
from .program import PointwiseProgram
from .runtime import LAUNCHES, NotFusible, cdiv, dot_precision, interpreting, is_suffix, next_pow2, use_triton
from .torch_path import run_torch

__all__ = ["MatmulResult", "MatmulSpec", "matmul_epilogue", "matmul_kernel", "matmul_params", "matmul_source",
           "matmul_torch"]

# Operand dtypes tl.dot multiplies (float64 is not one of them: it runs the torch path).
_TL_DOT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The product, or a tuple of the epilogue's outputs when it has several.
MatmulResult = torch.Tensor | tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class MatmulSpec:
    """How the epilogue's extra inputs are read, per extra: ``"full"`` (shaped like the output),
    ``"bcast"`` (``[..., Nout]``, a proper suffix: output row ``r`` reads row ``r % rows``), ``"row"``
    (``[Nout]``), ``"one"`` (one element) or ``"scalar"`` (a Python number); ``n_outputs`` of the
    epilogue (1 without one)."""

    extras: tuple[str, ...] = ()
    n_outputs: int = 1


def matmul_params(spec: MatmulSpec) -> list[str]:
    """The parameters of the kernel :func:`matmul_source` writes for ``spec``, in order (less the
    constexprs)."""
    ps = ["a_ptr", "b_ptr"]
    ps += [f"e{i}" if s == "scalar" else f"e{i}_ptr" for i, s in enumerate(spec.extras)]
    ps += [f"out{j}_ptr" for j in range(spec.n_outputs)]
    ps += ["M", "N", "K", "stride_am", "stride_ak", "stride_bk", "stride_bn"]
    ps += [f"rows_e{i}" for i, s in enumerate(spec.extras) if s == "bcast"]
    return ps


def matmul_source(epilogue: PointwiseProgram | None, spec: MatmulSpec) -> str:
    """The module source of a tiled ``tl.dot`` kernel (float32 accumulation) computing
    ``epilogue(A @ B, *extras)`` for ``A [M, K]`` and ``B [K, N]`` (any strides), ``B`` optionally
    squared elementwise as it is loaded. The epilogue code comes from
    :func:`~fxcurv.kernels.codegen.emit_program` applied to the accumulator tile."""
    body = [
        "pid = tl.program_id(0)",
        "num_pid_m = tl.cdiv(M, BLOCK_M)",
        "num_pid_n = tl.cdiv(N, BLOCK_N)",
        # grouped launch order: consecutive programs share columns of B in L2
        "group = GROUP_M * num_pid_n",
        "first_m = (pid // group) * GROUP_M",
        "size_m = tl.minimum(num_pid_m - first_m, GROUP_M)",
        "pid_m = first_m + ((pid % group) % size_m)",
        "pid_n = (pid % group) // size_m",
        "rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)",
        "rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)",
        "rk = tl.arange(0, BLOCK_K)",
        "a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak",
        "b_ptrs = b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn",
        "acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)",
        "for k0 in range(0, tl.cdiv(K, BLOCK_K)):",
        "    k_left = K - k0 * BLOCK_K",
        "    a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < k_left), other=0.0)",
        "    b = tl.load(b_ptrs, mask=(rk[:, None] < k_left) & (rn[None, :] < N), other=0.0)",
        "    if SQUARE_B:",
        "        b = b * b",
        "    acc = tl.dot(a, b, acc, input_precision=PRECISION)",
        "    a_ptrs += BLOCK_K * stride_ak",
        "    b_ptrs += BLOCK_K * stride_bk",
        "mask = (rm[:, None] < M) & (rn[None, :] < N)",
        "offs = rm[:, None] * N + rn[None, :]",
    ]
    values = [KernelValue("acc", "f", True)]
    for i, s in enumerate(spec.extras):
        if s == "full":
            body.append(f"x{i} = tl.load(e{i}_ptr + offs, mask=mask, other=0).to(tl.float32)")
        elif s == "bcast":
            body.append(f"x{i} = tl.load(e{i}_ptr + (rm % rows_e{i})[:, None] * N + rn[None, :], mask=mask, "
                        "other=0).to(tl.float32)")
        elif s == "row":
            body.append(f"x{i} = tl.load(e{i}_ptr + rn, mask=rn < N, other=0).to(tl.float32)[None, :]")
        elif s == "one":
            body.append(f"x{i} = tl.load(e{i}_ptr).to(tl.float32)")
        elif s == "scalar":
            body.append(f"x{i} = e{i}")
        else:
            raise ValueError(f"extra spec {s!r}")
        values.append(KernelValue(f"x{i}", "f", s not in ("one", "scalar")))
    if epilogue is None:
        outs = [values[0]]
    else:
        lines, outs = emit_program(epilogue, values, "float32", prefix="t")
        body += lines
    for j, v in enumerate(outs):
        val = v.expr
        if not v.tensor:
            raise NotFusible("an epilogue output that does not depend on the product")
        if v.kind == "b":
            raise NotFusible("a boolean epilogue output")
        # a value computed from a [1, BLOCK_N] row only still covers the whole tile
        body.append(f"tl.store(out{j}_ptr + offs, tl.broadcast_to({val}, (BLOCK_M, BLOCK_N))"
                    f".to(out{j}_ptr.dtype.element_ty), mask=mask)")
    params = ", ".join(matmul_params(spec) + [
        "SQUARE_B: tl.constexpr", "PRECISION: tl.constexpr", "BLOCK_M: tl.constexpr",
        "BLOCK_N: tl.constexpr", "BLOCK_K: tl.constexpr", "GROUP_M: tl.constexpr"])
    return module_source(f"def kernel({params}):", body, epilogue)


def matmul_kernel(epilogue: PointwiseProgram | None, spec: MatmulSpec) -> Any:
    """The compiled kernel of :func:`matmul_source`, cached per ``(epilogue.key(), spec)``."""
    key = ("mm", None if epilogue is None else epilogue.key(), spec, interpreting())
    return cached_kernel(key, lambda: matmul_source(epilogue, spec), "mm")


def _config(M: int, N: int, K: int) -> dict[str, int]:
    if interpreting():
        # the interpreter pays per program and per loop step, not per element
        return dict(BLOCK_M=min(max(next_pow2(M), 16), 128), BLOCK_N=min(max(next_pow2(N), 16), 128),
                    BLOCK_K=min(max(next_pow2(K), 16), 128), GROUP_M=8, num_warps=4)
    bm = 128 if M >= 2048 else 64
    bn = min(max(next_pow2(N), 32), 128)
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=32, GROUP_M=8, num_warps=4 if bm * bn <= 64 * 64 else 8,
                num_stages=3)


def _finish(outs: Sequence[torch.Tensor], epilogue: PointwiseProgram | None) -> MatmulResult:
    return outs[0] if epilogue is None or epilogue.n_outputs == 1 else tuple(outs)


# The torch path forms a product with an epilogue whole up to this size (bytes); a larger one is formed
# and finished a chunk of rows (dim -2) at a time into its output, so that the epilogue's temporaries
# (an activation's derivative ``[N, D]`` beside the ``[K, N, D]`` bundle, 17 MiB for the MNIST MLP's
# first layer at N = 4500) are a chunk's, not the whole output's.
EPILOGUE_WHOLE_BYTES = 16 << 20
# Entries of one chunk's product (1 MiB in float32): the chunk is a temporary beside the output, so it
# must be smaller than the whole epilogue's temporaries it replaces (a [N, D] derivative: 0.7 M entries
# for the MNIST MLP's first layer at N = 700; a 4 MiB chunk raised that exact setting's measured peak
# from 123.2 to 128.9 MiB, this one lowers it to 122.6 MiB, and the Monte Carlo one at N = 4761 from
# 136.2 to 120.5 MiB).
EPILOGUE_CHUNK_ELEMENTS = 1 << 18
# Chunks of fewer rows than this are not worth it: with many leading columns (diag_hessian's residual
# bundles [K = 1000, N, D]) a chunk of one or two rows is a strided slice of every column, whose copies and
# small products made the MNIST MLP's diag_hessian 4x slower; such products are formed whole.
EPILOGUE_MIN_ROWS = 16


def matmul_torch(a: torch.Tensor, b: torch.Tensor, epilogue: PointwiseProgram | None = None,
                 extras: Sequence[Any] = (), *, trans_b: bool = False, square_b: bool = False) -> MatmulResult:
    """The reference: ``a @ op(b)`` with torch, then the epilogue, which may overwrite the fresh
    product (one multiply becomes ``out.mul_(extra)``: no second buffer). A product above
    :data:`EPILOGUE_WHOLE_BYTES` is finished in chunks of rows (:func:`_matmul_torch_rows`)."""
    bb = b.t() if trans_b else b
    if square_b:
        bb = bb * bb
    if epilogue is not None and _row_chunks(a, bb, extras):
        return _finish(_matmul_torch_rows(a, bb, epilogue, extras), epilogue)
    out = torch.matmul(a, bb)
    if epilogue is None:
        return out
    return _finish(run_torch(epilogue, [out, *extras], owned=frozenset({0})), epilogue)


def _row_chunks(a: torch.Tensor, bb: torch.Tensor, extras: Sequence[Any]) -> bool:
    """Whether the product ``a @ bb`` is finished in chunks of rows: above :data:`EPILOGUE_WHOLE_BYTES`,
    ``a`` with rows (``[..., R, K]``), no autograd history, and every tensor extra a suffix-shaped
    operand whose rows (dim -2, where it has two dims or more) are the product's."""
    if a.dim() < 2 or bb.dim() != 2 or torch.is_grad_enabled() and (a.requires_grad or bb.requires_grad):
        return False
    numel = math.prod(a.shape[:-1]) * bb.shape[1]
    if numel * a.element_size() <= EPILOGUE_WHOLE_BYTES:
        return False
    rows = a.shape[-2]
    if _rows_per_chunk(a, bb) < EPILOGUE_MIN_ROWS:
        return False
    for e in extras:
        if not isinstance(e, torch.Tensor):
            continue
        if e.requires_grad and torch.is_grad_enabled():
            return False
        if e.dim() > a.dim() or (e.dim() >= 2 and e.shape[-2] != rows):
            return False
    return True


def _rows_per_chunk(a: torch.Tensor, bb: torch.Tensor) -> int:
    """Rows (dim -2) of ``a @ bb`` per chunk: :data:`EPILOGUE_CHUNK_ELEMENTS` entries of the product."""
    per_row = math.prod(a.shape[:-2]) * bb.shape[1]
    return max(1, EPILOGUE_CHUNK_ELEMENTS // max(1, per_row))


def _matmul_torch_rows(a: torch.Tensor, bb: torch.Tensor, epilogue: PointwiseProgram,
                       extras: Sequence[Any]) -> list[torch.Tensor]:
    """``epilogue(a @ bb, *extras)`` a chunk of rows ``r0:r1`` (dim -2 of the product and of the extras
    with two dims or more) at a time: each chunk's product is fresh (the epilogue may overwrite it)
    and its results are copied into the outputs, allocated on the first chunk."""
    rows = a.shape[-2]
    step = _rows_per_chunk(a, bb)
    outs: list[torch.Tensor] = []
    for r0 in range(0, rows, step):
        r = slice(r0, min(rows, r0 + step))
        part = torch.matmul(a[..., r, :], bb)
        chunk = [e[..., r, :] if isinstance(e, torch.Tensor) and e.dim() >= 2 else e for e in extras]
        results = run_torch(epilogue, [part, *chunk], owned=frozenset({0}))
        if not outs:
            shape = tuple(a.shape[:-1]) + (bb.shape[1],)
            outs = [torch.empty(shape, dtype=t.dtype, device=t.device) for t in results]
        for out, t in zip(outs, results):
            out[..., r, :].copy_(t)
    return outs


class _MatmulPlan(NamedTuple):
    """One launch of a matmul kernel: its spec, its arguments, the outputs and ``(M, N, K)``."""

    spec: MatmulSpec
    args: list[Any]
    outputs: list[torch.Tensor]
    sizes: tuple[int, int, int]


def _launch_plan(a: torch.Tensor, b: torch.Tensor, epilogue: PointwiseProgram | None, extras: Sequence[Any],
                 trans_b: bool) -> _MatmulPlan | str:
    """The launch of ``epilogue(a @ op(b), *extras)`` (outputs allocated), or a string saying why
    the operands do not fit the kernel."""
    if a.dim() < 1 or b.dim() != 2:
        return "a must be [..., K] and b a matrix"
    if a.dtype != b.dtype or a.dtype not in _TL_DOT_DTYPES:
        return f"operand dtypes {a.dtype}, {b.dtype}"
    if a.device != b.device:
        return "operands on different devices"
    K = a.shape[-1]
    bk, N = (b.shape[1], b.shape[0]) if trans_b else (b.shape[0], b.shape[1])
    if bk != K:
        raise ValueError(f"shapes {tuple(a.shape)} and {tuple(b.shape)} (trans_b={trans_b}) do not multiply")
    out_shape = tuple(a.shape[:-1]) + (N,)
    M = math.prod(a.shape[:-1])
    if K == 0:
        return "empty contraction"
    a2 = a.reshape(M, K)
    sb = (b.stride(1), b.stride(0)) if trans_b else (b.stride(0), b.stride(1))
    ex_spec: list[str] = []
    ex_args: list[Any] = []
    rows: list[int] = []
    for i, e in enumerate(extras):
        if not isinstance(e, torch.Tensor):
            if isinstance(e, bool) or not isinstance(e, (int, float)):
                return f"extra {i} of type {type(e).__name__}"
            ex_spec.append("scalar")
            ex_args.append(float(e))
            continue
        if e.device != a.device:
            return f"extra {i} on another device"
        if not e.dtype.is_floating_point or e.dtype == torch.float64:
            return f"extra {i} of dtype {e.dtype}"
        if e.numel() == 1:
            ex_spec.append("one")
        elif not is_suffix(tuple(e.shape), out_shape):
            return f"extra {i} of shape {tuple(e.shape)} is not a suffix of the output shape {out_shape}"
        elif e.numel() == M * N:
            ex_spec.append("full")
        elif e.numel() == N:
            ex_spec.append("row")
        else:
            ex_spec.append("bcast")
            rows.append(e.numel() // N)
        # a copy of an extra costs less than leaving the product unfused
        ex_args.append(e.contiguous())
    out_dtypes: list[torch.dtype] = []
    if epilogue is None:
        out_dtypes.append(torch.promote_types(a.dtype, b.dtype))
    else:
        if epilogue.n_inputs != 1 + len(extras):
            raise TypeError(f"epilogue takes {epilogue.n_inputs} inputs: the product and "
                            f"{epilogue.n_inputs - 1} extras; got {len(extras)} extras")
        acc = torch.empty(out_shape, dtype=torch.promote_types(a.dtype, b.dtype), device="meta")
        meta = epilogue.meta([acc, *extras])
        if meta is None:
            return "torch cannot run the epilogue on these inputs"
        for o in epilogue.output_nodes:
            m = meta[o]
            if m is None or m[0] != out_shape:
                return f"epilogue output {o.name} is not shaped like the product"
            if not m[1].is_floating_point or m[1] == torch.float64:
                return f"epilogue output of dtype {m[1]}"
            out_dtypes.append(m[1])
    outs = [torch.empty(out_shape, dtype=dt, device=a.device) for dt in out_dtypes]
    spec = MatmulSpec(tuple(ex_spec), len(outs))
    args = [a2, b, *ex_args, *outs, M, N, K, a2.stride(0), a2.stride(1), sb[0], sb[1], *rows]
    return _MatmulPlan(spec, args, outs, (M, N, K))


def matmul_epilogue(a: torch.Tensor, b: torch.Tensor, epilogue: PointwiseProgram | None = None,
                    extras: Sequence[torch.Tensor | float] = (), *, trans_b: bool = False,
                    square_b: bool = False, force: str | None = None) -> MatmulResult:
    """``epilogue(a @ op(b), *extras)`` in one kernel: HBP B.4 / Botev eq. 29's
    ``(W^T [g; S]) * phi'(x)`` and HesScale eq. 4's ``((W o W)^T d) * phi'(x)^2 + ...``.

    ``a``: ``[..., K]`` (leading dims are the rows ``M``: factor columns and samples), ``b``:
    ``[K, Nout]``, or ``[Nout, K]`` with ``trans_b=True``; ``square_b=True`` uses ``b o b`` (the
    squared weight of HesScale eq. 4, squared as it is loaded). ``epilogue``'s input 0 is the product
    ``[..., Nout]``, the others are ``extras``: tensors whose shapes are suffixes of the output shape
    (a ``[N, D]`` derivative against ``[K, N, D]`` products: row ``r`` of the flattened output reads
    row ``r % N``) or Python numbers. Returns a tensor, or a tuple for a multi-output epilogue.

    Triton path (CUDA, or ``force="triton"``): float32/float16/bfloat16 operands of one dtype, float32
    accumulation, ``tl.dot`` in TF32 only where ``torch.backends.cuda.matmul.allow_tf32`` says so.
    Anything else (float64, unfusible epilogues, broadcasting other than by suffix) runs
    :func:`matmul_torch`; ``force="triton"`` raises :class:`NotFusible` instead.
    """
    extras = list(extras)
    tensors = [a, b] + [e for e in extras if isinstance(e, torch.Tensor)]
    if not use_triton(tensors, force):
        return matmul_torch(a, b, epilogue, extras, trans_b=trans_b, square_b=square_b)
    plan = _launch_plan(a, b, epilogue, extras, trans_b)
    if isinstance(plan, str):
        if force == "triton":
            raise NotFusible(f"cannot run on the Triton path: {plan}")
        return matmul_torch(a, b, epilogue, extras, trans_b=trans_b, square_b=square_b)
    spec, args, outs, (M, N, K) = plan
    try:
        kernel = matmul_kernel(epilogue, spec)
    except NotFusible:
        if force == "triton":
            raise
        return matmul_torch(a, b, epilogue, extras, trans_b=trans_b, square_b=square_b)
    if M and N:
        cfg = _config(M, N, K)
        grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),)
        kernel[grid](*args, SQUARE_B=square_b, PRECISION=dot_precision(a.dtype), **cfg)
        LAUNCHES["matmul"] += 1
    return _finish(outs, epilogue)
