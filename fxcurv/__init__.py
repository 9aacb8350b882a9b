"""fxcurv: a graph compiler for second-order information in PyTorch.

``fxcurv.compile(model, loss_fn, quantities=...)`` traces the model and loss with torch.fx, inserts
the gradient and curvature backpropagation for each op, and returns an engine that computes the loss,
the gradient and every requested quantity in one call.
"""

from . import linops, operators, optim, rules  # noqa: F401  (rules: registers the op vocabulary)
from .api import Engine, Program, Result, compile
from .errors import FxcurvError, InputError, LossError, MemoryBudgetError, TraceError, UnsupportedOpError
from .operators import BlockOperator, Kronecker, KroneckerLayout
from .passes.memory import MemoryEstimate
from .quantities import QUANTITIES, Quantity

__version__ = "0.1.0"

__all__ = [
    "compile", "Engine", "Program", "Result", "QUANTITIES", "Quantity", "MemoryEstimate", "Kronecker",
    "KroneckerLayout", "BlockOperator",
    "FxcurvError", "TraceError", "UnsupportedOpError", "LossError", "InputError", "MemoryBudgetError",
]
