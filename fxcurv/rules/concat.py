"""Concatenation and stacking of batched activations along a per-sample axis (``torch.cat`` /
``torch.concatenate`` / ``torch.concat`` / ``torch.stack``, ATen ``aten.cat.default`` / ``aten.stack.default``).

``z = cat(x_0, ..., x_{m-1})`` along axis ``a`` (not the batch) places each input at its own block of ``z``:
``z_n = sum_i P_i x_{i,n}`` with ``P_i`` the 0/1 matrix that writes ``x_i`` at offsets ``o_i = s_0 + ... +
s_{i-1}`` along ``a`` (``s_j`` the inputs' extents there; ``stack`` is the same with a new axis of extent one
per input). So (HBP Sec. D.2, for each input its own index selection)

* ``J_i^T v = P_i^T v``: the block of ``v`` at ``o_i : o_i + s_i`` along ``a`` (a view of the message);
* HesScale eq. 8, ``(P_i o P_i)^T d = P_i^T d``: the same block of the diagonal;
* no second-order term (the op is linear in every input).

The op has a fixed number of input slots (:data:`MAX_INPUTS`, unused ones absent); a call with more inputs, a
constant operand, or an axis that is the batch is left to the generic rule (``None``).

``cat_param`` is the concatenation of one activation with a parameter expanded over the batch (ViT's class
token, ``torch.cat([cls.expand(N, -1, -1), x], 1)``, or learned register/memory tokens): the same blocks, the
parameter's per sample being ``P_p^T v`` (its block of the message), summed over the batch for its gradient
(HBP eq. S.8b with ``J_p = P_p`` for every sample).
"""

from __future__ import annotations

from typing import Any

import torch

from .add import is_parameter
from .bilinear import computed_from_input
from .registry import Match, define_op, example
from .selection import define_selection_parameter

MAX_INPUTS = 16
INPUTS = tuple(f"x{i}" for i in range(MAX_INPUTS))

_aten = torch.ops.aten


def cat(*xs, dim, sizes, stack):
    parts = [x for x in xs if x is not None]
    return torch.stack(parts, dim) if stack else torch.cat(parts, dim)


op = define_op("cat", "concat", cat, inputs=INPUTS, drops_absent_tail=True)


# ---- canonicalization ------------------------------------------------------------------------------

def _canonical(tensors: Any, dim: Any, stack: bool) -> Match | None:
    """``{"x0": t_0, ...}`` with ``dim`` counted from the end (negative, so that rules index messages with
    leading axes) and each input's extent along it; ``None`` (the generic rule) unless every input is a batched
    activation of one dtype and ``dim`` is a per-sample axis."""
    if not isinstance(tensors, (tuple, list)) or not 1 <= len(tensors) <= MAX_INPUTS or not isinstance(dim, int):
        return None
    vals = [example(t) for t in tensors]
    if any(v is None for v in vals):
        return None
    if not stack and any(_expanded_parameter(t) is not None for t in tensors):
        return _learned_tokens(tensors, dim)
    if not all(computed_from_input(t) for t in tensors):
        return None
    first = vals[0]
    assert first is not None
    ndim = first.dim() + (1 if stack else 0)
    if first.dim() == 0 or not -ndim <= dim < ndim or dim % ndim == 0:
        return None
    if any(v.dim() != first.dim() or v.dtype != first.dtype for v in vals if v is not None):
        return None
    axis = dim % ndim
    sizes = tuple(1 if stack else int(v.shape[axis]) for v in vals if v is not None)
    inputs = {INPUTS[i]: t for i, t in enumerate(tensors)}
    return Match(inputs, {"dim": axis - ndim, "sizes": sizes, "stack": stack})


@op.function(torch.cat, torch.concatenate, torch.concat)
def _from_cat(node, a):
    return _canonical(a(0, "tensors"), a(1, "dim", 0), stack=False)


@op.function(torch.stack)
def _from_stack(node, a):
    return _canonical(a(0, "tensors"), a(1, "dim", 0), stack=True)


@op.function(_aten.cat.default)
def _from_aten_cat(node, a):
    return _canonical(a(0, "tensors"), a(1, "dim", 0), stack=False)


@op.function(_aten.stack.default)
def _from_aten_stack(node, a):
    return _canonical(a(0, "tensors"), a(1, "dim", 0), stack=True)


# ---- rules -----------------------------------------------------------------------------------------

