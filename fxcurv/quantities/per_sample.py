"""Per-sample quantities (BackPACK's first-order extensions and per-sample curvature), shared parts.

Sample ``n``'s share of the gradient is ``J_n^T g_n``: ``g`` at an op's output carries the loss's
reduction, so with a mean the shares include its ``1/N`` and sum to the gradient (BackPACK's scaling).
Likewise ``J_n^T S_kn`` for the factor columns ``S`` of the loss Hessian (the reduction's scale inside
``S``) are the columns of sample ``n``'s GGN, ``sum_k (J_n^T S_kn)(J_n^T S_kn)^T`` (HBP eq. S.6-S.8).

* A parameter one op uses gets the op's per-sample rules (``per_sample``, or ``batch_l2`` and
  ``batch_diag_sqrt``, which never form ``[N, *param]`` products where the op has a shortcut).
* A parameter used by several ops sums the per-sample ``J_n^T v`` of every use *before* squaring --
  the cross terms between uses belong to the result (as in
  :mod:`fxcurv.quantities.factor_diagonal`) -- so its norms and squares go through ``[N, *param]``.

A parameter the loss does not reach gets zeros in the quantity's shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import is_fake

from ..curvature.accumulate import ParamEnd, ParamUse
from ..curvature.messages import FactorSource, Needs, Origin
from ..errors import LossError
from ..factors import signed_column_squares
from ..node_info import INPUT, Kind, info
from ..rules.registry import RuleKind
from ..targets import target
from .base import Quantity
from .combine import Accumulator, Concatenated

# ---- graph-node targets -------------------------------------------------------------------------

@target("per_sample_zeros")
def per_sample_zeros(p: torch.Tensor, like: torch.Tensor, lead: int, with_param: bool) -> torch.Tensor:
    """Zeros ``[*like.shape[:lead], *p.shape]`` (``with_param``) or ``[*like.shape[:lead]]``: the result of
    a parameter the loss does not reach."""
    return p.new_zeros(tuple(like.shape[:lead]) + (tuple(p.shape) if with_param else ()))


@target("empty_columns")
def empty_columns(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``[0, N, *p.shape]`` for the batch ``x``: no factor columns (a loss without curvature)."""
    return p.new_zeros((0, x.shape[0]) + tuple(p.shape))


@target("as_column", view=True, column=True)
def as_column(g: torch.Tensor) -> torch.Tensor:
    """``g [N, ...]`` as one factor column ``[1, N, ...]`` (a view): ``sum_n (J_n^T g_n)^2`` is the
    ``diag_sqrt`` of that column."""
    return g.unsqueeze(0)


@target("square_norms")
def square_norms(per_sample: torch.Tensor) -> torch.Tensor:
    """``|v_n|^2`` for ``v [N, *param]``: ``[N]``."""
    return (per_sample * per_sample).flatten(1).sum(1)


@target("per_sample_squares")
def per_sample_squares(per_sample: torch.Tensor, sign: torch.Tensor | None) -> torch.Tensor:
    """``sum_k sign_kn v_kn^2`` for ``v [K, N, *param]``: ``[N, *param]``."""
    return signed_column_squares(per_sample, sign)


@target("square_sum")
def square_sum(per_sample: torch.Tensor) -> torch.Tensor:
    """``sum_n v_n^2`` for ``v [N, *param]``: shaped like the parameter."""
    return (per_sample * per_sample).sum(0)


@target("variance_from")
def variance_from(grad: torch.Tensor, sum_grad_squared: torch.Tensor, n: int) -> torch.Tensor:
    """``(1/N) sum_n g_n^2 - ((1/N) sum_n g_n)^2``: the variance over the batch of the per-sample
    gradients ``g_n`` (BackPACK's Variance, the reduction's scale inside ``g_n``); one fresh buffer."""
    out = grad * grad
    return out.mul_(-1.0 / (n * n)).add_(sum_grad_squared, alpha=1.0 / n)


# ---- helpers ------------------------------------------------------------------------------------

