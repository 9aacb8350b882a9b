"""The GGN's eigenpairs through its Gram matrix (ViViT), as result objects.

The GGN is ``G = V D V^T`` with ``V [P, M]`` the per-sample factors ``a_kn = J_n^T S_kn`` as columns
(``M = K N``, ``k``-major) and ``D`` the factor signs (the identity for cross-entropy and squared error).
Its nonzero spectrum is the Gram matrix's ``V^T V`` (ViViT A.1; with signs, that of
``Lambda^1/2 Q^T D Q Lambda^1/2`` for ``V^T V = Q Lambda Q^T``), and each eigenvector is ``e = V c``
for a coefficient vector ``c`` in Gram space (A.2: ``c = u / sqrt(lambda)`` for a Gram eigenvector
``u``). :class:`GramEigen` holds one block's Gram matrix and computes, on demand:

* ``values`` (descending) from one symmetric eigendecomposition of the Gram matrix;
* ``vectors[name]`` ``[k, *param.shape]``, mapped to parameter space lazily (one VJP per use);
* ``directional()``: the per-sample first and second directional derivatives of ViViT eq. 8;
* ``newton_step(damping)``: the damped Newton step in the eigenspace (eq. 9), or, with
  ``restrict=False``, ``-(G + damping I)^-1 g`` by the matrix inversion lemma (ViViT eq. S.25);
* ``bootstrap_damping()``: the per-direction damping of ViViT B.3.

:class:`BlockDiagonalEigen` holds one :class:`GramEigen` per parameter group (the block-diagonal GGN,
ViViT C.2). The products with ``V`` come from a :class:`ParameterFactor` the quantity provides.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import importlib.util
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from ..gram import PackedGram

# The entries of eigenvectors formed at once in parameter space when directional() maps them there in
# chunks of directions: 64 MiB in float32 (the vectors of all directions of a large network would be
# k x P, e.g. 1152 x 1.3M for the MNIST MLP at N = 128).
DIRECTION_CHUNK_ELEMENTS = 1 << 24

# ViViT B.3 / B.5: dampings on a log-equidistant grid from 1e-4 to 1e2 with 200 points, 100 bootstrap
# resamples, and the 5% percentile of the resampled loss reduction as its lower bound.
BOOTSTRAP_GRID = (1e-4, 1e2, 200)
BOOTSTRAP_RESAMPLES = 100
BOOTSTRAP_PERCENTILE = 5.0


# Rows of the Gram matrix restored at a time after an in-place eigenvalue computation (the diagonal
# block's temporaries are MIRROR_BLOCK^2 entries, 1 MiB in float32).
MIRROR_BLOCK = 512
# Gram matrices from this size on (bytes) have their eigenvalues computed in place: below it the copy
# is small, and torch's own LAPACK call avoids switching to SciPy's thread pool (measured on 2 busy
# cores: 7.4 against 0.6 ms at M = 128, interleaved with torch's work; 1.5 against 1.2 ms alone).
# Above it the in-place call trades time for memory: SciPy's LAPACK took 963 ms against torch's 801 ms
# at M = 3000 (float32, 2 threads), for M^2 entries less at the peak.
IN_PLACE_BYTES = 16 << 20


@functools.cache
def scipy_installed() -> bool:
    """Whether SciPy (its LAPACK wrappers) can be imported; looked up once (the lookup searches the import
    path on disk: 0.36 ms, paid by every call of a Gram program before it was cached)."""
    return importlib.util.find_spec("scipy") is not None


def lapack_in_place(device: torch.device, dtype: torch.dtype, m: int) -> bool:
    """Whether eigenvalues of an ``[m, m]`` Gram matrix on ``device`` in ``dtype`` are computed in place:
    on CPU in float32 or float64, at least :data:`IN_PLACE_BYTES` large, with SciPy's LAPACK wrappers
    installed."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return (device.type == "cpu" and dtype in (torch.float32, torch.float64) and m * m * itemsize >= IN_PLACE_BYTES
            and scipy_installed())


def eigenvalues_in_place(gram: torch.Tensor) -> bool:
    """Whether :func:`symmetric_eigenvalues` works without a copy of ``gram``: a contiguous matrix
    without autograd history where :func:`lapack_in_place`."""
    return (gram.is_contiguous() and not gram.requires_grad
            and lapack_in_place(gram.device, gram.dtype, gram.shape[0]))


