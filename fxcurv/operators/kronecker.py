"""Kronecker-factored curvature blocks (KFAC, KFLR, KFRA, HBP) and their damped inverses.

Conventions (BackPACK's). A weight ``W`` of shape ``[O, ...]`` with ``I = prod(W.shape[1:])`` input-side
entries per output (``C_in * k1 * k2`` for a conv weight ``[C_out, C_in, k1, k2]``) has the factors
``(G, A)``: ``G`` ``[O, O]`` on the output side, ``A`` ``[I, I]`` on the input side. The block is
``kron(G, A)`` (``torch.kron``) acting on ``vec_r(W) = W.reshape(-1)``, row-major:

    kron(G, A)[o * I + i, p * I + j] = G[o, p] A[i, j],
    kron(G, A) @ W.reshape(-1) = (G @ W_mat @ A^T).reshape(-1),   W_mat = W.reshape(O, I).

(Botev et al. write the same block ``Q ⊗ G`` with the input-side factor first, because they stack
columns; row-major stacking swaps the order.) A bias ``[O]`` has one factor ``(G,)`` and the block
``G``.

Inverses, with ``G = Q_G diag(g) Q_G^T`` and ``A = Q_A diag(a) Q_A^T`` (symmetric factors):

* exact (:meth:`Kronecker.inverse`, Martens & Grosse's eigenbasis, Botev eq. 35):
  ``(kron(G, A) + d I)^{-1} = kron(Q_G, Q_A) diag(1 / (g_i a_j + d)) kron(Q_G, Q_A)^T``;
* factored approximation (:meth:`Kronecker.inverse_factored`, Botev eq. 36-38):
  ``kron(G + pi sqrt(d) I, A + sqrt(d) / pi I)^{-1}``, which differs from the exact one by the
  residual ``sqrt(d) / pi kron(G, I) + pi sqrt(d) kron(I, A)`` (eq. 37), minimized in trace norm by
  ``pi = sqrt((tr(G) / O) / (tr(A) / I))`` (eq. 38).

Products never form a ``[P, P]`` matrix: ``kron(G, A) @ vec_r(X) = vec_r(G X A^T)`` (EA-CG eq. 11a in
row-major form), ``O^2 I + O I^2`` operations per column instead of ``O^2 I^2``.

**Layouts** (:class:`KroneckerLayout`). The factors split a *factor layout* of the parameter: its own
(``ROWS``: ``W.reshape(O, I)``, linear and convolution weights), or ``W.transpose(0, 1)``
(``TRANSPOSED``: a transposed convolution's weight ``[C_in, C_out, *k]``, whose output channel is its
*second* axis; BackPACK's factors of ``nn.ConvTranspose*`` describe ``weight.transpose(0, 1)``).
Whatever the layout, a block is a matrix over the parameter's own ``W.reshape(-1)``: products take
and return tensors shaped like the parameter, ``to_dense()`` and ``diag()`` are in the parameter's
order, and the factors are kept as given. With ``Pi`` the permutation ``vec_r(W) -> vec_r(W^T01)``
(``W^T01 = W.transpose(0, 1)``) the ``TRANSPOSED`` block is ``Pi^T kron(G, A) Pi``:

    (K @ W) = (G @ W^T01.reshape(O, I) @ A^T).reshape(W^T01.shape).transpose(0, 1).

Eigenvalues, traces, norms and log-determinants do not depend on the layout; inverses carry it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import Enum

import torch

from .base import CurvatureOperator, SingularOperatorError

Eigh = tuple[torch.Tensor, torch.Tensor]  # (eigenvalues ascending, eigenvectors as columns)


class KroneckerLayout(Enum):
    """Which arrangement of a parameter ``W`` the factors ``(G, A)`` split (module docstring).

    * ``ROWS``: ``W.reshape(W.shape[0], -1)``, ``G`` over ``W.shape[0]`` (linear and convolution weights,
      biases);
    * ``TRANSPOSED``: ``W.transpose(0, 1).reshape(W.shape[1], -1)``, ``G`` over ``W.shape[1]`` (a
      transposed convolution's weight ``[C_in, C_out, *k]``: BackPACK's convention).
    """

    ROWS = "rows"
    TRANSPOSED = "transposed"


def factor_shape(param_shape: Sequence[int], layout: KroneckerLayout) -> torch.Size:
    """The shape of the arrangement of a parameter of ``param_shape`` that ``layout``'s factors split."""
    shape = torch.Size(param_shape)
    if layout is KroneckerLayout.ROWS:
        return shape
    return torch.Size((shape[1], shape[0]) + tuple(shape[2:]))


