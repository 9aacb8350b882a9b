"""The properties every drawn problem must satisfy, as plain functions that raise
:class:`PropertyFailure` (an ``AssertionError``) naming what broke.

Shared by tests/test_properties.py (bounded, in CI) and benchmarks/fuzz.py (long runs). Every
number is compared with an *independent* reference -- torch.func in float64 (tests/reference.py),
HesScale's defining equations by brute force (tests/hesscale_reference.py), the definition of
``diag_ggn_mc`` as an unbiased estimator of ``diag_ggn`` -- except :func:`check_backends_agree`,
which is the separate property that the backends give the same numbers.
"""

from __future__ import annotations

from collections import OrderedDict

import hesscale_reference as hs_ref
import reference
import torch
from torch import nn

import fxcurv

RTOL = 1e-6  # against the float64 references
AGREE_RTOL = 1e-10  # between backends running the same float64 program
MC_CALLS, MC_SAMPLES, MC_Z = 24, 64, 7.0  # 24 independent estimates of 64 draws each; |t| bound

EXACT = ("diag_ggn", "diag_hessian")


class PropertyFailure(AssertionError):
    """A property does not hold. ``kind`` is stable across examples (what broke, which quantity and
    backend); the message adds the details (parameter, error)."""

    def __init__(self, kind: str, detail: str = ""):
        self.kind = kind
        super().__init__(f"{kind}: {detail}" if detail else kind)


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |a - e| / max |e|`` (absolute where ``e`` vanishes)."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    return err / scale if scale > 0 else err


