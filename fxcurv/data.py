"""How batches add up to a data set: each batch's weight in the data set's loss.

A loss reduced by ``"mean"`` is ``L_b = (1/W_b) sum_{i in b} l_i`` for a batch ``b``, where the
normalizer ``W_b`` counts what the loss averages over: samples, or positions times output entries
(``mse_loss``), or non-ignored targets (``cross_entropy`` with ``ignore_index``). The same loss over
the concatenated data set is ``L = (1/W) sum_i l_i = sum_b (W_b / W) L_b`` with ``W = sum_b W_b``;
every quantity that is linear in the loss (gradient, GGN, Hessian, their diagonals and blocks,
Kronecker factors of KFLR/KFAC) combines with the same weights ``W_b / W``. A naive mean over batches
(weights ``1 / B``) is off whenever the batches' normalizers differ (batches of 4 and 3 samples).
A loss reduced by ``"sum"`` is ``L = sum_b L_b``: every weight is 1.

This module imports nothing else of fxcurv, so that the loss rules can declare their normalizers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum


class LossReduction(Enum):
    """How a loss reduces its per-sample (per-position) terms."""

    MEAN = "mean"  # L = (1/W) sum_i l_i
    SUM = "sum"  # L = sum_i l_i


@dataclass(frozen=True)
class LossScale:
    """How one batch's loss enters the loss of a data set: ``reduction`` and, for ``MEAN``, the
    normalizer ``count`` (``W_b`` above; ``1.0`` for ``SUM``, where it plays no part)."""

    reduction: LossReduction
    count: float = 1.0


def unnormalized_weight(scale: LossScale) -> float:
    """A batch's weight before the data set's normalizer divides it: ``W_b`` for a mean-reduced loss (the
    data set divides by ``W = sum_b W_b``), ``1`` for a summed one (divided by nothing). One pass over the
    batches can add ``u_b``-weighted values and divide at the end (``engine.accumulate``)."""
    return scale.count if scale.reduction is LossReduction.MEAN else 1.0


def batch_weights(scales: Sequence[LossScale]) -> list[float]:
    """The weight of each batch's loss (and of every quantity linear in it) in the data set's:
    ``W_b / sum_b W_b`` for mean-reduced losses, ``1`` for summed ones.

    Raises ValueError for an empty sequence, for batches whose reductions differ, and for mean-reduced
    batches that average over nothing in total (every target ignored)."""
    if not scales:
        raise ValueError("no batches: a data set needs at least one batch")
    kinds = {s.reduction for s in scales}
    if len(kinds) > 1:
        raise ValueError(f"the batches' losses reduce differently ({sorted(k.value for k in kinds)}): "
                         "one data set takes one reduction")
    weights = [unnormalized_weight(s) for s in scales]
    if kinds == {LossReduction.SUM}:
        return weights
    total = sum(weights)
    if total <= 0:
        raise ValueError("the mean-reduced loss averages over nothing in the whole data set "
                         "(every target ignored, or empty batches)")
    return [u / total for u in weights]