def batch_input(end: ParamEnd) -> fx.Node:
    """The program's input batch ``x`` (its dim 0 is ``N``)."""
    return next(n for n in end.emit.graph.nodes if n.op == "placeholder" and n.name == INPUT)


def zeros(end: ParamEnd, message: str, *, like: fx.Node | None = None, lead: int = 1,
          with_param: bool = True) -> fx.Node:
    """Zeros ``[N, *param]`` (``[*like.shape[:lead], *param]``; ``[N]`` without ``with_param``)."""
    like = batch_input(end) if like is None else like
    return end.node(per_sample_zeros, (end.emit.env[end.param], like, lead, with_param), message=message,
                    shaped=False)


def per_sample_vjp(use: ParamUse, v: fx.Node, message: str, stream: str = "") -> fx.Node:
    """``J_n^T v_n`` of this use for every sample (and column), ``[*lead, N, *param]``."""
    return use.rule(RuleKind.PER_SAMPLE, v, message=message, stream=stream, shaped=False)


def summed(end: ParamEnd, parts: list[fx.Node], message: str, stream: str = "") -> fx.Node:
    """The uses' per-sample ``J_n^T v_n`` summed (before any square)."""
    return end.sum(parts, message=message, stream=stream, shaped=False)


# ---- per-sample curvature from factor columns ---------------------------------------------------

@dataclass
class _ColumnState:
    parts: list[fx.Node] = field(default_factory=list)  # per-use results of the op's rule
    per_sample: dict[Origin, list[tuple[fx.Node, fx.Node | None]]] = field(default_factory=dict)


class BatchFactorDiagonal(Quantity):
    """Per-sample curvature diagonals ``sum_k sign_kn (J_n^T S_kn)^2``, ``[N, *param]``, from the factor
    columns of ``sources`` (per use the op's ``batch_diag_sqrt``; summed over uses before squaring for a
    parameter used more than once)."""

    shaped_like_parameter = False

    def __init__(self, name: str, description: str, reference: str, sources: frozenset[FactorSource]):
        self.name, self.description, self.reference = name, description, reference
        self.sources = sources
        self.needs = Needs(factors=sources)

    def start(self) -> _ColumnState:
        return _ColumnState()

    def accumulator(self) -> Accumulator[Any]:
        """Each sample's curvature is linear in the loss's scale: the batches' ``[N_b, *param]`` scaled by
        ``w_b`` and concatenated."""
        return Concatenated(1.0, 0)

    def collect(self, use: ParamUse, state: _ColumnState) -> None:
        for origin, cols in use.columns.items():
            if origin.source not in self.sources:
                continue
            s, sign = use.dense(cols)
            if use.shared or not use.has_rule(RuleKind.BATCH_DIAG_SQRT):
                ps = per_sample_vjp(use, s, "J^T S", origin.label)
                state.per_sample.setdefault(origin, []).append((ps, sign))
            else:
                state.parts.append(use.rule(RuleKind.BATCH_DIAG_SQRT, s, sign, message="batch_diag_",
                                            stream=origin.label, shaped=False))

    def finalize(self, end: ParamEnd, state: _ColumnState) -> fx.Node:
        parts = list(state.parts)
        for origin, uses in state.per_sample.items():
            total = summed(end, [ps for ps, _ in uses], "J^T S", origin.label)
            parts.append(end.node(per_sample_squares, (total, uses[0][1]), message="batch_diag_",
                                  stream=origin.label, shaped=False))
        if not parts:
            return zeros(end, self.name)
        return end.sum(parts, message=self.name, shaped=False)


@dataclass
class _SqrtState:
    parts: list[fx.Node] = field(default_factory=list)
    sign: fx.Node | None = None  # the columns' signs, where the loss's Hessian may be indefinite


