"""Generic rules: every rule kind of fxcurv, derived from an op's forward by torch.func (float64).

DESIGN.md asks that every hand-written rule equal the *generic exact rule* derived from the op
itself. This module is that derivation on the test side. A reference here reads the op's forward
(``registry.OPS[op].forward``) with its canonical attributes, and torch.func; never a rule, a derived
value or a helper of fxcurv's rules. So a rule and its reference are two unrelated computations.

Notation, per sample ``n`` of an op ``z = f(x, theta)`` with data inputs ``x`` (batched, dim 0) and
parameters ``theta`` (shared by the samples): ``J_n = dz_n / du_n`` is the per-sample Jacobian with
respect to one input ``u`` (``M`` output entries by ``P`` input entries; for a parameter ``u_n`` is the
parameter itself). Then

* ``jac_t[u](V)``       = ``J^T v_k`` for every column ``v_k`` of ``V [*lead, N, *z]``: HBP eq. S.6
  (first term) and S.8a; a vector-Jacobian product of the *batched* forward gives all samples at
  once, since samples are independent;
* ``diag[u](d)``        = ``diag(J_n^T diag(d_n) J_n) = (J_n o J_n)^T d_n``: HesScale eq. 4 and 8
  (first terms, the off-diagonal terms of ``H_z`` dropped);
* ``residual[u](g)``    = the per-sample Hessian ``d2 (g_n . f(u_n)) / du_n^2``: HBP eq. S.6 (second
  term), S.9 for activations (``diag(phi''(x) g)``); the compiler holds it as ``diag(r)``, so its
  off-diagonal entries must vanish;
* ``grad[theta](g)``    = ``sum_n J_n^T g_n``, the VJP of the batched forward: HesScale eq. 2, 7;
* ``per_sample[theta](V)`` = ``J_n^T v_{k,n}`` for each column and sample, ``[*lead, N, *theta]``;
* ``gram[theta](S)``    = ``[a_kn . a_k'n']`` with ``a_kn = J_n^T s_{k,n}``, ``[K N, K N]`` (``k``-major): the
  parameter's share of ViViT's Gram matrix ``V^T V`` (ViViT eq. S.22-S.23), from the per-sample VJPs;
* ``diag_sqrt[theta](S, sign)`` = ``sum_{k,n} sign_{k,n} (J_n^T s_{k,n})^2``, the diagonal of
  ``sum_n J_n^T (sum_k sign S S^T) J_n``: HBP eq. S.8b-c (the square taken after ``J_n^T``);
* ``diag_diag[theta](d)`` = ``sum_n diag(J_n^T diag(d_n) J_n)``: HesScale eq. 5 and 9;
* ``batch_l2[theta](g)`` = ``|J_n^T g_n|^2`` per sample, ``[N]``: the squared norm of each sample's
  gradient (BackPACK's BatchL2Grad);
* ``batch_diag_sqrt[theta](S, sign)`` = ``sum_k sign_{k,n} (J_n^T s_{k,n})^2`` per sample,
  ``[N, *theta]``: ``diag_sqrt`` before its sum over samples (BackPACK's BatchDiagGGN);
* ``dense[u](M)``      = ``(1/N) sum_n J_n^T M J_n``: the batch-averaged matrix of KFRA / HBP (Botev
  eq. 29, HBP Sec. 3.2), with ``M`` over one sample's output entries;
* ``kron_out[theta](S, sign)`` = ``sum_{k,n} sign_{k,n} (J_b^T s_{k,n})(J_b^T s_{k,n})^T``, the bias
  block from the columns (BackPACK's output factor of KFLR/KFAC for weight and bias alike), with
  ``J_b`` the op's Jacobian w.r.t. its bias (a zero bias where the op has none);
* ``kron_dense[theta](M)`` = ``J_b^T M J_b``, the bias block from a batch-averaged matrix (KFRA's);
* ``kron_in[weight]`` = ``(1/N) sum_{n,e} v_{n,e} v_{n,e}^T`` over the output entries ``e`` of one
  output channel, ``v_{n,e}`` that channel's row of ``J_{W,n}^T e``: ``x x^T`` for a linear layer, the
  unfolded patches' for a convolution (HBP eq. S.8c, Sec. D.3).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.func import jacrev, vjp, vmap

from fxcurv.operators import KroneckerLayout
from fxcurv.rules.registry import OpDef


@dataclass(eq=False)
class OpContext:
    """One op application: its tensor inputs by name (``None`` where absent), canonical attributes,
    output and the tensors its forward saved -- what the compiler binds rule arguments to."""

    op: OpDef
    inputs: dict[str, torch.Tensor | None]
    attrs: dict[str, Any]
    out: torch.Tensor
    saved: dict[str, torch.Tensor] = field(default_factory=dict)

    def bindings(self) -> dict[str, Any]:
        """Rule arguments by name (``tests/helpers.call_rule`` adds the derived values)."""
        return {**self.inputs, **self.attrs, "out": self.out, **self.saved}

    def is_param(self, key: str) -> bool:
        return key in self.op.params

    # ---- the forward as a function of one input -------------------------------------------------
    def forward(self, key: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """The batched forward as a function of input ``key``, every other input fixed."""

        def f(u: torch.Tensor) -> torch.Tensor:
            args = [u if k == key else self.inputs[k] for k in self.op.inputs]
            return self.op.forward(*args, **self.attrs)

        return f

    def sample_forward(self, key: str, n: int) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
        """Sample ``n``'s forward ``u_n -> z_n`` (no batch axis) as a function of input ``key``, and
        ``u_n``: data inputs are sliced to sample ``n``, parameters and constants are shared."""
        fixed = {k: v if v is None or not self.op.is_batched(k) else v[n:n + 1] for k, v in self.inputs.items()}
        batched = self.op.is_batched(key)

        def f(u: torch.Tensor) -> torch.Tensor:
            args = [(u[None] if batched else u) if k == key else fixed[k] for k in self.op.inputs]
            return self.op.forward(*args, **self.attrs)[0]

        value = self.inputs[key]
        assert value is not None, f"{self.op.name} has no input {key} here"
        return f, value[n] if batched else value

    @property
    def n(self) -> int:
        return self.out.shape[0]


def _lead(v: torch.Tensor, like: torch.Tensor) -> tuple[int, ...]:
    """The leading (column) dims of a message ``v [*lead, *like]``."""
    lead = v.dim() - like.dim()
    assert lead >= 0 and tuple(v.shape[lead:]) == tuple(like.shape), (tuple(v.shape), tuple(like.shape))
    return tuple(v.shape[:lead])


# ---- Jacobians ----------------------------------------------------------------------------------

@functools.cache
def per_sample_jacobians(c: OpContext, key: str) -> torch.Tensor:
    """``J_n`` for every sample, ``[N, M, P]``, by ``torch.func.jacrev`` of the single-sample forward."""
    out = []
    for n in range(c.n):
        f, u = c.sample_forward(key, n)
        out.append(jacrev(f)(u).reshape(c.out[n].numel(), u.numel()))
    return torch.stack(out)


def per_sample_hessian(c: OpContext, key: str, g: torch.Tensor, n: int) -> torch.Tensor:
    """``d2 (g_n . f(u_n)) / du_n^2`` as a ``[P, P]`` matrix (reverse over reverse mode)."""
    f, u = c.sample_forward(key, n)
    h = jacrev(jacrev(lambda t: (g[n] * f(t)).sum()))(u)
    return h.reshape(u.numel(), u.numel())


def hvp(c: OpContext, key: str, g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``(d2 (g . f(u)) / du^2) w`` for the batched forward (reverse over reverse mode). For a data
    input the Hessian is block diagonal with the per-sample Hessians as blocks; for a parameter it is
    their sum."""
    f = c.forward(key)
    _, pullback = vjp(jacrev(lambda t: (g * f(t)).sum()), c.inputs[key])
    return pullback(w)[0]


