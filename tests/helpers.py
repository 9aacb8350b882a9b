"""Comparison helpers shared by the tests."""

from __future__ import annotations

import torch


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |a - e| / max |e|`` (absolute where ``e`` vanishes)."""
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    return err / scale if scale > 0 else err


def assert_close(actual: dict, expected: dict, rtol: float = 1e-6, what: str = "") -> None:
    """Every tensor of ``expected`` matches ``actual`` (same keys, shapes) to relative error ``rtol``."""
    assert set(actual) == set(expected), f"{what}: keys {sorted(actual)} != {sorted(expected)}"
    for name, e in expected.items():
        a = actual[name]
        assert a.shape == e.shape, f"{what} {name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        err = rel_error(a, e)
        assert err < rtol, f"{what} {name}: relative error {err:.3e} >= {rtol:.0e}"


def check_against_references(model, loss_fn, x, y, quantities=("diag_ggn", "diag_hessian"), **compile_kw):
    """Compile, call once, and compare grad / diag_ggn / diag_hessian with the torch.func references
    of :mod:`reference` (float64, relative error < 1e-6). Returns the result."""
    import reference

    import fxcurv

    out = fxcurv.compile(model, loss_fn, quantities=quantities, **compile_kw)(x, y)
    assert_close(out.grad, reference.grad(model, loss_fn, x, y), what="grad")
    if "diag_ggn" in quantities:
        assert_close(out["diag_ggn"], reference.diag_ggn(model, loss_fn, x, y), what="diag_ggn")
    if "diag_hessian" in quantities:
        assert_close(out["diag_hessian"], reference.diag_hessian(model, loss_fn, x, y), what="diag_hessian")
    return out


def call_rule(table, op, key, *messages, **ctx):
    """Call the rule ``table[(op, key)]`` the way the compiler binds it (``registry.bind``): every
    argument after the messages by name from ``ctx``, derived quantities from the op's DERIVED rules."""
    from fxcurv.rules import registry

    rule = table[(op, key)]

    def resolve(name):
        if name in ctx:
            return ctx[name]
        if (op, name) in registry.DERIVED:
            return call_rule(registry.DERIVED, op, name, **ctx)
        raise registry.Unresolved(name)

    return rule.fn(*messages, **registry.bind(rule, resolve, len(messages)))


def check_hesscale_exact_at_last_layer(model, loss_fn, x, y, quantity, last: tuple):
    """``quantity`` (hesscale or hesscale_gn) runs, gives finite values shaped like every parameter,
    and equals the exact Hessian diagonal (torch.func) on the parameters ``last`` of the last layer,
    where the HesScale paper says it is exact."""
    import reference
    import torch

    import fxcurv

    out = fxcurv.compile(model, loss_fn, quantities=(quantity,))(x, y)
    exact = reference.diag_hessian(model, loss_fn, x, y)
    assert set(out[quantity]) == set(exact)
    for name, value in out[quantity].items():
        assert value.shape == exact[name].shape and torch.isfinite(value).all()
    assert_close({k: out[quantity][k] for k in last}, {k: exact[k] for k in last}, what=quantity)


def check_layer_net(model, loss_fn, x, y, backpack: bool = False):
    """A ``nn.Sequential`` ``model`` containing the layer under test, end to end (float64): ``grad``,
    ``diag_ggn`` and ``diag_hessian`` against torch.func (:func:`check_against_references`),
    ``hesscale`` and ``hesscale_gn`` against the brute-force HesScale of their defining equations
    (``tests/hesscale_reference.py``), and, where ``backpack``, ``diag_ggn`` against BackPACK's
    DiagGGNExact (relative error < 1e-10)."""
    import hesscale_reference

    out = check_against_references(model, loss_fn, x, y, quantities=("diag_ggn", "diag_hessian", "hesscale",
                                                                      "hesscale_gn"))
    assert_close(out["hesscale"], hesscale_reference.hesscale(model, loss_fn, x, y), what="hesscale")
    assert_close(out["hesscale_gn"], hesscale_reference.hesscale_gn(model, loss_fn, x, y), what="hesscale_gn")
    if backpack:
        import backpack_reference
        from backpack.extensions import DiagGGNExact

        want = backpack_reference.run_extension(model, loss_fn, x, y, DiagGGNExact())
        assert_close(out["diag_ggn"], want, rtol=1e-10, what="diag_ggn vs BackPACK")
    return out


class GenericAffine(torch.nn.Module):
    """``b + h o w`` by ``torch.addcmul``: a call without a hand rule (one generic node, two parameters)."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d))
        self.bias = torch.nn.Parameter(torch.zeros(d))

    def forward(self, h):
        return torch.addcmul(self.bias, h, self.weight)
