"""Per-op derivative rules, one file per op family; importing this package registers them all.

See :mod:`fxcurv.rules.registry` for the rule kinds and how rules are bound to graph nodes.
"""

import importlib
import pkgutil

from . import registry
from .registry import OPS, OpDef

# Every family module registers itself; a new op family is a new file here, nothing else.
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    if _info.name != "registry":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["OPS", "OpDef", "registry"]
