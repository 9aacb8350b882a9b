"""define_selection_parameter: the contract its rules keep with the registry.

The numbers of the rules it registers (``add_param``, ``cat_param``) are checked against the generic rule in
``test_generic.py``; here, that every rule binds the op's context by the per-sample function's names (the
registry binds rules by their signatures) and that a per-sample function without the parameter is refused.
"""

from __future__ import annotations

import pytest

from fxcurv.rules import registry
from fxcurv.rules.registry import OpDef, RuleKind
from fxcurv.rules.selection import define_selection_parameter

KINDS = (RuleKind.GRAD, RuleKind.PER_SAMPLE, RuleKind.DIAG_SQRT, RuleKind.DIAG_DIAG, RuleKind.BATCH_L2,
         RuleKind.BATCH_DIAG_SQRT, RuleKind.GRAM)
# The message arguments of each kind, before the context.
MESSAGES = {RuleKind.DIAG_SQRT: 2, RuleKind.BATCH_DIAG_SQRT: 2}
CONTEXT = {"add_param": ["p", "x"], "cat_param": ["p", "dim", "p_first"]}


@pytest.mark.parametrize("op", sorted(CONTEXT))
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.value)
def test_rules_bind_the_per_sample_context(op, kind):
    rule = registry.TABLES[kind][(op, "p")]
    names = rule.context_names(MESSAGES.get(kind, 1))
    options = ["include", "total"] if kind is RuleKind.GRAM else []
    assert names == CONTEXT[op] + options, f"{rule.label}: {names}"
    want = f"{op}_gram" if kind is RuleKind.GRAM else f"{op}_{kind.value}_p"
    assert rule.fn.__name__ == want and rule.fn.__module__ == registry.PER_SAMPLE[(op, "p")].fn.__module__


def test_per_sample_without_the_parameter_is_refused():
    probe = OpDef("selection_probe", "test", lambda x, p: x + p, ("x", "p"), params=("p",))
    with pytest.raises(ValueError, match=r"selection_probe: the per-sample rule of 'p' must read 'p'.*\['x'\]"):
        define_selection_parameter(probe, "p", lambda v, x: v)
    assert ("selection_probe", "p") not in registry.GRAD  # nothing registered