# ---- message rules ------------------------------------------------------------------------------

def jac_t(c: OpContext, key: str, v: torch.Tensor) -> torch.Tensor:
    """``J^T v`` for every column of ``v [*lead, N, *z]``: one VJP of the batched forward per column."""
    lead = _lead(v, c.out)
    _, pullback = vjp(c.forward(key), c.inputs[key])
    cols = vmap(pullback)(v.reshape((-1,) + tuple(c.out.shape)))[0]
    return cols.reshape(lead + tuple(c.inputs[key].shape))


def diag(c: OpContext, key: str, d: torch.Tensor) -> torch.Tensor:
    """HesScale eq. 4/8 (first term): ``(J_n o J_n)^T d_n`` per sample, shaped like the input."""
    _lead(d, c.out)
    j = per_sample_jacobians(c, key)
    return torch.einsum("nmp,nm->np", j * j, d.reshape(c.n, -1)).reshape(c.inputs[key].shape)


def residual_hessians(c: OpContext, key: str, g: torch.Tensor) -> torch.Tensor:
    """HBP eq. S.6 (second term): the per-sample Hessians of ``g_n . f(u_n)``, ``[N, P, P]``."""
    return torch.stack([per_sample_hessian(c, key, g, n) for n in range(c.n)])


# ---- parameter rules ----------------------------------------------------------------------------

