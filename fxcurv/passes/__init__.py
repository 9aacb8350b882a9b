"""Compiler passes, one job per file, each a function ``Graph -> Graph`` (or producing one).

The pipeline (:func:`fxcurv.api.build_program`)::

    canonicalize      traced graph  -> canonical forward graph (op vocabulary, params as inputs)
    insert_curvature  forward graph -> curvature program (gradient + curvature messages)
    share_products    merge identical products between quantities (CSE)
    eliminate_dead_code
    free_messages     schedule for early frees, annotate liveness
"""

from .canonicalize import canonicalize
from .dead_code import eliminate_dead_code
from .free_messages import free_messages
from .fuse import fuse
from .insert_curvature import insert_curvature
from .share_products import share_products

__all__ = ["canonicalize", "insert_curvature", "share_products", "eliminate_dead_code", "fuse", "free_messages"]
