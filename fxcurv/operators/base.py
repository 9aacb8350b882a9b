"""What a matrix-valued per-parameter result is: a linear operator over the flattened parameter.

A curvature block for a parameter ``W`` of shape ``S`` with ``P = prod(S)`` entries is a ``[P, P]``
matrix acting on ``W.reshape(-1)`` (row-major flattening, PyTorch's and BackPACK's). fxcurv returns
such a block as a :class:`CurvatureOperator`: a Kronecker product of small factors
(:class:`~fxcurv.operators.kronecker.Kronecker`) or an exact block known only through its products
(:class:`~fxcurv.operators.block.BlockOperator`). Both answer the same calls:

* ``K @ v`` for ``v`` shaped like the parameter (result shaped like it), flat ``[P]`` (result ``[P]``)
  or a matrix of columns ``[P, M]`` (result ``[P, M]``);
* ``to_dense()`` -> ``[P, P]``, refused above :data:`DENSE_MAX_BYTES` unless ``max_bytes=`` allows it;
* ``diag()`` shaped like the parameter, ``trace()``;
* ``damped(damping, scale)`` -> the operator ``scale * K + damping * I`` (EA-CG eq. 9-10);
* ``shape`` ``(P, P)``, ``param_shape``, ``dtype``, ``device``, ``numel``.

A quantity returns one from :meth:`~fxcurv.quantities.base.Quantity.wrap`, e.g.
``Kronecker(value, param.shape, label=self.name)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import FxcurvError, MemoryBudgetError

# A dense [P, P] block is one allocation on the operator's device. 1 GiB holds a float32 block of a
# 128 x 128 weight (P = 16,384) or a float64 block of P = 11,585: enough for the small layers where a
# dense block is useful (tests, Laplace on a last layer), and an allocation every CPU or GPU we target
# survives. A block beyond that is almost always meant to be used through products; callers who do
# want it pass ``max_bytes=``.
DENSE_MAX_BYTES = 2**30

# Identity columns per product when a block known only through products is densified or its
# diagonal extracted. A matrix-free product's own intermediates usually grow with the number of
# columns (per-sample Jacobian products, vmap), so the chunk bounds them; 256 columns amortize the
# per-call overhead of a product over enough work.
DENSE_CHUNK_COLUMNS = 256

# Extracting the exact diagonal of a block known only through products costs one product per entry
# (P columns). Beyond 16,384 entries (the 128 x 128 weight above) that is the cost of densifying a
# large block, and a dedicated diagonal quantity (``diag_ggn``, ``diag_hessian``) or a stochastic
# estimate is the tool; ``max_columns=`` overrides.
DIAG_MAX_COLUMNS = 16_384

# Probe columns of the matrix-free symmetry check: the defect of u^T K v - v^T K u over 4 random
# pairs; one pair already detects an asymmetric operator with probability one.
SYMMETRY_PROBES = 4


class DenseSizeError(MemoryBudgetError):
    """A dense matrix (or a column-by-column extraction) was refused as too large; the message says
    what it would cost and how to allow it."""


class SingularOperatorError(FxcurvError, ValueError):
    """An inverse (or log-determinant) was asked of a matrix that is singular or not positive definite
    at the damping given; the message says the smallest eigenvalue and what damping would do."""


def format_bytes(n: int) -> str:
    """``n`` bytes in binary units, e.g. ``'1.50 GiB'``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def dense_bytes(numel: int, dtype: torch.dtype) -> int:
    """Bytes of a dense ``[numel, numel]`` matrix of ``dtype``."""
    return numel * numel * torch.empty((), dtype=dtype).element_size()


def check_dense_size(what: str, numel: int, dtype: torch.dtype, max_bytes: int | None) -> None:
    """Refuse a dense ``[numel, numel]`` matrix above ``max_bytes`` (default :data:`DENSE_MAX_BYTES`)."""
    limit = DENSE_MAX_BYTES if max_bytes is None else int(max_bytes)
    need = dense_bytes(numel, dtype)
    if need > limit:
        raise DenseSizeError(
            f"{what}.to_dense() would allocate a [{numel}, {numel}] {dtype} matrix: {format_bytes(need)} "
            f"({need} bytes), above the limit of {format_bytes(limit)} (fxcurv.operators.DENSE_MAX_BYTES). "
            f"Use products (K @ v) instead, or pass max_bytes={need} to allow it.")


