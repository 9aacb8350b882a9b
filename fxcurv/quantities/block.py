"""Exact per-parameter curvature blocks, matrix-free (shared by ``block_ggn`` and ``block_hessian``).

A parameter's block of ``sum_origins sum_{k,n} sign_kn a_kn a_kn^T`` with ``a_kn = sum_u J_{u,n}^T S^u_kn``
(``u`` over the ops that use the parameter, ``S^u`` the origin's factor columns at the output of use
``u``, HBP eq. S.6-S.9) is never formed: the program keeps, per use, the op's inputs and the columns at
its output, and a product with ``V`` is

    c_kn = sum_u <S^u_kn, (J_u V)_n>                      (forward-mode: one JVP of the op per use)
    K V  = sum_u J_u^T (sum_k sign_kn c_kn S^u_kn)         (reverse-mode: one VJP per use)

which is exact on residual networks (columns of one origin are summed over paths) and for weights
used more than once (the uses' Jacobians are summed before the product: the cross terms are in). The
mixed second derivative of a weight used twice pairs unit columns ``a_i`` with the op's ``b_i = B^T e_i``
(:class:`fxcurv.curvature.accumulate.MixedColumns`): ``(a b^T + b a^T) V = a <b, V> + b <a, V>``. The
JVPs and VJPs are torch.func's of the op's own forward: nothing here depends on the op.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from ..curvature.accumulate import Finalized, ParamEnd, ParamUse
from ..curvature.messages import FactorSource, Needs, Origin
from ..errors import UnsupportedOpError
from ..operators import BlockOperator
from ..rules.registry import RuleKind
from .base import Quantity
from .combine import Accumulator, OperatorSum
from .uses import OpUse, UseSpec, keep, vjp_sum


@dataclass(frozen=True)
class _OriginSpec:
    origin: Origin
    uses: tuple[int, ...]  # the uses whose outputs the origin's columns reach (the others add zero)
    mixed: bool  # paired with the op's mixed-derivative columns


@dataclass(frozen=True)
class _Spec:
    uses: tuple[UseSpec, ...]
    origins: tuple[_OriginSpec, ...]


@dataclass
class _State:
    uses: list[tuple[UseSpec, tuple[Any, ...]]] = field(default_factory=list)
    # origin -> use index -> (S, sign) at that use's output
    columns: dict[Origin, dict[int, tuple[fx.Node, fx.Node | None]]] = field(default_factory=dict)


class ExactBlock(Quantity):
    """The exact block of the curvature carried by the factor columns of ``sources``."""

    shaped_like_parameter = False

    def __init__(self, name: str, description: str, reference: str, sources: frozenset[FactorSource]):
        self.name, self.description, self.reference = name, description, reference
        self.sources = sources
        self.needs = Needs(factors=sources)

    def start(self) -> _State:
        return _State()

    def accumulator(self) -> Accumulator[Any]:
        """The block is a sum over samples linear in the loss: ``K = sum_b w_b K_b``, as products
        (:class:`~fxcurv.quantities.combine.OperatorSum`; one process only)."""
        return OperatorSum()

    def collect(self, use: ParamUse, state: _State) -> None:
        if FactorSource.RESIDUAL in self.sources and use.has_rule(RuleKind.PARAM_RESIDUAL):
            raise UnsupportedOpError(
                f"{use.where()}: the op is nonlinear in the parameter; its own second derivative is not "
                f"carried by {self.name} yet (diag_hessian carries it)")
        index = len(state.uses)
        state.uses.append(keep(use))
        for origin, cols in use.columns.items():
            if origin.source not in self.sources or (origin.weight and origin.weight != use.name):
                continue
            state.columns.setdefault(origin, {})[index] = use.dense(cols)

    def finalize(self, end: ParamEnd, state: _State) -> Any:
        origins, values = [], []
        for origin, per_use in state.columns.items():
            partner = end.partner(origin) if origin.source is FactorSource.MIXED else None
            if origin.source is FactorSource.MIXED and partner is None:
                continue
            reached = tuple(sorted(per_use))
            sign = per_use[reached[0]][1]
            origins.append(_OriginSpec(origin, reached, partner is not None))
            values.append((tuple(per_use[u][0] for u in reached), sign, partner))
        spec = _Spec(tuple(u for u, _ in state.uses), tuple(origins))
        return Finalized((tuple(v for _, v in state.uses), tuple(values)), spec)

    def wrap(self, value: Any, param: torch.Tensor, static: Any = None) -> BlockOperator:
        assert isinstance(static, _Spec)
        uses, columns = value
        matvec = _block_matvec(static, uses, columns, param.shape)
        return BlockOperator(matvec, param.shape, param.dtype, param.device, label=self.name)


def _block_matvec(spec: _Spec, uses: tuple[tuple[Any, ...], ...], columns: tuple[Any, ...],
                  shape: torch.Size) -> Callable[[torch.Tensor], torch.Tensor]:
    ops = [OpUse(u, inputs) for u, inputs in zip(spec.uses, uses)]

    def jvp(u: int, vs: torch.Tensor) -> torch.Tensor:
        """``J_u V`` for use ``u``, ``[M, N, *out_u]``."""
        return ops[u].jvp(vs)

    def vjps(reached: tuple[int, ...], cotangents: list[torch.Tensor]) -> torch.Tensor:
        """``sum_u J_u^T m_u`` over the uses ``reached`` (summed over samples), ``[M, *param]``."""
        return vjp_sum([ops[u] for u in reached], cotangents)

    def matvec(V: torch.Tensor) -> torch.Tensor:
        m_cols = V.shape[1]
        vs = V.T.reshape((m_cols,) + tuple(shape))
        tangents: dict[int, torch.Tensor] = {}
        out = torch.zeros_like(vs)
        for o, (per_use, sign, partner) in zip(spec.origins, columns):
            for u in o.uses:
                if u not in tangents:
                    tangents[u] = jvp(u, vs)
            # c[m, k, n] = sum_u <S^u_kn, (J_u V_m)_n>
            c = functools.reduce(torch.add, [torch.einsum("knj,mnj->mkn", s.flatten(2), tangents[u].flatten(2))
                                             for u, s in zip(o.uses, per_use)])
            if o.mixed:
                # (a b^T + b a^T) V with a = J^T S (the columns), b the op's mixed-derivative columns.
                cb = torch.einsum("knj,mj->mkn", partner.flatten(2), vs.flatten(1))
                out = out + vjps(o.uses, [torch.einsum("mkn,kn...->mn...", cb, s) for s in per_use])
                out = out + torch.einsum("mkn,kn...->m...", c, partner)
                continue
            w = c if sign is None else c * sign.to(c.dtype)
            out = out + vjps(o.uses, [torch.einsum("mkn,kn...->mn...", w, s) for s in per_use])
        return out.reshape(m_cols, -1).T

    return matvec