def to_factor_order(V: torch.Tensor, param_shape: torch.Size, layout: KroneckerLayout) -> torch.Tensor:
    """Columns ``V [P, M]`` over ``W.reshape(-1)`` reordered to the factor layout's ``vec_r`` (``Pi V``)."""
    if layout is KroneckerLayout.ROWS:
        return V
    return V.reshape(tuple(param_shape) + (-1,)).transpose(0, 1).reshape(V.shape)


def from_factor_order(V: torch.Tensor, param_shape: torch.Size, layout: KroneckerLayout) -> torch.Tensor:
    """Columns ``V [P, M]`` in the factor layout's ``vec_r`` reordered to ``W.reshape(-1)`` (``Pi^T V``)."""
    if layout is KroneckerLayout.ROWS:
        return V
    return V.reshape(tuple(factor_shape(param_shape, layout)) + (-1,)).transpose(0, 1).reshape(V.shape)


def in_param_order(T: torch.Tensor, param_shape: torch.Size, layout: KroneckerLayout) -> torch.Tensor:
    """A tensor with one entry per parameter entry in the factor layout's order (``[O, I]`` or flat) shaped
    like the parameter."""
    arranged = T.reshape(factor_shape(param_shape, layout))
    return arranged if layout is KroneckerLayout.ROWS else arranged.transpose(0, 1).contiguous()


# ---- pure functions on factor tuples -------------------------------------------------------------

def kron_matmat(factors: Sequence[torch.Tensor], V: torch.Tensor) -> torch.Tensor:
    """``kron(F_1, F_2) @ V`` (or ``F_1 @ V`` for one factor) for columns ``V`` ``[P, M]``.

    Column ``m`` read row-major as ``X`` ``[n_1, n_2]`` maps to ``F_1 X F_2^T``: ``F_1`` acts on the
    first index of every column at once (one ``[n_1, n_1] @ [n_1, n_2 M]`` product), ``F_2`` on the
    second (a batched ``[n_2, n_2] @ [n_2, M]`` product over ``n_1``).
    """
    if len(factors) == 1:
        return factors[0] @ V
    F1, F2 = factors
    n1, n2, M = F1.shape[0], F2.shape[0], V.shape[1]
    T = (F1 @ V.reshape(n1, n2 * M)).reshape(n1, n2, M)
    return (F2 @ T).reshape(n1 * n2, M)