def grad(c: OpContext, key: str, g: torch.Tensor) -> torch.Tensor:
    """``sum_n J_n^T g_n``: the VJP of the batched forward (the parameter is shared by the samples)."""
    _, pullback = vjp(c.forward(key), c.inputs[key])
    return pullback(g)[0]


def per_sample(c: OpContext, key: str, v: torch.Tensor) -> torch.Tensor:
    """``J_n^T v_{k,n}`` for every column ``k`` and sample ``n``, ``[*lead, N, *theta]``: per-sample VJPs."""
    lead = _lead(v, c.out)
    flat = v.reshape((-1,) + tuple(c.out.shape))
    out = []
    for n in range(c.n):
        f, u = c.sample_forward(key, n)
        _, pullback = vjp(f, u)
        out.append(vmap(pullback)(flat[:, n])[0])
    return torch.stack(out, dim=1).reshape(lead + (c.n,) + tuple(c.inputs[key].shape))


def gram(c: OpContext, key: str, s: torch.Tensor) -> torch.Tensor:
    """ViViT eq. S.23: the Gram matrix of the per-sample VJPs ``J_n^T s_{k,n}``, rows ``k``-major."""
    a = per_sample(c, key, s)  # [K, N, *theta]
    flat = a.reshape(a.shape[0] * a.shape[1], -1)
    return flat @ flat.T


def diag_sqrt(c: OpContext, key: str, s: torch.Tensor, sign: torch.Tensor | None) -> torch.Tensor:
    """HBP eq. S.8b-c: ``sum_{k,n} sign_{k,n} (J_n^T s_{k,n})^2`` from the per-sample VJPs."""
    jts = per_sample(c, key, s)  # [K, N, *theta]
    w = torch.ones(s.shape[:2], dtype=s.dtype) if sign is None else sign
    return torch.einsum("kn,knp->p", w, (jts * jts).flatten(2)).reshape(c.inputs[key].shape)


def batch_l2(c: OpContext, key: str, g: torch.Tensor) -> torch.Tensor:
    """``|J_n^T g_n|^2`` per sample from the per-sample VJPs, ``[N]``."""
    _lead(g, c.out)
    jtg = per_sample(c, key, g)  # [N, *theta]
    return (jtg * jtg).flatten(1).sum(1)


