"""Errors fxcurv raises. Each names the node or argument at fault and says what is supported."""

from __future__ import annotations

from typing import Any


class FxcurvError(Exception):
    """Base class of fxcurv's errors."""


class TraceError(FxcurvError):
    """The model or loss cannot be traced by torch.fx (e.g. data-dependent control flow)."""


class UnsupportedOpError(FxcurvError, NotImplementedError):
    """A traced node is outside fxcurv's op vocabulary, or uses an unsupported configuration."""


class LossError(FxcurvError, ValueError):
    """The loss cannot be differentiated twice w.r.t. the model output in its traced form."""


class InputError(FxcurvError, ValueError):
    """Inputs, targets or parameters have shapes, dtypes or devices the program cannot take.
    ``node`` is the traced node where torch rejected them, if that is where it was found."""

    def __init__(self, message: str, node: Any = None):
        super().__init__(message)
        self.node = node


class MemoryBudgetError(FxcurvError, MemoryError):
    """The program's estimated peak memory exceeds the budget (``memory_budget=``, default: what the
    machine has available); raised before it runs, naming the node at the peak."""


class NotCombinableError(FxcurvError, NotImplementedError):
    """A quantity has no exact combination over the batches of a data set (``engine.accumulate``):
    its value for the concatenated data is not a function of the batches' values (a batch-averaged
    dense recursion, eigenpairs of a Gram matrix), or cannot cross processes (a matrix-free operator)."""