def symmetric_eigenvalues(gram: torch.Tensor) -> torch.Tensor:
    """The eigenvalues, ascending, of the symmetric matrix whose lower triangle ``gram`` holds (as
    ``torch.linalg.eigvalsh``), where :func:`eigenvalues_in_place` without a copy of it.

    ``torch.linalg.eigvalsh`` hands LAPACK a copy of the matrix, ``M^2`` entries besides it: at the
    Gram path's peak the copy and the Gram matrix are all that is alive. LAPACK's ``?syevd`` without
    eigenvectors destroys only the triangle it reads and the diagonal (workspace ``1 + 2 M`` reals):
    the row-major ``gram`` is passed as its column-major transpose, whose upper triangle is ``gram``'s
    lower one; afterwards the lower triangle is rebuilt from the untouched upper triangle and the
    diagonal from a copy (``M`` entries), :data:`MIRROR_BLOCK` rows at a time. The matrix is then
    exactly symmetric (its lower triangle mirrors the upper one; a Gram matrix is symmetric up to
    rounding in its diagonal blocks)."""
    if not eigenvalues_in_place(gram):
        return torch.linalg.eigvalsh(gram)
    lapack = importlib.import_module("scipy.linalg.lapack")
    m = gram.shape[0]
    if m == 0:
        return gram.new_zeros(0)
    diagonal = gram.diagonal().clone()
    syevd = lapack.ssyevd if gram.dtype == torch.float32 else lapack.dsyevd
    with torch.no_grad():
        values, _, status = syevd(gram.numpy().T, compute_v=0, lower=0, overwrite_a=1)
        _mirror_upper(gram, diagonal)
    if status != 0:
        raise torch.linalg.LinAlgError(f"symmetric_eigenvalues: LAPACK's ?syevd failed to converge (info={status}) "
                                       f"on the {m}x{m} Gram matrix")
    return torch.from_numpy(values)


def _mirror_upper(a: torch.Tensor, diagonal: torch.Tensor) -> None:
    """``a``'s strictly lower triangle := its strictly upper one transposed, its diagonal := ``diagonal``,
    in place (block rows of :data:`MIRROR_BLOCK`; the only temporaries are a diagonal block's)."""
    m = a.shape[0]
    for i in range(0, m, MIRROR_BLOCK):
        r = slice(i, min(m, i + MIRROR_BLOCK))
        if i:
            a[r, :i].copy_(a[:i, r].T)
        block = a[r, r]
        upper = block.triu(1)
        block.copy_(upper + upper.T)
    a.diagonal().copy_(diagonal)


_SPEVD = {torch.float32: ("sspevd", ctypes.c_float), torch.float64: ("dspevd", ctypes.c_double)}


@functools.cache
def _spevd(dtype: torch.dtype) -> Callable[..., None]:
    """LAPACK's ``?spevd`` (SciPy's BLAS/LAPACK, through the function pointers ``scipy.linalg.cython_lapack``
    exports; SciPy's Python wrappers have no packed eigensolver)."""
    name, real = _SPEVD[dtype]
    capsule = importlib.import_module("scipy.linalg.cython_lapack").__pyx_capi__[name]
    api = ctypes.pythonapi
    api.PyCapsule_GetName.restype = ctypes.c_char_p
    api.PyCapsule_GetName.argtypes = [ctypes.py_object]
    api.PyCapsule_GetPointer.restype = ctypes.c_void_p
    api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    address = api.PyCapsule_GetPointer(capsule, api.PyCapsule_GetName(capsule))
    p_int, p_real = ctypes.POINTER(ctypes.c_int), ctypes.POINTER(real)
    # jobz, uplo, n, ap, w, z, ldz, work, lwork, iwork, liwork, info
    kind = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, p_int, p_real, p_real, p_real, p_int, p_real, p_int,
                            p_int, p_int, p_int)
    return kind(address)


