"""The memory of ``ggn_eigen``'s Gram path, estimated before anything runs.

The program's own estimate (:mod:`fxcurv.passes.memory`, from shapes and liveness) covers every value
the program keeps, the running Gram matrices ``[M, M]`` (``M = K N_s``) included; two things happen
outside its values and are added here in closed form:

* the temporaries inside the Gram rules: a chunk of ``c`` rows of a block row of the product, ``c x M``
  (ViViT C.1's ``(S S^T) o (x x^T)``, one column index at a time; ``c = min(N_s, R / M)``,
  ``R`` = :data:`fxcurv.gram.GRAM_ROW_ELEMENTS`), the same rows of ``x x^T`` (``c x N_s``), and where an op's data
  input has positions (convolutions), its per-sample factors, two blocks of at most
  :data:`fxcurv.gram.GRAM_BLOCK_ELEMENTS` entries (or all ``K N_s |W|`` where fewer);
* the eigendecomposition after the program: ``torch.linalg.eigh`` writes the eigenvectors into a copy
  of the matrix and LAPACK's ``syevd`` needs ``1 + 6 M + 2 M^2`` reals (``3 + 5 M`` integers) of
  workspace; ``eigvalsh`` (``vectors=False``) a copy and ``1 + 2 M`` reals -- or, where the eigenvalues
  are computed in place (:func:`fxcurv.operators.gram_eigen.symmetric_eigenvalues`: CPU, SciPy, at
  least ``IN_PLACE_BYTES``), no copy: the workspace, the eigenvalues, a copy of the diagonal and the
  restoring block's temporaries (``4 M + 1 + 2 B_m^2``, ``B_m = min(M, MIRROR_BLOCK)``).

With ``keep_gram=False`` above :data:`fxcurv.operators.gram_eigen.IN_PLACE_BYTES` (CPU, SciPy) the Gram
matrix is packed (:class:`fxcurv.gram.PackedGram`, ``M (M + 1) / 2`` entries, what the program's
estimate then counts) and ``?spevd`` in it needs ``3 M + 1`` reals and one integer besides it (plus a
copy of the packed matrix where a packed block keeps its Gram matrix).

So, in entries of the parameters' dtype, with ``L`` the layers and ``W_l`` their weights:

    peak ~ max(program + max_l [c M + c N_s + 2 min(B, K N_s |W_l|)],  outputs + 3 M^2 + 7 M)

(``M^2 + 3 M``, or in place ``4 M + 1 + 2 B_m^2``, for the eigendecomposition instead of ``3 M^2 + 7 M``
with ``vectors=False``), where the
program's peak itself grows as ``M^2`` (the Gram matrix) plus the messages ``(1 + K) N`` times the
largest layer output, and ``outputs`` is the Gram matrix plus, with ``vectors=True``, the columns,
gradients and inputs every use keeps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from .. import gram as gram_products
from ..node_info import info
from ..operators.gram_eigen import MIRROR_BLOCK, lapack_in_place
from ..passes.memory import MemoryEstimate

# LAPACK's ?syevd with eigenvectors: lwork = 1 + 6 M + 2 M^2 reals, liwork = 3 + 5 M integers (its
# documentation's minimum, what torch allocates); without: lwork = 1 + 2 M, liwork = 1.
_INT_BYTES = 4


def decomposition_bytes(m: int, itemsize: int, vectors: bool, device: torch.device | None = None,
                        packed: bool = False, keep_gram: bool = True) -> int:
    """Bytes the eigendecomposition of an ``[m, m]`` Gram matrix on ``device`` (``None``: a copy
    assumed) allocates besides the matrix; eigenvalues alone (``vectors=False``) where computed in place
    (:func:`fxcurv.operators.gram_eigen.lapack_in_place`) without the copy. From ``packed`` storage
    (:func:`fxcurv.operators.gram_eigen.packed_eigenvalues`): workspace ``2 M``, eigenvalues ``M``, one
    integer, and with ``keep_gram`` a copy of the packed matrix (``M (M + 1) / 2``)."""
    if packed and not vectors:
        copy = gram_products.packed_numel(m) if keep_gram else 0
        return itemsize * (copy + 3 * m + 1) + _INT_BYTES
    if vectors:
        # eigenvectors (a copy of the matrix) + workspace + eigenvalues
        return itemsize * (m * m + (1 + 6 * m + 2 * m * m) + m) + _INT_BYTES * (3 + 5 * m)
    dtype = {4: torch.float32, 8: torch.float64}.get(itemsize)
    if device is not None and dtype is not None and lapack_in_place(device, dtype, m):
        # workspace + eigenvalues + the diagonal's copy + one diagonal block's two temporaries
        block = min(m, MIRROR_BLOCK)
        return itemsize * ((1 + 2 * m) + m + m + 2 * block * block) + _INT_BYTES
    return itemsize * (m * m + (1 + 2 * m) + m) + _INT_BYTES


def _shape(node: object) -> tuple[int, ...] | None:
    return info(node).shape if isinstance(node, fx.Node) else None


def rule_temporary_bytes(graph: fx.Graph, targets: tuple[type, ...]) -> int:
    """The largest temporary inside one Gram node of ``graph`` (nodes whose target is an instance of
    ``targets``), from the shapes of its columns and data input (see the module docstring)."""
    worst = 0
    for node in graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, targets):
            continue
        s = _shape(node.args[-1])  # the columns [K, N_s, ...] or per-sample factors [K, N_s, *param]
        if s is None or len(s) < 2:
            continue
        k, n = s[0], s[1]
        m = k * n
        rows = gram_products.gram_rows(m, n)
        entries = rows * m + rows * n  # a chunk of a block row and its weight rows
        x = _shape(node.kwargs.get("x"))
        weight = _shape(node.kwargs.get("weight"))
        if x is not None and len(x) > 2:
            per_sample = k * n * (int(torch.Size(weight).numel()) if weight is not None else 1)
            entries += 2 * min(gram_products.GRAM_BLOCK_ELEMENTS, per_sample)
        dtype = info(node).dtype or torch.float32
        worst = max(worst, entries * torch.empty((), dtype=dtype).element_size())
    return worst


@dataclass(frozen=True)
class GramMemory:
    """The estimated peak of a ``ggn_eigen`` call and its parts, in bytes.

    ``program``: the program's values at their peak; ``outputs``: what it returns; ``temporaries``:
    the largest temporary inside one Gram node; ``decomposition``: the eigendecomposition's own
    allocations; ``inputs``: batch and parameters (alive throughout, not in ``peak``). ``setting``: the
    approximation these numbers are for.
    """

    program: int
    outputs: int
    temporaries: int
    decomposition: int
    inputs: int
    setting: str

    @property
    def peak(self) -> int:
        """The larger of the program's peak with one Gram node's temporaries, and its outputs with the
        eigendecomposition."""
        return max(self.program + self.temporaries, self.outputs + self.decomposition)

    @classmethod
    def of(cls, estimate: MemoryEstimate, graph: fx.Graph, targets: tuple[type, ...], gram_sizes: list[int],
           itemsize: int, vectors: bool, setting: str, device: torch.device | None = None, packed: bool = False,
           keep_gram: bool = True) -> GramMemory:
        decomposition = max((decomposition_bytes(m, itemsize, vectors, device, packed, keep_gram)
                             for m in gram_sizes), default=0)
        return cls(estimate.peak_bytes, estimate.output_bytes, rule_temporary_bytes(graph, targets), decomposition,
                   estimate.input_bytes, setting)

    def __str__(self) -> str:
        mib = 2**20
        return (f"{self.peak / mib:.1f} MiB at the peak ({self.setting}): program {self.program / mib:.1f} MiB + Gram "
                f"temporaries {self.temporaries / mib:.1f} MiB, or outputs {self.outputs / mib:.1f} MiB + "
                f"eigendecomposition {self.decomposition / mib:.1f} MiB; plus {self.inputs / mib:.1f} MiB of inputs")
