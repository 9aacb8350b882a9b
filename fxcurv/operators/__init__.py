"""Matrix-valued per-parameter results: linear operators over the row-major flattened parameter.

| class | what |
| --- | --- |
| :class:`CurvatureOperator` | the common base: ``@``, ``to_dense``, ``diag``, ``trace``, ``damped`` |
| :class:`Kronecker` | a Kronecker-factored block ``kron(G, A)`` / ``G`` (KFAC, KFLR, KFRA, HBP) |
| :class:`KroneckerLayout` | the arrangement its factors split (``ROWS``; ``TRANSPOSED``: ``ConvTranspose``) |
| :class:`KroneckerInverse` | its exact damped inverse (``Kronecker.inverse``) |
| :class:`FactoredApproxInverse` | Botev's factored approximation of it (``Kronecker.inverse_factored``) |
| :class:`BlockOperator` | an exact block known through products (``block_ggn``, ``block_hessian``) |
| :class:`DampedOperator` | ``scale * K + damping * I`` of any of them (EA-CG eq. 9-10) |
| :class:`GramEigen` | GGN eigenpairs of the whole network from its Gram matrix (``ggn_eigen``, ViViT) |
| :class:`BlockDiagonalEigen` | the same per parameter group (``ggn_eigen`` with ``groups=``) |
"""

from .base import (
    DENSE_CHUNK_COLUMNS,
    DENSE_MAX_BYTES,
    DIAG_MAX_COLUMNS,
    CurvatureOperator,
    DampedOperator,
    DenseSizeError,
    SingularOperatorError,
)
from .block import BlockOperator
from .gram_eigen import BlockDiagonalEigen, Directional, GramConsumedError, GramEigen, NoVectorsError
from .kronecker import FactoredApproxInverse, Kronecker, KroneckerInverse, KroneckerLayout

__all__ = [
    "CurvatureOperator", "DampedOperator", "Kronecker", "KroneckerInverse", "KroneckerLayout", "FactoredApproxInverse",
    "BlockOperator", "DenseSizeError", "SingularOperatorError", "DENSE_MAX_BYTES", "DENSE_CHUNK_COLUMNS",
    "DIAG_MAX_COLUMNS", "GramEigen", "BlockDiagonalEigen", "Directional", "NoVectorsError", "GramConsumedError",
]