def batch_diag_sqrt(c: OpContext, key: str, s: torch.Tensor, sign: torch.Tensor | None) -> torch.Tensor:
    """``sum_k sign_{k,n} (J_n^T s_{k,n})^2`` per sample from the per-sample VJPs, ``[N, *theta]``."""
    jts = per_sample(c, key, s)  # [K, N, *theta]
    w = torch.ones(s.shape[:2], dtype=s.dtype) if sign is None else sign
    return torch.einsum("kn,knp->np", w, (jts * jts).flatten(2)).reshape((c.n,) + tuple(c.inputs[key].shape))


def diag_diag(c: OpContext, key: str, d: torch.Tensor) -> torch.Tensor:
    """HesScale eq. 5/9: ``sum_n (J_n o J_n)^T d_n``, shaped like the parameter."""
    _lead(d, c.out)
    j = per_sample_jacobians(c, key)
    return torch.einsum("nmp,nm->p", j * j, d.reshape(c.n, -1)).reshape(c.inputs[key].shape)


# ---- the batch-averaged and Kronecker family -----------------------------------------------------

def dense(c: OpContext, key: str, m: torch.Tensor) -> torch.Tensor:
    """``(1/N) sum_n J_n^T M J_n`` from the per-sample Jacobians."""
    j = per_sample_jacobians(c, key)
    return torch.einsum("nap,ab,nbq->pq", j, m, j) / c.n


def _with_bias(c: OpContext) -> OpContext:
    """The op with a bias input (zeros where it has none), for the bias Jacobian."""
    if c.inputs.get("bias") is not None:
        return c
    w = c.inputs["weight"]
    assert w is not None
    return OpContext(c.op, {**c.inputs, "bias": torch.zeros(w.shape[0], dtype=w.dtype)}, c.attrs, c.out, c.saved)


def bias_jacobian(c: OpContext) -> torch.Tensor:
    """``J_b`` of one sample, ``[M, C_out]`` (the same for every sample)."""
    return per_sample_jacobians(_with_bias(c), "bias")[0]


def kron_out(c: OpContext, s: torch.Tensor, sign: torch.Tensor | None) -> torch.Tensor:
    jb = bias_jacobian(c)
    cols = torch.einsum("knm,mc->knc", s.reshape(s.shape[0], c.n, -1), jb)
    w = torch.ones(s.shape[:2], dtype=s.dtype) if sign is None else sign
    return torch.einsum("kn,knc,knd->cd", w, cols, cols)


def kron_dense(c: OpContext, m: torch.Tensor) -> torch.Tensor:
    jb = bias_jacobian(c)
    return jb.T @ m @ jb


def weight_jacobian_rows(c: OpContext) -> torch.Tensor:
    """The per-sample weight Jacobian as ``[N, M, O, I]`` over the arrangement of the weight that the op's
    Kronecker factors split (``OpDef.kron_layout``): ``weight.reshape(O, I)``, or for a transposed
    convolution ``weight.transpose(0, 1).reshape(O, I)`` (``O`` its output channels)."""
    w = c.inputs["weight"]
    assert w is not None
    j = per_sample_jacobians(c, "weight").reshape((c.n, -1) + tuple(w.shape))
    if c.op.kron_layout("weight") is KroneckerLayout.TRANSPOSED:
        j = j.transpose(2, 3)
    return j.reshape(j.shape[:3] + (-1,))


def kron_in(c: OpContext) -> torch.Tensor:
    jb = bias_jacobian(c)
    channel0 = jb[:, 0] == 1  # the output entries of channel 0
    assert channel0.any() and ((jb == 0) | (jb == 1)).all(), "the bias Jacobian is not a 0/1 selection"
    rows = weight_jacobian_rows(c)[:, channel0, 0, :]  # [N, entries of channel 0, I]
    return torch.einsum("nei,nej->ij", rows, rows) / c.n


# ---- derived values -----------------------------------------------------------------------------