class SqrtFactor(Quantity):
    """The per-sample columns ``V_kn = J_n^T S_kn``, ``[K, N, *param]``, of the factor columns of
    ``source``: ``sum_{k} V_kn V_kn^T`` is sample ``n``'s block of the curvature they carry, and
    ``sum_{k,n} V_kn V_kn^T`` the parameter's block (BackPACK's SqrtGGNExact / SqrtGGNMC). Where the loss
    is not one of the closed forms, its factor is signed (eigenvalues of the per-sample Hessian); then
    each call checks that no column of the loss factor has a negative eigenvalue beyond rounding
    (``V V^T`` cannot carry one) and drops those within it."""

    shaped_like_parameter = False

    def __init__(self, name: str, description: str, reference: str, source: FactorSource):
        self.name, self.description, self.reference = name, description, reference
        self.origin = Origin(source)
        self.needs = Needs(factors=frozenset({source}))

    def start(self) -> _SqrtState:
        return _SqrtState()

    def accumulator(self) -> Accumulator[Any]:
        """``S`` carries the square root of the loss's scale: the batches' ``[K, N_b, *param]`` scaled by
        ``sqrt(w_b)`` and concatenated along the samples (dim 1); ``V V^T`` then weighs batch ``b`` by
        ``w_b``."""
        return Concatenated(0.5, 1)

    def collect(self, use: ParamUse, state: _SqrtState) -> None:
        cols = use.columns.get(self.origin)
        if cols is None:  # a loss without curvature (one class): no columns
            return
        state.sign = cols.sign
        state.parts.append(per_sample_vjp(use, cols.value, "sqrt_", self.origin.label))

    def finalize(self, end: ParamEnd, state: _SqrtState) -> fx.Node:
        seed = _seed_columns(end, self.origin) if not state.parts or state.sign is not None else None
        if not state.parts:
            if seed is None:  # no columns at all (a loss without curvature): an empty factor, V V^T = 0
                return end.node(empty_columns, (end.emit.env[end.param], batch_input(end)), message=self.name,
                                shaped=False)
            return zeros(end, self.name, like=seed, lead=2)
        total = summed(end, state.parts, "sqrt_", self.origin.label)
        if state.sign is None:
            return total
        assert seed is not None
        return end.node(positive_columns, (total, seed, state.sign, f"{self.name}[{end.name}]"), message="sqrt_",
                        stream=self.origin.label, shaped=False)


@target("positive_columns")
def positive_columns(v: torch.Tensor, seed: torch.Tensor, sign: torch.Tensor, what: str) -> torch.Tensor:
    """``v [K, N, ...]`` without the columns whose sign is negative, after checking that they are rounding
    errors: the loss factor's column ``k`` of sample ``n`` has the squared norm ``|lambda_kn|`` (an
    eigenvalue of the per-sample loss Hessian); a negative one above ``sqrt(eps)`` times the sample's
    largest means an indefinite Hessian, which a square-root factor cannot represent."""
    negative = sign < 0
    keep = (~negative).reshape(sign.shape + (1,) * (v.dim() - 2)).to(v.dtype)
    if is_fake(v):  # shape propagation: no values to check
        return v * keep
    lam = seed.reshape(seed.shape[0], seed.shape[1], -1).square().sum(-1)  # [K, N]
    tol = torch.finfo(lam.dtype).eps ** 0.5 * lam.amax(0, keepdim=True)
    if bool((negative & (lam > tol)).any()):
        raise LossError(
            f"{what}: the loss Hessian w.r.t. the model output has a negative eigenvalue for some sample at this "
            "call, so no square-root factor V (V V^T) represents the curvature. Supported: losses with a positive "
            "semi-definite Hessian (cross-entropy, squared error, ...); diag_ggn, batch_diag_ggn and block_ggn take "
            "indefinite ones")
    return v * keep


def _seed_columns(end: ParamEnd, origin: Origin) -> fx.Node | None:
    """The first node holding ``origin``'s columns ``[K, N, ...]``: where they are seeded at the loss."""
    for n in end.emit.graph.nodes:
        record = info(n)
        if record.kind is Kind.SQRT and record.message == "S" and record.stream == origin.label:
            return n
    return None