def trainable_names(model: nn.Module) -> list[str]:
    """The names fxcurv's results are keyed by, in ``named_parameters()`` order."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def compare(kind: str, actual: dict, expected: dict, rtol: float) -> None:
    if set(actual) != set(expected):
        raise PropertyFailure(f"{kind}: keys", f"{sorted(actual)} != {sorted(expected)}")
    for name, e in expected.items():
        a = actual[name]
        if a.shape != e.shape:
            raise PropertyFailure(f"{kind}: shape", f"{name} {tuple(a.shape)} != {tuple(e.shape)}")
        err = rel_error(a, e)
        if not err < rtol:  # also catches nan
            raise PropertyFailure(kind, f"{name}: relative error {err:.3e} >= {rtol:.0e}")


def _snapshot(model, x, y) -> list[torch.Tensor]:
    return [t.detach().clone() for t in (x, y, *model.parameters(), *model.buffers())]


def _unchanged(before: list, model, x, y) -> bool:
    now = [x, y, *model.parameters(), *model.buffers()]
    return len(now) == len(before) and all(torch.equal(a.detach(), b) for a, b in zip(now, before))


def _generator(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def references(model, loss_fn, x, y, quantities) -> dict[str, dict]:
    """The torch.func references for grad and the exact quantities in ``quantities``."""
    out = {"grad": reference.grad(model, loss_fn, x, y)}
    if "diag_ggn" in quantities or "diag_ggn_mc" in quantities:
        out["diag_ggn"] = reference.diag_ggn(model, loss_fn, x, y)
    if "diag_hessian" in quantities:
        out["diag_hessian"] = reference.diag_hessian(model, loss_fn, x, y)
    return out


def check_structure(out, model, quantities, backend: str) -> None:
    """Every requested quantity (and grad) is there, keyed by exactly the trainable parameters,
    shaped and typed like them, finite."""
    params = dict(model.named_parameters())
    names = set(trainable_names(model))
    expected_q = {"grad", *quantities}
    if set(out) != expected_q:
        raise PropertyFailure(f"result quantities [{backend}]", f"{sorted(out)} != {sorted(expected_q)}")
    for q in expected_q:
        if set(out[q]) != names:
            raise PropertyFailure(f"result keys [{backend}]", f"{q}: {sorted(out[q])} != {sorted(names)}")
        for name, value in out[q].items():
            p = params[name]
            if value.shape != p.shape or value.dtype != p.dtype:
                raise PropertyFailure(f"result shape/dtype [{backend}]",
                                      f"{q} {name}: {tuple(value.shape)} {value.dtype} for a parameter "
                                      f"{tuple(p.shape)} {p.dtype}")
            if not torch.isfinite(value).all():
                raise PropertyFailure(f"not finite [{backend}]", f"{q} {name}")


def check_exact(model, loss_fn, x, y, quantities, backend: str, refs: dict | None = None):
    """grad, diag_ggn, diag_hessian (those requested) equal torch.func's float64 references; the
    result has the right keys, shapes and dtypes, in ``named_parameters()`` order; the loss is
    ``loss_fn(model(x), y)``; the call
    changes no input or parameter; a second call (cached program) returns the same numbers; a call
    with another batch size in between does not disturb the cached program. Returns the result."""
    refs = refs if refs is not None else references(model, loss_fn, x, y, quantities)
    before = _snapshot(model, x, y)
    engine = fxcurv.compile(model, loss_fn, quantities=quantities, backend=backend, seed=0)
    out = engine(x, y, generator=_generator())
    check_structure(out, model, quantities, backend)
    with torch.no_grad():
        loss = loss_fn(model(x), y)
    if not rel_error(out.loss.reshape(()), loss.reshape(())) < 1e-12:
        raise PropertyFailure(f"loss [{backend}]", f"{out.loss.item()!r} != {loss.item()!r}")
    check_order(out, model, backend)
    compare(f"grad != reference [{backend}]", out.grad, refs["grad"], RTOL)
    for q in EXACT:
        if q in quantities:
            compare(f"{q} != reference [{backend}]", out[q], refs[q], RTOL)
    if not _unchanged(before, model, x, y):
        raise PropertyFailure(f"call mutated x, y or the parameters [{backend}]")
    again = engine(x, y, generator=_generator())
    if x.shape[0] > 1:  # another input signature in between: its own program
        part = engine(x[:1], y[:1], generator=_generator())
        compare(f"grad on a sub-batch != reference [{backend}]", part.grad,
                reference.grad(model, loss_fn, x[:1], y[:1]), RTOL)
        again = engine(x, y, generator=_generator())
    for q in out:
        for name in out[q]:
            if not torch.equal(out[q][name], again[q][name]):
                raise PropertyFailure(f"second call differs [{backend}]",
                                      f"{q} {name}: {rel_error(again[q][name], out[q][name]):.3e}")
    return out


def check_order(out, model, backend: str) -> None:
    """Every result dict iterates in ``model.named_parameters()`` order (trainable ones)."""
    names = trainable_names(model)
    for q in out:
        if list(out[q]) != names:
            raise PropertyFailure(f"result order != named_parameters() order [{backend}]",
                                  f"{q}: {list(out[q])} != {names}")


def sequential_view(model: nn.Module, chain: list[str]) -> nn.Sequential:
    """The chain model as an ``nn.Sequential`` of its own modules (same parameter objects, names
    ``<attribute>.<param>`` as in the model): the input tests/hesscale_reference.py takes."""
    return nn.Sequential(OrderedDict((name, getattr(model, name)) for name in chain))


def check_hesscale(model, loss_fn, x, y, chain: list[str], quantities, backend: str) -> None:
    """hesscale / hesscale_gn (those requested) equal the brute-force HesScale of
    tests/hesscale_reference.py (float64, rel. error < 1e-6). Applies to chains of modules each used
    once; parameters the chain never reads must get zeros."""
    wanted = [q for q in ("hesscale", "hesscale_gn") if q in quantities]
    if not wanted:
        return
    out = fxcurv.compile(model, loss_fn, quantities=quantities, backend=backend, seed=0)(
        x, y, generator=_generator())
    seq = sequential_view(model, chain)
    for q in wanted:
        expected = hs_ref.hesscale(seq, loss_fn, x, y, gn=q == "hesscale_gn")
        for name, p in model.named_parameters():
            if p.requires_grad and name not in expected:  # not in the chain: unused
                expected[name] = torch.zeros_like(p.detach())
        compare(f"{q} != brute-force HesScale [{backend}]", out[q], expected, RTOL)


def check_backends_agree(model, loss_fn, x, y, quantities, backends=("eager", "fused")) -> dict:
    """Every backend gives the same loss and the same numbers of every requested quantity, the
    Monte Carlo one included when both draw from equally seeded generators (rel. error < 1e-10).
    Returns the results by backend."""
    results = {}
    for backend in backends:
        engine = fxcurv.compile(model, loss_fn, quantities=quantities, backend=backend, seed=0)
        results[backend] = engine(x, y, generator=_generator(5))
    first, *others = backends
    for other in others:
        a, b = results[first], results[other]
        if not rel_error(b.loss.reshape(()), a.loss.reshape(())) < AGREE_RTOL:
            raise PropertyFailure(f"loss: {other} != {first}", f"{b.loss.item()!r} != {a.loss.item()!r}")
        for q in a:
            if q not in b:
                raise PropertyFailure(f"{q}: missing in {other}")
            compare(f"{q}: {other} != {first}", b[q], a[q], AGREE_RTOL)
    return results


def check_hesscale_last_layer(out, model, loss_fn, x, y, head: list[str], backend: str) -> None:
    """HesScale Sec. 3: the last linear layer starts from the exact diagonal of the loss Hessian
    and each of its weights reaches one output only, so hesscale and hesscale_gn (those in ``out``)
    equal the exact Hessian diagonal (torch.func) on that layer's parameters -- whatever the graph
    before it. ``head``: the layer's parameter names (those frozen are skipped)."""
    wanted = [q for q in ("hesscale", "hesscale_gn") if q in out]
    head = [name for name in head if name in out.grad]
    if not wanted or not head:
        return
    exact = reference.diag_hessian(model, loss_fn, x, y)
    for q in wanted:
        compare(f"{q} != exact Hessian diagonal at the last layer [{backend}]",
                {k: out[q][k] for k in head}, {k: exact[k] for k in head}, RTOL)