def packed_lapack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`packed_eigenvalues` runs for a matrix on ``device`` in ``dtype``: CPU, float32 or
    float64, SciPy installed."""
    return device.type == "cpu" and dtype in _SPEVD and scipy_installed()


def packed_storage(device: torch.device, dtype: torch.dtype, m: int) -> bool:
    """Whether a ``keep_gram=False`` Gram matrix ``[m, m]`` (eigenvalues alone, at the least memory) is
    accumulated in packed storage (its upper triangle, :class:`fxcurv.gram.PackedGram`): where
    :func:`packed_eigenvalues` runs and the square matrix would be at least :data:`IN_PLACE_BYTES`
    (below it the packed accumulation's row-by-row additions cost more time than the memory saved is
    worth). ``?spevd`` is unblocked: measured 34-51 s against ``?syevd``'s 15-22 s (in place) at
    ``M = 5418``, float32, one thread on a shared machine."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return packed_lapack(device, dtype) and m * m * itemsize >= IN_PLACE_BYTES


def packed_eigenvalues(packed: PackedGram) -> torch.Tensor:
    """The eigenvalues, ascending, of the symmetric matrix ``packed`` holds, by LAPACK's ``?spevd``
    without eigenvectors (``uplo = 'L'``: the row-major upper triangle read column-major). It
    overwrites ``packed.data`` (with its tridiagonal reduction); besides it, the workspace is ``2 M``
    reals, the eigenvalues ``M`` and one integer."""
    data = packed.data
    if not (data.is_contiguous() and packed_lapack(data.device, data.dtype)):
        raise ValueError(f"packed_eigenvalues: needs a contiguous CPU float32/float64 matrix and SciPy, got "
                         f"{data.dtype} on {data.device}")
    m = packed.size
    if m == 0:
        return data.new_zeros(0)
    values, work = data.new_empty(m), data.new_empty(max(1, 2 * m))
    z = data.new_empty(1)
    iwork = torch.empty(1, dtype=torch.int32)
    real = ctypes.POINTER(_SPEVD[data.dtype][1])

    def ptr(t: torch.Tensor, kind: type = real) -> object:
        return ctypes.cast(t.data_ptr(), kind)

    status = ctypes.c_int(0)
    with torch.no_grad():
        _spevd(data.dtype)(b"N", b"L", ctypes.byref(ctypes.c_int(m)), ptr(data), ptr(values), ptr(z),
                           ctypes.byref(ctypes.c_int(1)), ptr(work), ctypes.byref(ctypes.c_int(work.numel())),
                           ptr(iwork, ctypes.POINTER(ctypes.c_int)), ctypes.byref(ctypes.c_int(1)),
                           ctypes.byref(status))
    if status.value != 0:
        raise torch.linalg.LinAlgError(f"packed_eigenvalues: LAPACK's ?spevd failed (info={status.value}) on the "
                                       f"{m}x{m} packed Gram matrix")
    return values


class GramConsumedError(RuntimeError):
    """The Gram matrix was asked of a result whose eigenvalues were computed in its storage
    (``GGNEigen(keep_gram=False)``)."""


