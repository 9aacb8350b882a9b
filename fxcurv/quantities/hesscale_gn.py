"""``hesscale_gn``: HesScaleGN (HesScale Sec. 3), HesScale without the activations' ``phi''(x) g``
terms: a diagonal approximation of the GGN."""

from __future__ import annotations

from ..curvature.messages import DiagonalStream
from .base import register
from .hesscale import DiagonalBackprop

HESSCALE_GN = register(DiagonalBackprop("hesscale_gn", "HesScaleGN approximation of the GGN diagonal",
                               "HesScale Sec. 3, eq. 4-5", DiagonalStream(residual=False)))