def check_mc(model, loss_fn, x, y, backend: str, exact: dict | None = None) -> None:
    """diag_ggn_mc: finite, nonnegative (a sum of squared columns; these losses are convex in the
    output), shaped like the parameters; reproducible (two engines with one seed, one generator
    state twice); and unbiased: the mean of ``MC_CALLS`` independent estimates of ``MC_SAMPLES``
    draws lies within ``MC_Z`` standard errors of the exact ``diag_ggn`` (torch.func) everywhere.

    The bound: a Student t with 23 degrees of freedom exceeds 7 with probability ~4e-7, so a
    correct estimator fails about once in a million entries (entries of one example are
    correlated), while a wrong scale or a missing term (a bias of one standard error of a single
    64-draw estimate, ~5 standard errors of the mean) is caught.
    """
    exact = exact if exact is not None else reference.diag_ggn(model, loss_fn, x, y)
    a = fxcurv.compile(model, loss_fn, quantities=("diag_ggn_mc",), backend=backend, seed=3,
                       mc_samples=MC_SAMPLES)
    b = fxcurv.compile(model, loss_fn, quantities=("diag_ggn_mc",), backend=backend, seed=3,
                       mc_samples=MC_SAMPLES)
    first = a(x, y)["diag_ggn_mc"]
    if any(not torch.equal(first[k], v) for k, v in b(x, y)["diag_ggn_mc"].items()):
        raise PropertyFailure(f"diag_ggn_mc: same seed, different draws [{backend}]")
    g1 = a(x, y, generator=_generator(9))["diag_ggn_mc"]
    g2 = a(x, y, generator=_generator(9))["diag_ggn_mc"]
    if any(not torch.equal(g1[k], v) for k, v in g2.items()):
        raise PropertyFailure(f"diag_ggn_mc: same generator state, different draws [{backend}]")
    params = dict(model.named_parameters())
    estimates = [first] + [a(x, y)["diag_ggn_mc"] for _ in range(MC_CALLS - 1)]
    for name, e in exact.items():
        if name not in first:
            raise PropertyFailure(f"diag_ggn_mc: keys [{backend}]", f"{name} missing")
        stack = torch.stack([est[name] for est in estimates])
        if stack.shape[1:] != params[name].shape or not torch.isfinite(stack).all():
            raise PropertyFailure(f"diag_ggn_mc: shape or not finite [{backend}]", name)
        if (stack < 0).any():
            raise PropertyFailure(f"diag_ggn_mc: negative [{backend}]", f"{name}: {stack.min().item():.3e}")
        mean, se = stack.mean(0), stack.std(0) / MC_CALLS ** 0.5
        floor = 1e-10 * max(e.abs().max().item(), 1e-300)
        bad = (mean - e).abs() > MC_Z * se + floor
        if bad.any():
            z = ((mean - e).abs() / (se + floor)).max().item()
            raise PropertyFailure(f"diag_ggn_mc: biased, mean != diag_ggn [{backend}]",
                                  f"{name}: {z:.1f} standard errors off (exact {e[bad][:3].tolist()}, "
                                  f"mean {mean[bad][:3].tolist()})")