def _block(v: torch.Tensor, i: int, dim: int, sizes: tuple[int, ...], stack: bool) -> torch.Tensor:
    """``P_i^T v``: input ``i``'s block of ``v [*lead, N, *z]`` along ``dim`` (negative), a view."""
    if stack:
        return v.select(dim, i)
    return v.narrow(dim, sum(sizes[:i]), sizes[i])


def _register_input(i: int) -> None:
    key = INPUTS[i]

    def jac_t(v, dim, sizes, stack):
        return _block(v, i, dim, sizes, stack)

    def diag(d, dim, sizes, stack):
        return _block(d, i, dim, sizes, stack)

    jac_t.__doc__ = f"HBP Sec. D.2: ``J^T v = P_{i}^T v``, input {i}'s block of the message."
    diag.__doc__ = f"HesScale eq. 8 with binary ``P_{i}``: input {i}'s block of the diagonal."
    for fn, register in ((jac_t, op.jac_t), (diag, op.diag)):
        fn.__name__ = f"cat_{fn.__name__}_{key}"
        fn.__qualname__ = fn.__name__
        register(key, view=True)(fn)


for _i in range(MAX_INPUTS):
    _register_input(_i)


# ---- an activation and a parameter expanded over the batch (learned tokens) ----------------------------

def cat_param(x, p, dim, p_first):
    tokens = p.expand((x.shape[0],) + tuple(p.shape[1:]))
    return torch.cat((tokens, x) if p_first else (x, tokens), dim)


param_op = define_op("cat_param", "concat", cat_param, inputs=("x", "p"), params=("p",))

_EXPANDS = ("expand",)


def _expanded_parameter(t: Any) -> Any:
    """The parameter ``p`` (of leading extent 1) that ``t`` expands over the batch (``p.expand(N, -1, ...)``,
    ``aten.expand.default``), else ``None``."""
    target = getattr(t, "target", None)
    is_expand = (getattr(t, "op", None) == "call_method" and target in _EXPANDS) or target is _aten.expand.default
    if not is_expand or not t.args or not is_parameter(t.args[0]):
        return None
    p, out = example(t.args[0]), example(t)
    if p is None or out is None or p.dim() != out.dim() or p.shape[0] != 1 or p.shape[1:] != out.shape[1:]:
        return None
    return t.args[0]


def _learned_tokens(tensors: Any, dim: int) -> Match | None:
    """``cat([p.expand(N, ...), x], dim)`` or ``cat([x, p.expand(N, ...)], dim)`` along a per-sample axis."""
    if len(tensors) != 2:
        return None
    for i in (0, 1):
        p, x = _expanded_parameter(tensors[i]), tensors[1 - i]
        vx, vp = example(x), example(p)
        if p is None or vp is None or vx is None or not computed_from_input(x) or vx.dim() < 2:
            continue
        if not -vx.dim() <= dim < vx.dim() or dim % vx.dim() == 0 or vp.dtype != vx.dtype:
            return None
        return Match({"x": x, "p": p}, {"dim": dim % vx.dim() - vx.dim(), "p_first": i == 0}, op=param_op)
    return None


def _parts(v: torch.Tensor, p: torch.Tensor, dim: int, p_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x's block, p's block)`` of ``v [*lead, N, *z]`` along ``dim`` (negative): views."""
    k = p.shape[dim]
    rest = v.shape[dim] - k
    if p_first:
        return v.narrow(dim, k, rest), v.narrow(dim, 0, k)
    return v.narrow(dim, 0, rest), v.narrow(dim, rest, k)


def cat_param_per_sample_p(v: torch.Tensor, p: torch.Tensor, dim: int, p_first: bool) -> torch.Tensor:
    """``P_p^T v`` per sample, ``[*lead, N, *p.shape]``: the parameter's block of the message (its leading axis
    of one kept)."""
    block = _parts(v, p, dim, p_first)[1]
    n_lead = v.dim() - p.dim()
    return block.unsqueeze(n_lead + 1)


@param_op.jac_t("x", view=True)
def cat_param_jac_t_x(v, p, dim, p_first):
    """HBP Sec. D.2: the activation's block of the message."""
    return _parts(v, p, dim, p_first)[0]


@param_op.diag("x", view=True)
def cat_param_diag_x(d, p, dim, p_first):
    """HesScale eq. 8 with a 0/1 selection: the activation's block of the diagonal."""
    return _parts(d, p, dim, p_first)[0]


# grad, per_sample, diag_sqrt, diag_diag (the parameter's block of ``d``), batch_l2, batch_diag_sqrt, gram.
define_selection_parameter(param_op, "p", cat_param_per_sample_p)
