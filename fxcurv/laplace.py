"""fxcurv as a curvature backend of laplace-torch (``Laplace(..., backend=fxcurv.laplace.Backend)``).

laplace-torch asks its backend for one batch at a time and sums the batches itself
(``ParametricLaplace.fit``): ``loss_b, H_b = backend.diag(X_b, y_b)`` (or ``.kron(X_b, y_b, N)``), then
``loss += loss_b`` and ``H += H_b``. Its conventions (``laplace/curvature/curvature.py``, and the
BackPACK and curvlinops backends it ships), which :class:`Backend` follows exactly:

* the loss is the batch's **summed** loss, ``CrossEntropyLoss(reduction="sum")`` for classification
  and ``MSELoss(reduction="sum")`` for regression, times ``factor`` (1 for classification, 1/2 for
  regression: ``(1/2) sum_n |f_n - y_n|^2`` is the negative log-likelihood of ``N(f, I)`` up to a
  constant), and every curvature is that of ``factor * loss``;
* ``diag`` returns the GGN diagonal of the batch, ``factor * sum_n diag(J_n^T H_n J_n)``, flattened and
  concatenated over the trainable parameters in ``model.parameters()`` order;
* ``kron`` returns a ``laplace.utils.matrix.Kron`` with one entry per trainable parameter in the same
  order, ``[G, A]`` for a weight ``[out, ...]`` and ``[G]`` for a bias, where (KFLR, the exact
  Gauss-Newton factors, as laplace's BackPACK backend ``KFLR`` and its curvlinops backend
  ``FisherType.TYPE2`` compute them)

      G = sum_{n in b} J_n^T H_n J_n,        A = (M / N) (1/M) sum_{n in b} x_n x_n^T = (1/N) sum_{n in b} x_n x_n^T,

  ``M`` the batch's size and ``N`` the data set's, so that laplace's factor-wise sum over the batches
  gives ``G = sum_n J_n^T H_n J_n`` and ``A = (1/N) sum_n x_n x_n^T`` over the data set; then the whole
  ``Kron`` is multiplied by ``factor`` (laplace's ``Kron.__mul__`` puts ``factor^(1/2)`` on each of a
  weight's two factors and ``factor`` on a bias's one). fxcurv's ``kflr`` with a summed loss is
  exactly ``(G, 1/M sum x x^T)`` (BackPACK's convention, ``docs/kronecker_conventions.md``).

``stochastic=True`` (``backend_kwargs``) uses the Monte Carlo versions, ``diag_ggn_mc`` and ``kfac``,
with ``num_samples`` columns per sample (and ``seed`` for reproducible draws). ``full`` and
``jacobians`` are laplace's own (``GGNInterface``, through torch.func). Last-layer and subnetwork
Laplace, dict-like inputs, classification targets with more than one dimension (laplace puts the
classes last, fxcurv's cross-entropy at dimension 1) and ``kron`` of a transposed convolution's weight
(its factors split ``weight.transpose(0, 1)``, which laplace's ``Kron`` does not take) are refused
with an error saying so.

Importing this module imports laplace-torch; ``import fxcurv`` does not.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from enum import Enum
from typing import Any

import torch
from laplace.curvature import GGNInterface
from laplace.utils import Kron, Likelihood
from torch import nn

from .api import Engine, Result, compile
from .errors import FxcurvError, InputError
from .operators import KroneckerLayout


class UnsupportedSettingError(FxcurvError, NotImplementedError):
    """laplace-torch asked for something the fxcurv backend does not compute."""


class Structure(Enum):
    """The curvature structures the backend computes, with the fxcurv quantity of each (exact GGN,
    Monte Carlo)."""

    DIAG = ("diag_ggn", "diag_ggn_mc")
    KRON = ("kflr", "kfac")

    def quantity(self, stochastic: bool) -> str:
        return self.value[1] if stochastic else self.value[0]


class Backend(GGNInterface):
    """laplace-torch's ``GGNInterface`` computed by fxcurv engines (module docstring).

    ``Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag" | "kron",
    backend=fxcurv.laplace.Backend)``; ``backend_kwargs`` may set ``stochastic``, ``num_samples``,
    ``seed`` and fxcurv's ``engine_backend`` (``"fused"``, ``"eager"``, ``"inductor"``). One engine is
    compiled per structure on first use and reused for every batch."""

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        stochastic: bool = False,
        num_samples: int = 1,
        seed: int | None = None,
        engine_backend: str = "fused",
    ) -> None:
        if last_layer:
            raise UnsupportedSettingError(
                "fxcurv's laplace backend computes the curvature of all weights (subset_of_weights='all'); "
                "for last-layer Laplace use laplace's own backends")
        if subnetwork_indices is not None:
            raise UnsupportedSettingError(
                "fxcurv's laplace backend computes the curvature of all weights (subset_of_weights='all'); "
                "subnetwork Laplace is not supported")
        super().__init__(model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y,
                         stochastic=stochastic, num_samples=num_samples)
        self.seed = seed
        self.engine_backend = engine_backend
        self._engines: dict[Structure, Engine] = {}

    def engine(self, structure: Structure) -> Engine:
        """The fxcurv engine computing ``structure`` for ``self.lossfunc`` (compiled on first use)."""
        if structure not in self._engines:
            self._engines[structure] = compile(
                self.model, self.lossfunc, quantities=(structure.quantity(self.stochastic),),
                mc_samples=self.num_samples, seed=self.seed, backend=self.engine_backend,
                grad=False)  # laplace reads the loss and the curvature: no weight gradients
        return self._engines[structure]

    def _run(self, structure: Structure, x: Any, y: torch.Tensor, kwargs: dict[str, Any]) -> tuple[Result, str]:
        unknown = sorted(set(kwargs) - {"N"})
        if unknown:
            raise UnsupportedSettingError(f"fxcurv's laplace backend takes no options {unknown} (from laplace's "
                                          "asdl_fisher_kwargs); set stochastic/num_samples/seed in backend_kwargs")
        if isinstance(x, MutableMapping):
            raise InputError("fxcurv's laplace backend takes tensor inputs, not dict-like batches")
        if self.likelihood == Likelihood.CLASSIFICATION and y.dim() != 1:
            raise InputError(
                f"classification targets of shape {tuple(y.shape)}: fxcurv's laplace backend takes one class "
                "index per sample ([N]) and outputs [N, C] (laplace flattens other outputs with the classes "
                "last, fxcurv's cross-entropy reads them at dimension 1)")
        quantity = structure.quantity(self.stochastic)
        return self.engine(structure)(x, y), quantity

    def diag(
        self,
        x: torch.Tensor | MutableMapping[str, torch.Tensor | Any],
        y: torch.Tensor,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(factor * loss, factor * diag GGN)`` of the batch, the diagonal flat over the trainable
        parameters (``N`` is accepted and not needed: the diagonal is a sum over the batch)."""
        out, quantity = self._run(Structure.DIAG, x, y, kwargs)
        diagonal = torch.cat([v.reshape(-1) for v in out[quantity].values()])
        return self.factor * out.loss.detach(), self.factor * diagonal

    def kron(
        self,
        x: torch.Tensor | MutableMapping[str, torch.Tensor | Any],
        y: torch.Tensor,
        N: int,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Kron]:
        """``(factor * loss, factor * Kron)`` of the batch, its input factors scaled by ``M / N``
        (module docstring)."""
        if not isinstance(N, int) or isinstance(N, bool) or N < 1:
            raise ValueError(f"N (the number of data points) must be a positive integer, got {N!r}")
        out, quantity = self._run(Structure.KRON, x, y, kwargs)
        M = int(y.shape[0])  # the batch size, as laplace counts it (len(y))
        kfacs: list[Any] = []
        for name, block in out[quantity].items():
            if block.layout is not KroneckerLayout.ROWS:
                raise UnsupportedSettingError(
                    f"laplace's Kron reads a weight's factors [G, A] as splitting weight.reshape(shape[0], -1); "
                    f"the {quantity} factors of {name} (a transposed convolution's weight) split "
                    f"weight.transpose(0, 1) (KroneckerLayout.{block.layout.name}), which Kron cannot take. "
                    "Use laplace's hessian_structure='diag' (or 'full') for models with transposed convolutions")
            factors = list(block.factors)
            if len(factors) == 2:
                factors[1] = factors[1] * (M / N)
            kfacs.append(factors)
        return self.factor * out.loss.detach(), Kron(kfacs) * self.factor


__all__ = ["Backend", "Structure", "UnsupportedSettingError"]
