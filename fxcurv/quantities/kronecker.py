"""Kronecker-factored curvature blocks (shared by ``kflr``, ``kfac``, ``kfra`` and the ``hbp_*`` blocks).

A parameter's block is approximated by ``G (x) A`` (BackPACK's factor order and scaling): the input
factor ``A = (1/N) sum_n x_n x_n^T`` (HBP eq. S.8c's ``x x^T``, batch averaged; unfolded patches for
a convolution) and an output factor ``G`` from

* square-root factor columns at the op's output, ``G = sum_{k,n} sign S S^T`` -- exact columns for
  KFLR, sampled ones for KFAC (Botev et al. App. C); or
* the batch-averaged matrix at the op's output, ``G = M`` -- KFRA's recursion (Botev eq. 29-31) and
  HBP's with its residual terms (HBP Sec. 3.2, S.11; EA-CG eq. 8b for the PCH variants).

A bias has the single factor ``G``. A transposed convolution's weight ``[C_in, C_out, *k]`` is split
as ``weight.transpose(0, 1)`` (BackPACK's convention; the op declares it, ``OpDef.kron_layouts``): its
block is a :class:`~fxcurv.operators.Kronecker` with ``layout=KroneckerLayout.TRANSPOSED``, still a
matrix over ``weight.reshape(-1)``. A parameter used by more than one op has no such factorization
(its block has cross terms between the uses): that is refused, naming the parameter and the node.
All of them are exact for one sample (N = 1) on an MLP: ``kflr = kfra =`` the GGN block and
``hbp_hessian =`` the Hessian block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from ..curvature.accumulate import Finalized, ParamEnd, ParamUse
from ..curvature.messages import DenseStream, FactorSource, Needs, Origin
from ..errors import UnsupportedOpError
from ..operators import Kronecker, KroneckerLayout
from ..rules.registry import RuleKind
from .base import Quantity
from .combine import Accumulator, KroneckerFactors, refuse


@dataclass
class _State:
    factors: tuple[fx.Node, ...] | None = None


class _KroneckerQuantity(Quantity):
    shaped_like_parameter = False

    def start(self) -> _State:
        return _State()

    def _refuse_shared(self, use: ParamUse) -> None:
        if use.shared:
            raise UnsupportedOpError(
                f"{self.name}: {use.where()} is used by more than one op; a Kronecker factorization is defined "
                "for a parameter one op uses (its block has cross terms between the uses). Supported for tied "
                "weights: diag_ggn, diag_hessian (exact)")

    def _with_input_factor(self, use: ParamUse, g: fx.Node) -> tuple[fx.Node, ...]:
        if not use.has_rule(RuleKind.KRON_IN):
            return (g,)
        return (g, use.rule(RuleKind.KRON_IN, message="A", shaped=False))

    def finalize(self, end: ParamEnd, state: _State) -> Any:
        value = state.factors if state.factors is not None else end.zeros(self.name)
        # The arrangement the factors split, as the op taking the parameter declares it (also where the loss
        # never reaches the parameter; a parameter of several ops is refused in collect unless unreached).
        declared = end.kron_layouts()
        return Finalized(value, declared.pop() if len(declared) == 1 else KroneckerLayout.ROWS)

    def wrap(self, value: Any, param: torch.Tensor, static: Any = None) -> Kronecker:
        layout = KroneckerLayout.ROWS if static is None else static
        if isinstance(value, torch.Tensor):  # a parameter the loss does not reach: zero factors
            return Kronecker(_zero_factors(param, layout), param.shape, label=self.name, layout=layout)
        return Kronecker(tuple(value), param.shape, label=self.name, layout=layout)


def _zero_factors(param: torch.Tensor, layout: KroneckerLayout) -> tuple[torch.Tensor, ...]:
    """Zero factors in the shapes of linear and convolution parameters: ``(G [O, O], A [I, I])`` for a
    weight (``O`` the output channels of ``layout``'s arrangement, ``I`` the remaining entries),
    ``(G [P, P],)`` for a bias."""
    if param.dim() >= 2:
        o = param.shape[1] if layout is KroneckerLayout.TRANSPOSED else param.shape[0]
        i = param.numel() // o
        return param.new_zeros(o, o), param.new_zeros(i, i)
    return (param.new_zeros(param.numel(), param.numel()),)


class ColumnKronecker(_KroneckerQuantity):
    """``G`` from the factor columns of ``source`` at the op's output."""

    def __init__(self, name: str, description: str, reference: str, source: FactorSource):
        self.name, self.description, self.reference = name, description, reference
        self.origin = Origin(source)
        self.needs = Needs(factors=frozenset({source}))

    def accumulator(self) -> Accumulator[Any]:
        """``G = sum_{k,n} S S^T`` is linear in the loss, ``A`` a mean over samples: each factor combines
        into the concatenated data set's own (:class:`~fxcurv.quantities.combine.KroneckerFactors`)."""
        return KroneckerFactors()

    def collect(self, use: ParamUse, state: _State) -> None:
        self._refuse_shared(use)
        cols = use.columns.get(self.origin)
        if cols is None:  # a loss without curvature (one class): no columns, zero factors
            return
        g = use.rule(RuleKind.KRON_OUT, cols.value, cols.sign, message="G", stream=self.origin.label, shaped=False)
        state.factors = self._with_input_factor(use, g)


class DenseKronecker(_KroneckerQuantity):
    """``G`` from the batch-averaged matrix of ``stream`` at the op's output."""

    def __init__(self, name: str, description: str, reference: str, stream: DenseStream):
        self.name, self.description, self.reference = name, description, reference
        self.stream = stream
        self.needs = Needs(dense=frozenset({stream}))

    def accumulator(self) -> Accumulator[Any]:
        """Refused: the recursion averages over the batch at every activation (``E_n[phi' phi'^T] o M``)
        and multiplies those averages layer after layer, so the data set's ``G`` is not a function of the
        batches' factors (and the ``hbp_pch_*`` modifications act on batch sums)."""
        raise refuse(self.name, "its G is a batch-averaged dense recursion (Botev eq. 29-31), a product of "
                     "batch averages over the layers that is not a function of per-batch factors; accumulate "
                     "kflr (exact columns) or kfac instead, or compute it on one batch")

    def collect(self, use: ParamUse, state: _State) -> None:
        self._refuse_shared(use)
        g = use.rule(RuleKind.KRON_DENSE, use.messages.dense[self.stream], message="G", stream=self.stream.label,
                     shaped=False)
        state.factors = self._with_input_factor(use, g)