class ParameterFactor(Protocol):
    """Products with ``V`` (the per-sample factors of the parameters of one block as columns)."""

    names: tuple[str, ...]
    samples: int  # N, the batch the gradients come from
    numel: int  # the block's parameter entries

    def apply(self, coeffs: torch.Tensor, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """``V c`` for each column of ``coeffs [M, q]``: ``{name: [q, *shape]}``."""
        ...

    def project(self, vectors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``V^T v`` for ``q`` vectors ``{name: [q, *shape]}``: ``[M, q]``."""
        ...

    def sample_gradient_dots(self, vectors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``grad L_n . v`` for every sample ``n`` and vector: ``[N, q]`` (``L = sum_n L_n``)."""
        ...

    def gradient(self) -> dict[str, torch.Tensor]:
        """The mini-batch gradient ``sum_n grad L_n`` of the block's parameters."""
        ...


@dataclass(frozen=True)
class BudgetChoice:
    """What ``GGNEigen(memory_budget=...)`` chose: the budget (bytes), the chosen approximation's
    estimated memory (a ``GramMemory``: ``.peak``, ``.setting``, its parts) and every candidate tried
    with its estimated peak, in the order tried."""

    budget: float
    memory: object
    tried: tuple[tuple[str, int], ...]


class NoVectorsError(RuntimeError):
    """Eigenvectors, directional derivatives or Newton steps were asked of a result computed with
    ``vectors=False`` (only the Gram matrix and its eigenvalues)."""


@dataclass(frozen=True)
class Directional:
    """ViViT eq. 8 along the eigenvectors ``e_k``, scaled so that their means over the samples are the
    mini-batch values: ``first[n, k] = N grad L_n . e_k`` over the whole batch (mean: ``g . e_k``) and
    ``second[n, k] = N_s e_k^T G_n e_k`` over the curvature samples (mean: ``lambda_k``), with
    ``L = sum_n L_n`` (for a mean-reduced loss ``N L_n = l_n``, the sample's own loss, as in ViViT) and
    ``G_n`` the sample's share of the (subsampled, Monte Carlo) GGN."""

    first: torch.Tensor  # [N, k]
    second: torch.Tensor  # [N_s, k]


def _descending(values: torch.Tensor, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.argsort(values, descending=True)
    return values[order], vectors[:, order]


class GramEigen:
    """The eigenpairs of one GGN block ``V D V^T`` from its Gram matrix (ViViT A.1-A.2, B.3, C.2).

    ``gram [M, M]`` (``M = K N_s``, rows ``k``-major), ``sign [M]`` or ``None`` (all +1), ``factor`` the
    products with ``V`` (``None``: eigenvalues only). ``top_k``: keep the largest ``top_k`` eigenvalues;
    ``min_value``: drop eigenvalues of absolute value at or below it (besides the numerically zero ones,
    below ``M eps`` times the largest). ``setting`` says which approximation produced the block.
    """

    def __init__(self, gram: torch.Tensor | PackedGram, *, columns: int, sign: torch.Tensor | None = None,
                 factor: ParameterFactor | None = None, top_k: int | None = None,
                 min_value: float = 0.0, names: Sequence[str] = (), setting: str = "",
                 choice: BudgetChoice | None = None, keep_gram: bool = True):
        if isinstance(gram, torch.Tensor) and (gram.dim() != 2 or gram.shape[0] != gram.shape[1]):
            raise ValueError(f"GramEigen: the Gram matrix must be square, got {tuple(gram.shape)}")
        self._gram: torch.Tensor | PackedGram | None = gram
        self.size = gram.size if isinstance(gram, PackedGram) else gram.shape[0]  # M
        self.keep_gram = keep_gram
        self.columns = columns  # K
        self.curvature_samples = self.size // columns if columns else 0  # N_s
        self.sign = sign
        self.factor = factor
        self.top_k = top_k
        self.min_value = float(min_value)
        self.names = tuple(names) if factor is None else factor.names
        self.setting = setting
        self.choice = choice  # where memory_budget= chose the approximation
        self._decomposed: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._vectors: dict[str, torch.Tensor] = {}

    @property
    def gram(self) -> torch.Tensor:
        """The Gram matrix ``[M, M]``; one kept in packed storage (:class:`fxcurv.gram.PackedGram`) is
        unpacked on first access (and kept square from then on)."""
        if self._gram is None:
            raise GramConsumedError("the Gram matrix was consumed by the eigenvalue computation (keep_gram=False): "
                                    "ask for .gram before .values, or compile with GGNEigen(keep_gram=True)")
        if isinstance(self._gram, PackedGram):
            self._gram = self._gram.full()
        return self._gram

    # ---- the spectrum --------------------------------------------------------------------------------
    def _tolerance(self, values: torch.Tensor) -> float:
        """Eigenvalues at or below this are zero: ``M eps`` times the largest magnitude (numerical rank,
        as numpy's ``matrix_rank``), or ``min_value`` if larger."""
        if values.numel() == 0:
            return self.min_value
        eps = torch.finfo(values.dtype).eps
        return max(self.min_value, float(values.abs().max()) * self.size * eps)

    def _eigenvalues(self) -> torch.Tensor:
        """The Gram matrix's eigenvalues, ascending: from packed storage by :func:`packed_eigenvalues` (in
        the storage itself where ``keep_gram`` is off, which consumes it; else in a copy of it, half a
        square matrix), else by :func:`symmetric_eigenvalues`."""
        packed = self._gram
        if not isinstance(packed, PackedGram):
            return symmetric_eigenvalues(self.gram)
        if self.keep_gram:
            return packed_eigenvalues(PackedGram(packed.data.clone(), packed.size))
        self._gram = None
        return packed_eigenvalues(packed)

    def _decompose(self, vectors: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(values [k], coeffs [M, k])`` with ``e_k = V coeffs[:, k]``; coefficients only where
        ``vectors``. Besides the Gram matrix this holds, at its peak, LAPACK's copy and workspace
        (``3 M^2``) and afterwards the coefficients; eigenvalues alone work in place on the Gram matrix
        where they can (:func:`symmetric_eigenvalues`; see :mod:`fxcurv.quantities.gram_memory`)."""
        if self._decomposed is not None and (self._decomposed[1] is not None or not vectors):
            return self._decomposed
        if self.sign is None and not vectors:
            lam = self._eigenvalues()
            values = lam[lam > self._tolerance(lam)].flip(0)
            self._decomposed = (values[: self.top_k] if self.top_k is not None else values, None)
            return self._decomposed
        gram = self.gram
        lam, u = torch.linalg.eigh(gram)
        if self.sign is None:
            # Ascending: the nonzero eigenvalues are a suffix; the kept ones (top_k) a view of it.
            start = int((lam <= self._tolerance(lam)).sum())
            if self.top_k is not None:
                start = max(start, lam.shape[0] - self.top_k)
            values = lam[start:].flip(0)
            coeffs = u[:, start:].flip(1).div_(values.sqrt())
        else:
            # G = V D V^T = U_V L^1/2 (Q^T D Q) L^1/2 U_V^T with V = U_V L^1/2 Q^T: its nonzero eigenpairs are
            # those of T = L^1/2 Q^T D Q L^1/2 = W Theta W^T, e = V Q L^-1/2 W.
            keep = lam > self._tolerance(lam)
            lam, u = lam[keep], u[:, keep]
            root = lam.sqrt()
            t = (u * root).T @ (self.sign.to(gram.dtype)[:, None] * (u * root))
            theta, w = torch.linalg.eigh((t + t.T) / 2)
            keep = theta.abs() > self._tolerance(theta)
            values, w = _descending(theta[keep], w[:, keep])
            if self.top_k is not None:
                values, w = values[: self.top_k], w[:, : self.top_k]
            coeffs = (u / root) @ w
        self._decomposed = (values, coeffs)
        return self._decomposed

    def _projections(self) -> torch.Tensor:
        """``a_m . e_k = (V^T V c_k)_m``, ``[M, k]``: ``u_k sqrt(lambda_k) = c_k lambda_k`` without signs."""
        values, coeffs = self._coefficients()
        return coeffs * values if self.sign is None else self.gram @ coeffs

    @property
    def values(self) -> torch.Tensor:
        """The block's nonzero GGN eigenvalues, descending (the ``top_k`` largest where given)."""
        return self._decompose(vectors=self.factor is not None)[0]

    def _factor(self, what: str) -> ParameterFactor:
        if self.factor is None:
            raise NoVectorsError(f"{what} needs the factor columns, which this result did not keep: it was computed "
                                 "with vectors=False (the Gram matrix and eigenvalues only). Use "
                                 "fxcurv.quantities.GGNEigen(vectors=True) (the default)")
        return self.factor

    def _coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        values, coeffs = self._decompose(vectors=True)
        assert coeffs is not None
        return values, coeffs

    @property
    def coefficients(self) -> torch.Tensor:
        """``[M, k]``: eigenvector ``k`` is ``V coefficients[:, k]`` (ViViT A.2: ``u_k / sqrt(lambda_k)``)."""
        return self._coefficients()[1]

    @property
    def vectors(self) -> _Vectors:
        """``vectors[name]``: the eigenvectors' entries for parameter ``name``, ``[k, *shape]``, mapped to
        parameter space on first access (ViViT A.2)."""
        self._factor("eigenvectors")
        return _Vectors(self)

    def _vectors_of(self, name: str) -> torch.Tensor:
        if name not in self._vectors:
            self._vectors[name] = self._factor("eigenvectors").apply(self.coefficients, (name,))[name]
        return self._vectors[name]

    # ---- directional derivatives (ViViT eq. 8) -----------------------------------------------------
    def directional(self) -> Directional:
        """Per-sample first and second directional derivatives along every eigenvector (ViViT eq. 8,
        scaled as :class:`Directional` says). The second ones come from the Gram matrix alone
        (``a_kn . e = (V^T V c)_kn``); the first ones map the eigenvectors to parameter space (in chunks of
        directions) and take per-sample JVPs of each use with the kept gradients."""
        factor = self._factor("directional derivatives")
        values, coeffs = self._coefficients()
        k_cols, n_s = self.columns, self.curvature_samples
        sq = self._projections().reshape(k_cols, n_s, -1) ** 2
        if self.sign is not None:
            sq = sq * self.sign.to(sq.dtype).reshape(k_cols, n_s, 1)
        second = n_s * sq.sum(0)
        chunk = max(1, DIRECTION_CHUNK_ELEMENTS // max(1, factor.numel))
        parts = []
        for start in range(0, coeffs.shape[1], chunk):
            vectors = factor.apply(coeffs[:, start:start + chunk])
            parts.append(factor.sample_gradient_dots(vectors))
        first = factor.samples * (torch.cat(parts, dim=1) if parts else coeffs.new_zeros(factor.samples, 0))
        return Directional(first, second)

    # ---- damped Newton steps (ViViT eq. 9, S.25) ---------------------------------------------------
    def gradient_projections(self) -> torch.Tensor:
        """``g . e_k`` for the mini-batch gradient ``g``, ``[k]``: ``(V^T g) . c_k``."""
        factor = self._factor("Newton steps")
        grad = factor.gradient()
        vtg = factor.project({n: g.unsqueeze(0) for n, g in grad.items()})[:, 0]
        return vtg @ self.coefficients

    def newton_step(self, damping: float | torch.Tensor, restrict: bool = True) -> dict[str, torch.Tensor]:
        """The damped Newton step ``{name: tensor}`` of the block.

        ``restrict=True`` (ViViT eq. 9's first term): ``-sum_k (g . e_k) / (lambda_k + damping_k) e_k`` over
        the block's eigenvectors (after ``top_k``); ``damping`` a number or one per direction ``[k]``
        (e.g. :meth:`bootstrap_damping`). ``restrict=False``: ``-(G + damping I)^-1 g`` on the whole
        parameter space by the matrix inversion lemma, ``(G + d I)^-1 = (I - V (d D + V^T V)^-1 V^T) / d``
        (ViViT eq. S.25), with one solve in Gram space; ``damping`` a positive number.
        """
        factor = self._factor("Newton steps")
        if restrict:
            values, coeffs = self._coefficients()
            d = torch.as_tensor(damping, dtype=values.dtype, device=values.device)
            if d.dim() not in (0, 1) or (d.dim() == 1 and d.shape[0] != values.shape[0]):
                raise ValueError(f"newton_step: damping must be a number or one per direction ({values.shape[0]}), "
                                 f"got shape {tuple(d.shape)}")
            denominator = values + d
            if bool((denominator == 0).any()):
                raise ValueError("newton_step: lambda_k + damping vanishes for some direction; use a damping that "
                                 "keeps every lambda_k + damping nonzero")
            step = factor.apply((coeffs @ (-self.gradient_projections() / denominator)).unsqueeze(1))
            return {n: v[0] for n, v in step.items()}
        if isinstance(damping, torch.Tensor) and damping.dim() > 0:
            raise ValueError("newton_step(restrict=False) takes one damping for the whole space, got a tensor of "
                             f"shape {tuple(damping.shape)}; per-direction dampings need restrict=True")
        delta = float(damping)
        if not delta > 0:
            raise ValueError(f"newton_step(restrict=False): the damping must be positive (G + d I is singular on the "
                             f"GGN's null space otherwise), got {damping!r}")
        grad = factor.gradient()
        vtg = factor.project({n: g.unsqueeze(0) for n, g in grad.items()})
        diag = torch.full((self.gram.shape[0],), delta, dtype=self.gram.dtype, device=self.gram.device)
        if self.sign is not None:
            diag = diag * self.sign.to(diag.dtype)
        inner = torch.linalg.solve(self.gram + torch.diag(diag), vtg)
        back = factor.apply(inner)
        return {n: -(grad[n] - back[n][0]) / delta for n in grad}

    # ---- bootstrap damping (ViViT B.3) -------------------------------------------------------------
    def bootstrap_damping(self, grid: torch.Tensor | None = None, resamples: int = BOOTSTRAP_RESAMPLES,
                          percentile: float = BOOTSTRAP_PERCENTILE,
                          generator: torch.Generator | None = None) -> torch.Tensor:
        """One damping per direction, ``[k]`` (ViViT B.3): for every candidate ``d`` on ``grid`` (default
        log-equidistant 1e-4 to 1e2, 200 points, B.5) the step ``s_k = -gamma_k / (lambda_k + d)`` along
        ``e_k`` reduces the quadratic model by ``R = -s gamma* - s^2 lambda* / 2`` on a resampled batch
        (``gamma*``, ``lambda*``: means of the directional derivatives of samples drawn with replacement);
        the damping maximizing the ``percentile`` of ``R`` over ``resamples`` resamples is chosen. Where
        first and second derivatives come from the same samples they are resampled together."""
        info = self.directional()
        first, second = info.first, info.second
        if grid is None:
            low, high, points = BOOTSTRAP_GRID
            grid = torch.logspace(torch.log10(torch.tensor(low)), torch.log10(torch.tensor(high)), points)
        grid = grid.to(first.dtype).to(first.device)
        n, n_s = first.shape[0], second.shape[0]
        idx_first = torch.randint(0, n, (resamples, n), generator=generator).to(first.device)
        idx_second = idx_first if n_s == n else torch.randint(0, n_s, (resamples, n_s), generator=generator).to(
            first.device)
        gamma_b = first[idx_first].mean(1)  # [B, k]
        lambda_b = second[idx_second].mean(1)
        step = -first.mean(0) / (second.mean(0) + grid[:, None])  # [G, k]
        reduction = -step[:, None] * gamma_b[None] - 0.5 * step[:, None] ** 2 * lambda_b[None]  # [G, B, k]
        bound = torch.quantile(reduction, percentile / 100, dim=1)  # [G, k]
        return grid[bound.argmax(0)]

    def __repr__(self) -> str:
        m = self.size
        return f"GramEigen(gram {m}x{m}, {len(self.names)} parameters{', ' + self.setting if self.setting else ''})"


class _Vectors(Mapping[str, torch.Tensor]):
    """The eigenvectors per parameter, each mapped to parameter space on first access."""

    def __init__(self, owner: GramEigen):
        self._owner = owner

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._owner.names:
            raise KeyError(f"{name!r} is not a parameter of this block; it has {list(self._owner.names)}")
        return self._owner._vectors_of(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._owner.names)

    def __len__(self) -> int:
        return len(self._owner.names)


class BlockDiagonalEigen:
    """One :class:`GramEigen` per parameter group: the eigenpairs of the block-diagonal GGN (ViViT C.2).
    ``result[group]`` is a block (``keys()``, ``items()``, iteration as a mapping of groups to blocks);
    ``values`` are the blocks' eigenvalues by group, as for one block; :meth:`newton_step` joins the
    blocks' steps."""

    def __init__(self, blocks: dict[str, GramEigen], setting: str = "", choice: BudgetChoice | None = None):
        self.blocks = blocks
        self.setting = setting
        self.choice = choice

    def __getitem__(self, group: str) -> GramEigen:
        try:
            return self.blocks[group]
        except KeyError:
            raise KeyError(f"no parameter group {group!r}; the groups are {list(self.blocks)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    def keys(self):  # noqa: ANN201 - dict's own view
        return self.blocks.keys()

    def items(self):  # noqa: ANN201 - dict's own view
        return self.blocks.items()

    @property
    def values(self) -> dict[str, torch.Tensor]:
        """Each block's eigenvalues, descending, by group."""
        return {g: b.values for g, b in self.blocks.items()}

    def directional(self) -> dict[str, Directional]:
        return {g: b.directional() for g, b in self.blocks.items()}

    def newton_step(self, damping: float | Mapping[str, float | torch.Tensor],
                    restrict: bool = True) -> dict[str, torch.Tensor]:
        """Every block's damped Newton step (ViViT C.2: the block-diagonal GGN inverted block by block);
        ``damping`` one number, or one per group (a number or per-direction tensor)."""
        out: dict[str, torch.Tensor] = {}
        for g, block in self.blocks.items():
            d = damping[g] if isinstance(damping, Mapping) else damping
            out.update(block.newton_step(d, restrict=restrict))
        return out

    def __repr__(self) -> str:
        return f"BlockDiagonalEigen({len(self.blocks)} groups: {list(self.blocks)})"
