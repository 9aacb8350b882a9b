"""Compiler passes, one job per file; :mod:`.pipeline` lists them in the order they run.

    canonicalize      traced graph  -> canonical forward graph (op vocabulary, params as inputs)
    insert_curvature  forward graph -> curvature program (gradient + curvature messages)
    share_products    merge identical products between quantities (CSE)
    eliminate_dead_code
    record_shapes     fake-tensor shapes of every value (shape_prop)
    fuse              pointwise regions, matmul epilogues, parameter reductions (fused backend)
    free_messages     schedule for early frees, annotate liveness
    estimate_memory   the program's peak memory (memory)
"""

from .canonicalize import canonicalize
from .dead_code import eliminate_dead_code
from .free_messages import free_messages
from .fuse import fuse
from .insert_curvature import insert_curvature
from .memory import estimate_memory
from .pipeline import PIPELINE, run_pipeline
from .shape_prop import record_shapes
from .share_products import share_products

__all__ = ["PIPELINE", "run_pipeline", "canonicalize", "insert_curvature", "share_products",
           "eliminate_dead_code", "record_shapes", "fuse", "free_messages", "estimate_memory"]