def kron_diag(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The diagonal of ``kron(F_1, F_2)`` as ``[n_1, n_2]``: ``outer(diag F_1, diag F_2)``."""
    d = factors[0].diagonal()
    return d if len(factors) == 1 else torch.outer(d, factors[1].diagonal())


def kron_eigvals(eigh: Sequence[Eigh]) -> torch.Tensor:
    """The eigenvalues of ``kron(F_1, F_2)`` in the order of its eigenbasis ``kron(Q_1, Q_2)``:
    ``lambda[i * n_2 + j] = f1_i f2_j``, flat ``[P]``."""
    values = eigh[0][0]
    return values if len(eigh) == 1 else torch.outer(values, eigh[1][0]).reshape(-1)


def sizes_of(factors: Sequence[torch.Tensor]) -> tuple[int, ...]:
    return tuple(int(f.shape[0]) for f in factors)


def eigenvalue_tolerance(scale: float, sizes: Sequence[int], dtype: torch.dtype) -> float:
    """Below this an eigenvalue of ``kron(F_1, F_2) + d I`` is zero to working precision.

    ``eigh`` of an ``n x n`` factor gets its eigenvalues to about ``n eps ||F||`` (the bound numpy's
    ``matrix_rank`` uses); a product ``f1_i f2_j`` inherits the larger factor's, relative to the
    largest eigenvalue ``scale`` of the damped matrix.
    """
    return torch.finfo(dtype).eps * max(sizes) * scale


def check_damping(damping: float, what: str) -> float:
    """``damping`` as a float, refused if negative or not finite."""
    d = float(damping)
    if not math.isfinite(d) or d < 0:
        raise ValueError(f"{what}: damping must be a finite number >= 0 (it is added to the eigenvalues to "
                         f"make the block positive definite); got {damping}")
    return d


# Relative asymmetry accepted in a factor: sqrt of float32's eps. Factors are sums of outer products,
# symmetric up to the rounding of their accumulation, which for float32 (or float32 factors cast to
# float64) with thousands of terms reaches ~1e-5; an asymmetric factor (the bug this catches) is off
# by order one.
SYMMETRY_RTOL = 3.5e-4


def symmetric_part(F: torch.Tensor, which: str) -> torch.Tensor:
    """``(F + F^T) / 2``, after refusing a factor that is not symmetric to :data:`SYMMETRY_RTOL`.

    ``eigh`` reads one triangle only: an asymmetric factor would silently give a wrong inverse.
    """
    scale = F.abs().max().item()
    defect = (F - F.mT).abs().max().item()
    tol = SYMMETRY_RTOL * scale
    if defect > tol:
        raise ValueError(f"factor {which} is not symmetric (max |F - F^T| = {defect:.3e} > {tol:.3e}): the "
                         f"eigendecomposition behind inverse(), eigvals() and logdet() needs symmetric factors")
    return (F + F.mT) / 2


# ---- the result object ---------------------------------------------------------------------------

class Kronecker(CurvatureOperator):
    """One parameter's Kronecker-factored curvature block ``kron(G, A)`` (or ``G`` for a bias) over
    ``param.reshape(-1)``; see the module docstring for the conventions. ``layout``: which arrangement of
    the parameter the factors split (:class:`KroneckerLayout`); with ``TRANSPOSED`` (a transposed
    convolution's weight) the block over ``param.reshape(-1)`` is ``Pi^T kron(G, A) Pi``, and
    ``to_dense()``, ``diag()`` and products are in the parameter's own order.

    Factors are kept as given (not copied) and treated as immutable: eigendecompositions are computed
    on first need (``inverse``, ``eigvals``, ``logdet``) and cached on the object, so that inverses at
    several dampings cost one eigendecomposition per factor. Changing a factor in place afterwards
    leaves the cache stale.
    """

    kind = "Kronecker-factored block"
    FACTOR_NAMES = ("G", "A")

    def __init__(self, factors: Sequence[torch.Tensor], shape: Sequence[int] | None = None, *, label: str = "",
                 layout: KroneckerLayout = KroneckerLayout.ROWS):
        factors = tuple(factors)
        if not isinstance(layout, KroneckerLayout):
            raise TypeError(f"Kronecker: layout must be a KroneckerLayout ({[m.name for m in KroneckerLayout]}); "
                            f"got {layout!r}")
        if len(factors) not in (1, 2) or not all(isinstance(f, torch.Tensor) for f in factors):
            raise ValueError("Kronecker(factors): factors are (G, A) for a weight or (G,) for a bias, as tensors; "
                             f"got {len(factors)} of types {[type(f).__name__ for f in factors]}")
        for name, f in zip(self.FACTOR_NAMES, factors):
            if f.dim() != 2 or f.shape[0] != f.shape[1]:
                raise ValueError(f"Kronecker: factor {name} must be square [n, n]; got {tuple(f.shape)}")
            if f.dtype != factors[0].dtype or f.device != factors[0].device:
                raise ValueError(f"Kronecker: factors must share dtype and device; G is {factors[0].dtype} on "
                                 f"{factors[0].device}, {name} is {f.dtype} on {f.device}")
        sizes = sizes_of(factors)
        param_shape = torch.Size(sizes if shape is None else shape)
        if layout is KroneckerLayout.TRANSPOSED and (len(sizes) != 2 or len(param_shape) < 2):
            raise ValueError(f"Kronecker: layout TRANSPOSED swaps the parameter's first two axes; it needs two "
                             f"factors (G, A) and a parameter with at least two axes, got {len(sizes)} factor(s) "
                             f"for shape {list(param_shape)}")
        arranged = factor_shape(param_shape, layout)
        if math.prod(sizes) != param_shape.numel() or (len(sizes) == 2 and arranged[:1] != sizes[:1]):
            axis = "[O, ...]" if layout is KroneckerLayout.ROWS else "[C_in, O, ...] (layout TRANSPOSED)"
            expected = (f"{axis} with O = G's size and the other entries A's size" if len(sizes) == 2
                        else "with as many entries as G's size")
            raise ValueError(f"Kronecker: factors of sizes {list(sizes)} do not fit a parameter of shape "
                             f"{list(param_shape)} (expected {expected})")
        super().__init__(param_shape, factors[0].dtype, factors[0].device, label)
        self.factors: tuple[torch.Tensor, ...] = factors
        self.layout = layout
        self._eigh: tuple[Eigh, ...] | None = None

    # ---- what it is -----------------------------------------------------------------------------
    @property
    def sizes(self) -> tuple[int, ...]:
        """``(O, I)`` for a weight, ``(O,)`` for a bias."""
        return sizes_of(self.factors)

    def _factors_text(self) -> str:
        return ", ".join(f"{n} [{s}, {s}]" for n, s in zip(self.FACTOR_NAMES, self.sizes))

    def _describe(self) -> str:
        if len(self.factors) == 1:
            return self._factors_text()
        if self.layout is KroneckerLayout.TRANSPOSED:
            return f"kron({self._factors_text()}) over weight.transpose(0, 1)"
        return f"kron({self._factors_text()})"

    # ---- the layout -----------------------------------------------------------------------------
    def to_factor_order(self, V: torch.Tensor) -> torch.Tensor:
        """Columns ``[P, M]`` over ``param.reshape(-1)`` in the order the factors act on (``Pi V``)."""
        return to_factor_order(V, self.param_shape, self.layout)

    def from_factor_order(self, V: torch.Tensor) -> torch.Tensor:
        """Columns ``[P, M]`` in the factors' order back in ``param.reshape(-1)``'s (``Pi^T V``)."""
        return from_factor_order(V, self.param_shape, self.layout)

    # ---- products and dense ---------------------------------------------------------------------
    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.from_factor_order(kron_matmat(self.factors, self.to_factor_order(V)))

    def _dense(self, chunk: int = 0) -> torch.Tensor:
        # torch.kron (2.13) raises on transposed strides, which factors from einsum can have (its
        # opt_einsum path returns them): contiguous copies of the small factors first.
        if len(self.factors) == 1:
            return self.factors[0].clone()
        full = torch.kron(*(f.contiguous() for f in self.factors))
        if self.layout is KroneckerLayout.ROWS:
            return full
        # Pi^T kron(G, A) Pi: rows, then columns, back in the parameter's order
        return self.from_factor_order(self.from_factor_order(full).T.contiguous()).T.contiguous()

    # ---- cheap exact summaries ------------------------------------------------------------------
    def diag(self) -> torch.Tensor:
        """The diagonal of the block shaped like the parameter: ``outer(diag G, diag A)`` (in the factor
        layout, then arranged like the parameter)."""
        return in_param_order(kron_diag(self.factors), self.param_shape, self.layout)

    def trace(self) -> torch.Tensor:
        """``tr(G) tr(A)``."""
        return torch.stack([f.diagonal().sum() for f in self.factors]).prod()

    def frobenius_norm(self) -> torch.Tensor:
        """``||kron(G, A)||_F = ||G||_F ||A||_F``."""
        return torch.stack([torch.linalg.matrix_norm(f) for f in self.factors]).prod()

    # ---- spectral -------------------------------------------------------------------------------
    def factor_eigh(self) -> tuple[Eigh, ...]:
        """``((g, Q_G), (a, Q_A))``: each factor's eigenvalues (ascending) and eigenvectors (columns),
        computed once (``torch.linalg.eigh``) and cached. Factors must be symmetric."""
        if self._eigh is None:
            self._eigh = tuple(torch.linalg.eigh(symmetric_part(f, n)) for n, f in zip(self.FACTOR_NAMES, self.factors))
        return self._eigh

    def eigvals(self) -> torch.Tensor:
        """All ``P`` eigenvalues ``g_i a_j`` of the block, ascending."""
        return torch.sort(kron_eigvals(self.factor_eigh())).values

    def _damped_eigvals(self, damping: float, what: str, positive: bool) -> torch.Tensor:
        """``g_i a_j + damping`` (flat, eigenbasis order), refused where one is zero to working precision
        (``positive``: where one is not clearly positive)."""
        undamped = kron_eigvals(self.factor_eigh())
        lam = undamped + damping
        scale = max(undamped.abs().max().item(), damping)
        tol = eigenvalue_tolerance(scale, self.sizes, self.dtype)
        smallest = (lam.min() if positive else lam.abs().min()).item()
        if smallest <= tol:
            condition, measure = ("positive definite", "eigenvalue") if positive else ("invertible", "|eigenvalue|")
            lowest = undamped.min().item()
            if lowest < -tol:
                cause = (f"the block is indefinite (smallest eigenvalue {lowest:.3e}) and the damping does not lift "
                         f"it clear of zero: use a damping above {-lowest:.3e}")
            elif damping > 0:
                cause = (f"damping {damping:g} is at or below that rounding level: use a larger damping"
                         + ("" if self.dtype == torch.float64 else " or float64"))
            else:
                cause = "the factors have zero eigenvalues: pass damping > 0, e.g. 1e-3 times the largest eigenvalue"
            raise SingularOperatorError(
                f"{self._name()}.{what}: {self._describe()} + {damping:g} I is not {condition} in "
                f"{self.dtype}: its smallest {measure} is {smallest:.3e} <= {tol:.3e}, the rounding level for "
                f"eigenvalues up to {scale:.3e}; {cause}.")
        return lam

    def logdet(self, damping: float = 0.0) -> torch.Tensor:
        """``log det(kron(G, A) + damping I) = sum_ij log(g_i a_j + damping)``, from the cached
        eigendecompositions; refused unless the damped block is positive definite."""
        d = check_damping(damping, f"{self._name()}.logdet")
        return torch.log(self._damped_eigvals(d, "logdet", positive=True)).sum()

    # ---- inverses -------------------------------------------------------------------------------
    def inverse(self, damping: float) -> KroneckerInverse:
        """The EXACT damped inverse ``(kron(G, A) + damping I)^{-1}`` (Botev eq. 35 solved exactly), applied
        through the cached eigendecompositions. ``damping`` must be >= 0, and > 0 when a factor is singular.
        For Botev's cheaper factored approximation see :meth:`inverse_factored`."""
        return KroneckerInverse(self, damping)

    def optimal_pi(self) -> float:
        """Botev eq. 38 / Martens & Grosse's ``pi = sqrt((tr(G) / O) / (tr(A) / I))``: the split of the
        damping between the factors that minimizes the trace norm of the residual (eq. 37)."""
        if len(self.factors) != 2:
            raise ValueError(f"{self._name()}.optimal_pi(): pi splits the damping between two factors; "
                             "a one-factor block (a bias) has nothing to split")
        G, A = self.factors
        mean_g = G.diagonal().mean().item()
        mean_a = A.diagonal().mean().item()
        if not (mean_g > 0 and mean_a > 0):
            raise ValueError(f"{self._name()}.optimal_pi(): needs positive traces (tr(G)/O = {mean_g:.3e}, "
                             f"tr(A)/I = {mean_a:.3e}); pass pi= explicitly")
        return math.sqrt(mean_g / mean_a)

    def inverse_factored(self, damping: float, pi: float | str = "optimal") -> FactoredApproxInverse:
        """An APPROXIMATION of ``(kron(G, A) + damping I)^{-1}`` (Botev eq. 36):
        ``kron(G + pi sqrt(damping) I, A + sqrt(damping) / pi I)^{-1}``, itself a Kronecker product of two
        small inverses. ``pi="optimal"`` uses :meth:`optimal_pi` (eq. 38). It differs from the exact
        :meth:`inverse` by the residual of eq. 37 (``(sqrt(d)/pi) kron(G, I) + pi sqrt(d) kron(I, A)``
        before inversion) whenever ``damping > 0`` and both factors are nonzero. For a bias ``(G,)``
        there is nothing to split: the result is ``(G + damping I)^{-1}``, exact, and ``pi`` is unused.
        Factors must be positive semi-definite (as KFAC/KFLR/KFRA factors are)."""
        return FactoredApproxInverse(self, damping, pi)


class KroneckerInverse(CurvatureOperator):
    """The exact ``(kron(G, A) + d I)^{-1}`` of a :class:`Kronecker` block:
    ``kron(Q_G, Q_A) diag(1 / (g_i a_j + d)) kron(Q_G, Q_A)^T`` (the eigendecompositions are the
    block's cached ones). Products cost two Kronecker products with the eigenbases."""

    kind = "exact damped inverse"

    def __init__(self, block: Kronecker, damping: float):
        super().__init__(block.param_shape, block.dtype, block.device, block.label)
        self.block = block  # the block it inverts
        self.damping = check_damping(damping, f"{block._name()}.inverse")
        self._inv_eigvals = 1 / block._damped_eigvals(self.damping, "inverse", positive=False)

    def _describe(self) -> str:
        return f"({self.block._describe()} + {self.damping:g} I)^-1, exact via eigendecompositions"

    def _bases(self) -> tuple[torch.Tensor, ...]:
        return tuple(Q for _, Q in self.block.factor_eigh())

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        Q = self._bases()
        T = kron_matmat(tuple(q.mT for q in Q), self.block.to_factor_order(V)) * self._inv_eigvals[:, None]
        return self.block.from_factor_order(kron_matmat(Q, T))

    def _dense(self, chunk: int = 0) -> torch.Tensor:
        return self._matmat(torch.eye(self.numel, dtype=self.dtype, device=self.device))

    def diag(self) -> torch.Tensor:
        """``diag(Q diag(w) Q^T)_p = sum_k Q[p, k]^2 w_k`` with ``Q = kron(Q_G, Q_A)``, whose elementwise
        square is ``kron(Q_G^2, Q_A^2)``: one Kronecker product, no dense matrix."""
        squares = tuple(q * q for q in self._bases())
        return in_param_order(kron_matmat(squares, self._inv_eigvals[:, None]), self.param_shape, self.block.layout)

    def trace(self) -> torch.Tensor:
        """``sum_ij 1 / (g_i a_j + d)``."""
        return self._inv_eigvals.sum()


def _damped_factor_inverse(F: torch.Tensor, shift: float, which: str, what: str) -> torch.Tensor:
    """``(F + shift I)^{-1}`` by Cholesky, refusing a damped factor that is not positive definite."""
    damped = F + shift * torch.eye(F.shape[0], dtype=F.dtype, device=F.device)
    L, info = torch.linalg.cholesky_ex(damped)
    if info.item() != 0:
        raise SingularOperatorError(
            f"{what}: the damped factor {which} + {shift:g} I is not positive definite (Cholesky failed at "
            f"column {info.item()}). The factored approximation assumes positive semi-definite factors and a "
            f"damping > 0 when one is singular; for indefinite factors use the exact inverse(damping).")
    return torch.cholesky_inverse(L)


class FactoredApproxInverse(Kronecker):
    """APPROXIMATE damped inverse (Botev eq. 36-38): the Kronecker product
    ``kron((G + pi sqrt(d) I)^{-1}, (A + sqrt(d) / pi I)^{-1})``, which is not
    ``(kron(G, A) + d I)^{-1}`` (see :meth:`Kronecker.inverse_factored`; the exact one is
    :meth:`Kronecker.inverse`). Being a Kronecker product, it has every :class:`Kronecker` method;
    ``factors`` are the two inverted damped factors, ``approximates`` the original block."""

    kind = "factored approximate damped inverse"

    def __init__(self, of: Kronecker, damping: float, pi: float | str = "optimal"):
        what = f"{of._name()}.inverse_factored"
        d = check_damping(damping, what)
        if len(of.factors) == 1:
            chosen: float | None = None
            factors: tuple[torch.Tensor, ...] = (_damped_factor_inverse(of.factors[0], d, "G", what),)
        else:
            chosen = of.optimal_pi() if pi == "optimal" else float(pi)
            if not (math.isfinite(chosen) and chosen > 0):
                raise ValueError(f"{what}: pi must be 'optimal' or a finite number > 0; got {pi!r}")
            root = math.sqrt(d)
            factors = (_damped_factor_inverse(of.factors[0], chosen * root, "G", what),
                       _damped_factor_inverse(of.factors[1], root / chosen, "A", what))
        super().__init__(factors, of.param_shape, label=of.label, layout=of.layout)
        self.approximates = of
        self.damping = d
        self.pi = chosen

    def _describe(self) -> str:
        if self.pi is None:
            return f"({self.approximates._describe()} + {self.damping:g} I)^-1 (one factor: exact)"
        return (f"APPROXIMATION of ({self.approximates._describe()} + {self.damping:g} I)^-1 by Botev eq. 36: "
                f"kron((G + pi sqrt(d) I)^-1, (A + sqrt(d)/pi I)^-1) with pi={self.pi:.6g}; "
                f"the exact inverse is inverse(damping)")