def elementwise_derivative(c: OpContext) -> torch.Tensor:
    """``phi'(x)``: the diagonal of the per-sample Jacobian of an elementwise op (which must be
    diagonal: checked here)."""
    j = per_sample_jacobians(c, "x")
    diagonal = torch.diagonal(j, dim1=1, dim2=2)
    off = j - torch.diag_embed(diagonal)
    assert off.abs().max() == 0, f"{c.op.name} is not elementwise: its Jacobian has off-diagonal entries"
    return diagonal.reshape(c.inputs["x"].shape)


def elementwise_second_derivative(c: OpContext) -> torch.Tensor:
    """``phi''(x)``: the diagonal of the per-sample Hessian of ``1 . phi(x_n)``."""
    ones = torch.ones_like(c.out)
    h = residual_hessians(c, "x", ones)
    return torch.diagonal(h, dim1=1, dim2=2).reshape(c.inputs["x"].shape)


def square_of(key: str) -> Callable[[OpContext], torch.Tensor]:
    def ref(c: OpContext) -> torch.Tensor:
        value = c.inputs[key]
        assert value is not None
        return value ** 2

    ref.__doc__ = f"``{key} o {key}``: the squared entries HesScale eq. 5/8-9 read."
    return ref


def unfolded_input(c: OpContext) -> torch.Tensor:
    """The unfolded input ``[[X]]`` of a convolution (HBP Sec. D.3), ``[N, G, C_in/G * K1 * K2, P]``,
    read off the per-sample weight Jacobian: ``Z = W [[X]] + b`` gives
    ``dZ[c, p] / dW[c, i] = [[X]][i, p]`` for every output channel ``c`` of a group. For a transposed
    convolution (groups 1) ``W`` is ``weight.transpose(0, 1)`` (:func:`weight_jacobian_rows`) and ``P`` its
    output positions."""
    groups = c.attrs["groups"]
    rows = weight_jacobian_rows(c)  # [N, M, C_out, I]
    c_out, per_group = rows.shape[2], rows.shape[3]
    positions = c.out[0, 0].numel()
    j = rows.reshape(c.n, c_out, positions, c_out, per_group)
    first = [g * (c_out // groups) for g in range(groups)]  # one output channel per group
    cols = torch.stack([j[:, ch, :, ch, :] for ch in first], dim=1)  # [N, G, P, I]
    return cols.transpose(2, 3)


def averaging_weights(c: OpContext) -> torch.Tensor:
    """``1/divisor_j`` per output position ``j`` of an average pooling, ``[1, 1, *out]``: the
    nonzero entries of row ``j`` of its per-sample Jacobian ``A`` (HBP Sec. D.2), read off one
    sample's first channel."""
    j = per_sample_jacobians(c, "x")[0]
    plane_out, plane_in = c.out[0, 0].numel(), c.inputs["x"][0, 0].numel()
    a = j[:plane_out, :plane_in]  # channel 0 -> channel 0
    rows = a.max(dim=1).values
    assert (rows > 0).all() and ((a == 0) | (a == rows[:, None])).all(), "rows of A are not constant"
    return rows.reshape((1, 1) + tuple(c.out.shape[2:]))


def normalized_input(c: OpContext) -> torch.Tensor:
    """``x_hat``: a normalization's output with unit weight and zero bias (its derivative by the weight),
    or without them where the op has none."""
    w, b = c.inputs.get("weight"), c.inputs.get("bias")
    unit = {"weight": None if w is None else torch.ones_like(w), "bias": None if b is None else torch.zeros_like(b)}
    args = {**c.inputs, **unit}
    return c.op.forward(*[args[k] for k in c.op.inputs], **c.attrs)


# The generic meaning of every derived value a registered rule reads, by name.
DERIVED: dict[str, Callable[[OpContext], torch.Tensor]] = {
    "d1": elementwise_derivative,
    "d2": elementwise_second_derivative,
    "x_sq": square_of("x"),
    "weight_sq": square_of("weight"),
    "x_cols": unfolded_input,
    "inv_divisor": averaging_weights,
    "x_hat": normalized_input,
}
