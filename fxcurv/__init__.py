"""fxcurv: a graph compiler for second-order information in PyTorch.

``fxcurv.compile(model, loss_fn, quantities=...)`` traces the model and loss with torch.fx, inserts
the gradient and curvature backpropagation for each op, and returns an engine that computes the loss,
the gradient and every requested quantity in one call.
"""

from . import rules  # noqa: F401  (registers the op vocabulary)
from .api import Engine, Program, Result, build_program, compile
from .errors import FxcurvError, InputError, LossError, TraceError, UnsupportedOpError
from .quantities import QUANTITIES

__version__ = "0.1.0"

__all__ = [
    "compile", "Engine", "Program", "Result", "build_program", "QUANTITIES",
    "FxcurvError", "TraceError", "UnsupportedOpError", "LossError", "InputError",
]