def _columns_and_restore(v: torch.Tensor, param_shape: torch.Size, numel: int,
                         what: str) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """``v`` as columns ``[P, M]``, and how to give a ``[P, M]`` result the shape ``v`` came in.

    Accepted: shaped like the parameter, flat ``[P]``, or ``[P, M]``. Where two readings coincide
    (a ``[P, 1]`` parameter, a flat parameter) they give the same numbers, so the order of the tests
    below decides only the result's shape, which is then ``v``'s shape.
    """
    if v.shape == param_shape:
        return v.reshape(numel, 1), lambda out: out.reshape(param_shape)
    if v.shape == (numel,):
        return v.reshape(numel, 1), lambda out: out.reshape(numel)
    if v.dim() == 2 and v.shape[0] == numel:
        return v, lambda out: out
    raise ValueError(
        f"{what} @ v: v must be shaped like the parameter {tuple(param_shape)}, flat [{numel}], or a matrix "
        f"of columns [{numel}, M]; got {tuple(v.shape)}")


class CurvatureOperator:
    """A ``[P, P]`` matrix over one parameter's row-major flattened entries.

    Subclasses implement :meth:`_matmat` (``[P, M] -> [P, M]``) and may override :meth:`_dense`,
    :meth:`diag` and :meth:`trace` with cheaper exact formulas. ``label`` (e.g. the quantity's name)
    appears in ``repr`` and error messages.
    """

    kind: str = "operator"  # what repr calls it

    def __init__(self, param_shape: Sequence[int], dtype: torch.dtype, device: str | torch.device,
                 label: str = ""):
        if not dtype.is_floating_point:
            raise TypeError(f"a curvature operator is real floating point; got dtype {dtype}")
        self.param_shape = torch.Size(param_shape)
        self.dtype = dtype
        # torch.device('cuda') and a tensor's device 'cuda:0' compare unequal: normalize as a tensor would.
        self.device = torch.empty(0, device=device).device
        self.label = label

    # ---- what it is -----------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        """``P``, the number of entries of the parameter."""
        return self.param_shape.numel()

    @property
    def shape(self) -> tuple[int, int]:
        """``(P, P)``: the shape of the matrix (``param_shape`` is the parameter's)."""
        return (self.numel, self.numel)

    def _name(self) -> str:
        return f"{type(self).__name__}({self.label})" if self.label else type(self).__name__

    def _describe(self) -> str:
        """What the operator is, for ``repr`` (subclasses say more)."""
        return self.kind

    def __repr__(self) -> str:
        label = f"{self.label}: " if self.label else ""
        return (f"{type(self).__name__}({label}{self._describe()}; parameter {list(self.param_shape)}, "
                f"P={self.numel}, {self.dtype}, {self.device})")

    # ---- products -------------------------------------------------------------------------------
    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``K @ V`` for columns ``V`` ``[P, M]``."""
        raise NotImplementedError

    def _check_operand(self, v: torch.Tensor) -> None:
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{self._name()} @ v: v must be a torch.Tensor, got {type(v).__name__}")
        if v.dtype != self.dtype or v.device != self.device:
            raise TypeError(
                f"{self._name()} @ v: v is {v.dtype} on {v.device}, the operator {self.dtype} on {self.device}; "
                f"pass v.to(dtype={self.dtype}, device='{self.device}')")

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        """``K @ v``: ``v`` shaped like the parameter, flat ``[P]``, or columns ``[P, M]``; the result
        has ``v``'s shape."""
        self._check_operand(v)
        V, restore = _columns_and_restore(v, self.param_shape, self.numel, self._name())
        return restore(self._matmat(V))

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """The same as ``self @ v``."""
        return self @ v

    # ---- dense and diagonal ---------------------------------------------------------------------
    def _identity_chunks(self, chunk: int):
        """``(start, E)`` with ``E`` the identity's columns ``start:start + k``, ``[P, k]``."""
        P = self.numel
        for start in range(0, P, chunk):
            k = min(chunk, P - start)
            E = torch.zeros(P, k, dtype=self.dtype, device=self.device)
            cols = torch.arange(k, device=self.device)
            E[start + cols, cols] = 1
            yield start, E

    def _dense(self, chunk: int = DENSE_CHUNK_COLUMNS) -> torch.Tensor:
        """``K`` as ``[P, P]``: the products with the identity's columns, ``chunk`` at a time."""
        out = torch.empty(self.numel, self.numel, dtype=self.dtype, device=self.device)
        for start, E in self._identity_chunks(chunk):
            out[:, start:start + E.shape[1]] = self._matmat(E)
        return out

    def to_dense(self, max_bytes: int | None = None) -> torch.Tensor:
        """``K`` as a ``[P, P]`` tensor; refused above ``max_bytes`` (default :data:`DENSE_MAX_BYTES`)."""
        check_dense_size(self._name(), self.numel, self.dtype, max_bytes)
        return self._dense()

    def _diag_by_columns(self, max_columns: int | None, chunk: int = DENSE_CHUNK_COLUMNS) -> torch.Tensor:
        """``diag(K)`` from products with identity columns (``P`` products, ``[P, chunk]`` memory)."""
        limit = DIAG_MAX_COLUMNS if max_columns is None else int(max_columns)
        P = self.numel
        if P > limit:
            raise DenseSizeError(
                f"{self._name()}.diag() of an operator known only through products costs one product per entry: "
                f"{P} products, above the limit of {limit} (fxcurv.operators.DIAG_MAX_COLUMNS). Construct it with "
                f"diag= (or use a diagonal quantity such as diag_ggn), or pass max_columns={P} to allow it.")
        out = torch.empty(P, dtype=self.dtype, device=self.device)
        for start, E in self._identity_chunks(chunk):
            k = E.shape[1]
            cols = torch.arange(k, device=self.device)
            out[start:start + k] = self._matmat(E)[start + cols, cols]
        return out.reshape(self.param_shape)

    def diag(self) -> torch.Tensor:
        """The diagonal of ``K``, shaped like the parameter."""
        return self._diag_by_columns(None)

    def trace(self) -> torch.Tensor:
        """``tr(K)``, a 0-dim tensor."""
        return self.diag().sum()

    # ---- derived operators and checks ------------------------------------------------------------
    def damped(self, damping: float, scale: float = 1.0) -> DampedOperator:
        """The operator ``scale * K + damping * I`` (EA-CG eq. 9-10 with ``scale = 1 - alpha``,
        ``damping = alpha``), applied without forming anything: for conjugate gradients."""
        return DampedOperator(self, damping, scale)

    def asymmetry(self, probes: int = SYMMETRY_PROBES, seed: int = 0) -> float:
        """Relative symmetry defect ``||U^T K V - (V^T K U)^T||_F / ||U^T K V||_F`` for random ``U``,
        ``V`` ``[P, probes]`` (a fixed ``seed``; the global RNG is untouched): about the rounding error
        for a symmetric ``K``, order one for an asymmetric one. Matrix-free, for tests and checks."""
        gen = torch.Generator(device=self.device).manual_seed(seed)
        U = torch.randn(self.numel, probes, generator=gen, dtype=self.dtype, device=self.device)
        V = torch.randn(self.numel, probes, generator=gen, dtype=self.dtype, device=self.device)
        a = U.mT @ self._matmat(V)
        b = (V.mT @ self._matmat(U)).mT
        scale = max(a.norm().item(), b.norm().item())
        return (a - b).norm().item() / scale if scale > 0 else 0.0


class DampedOperator(CurvatureOperator):
    """``scale * K + damping * I`` for an operator ``K`` (EA-CG eq. 9, 10b: ``scale = 1 - alpha``,
    ``damping = alpha``). Its products cost one product of ``K``; ``diag``/``trace``/``to_dense``
    follow from ``K``'s."""

    kind = "damped operator"

    def __init__(self, base: CurvatureOperator, damping: float, scale: float = 1.0):
        super().__init__(base.param_shape, base.dtype, base.device, base.label)
        self.base = base
        self.damping = float(damping)
        self.scale = float(scale)

    def _describe(self) -> str:
        return f"{self.scale:g} * K + {self.damping:g} * I, K the {type(self.base).__name__} {self.base._describe()}"

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.scale * self.base._matmat(V) + self.damping * V

    def _dense(self, chunk: int = DENSE_CHUNK_COLUMNS) -> torch.Tensor:
        out = self.scale * self.base._dense()
        out.diagonal().add_(self.damping)
        return out

    def diag(self) -> torch.Tensor:
        return self.scale * self.base.diag() + self.damping

    def trace(self) -> torch.Tensor:
        return self.scale * self.base.trace() + self.damping * self.numel