# ---- the model as it is now --------------------------------------------------------------------

MUTATIONS = ("inplace", "replace", "freeze", "hyperparameter", "loss_hyperparameter", "train")

_HYPER = (
    (nn.LeakyReLU, "negative_slope", lambda v: v + 0.3),
    (nn.ELU, "alpha", lambda v: v + 0.5),
    (nn.Softplus, "beta", lambda v: v * 2),
    (nn.GELU, "approximate", lambda v: "tanh" if v == "none" else "none"),
    (nn.AvgPool2d, "count_include_pad", lambda v: not v),
    (nn.ConstantPad2d, "value", lambda v: v + 1.0),
)


def plan_mutation(model, loss_fn, kind: str, pick: int):
    """A change of the model (or loss) to make after it was compiled and called: ``(what, apply)``,
    or ``None`` when this kind of change does not apply to this model. ``pick`` chooses the target."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if kind == "inplace":
        name, p = named[pick % len(named)]

        def inplace():
            with torch.no_grad():
                p.mul_(-0.5).add_(0.25)
        return f"{name}.mul_(-0.5).add_(0.25)", inplace
    if kind == "replace":
        name, p = named[pick % len(named)]
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        return (f"{name} = nn.Parameter(... * -0.5 + 0.25)",
                lambda: setattr(module, attr, nn.Parameter(p.detach() * -0.5 + 0.25)))
    if kind == "freeze":
        if len(named) < 2:
            return None
        name, p = named[pick % len(named)]
        return f"{name}.requires_grad_(False)", lambda: p.requires_grad_(False)
    if kind == "hyperparameter":
        targets = [(n, m, attr, fn) for n, m in model.named_modules() for t, attr, fn in _HYPER
                   if type(m) is t]
        if not targets:
            return None
        name, m, attr, fn = targets[pick % len(targets)]
        new = fn(getattr(m, attr))
        return f"{name}.{attr} = {new!r}", lambda: setattr(m, attr, new)
    if kind == "loss_hyperparameter":
        if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.MSELoss)):
            new = "sum" if loss_fn.reduction == "mean" else "mean"
            return f"loss_fn.reduction = {new!r}", lambda: setattr(loss_fn, "reduction", new)
        return None
    if kind == "train":
        if not any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
            return None
        return "model.train()", model.train
    raise ValueError(kind)


def check_follows_model(model, loss_fn, x, y, kind: str, pick: int, backend: str) -> str | None:
    """After a change to the model or loss, the same engine either answers for the model as it is
    now (loss and grad equal the reference at the new state; with ``model.train()`` and active
    dropout no deterministic answer exists) or raises an fxcurv error saying why it cannot. A stale
    answer fails. Returns the change made, ``None`` if it did not apply."""
    plan = plan_mutation(model, loss_fn, kind, pick)
    if plan is None:
        return None
    what, apply = plan
    engine = fxcurv.compile(model, loss_fn, quantities=("diag_ggn",), backend=backend)
    engine(x, y)
    apply()
    try:
        out = engine(x, y)
    except fxcurv.FxcurvError:
        return what  # says why it cannot
    if kind == "train":
        raise PropertyFailure(f"after {kind}: answered for a stochastic model", what)
    with torch.no_grad():
        loss = loss_fn(model(x), y)
    if not rel_error(out.loss.reshape(()), loss.reshape(())) < 1e-12:
        raise PropertyFailure(f"after {kind}: stale loss",
                              f"{what}: {out.loss.item()!r} != {loss.item()!r}")
    compare(f"after {kind}: grad != reference", out.grad,
            reference.grad(model, loss_fn, x, y), RTOL)
    compare(f"after {kind}: diag_ggn != reference", out["diag_ggn"],
            reference.diag_ggn(model, loss_fn, x, y), RTOL)
    return what
