"""The generic exact rule: every op without a hand-written one, differentiated by torch.func.

Any traced call outside the hand-written vocabulary -- a module (``nn.LayerNorm``,
``nn.MultiheadAttention``, a module torch.fx cannot trace), a function (``torch.cat``,
``torch.softmax``) or a tensor method (``x.mean(1)``, ``x.transpose(1, 2)``) -- becomes one
``generic`` node: its tensor arguments are the node's inputs (*slots*: data, parameters or constants),
everything else is kept in a :class:`GenericCall` that rebuilds the call. The rules below read nothing
but that call and are exact for any op that treats samples independently (checked when the node is built,
:func:`check_samples_independent`), by the block-diagonal structure of its batched Jacobian
``J = diag(J_1, ..., J_N)``:

* ``jac_t``:  ``J^T v`` by one VJP of the batched call, vectorized over the columns (HBP eq. S.6);
* ``diag``:   ``d_x = sum_j (J_n)_{j.}^2 d_{z,j}`` (HesScale eq. 4, 8 for a general block): the rows of
  every ``J_n`` from VJPs with one-hot cotangents repeated over the batch;
* ``residual_sqrt``: the op's own second-order term ``R_n = d2(g_n . z_n)/dx_n^2`` (HBP eq. S.6, second
  term), joint over the data inputs, from Hessian-vector products (reverse over reverse) with one-hot
  directions, factorized per sample by its eigen-decomposition ``R_n = U diag(l) U^T`` into signed
  columns ``sqrt|l_k| u_k`` (the general-loss path's factorization, HBP Sec. C); ``residual``: its
  diagonal, for HesScale;
* parameter rules: ``grad`` by one VJP; the per-sample ``J_n^T v`` (``per_sample``, and from it
  ``diag_sqrt``, ``batch_l2``, ``batch_diag_sqrt``) by a VJP inside ``vmap`` over the samples;
  ``diag_diag`` from the per-sample parameter Jacobian's rows; ``param_residual``, the diagonal of
  ``sum_n d2(g_n . z_n)/dp^2``, by Hessian-vector products; ``gram`` (ViViT eq. S.23) from the per-sample
  products. The products of all trainable parameters of a node are computed in one pass (:class:`_Shared`).

Which second-order rules apply is decided per node when it is built (:func:`probe_curvature`): a call
whose Hessian-vector product is exactly zero at a random direction (linear maps, index maps,
piecewise-linear functions: autograd's second derivative of such an op is zero) has no residual.

Hand-written ops are optimizations of these rules, and the tests check each against them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from ..errors import UnsupportedOpError
from .registry import RuleKind, define_op

# The most tensor arguments one generic call may take, parameters of a module kept whole included
# (torch.cat of more tensors is refused).
MAX_SLOTS = 64
# One-hot cotangents and Hessian-vector products are vectorized in blocks of this many elements
# (columns x batch x features): 4 Mi elements = 32 MiB in float64 per block.
_BLOCK_ELEMENTS = 1 << 22
# Relative tolerance of the per-sample independence check: a batched call and its per-sample calls
# differ by rounding only (GEMMs of different shapes), an op that mixes samples by O(1).
_INDEPENDENCE_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


class CallKind(Enum):
    FUNCTION = "function"
    METHOD = "method"
    MODULE = "module"


@dataclass(frozen=True)
class Slot:
    """Stands for tensor argument ``index`` of a generic call in its argument template."""

    index: int


@dataclass(frozen=True)
class Nested:
    """A call on parameters alone inside a generic call's arguments (``self.cls.expand(N, -1, -1)``,
    ``self.w.t()``): evaluated with the slots ``slots`` of the enclosing call, so that its parameters are
    that call's inputs and the generic rule differentiates through both."""

    call: GenericCall
    slots: tuple[int, ...]


@dataclass(frozen=True)
class BatchSize:
    """The batch size in a call's arguments (``self.cls.expand(x.shape[0], -1, -1)``): the size of the
    data slots' dimension 0 when the call runs -- 1 when the rules run it on one sample."""


class SlotKind(Enum):
    DATA = "data"  # carries the batch as dimension 0
    PARAM = "param"  # a parameter of the model
    CONSTANT = "constant"  # a buffer or a value computed without the input


@dataclass(eq=False)
class GenericCall:
    """A traced call with its tensor arguments taken out: ``call(*slots)`` runs it.

    ``target`` is the function, the method's name or the module; ``args``/``kwargs`` the call's
    arguments with :class:`Slot` leaves; for a module, ``module_params`` says which slot holds which
    of its parameters (its buffers stay in the module). ``pick`` selects one output of a call that
    returns several. ``kinds`` says what each slot is, ``smooth_data`` whether the call has a second
    derivative w.r.t. its data slots, ``smooth_params`` the parameter slots with one.
    """

    kind: CallKind
    target: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    kinds: tuple[SlotKind, ...]
    source: str
    module_params: tuple[tuple[str, int], ...] = ()
    pick: int | None = None
    smooth_data: bool = True
    smooth_params: frozenset[int] = field(default_factory=frozenset)
    # The parameter slots that are trainable (their rules run); the others are held constant.
    trainable: frozenset[int] = field(default_factory=frozenset)
    shared: dict[str, Any] = field(default_factory=dict, repr=False)
    # Why torch cannot differentiate the call twice (its first message), if it cannot.
    no_second_derivative: str = ""
    # Whether one sample's call runs under vmap (a recurrent layer's in-place state updates do not):
    # per-sample parameter products then loop over the samples.
    vmap_samples: bool = True

    def __call__(self, *slots: torch.Tensor, batch: int | None = None) -> Any:
        data = self.data
        if data:
            batch = slots[data[0]].shape[0]

        def fill(v: Any) -> Any:
            if isinstance(v, Nested):
                return v.call(*[slots[i] for i in v.slots], batch=batch)
            if isinstance(v, BatchSize):
                assert batch is not None, "a batch size in a call without data"
                return batch
            return slots[v.index] if isinstance(v, Slot) else v

        args, kwargs = pytree.tree_map(fill, (self.args, self.kwargs))
        with _math_kernels():
            if self.kind is CallKind.MODULE:
                params = {name: slots[i] for name, i in self.module_params}
                out = torch.func.functional_call(self.target, params, tuple(args), kwargs)
            elif self.kind is CallKind.METHOD:
                out = getattr(args[0], self.target)(*args[1:], **kwargs)
            else:
                out = self.target(*args, **kwargs)
        return out if self.pick is None else out[self.pick]

    @property
    def data(self) -> tuple[int, ...]:
        return tuple(i for i, k in enumerate(self.kinds) if k is SlotKind.DATA)

    def __repr__(self) -> str:  # the program listing shows it
        return f"GenericCall({self.source})"


@contextlib.contextmanager
def _math_kernels() -> Iterator[None]:
    """Attention through differentiable math: nn.MultiheadAttention's fused fast path and SDPA's
    flash kernel have no second derivatives (or no vmap rules) on CPU."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


def generic(*slots: torch.Tensor, call: GenericCall) -> Any:
    return call(*slots)


SLOTS = tuple(f"x{i}" for i in range(MAX_SLOTS))


def _applies(node: fx.Node, kind: RuleKind, key: str) -> bool:
    call = generic_call(node)
    i = SLOTS.index(key)
    second = (RuleKind.RESIDUAL, RuleKind.RESIDUAL_SQRT, RuleKind.PARAM_RESIDUAL)
    if kind in second and call.no_second_derivative:
        raise UnsupportedOpError(
            f"node '{node.name}' ({call.source}) has no second derivative in torch "
            f"({call.no_second_derivative}); the Hessian quantities (diag_hessian, hesscale, ...) need it, "
            "the GGN and first-order quantities do not")
    if kind in (RuleKind.RESIDUAL, RuleKind.RESIDUAL_SQRT):
        return call.smooth_data
    if kind is RuleKind.PARAM_RESIDUAL:
        return i in call.smooth_params
    return True


op = define_op("generic", "generic", generic, inputs=SLOTS, variadic=True, applies=_applies)


def generic_call(node: fx.Node) -> GenericCall:
    """The :class:`GenericCall` of a generic node (canonical graph or program)."""
    from ..node_info import info

    call = info(node).call
    assert isinstance(call, GenericCall), f"node {node.name} is not a generic op"
    return call


# ---- helpers ---------------------------------------------------------------------------------------

def _pullback(fn: Callable[..., Any], *primals: Any) -> Callable[..., Any]:
    """``torch.func.vjp``'s pullback of ``fn`` at ``primals``."""
    return torch.func.vjp(fn, *primals)[1]


def _replace(inputs: Sequence[Any], values: dict[int, Any]) -> tuple[Any, ...]:
    return tuple(values.get(i, v) for i, v in enumerate(inputs))


def _lead(v: torch.Tensor, out: torch.Tensor) -> tuple[int, ...]:
    """The column dimensions of ``v [*lead, N, *out]``."""
    return tuple(v.shape[: v.dim() - out.dim()])


def _over_columns(fn: Callable[[torch.Tensor], torch.Tensor], v: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor:
    """``fn`` applied to every column of ``v [*lead, ...]``, vectorized."""
    if not lead:
        return fn(v)
    flat = v.reshape((-1,) + tuple(v.shape[len(lead):]))
    res = torch.vmap(fn)(flat)
    return res.reshape(lead + tuple(res.shape[1:]))


def _one_hot_blocks(n: int, shape: tuple[int, ...], width: int, like: torch.Tensor
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Blocks ``(idx [C], E [C, n, *shape])`` of one-hot cotangents: ``E[c, m]`` is the unit vector of
    feature ``idx[c]``, the same for every sample ``m``; ``width`` elements per cotangent column bound
    the block size."""
    d = 1
    for s in shape:
        d *= s
    per = max(1, _BLOCK_ELEMENTS // max(1, n * max(d, width)))
    for start in range(0, d, per):
        idx = torch.arange(start, min(d, start + per), device=like.device)
        e = torch.zeros(len(idx), d, dtype=like.dtype, device=like.device)
        e[torch.arange(len(idx), device=like.device), idx] = 1
        yield idx, e.unsqueeze(1).expand(len(idx), n, d).reshape((len(idx), n) + shape)


def _numel(shape: Sequence[int]) -> int:
    d = 1
    for s in shape:
        d *= s
    return d


# ---- data rules ------------------------------------------------------------------------------------

def _jac_t(i: int, v: torch.Tensor, inputs: tuple[Any, ...], call: GenericCall, out: torch.Tensor) -> torch.Tensor:
    """``J_i^T v`` for every column of ``v [*lead, N, *out]`` (HBP eq. S.6)."""
    pull = _pullback(lambda x: call(*_replace(inputs, {i: x})), inputs[i])
    return _over_columns(lambda c: pull(c)[0], v, _lead(v, out))


def _diag(i: int, d: torch.Tensor, inputs: tuple[Any, ...], call: GenericCall, out: torch.Tensor) -> torch.Tensor:
    """``d_x = sum_j (J_n)_{j.}^2 d_{n,j}`` (HesScale eq. 4 and 8 for a general block)."""
    x = inputs[i]
    pull = _pullback(lambda x_: call(*_replace(inputs, {i: x_})), x)
    n = out.shape[0]
    total = torch.zeros_like(x)
    weights = d.reshape(n, -1)
    for idx, e in _one_hot_blocks(n, tuple(out.shape[1:]), x[0].numel(), out):
        rows = torch.vmap(lambda c: pull(c)[0])(e)  # [C, N, *x]
        w = weights[:, idx].T.reshape((len(idx), n) + (1,) * (x.dim() - 1))
        total = total + (rows * rows * w).sum(0)
    return total


def _hessian_rows(g: torch.Tensor, inputs: tuple[Any, ...], call: GenericCall, slots: tuple[int, ...],
                  directions: tuple[int, ...]) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Rows of the per-sample Hessians ``R_n = d2(g_n . z_n)/dx_n^2`` joint over ``slots``: blocks
    ``(slot, idx [C], rows [C, N, D])`` with ``rows[c, n] = R_n e_{idx[c]}`` for the one-hot directions
    ``e`` in slot ``slot`` (``D`` the joint per-sample size). The samples are independent, so one HVP of
    the batch's ``sum_n g_n . z_n`` with a direction repeated over the batch gives every sample's row."""
    xs = tuple(inputs[i] for i in slots)

    def scalar(*values: torch.Tensor) -> torch.Tensor:
        return (g * call(*_replace(inputs, dict(zip(slots, values))))).sum()

    grads = torch.func.grad(scalar, argnums=tuple(range(len(slots))))
    hvp = _pullback(grads, *xs)
    n = g.shape[0]
    width = sum(x[0].numel() for x in xs)
    for j in directions:
        x = inputs[slots[j]]
        for idx, e in _one_hot_blocks(n, tuple(x.shape[1:]), width, x):
            zeros = [torch.zeros((len(idx),) + tuple(y.shape), dtype=y.dtype, device=y.device) for y in xs]
            zeros[j] = e
            rows = torch.vmap(hvp)(tuple(zeros))
            yield j, idx, torch.cat([r.reshape(len(idx), n, -1) for r in rows], dim=2)


def _residual_sqrt(g: torch.Tensor, inputs: tuple[Any, ...], call: GenericCall
                   ) -> tuple[tuple[torch.Tensor | None, ...], torch.Tensor]:
    """A signed square-root factor of ``R_n`` joint over the data slots: ``R_n = U diag(l) U^T``,
    columns ``s_k = sqrt|l_k| u_k`` with ``sign_k = sign(l_k)`` (HBP Sec. C), split per slot."""
    slots = call.data
    sizes = [inputs[i][0].numel() for i in slots]
    offsets = [sum(sizes[:j]) for j in range(len(slots))]
    n, width = g.shape[0], sum(sizes)
    hessian = torch.zeros(n, width, width, dtype=g.dtype, device=g.device)
    for j, idx, rows in _hessian_rows(g, inputs, call, slots, tuple(range(len(slots)))):
        hessian[:, offsets[j] + idx, :] = rows.transpose(0, 1)
    hessian = 0.5 * (hessian + hessian.transpose(1, 2))
    eigenvalues, vectors = torch.linalg.eigh(hessian)  # [N, D], [N, D, D]
    columns = (vectors * eigenvalues.abs().sqrt().unsqueeze(1)).permute(2, 0, 1)  # [K = D, N, D]
    sign = torch.where(eigenvalues >= 0, 1.0, -1.0).to(g.dtype).T  # [K, N]
    parts: list[torch.Tensor | None] = [None] * len(inputs)
    for j, i in enumerate(slots):
        part = columns[:, :, offsets[j]: offsets[j] + sizes[j]]
        parts[i] = part.reshape((width, n) + tuple(inputs[i].shape[1:]))
    return tuple(parts), sign


def _residual_diag(i: int, g: torch.Tensor, inputs: tuple[Any, ...], call: GenericCall) -> torch.Tensor:
    """The diagonal of ``R_n``'s block of slot ``i`` (the residual HesScale adds, eq. 4 second term)."""
    x = inputs[i]
    n = x.shape[0]
    diag = torch.zeros(n, x[0].numel(), dtype=x.dtype, device=x.device)
    for _, idx, rows in _hessian_rows(g, inputs, call, (i,), (0,)):
        diag[:, idx] = rows[torch.arange(len(idx)), :, idx].T
    return diag.reshape(x.shape)


# ---- parameter rules --------------------------------------------------------------------------------

class _Shared:
    """Results a generic node computes for all its trainable parameter slots at once (one VJP, one
    ``vmap`` over the samples, instead of one per parameter), kept until every slot took its own.
    Keyed by the identity of the arguments (held, so that an identity is never reused meanwhile)."""

    def __init__(self) -> None:
        self.args: tuple[Any, ...] = ()
        self.values: dict[int, torch.Tensor] = {}
        self.pending: set[int] = set()

    def get(self, i: int, args: tuple[Any, ...], slots: frozenset[int],
            compute: Callable[[tuple[int, ...]], dict[int, torch.Tensor]]) -> torch.Tensor:
        if i not in self.values or len(args) != len(self.args) or any(a is not b for a, b in zip(args, self.args)):
            wanted = tuple(sorted(slots | {i}))
            self.args, self.values, self.pending = args, compute(wanted), set(wanted)
        value = self.values[i]
        self.pending.discard(i)
        if not self.pending:
            self.args, self.values = (), {}
        return value


def _shared(call: GenericCall, what: str) -> _Shared:
    return call.shared.setdefault(what, _Shared())


def _grad(i: int, g: torch.Tensor, inputs: tuple[Any, ...], call: GenericCall) -> torch.Tensor:
    """``dL/dp = sum_n J_n^T g_n``: one VJP of the batched call (for all trainable parameters at once)."""

    def compute(slots: tuple[int, ...]) -> dict[int, torch.Tensor]:
        def f(*ps: torch.Tensor) -> Any:
            return call(*_replace(inputs, dict(zip(slots, ps))))

        pull = _pullback(f, *[inputs[j] for j in slots])
        return dict(zip(slots, pull(g)))

    return _shared(call, "grad").get(i, (g, *inputs), call.trainable, compute)


def _per_sample(i: int, v: torch.Tensor, inputs: tuple[Any, ...], call: GenericCall, out: torch.Tensor
                ) -> torch.Tensor:
    """``J_n^T v_n`` per sample, ``[*lead, N, *p]``: a VJP of one sample's call inside ``vmap`` (for all
    trainable parameters at once)."""
    lead = _lead(v, out)
    n = out.shape[0]
    cols = v.reshape((-1,) + tuple(out.shape)).movedim(1, 0)  # [N, L, *out]
    data = set(call.data)

    def compute(slots: tuple[int, ...]) -> dict[int, torch.Tensor]:
        def one(*values: torch.Tensor) -> tuple[torch.Tensor, ...]:
            *xs, vn = values
            xs = [x.unsqueeze(0) if j in data else x for j, x in enumerate(xs)]

            def single(*ps: torch.Tensor) -> torch.Tensor:
                return call(*_replace(xs, dict(zip(slots, ps)))).squeeze(0)

            pull = _pullback(single, *[xs[j] for j in slots])
            return torch.vmap(pull)(vn)

        if call.vmap_samples:
            in_dims = tuple(0 if j in data else None for j in range(len(inputs))) + (0,)
            res = torch.vmap(one, in_dims=in_dims)(*inputs, cols)  # per slot [N, L, *p]
        else:
            per = [one(*[x[m] if j in data else x for j, x in enumerate(inputs)], cols[m]) for m in range(n)]
            res = tuple(torch.stack(parts) for parts in zip(*per))
        return {j: r.movedim(0, 1).reshape(lead + (n,) + tuple(inputs[j].shape)) for j, r in zip(slots, res)}

    return _shared(call, "per_sample").get(i, (v, *inputs), call.trainable, compute)


def _signed_squares(a: torch.Tensor, sign: torch.Tensor | None) -> torch.Tensor:
    """``sum_k sign_kn a_kn^2`` per sample, ``[N, *p]`` from ``a [K, N, *p]``."""
    sq = a * a
    if sign is not None:
        sq = sq * sign.reshape(sign.shape + (1,) * (a.dim() - 2))
    return sq.sum(0)


def _diag_diag(i: int, d: torch.Tensor, inputs: tuple[Any, ...], call: GenericCall, out: torch.Tensor
               ) -> torch.Tensor:
    """``sum_n sum_j (J_n)_{j.}^2 d_{n,j}`` w.r.t. the parameter (HesScale eq. 5, 9 for a general op)."""
    p = inputs[i]
    n = out.shape[0]
    total = torch.zeros_like(p)
    weights = d.reshape(n, -1)
    for idx, e in _one_hot_blocks(n, tuple(out.shape[1:]), p.numel(), out):
        rows = _per_sample(i, e, inputs, call, out)  # [C, N, *p]
        w = weights[:, idx].T.reshape((len(idx), n) + (1,) * p.dim())
        total = total + (rows * rows * w).sum((0, 1))
    return total


def _param_residual(i: int, g: torch.Tensor, inputs: tuple[Any, ...], call: GenericCall) -> torch.Tensor:
    """``diag sum_n d2(g_n . z_n)/dp^2`` by HVPs of ``sum_n g_n . z_n`` with one-hot directions."""
    p = inputs[i]

    def scalar(q: torch.Tensor) -> torch.Tensor:
        return (g * call(*_replace(inputs, {i: q}))).sum()

    hvp = _pullback(torch.func.grad(scalar), p)
    flat = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
    for idx, e in _one_hot_blocks(1, tuple(p.shape), p.numel(), p):
        rows = torch.vmap(lambda c: hvp(c)[0])(e[:, 0])  # [C, *p]
        flat[idx] = rows.reshape(len(idx), -1)[torch.arange(len(idx)), idx]
    return flat.reshape(p.shape)


# ---- registration: one rule per slot and kind -------------------------------------------------------

def _register_slot(i: int) -> None:
    key = SLOTS[i]

    def jac_t(v, inputs, call, out):
        return _jac_t(i, v, inputs, call, out)

    def diag(d, inputs, call, out):
        return _diag(i, d, inputs, call, out)

    def residual(g, inputs, call):
        return _residual_diag(i, g, inputs, call)

    def grad(g, inputs, call):
        return _grad(i, g, inputs, call)

    def per_sample(v, inputs, call, out):
        return _per_sample(i, v, inputs, call, out)

    def diag_sqrt(S, sign, inputs, call, out):
        return _signed_squares(_per_sample(i, S, inputs, call, out), sign).sum(0)

    def batch_diag_sqrt(S, sign, inputs, call, out):
        return _signed_squares(_per_sample(i, S, inputs, call, out), sign)

    def batch_l2(g, inputs, call, out):
        a = _per_sample(i, g, inputs, call, out)
        return (a * a).reshape(a.shape[0], -1).sum(1)

    def diag_diag(d, inputs, call, out):
        return _diag_diag(i, d, inputs, call, out)

    def param_residual(g, inputs, call):
        return _param_residual(i, g, inputs, call)

    for fn, register in ((jac_t, op.jac_t), (diag, op.diag), (residual, op.residual), (grad, op.grad),
                         (per_sample, op.per_sample), (diag_sqrt, op.diag_sqrt),
                         (batch_diag_sqrt, op.batch_diag_sqrt), (batch_l2, op.batch_l2),
                         (diag_diag, op.diag_diag), (param_residual, op.param_residual)):
        fn.__name__ = f"generic_{fn.__name__}_{key}"
        fn.__qualname__ = fn.__name__
        register(key)(fn)


for _i in range(MAX_SLOTS):
    _register_slot(_i)


@op.gram(*SLOTS)
def generic_gram(S, inputs, call, out, include=(), total=None):
    """ViViT eq. S.23: the Gram matrix ``[K N, K N]`` of the per-sample factors ``a_kn = J_n^T S_kn`` of the
    parameter slots ``include`` (side by side), ``k``-major rows, added in place into ``total`` where given.
    It reads the op's output, so a subset of samples (ggn_eigen's ``subsample=``) is refused upstream."""
    from ..gram import gram_into

    k, n = S.shape[0], S.shape[1]
    parts = [_per_sample(SLOTS.index(key), S, inputs, call, out).reshape(k * n, -1) for key in include]
    return gram_into(torch.cat(parts, 1), total, k)


@op.residual_sqrt(*SLOTS)
def generic_residual_sqrt(g, inputs, call):
    """The joint signed factor of the op's second-order term over its data slots."""
    return _residual_sqrt(g, inputs, call)


# ---- building a generic node ------------------------------------------------------------------------

def probe_curvature(call: GenericCall, inputs: tuple[torch.Tensor, ...], where: str = "") -> GenericCall:
    """``call`` with ``smooth_data`` / ``smooth_params`` set: whether a Hessian-vector product of
    ``g . call`` at a random direction is nonzero, jointly over the data slots and per parameter slot.
    Autograd's second derivative of a linear, index or piecewise-linear map is exactly zero, so those
    get no residual rules. The directions come from a private generator (the user's RNG is untouched).
    A call torch cannot differentiate is refused here, naming it (``where``); one it cannot
    differentiate twice is refused where a Hessian quantity needs its second derivative."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand_like(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)

    out = call(*inputs)
    if not (isinstance(out, torch.Tensor) and out.is_floating_point()):
        return call
    g = rand_like(out)

    def nonzero_hvp(slots: tuple[int, ...]) -> bool:
        xs = tuple(inputs[i] for i in slots)

        def scalar(*values: torch.Tensor) -> torch.Tensor:
            return (g * call(*_replace(inputs, dict(zip(slots, values))))).sum()

        grads = torch.func.grad(scalar, argnums=tuple(range(len(slots))))
        hvp = _pullback(grads, *xs)
        return any(bool((h != 0).any()) for h in hvp(tuple(rand_like(x) for x in xs)))

    params = [i for i, k in enumerate(call.kinds) if k is SlotKind.PARAM and inputs[i].is_floating_point()]
    data = tuple(i for i in call.data if inputs[i].is_floating_point())
    try:
        _pullback(lambda *xs: call(*_replace(inputs, dict(zip(data + tuple(params), xs)))),
                  *[inputs[i] for i in data + tuple(params)])(g)
    except (RuntimeError, NotImplementedError) as err:
        raise UnsupportedOpError(f"{where or call.source} has no derivative in torch: "
                                 f"{str(err).splitlines()[0]}") from err
    if params:
        try:
            _per_sample(params[0], g[:1].unsqueeze(0).expand((1,) + tuple(g.shape)), inputs, call, out)
        except RuntimeError:  # no batching rule, or in-place updates of a state created inside the call
            call.vmap_samples = False
        call.shared.clear()  # the probe's results hold the example batch
    try:
        call.smooth_data = bool(data) and nonzero_hvp(data)
        call.smooth_params = frozenset(i for i in params if nonzero_hvp((i,)))
    except (RuntimeError, NotImplementedError) as err:  # no double backward for some op inside the call
        call.no_second_derivative = str(err).splitlines()[0]
    return call


def check_samples_independent(call: GenericCall, inputs: tuple[torch.Tensor, ...], where: str) -> None:
    """Refuse a call that mixes samples: its batched output must equal its per-sample outputs (each
    sample alone, as a batch of one). BatchNorm in training mode, a sum over the batch, dropout in
    training mode (random) fail this."""
    out = call(*inputs)
    n = inputs[call.data[0]].shape[0]
    if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != n:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UnsupportedOpError(
            f"{where}: its output {shape} does not keep the batch (dim 0, size {n}) of its input; fxcurv "
            "defines curvature per sample and needs every op to map a batch [N, ...] to a batch [N, ...] "
            "(reshapes that fold the batch into other axes are not supported)")
    if n == 1 or not out.is_floating_point():
        return
    rtol = _INDEPENDENCE_RTOL.get(out.dtype, 1e-4)
    scale = float(out.abs().max()) + torch.finfo(out.dtype).tiny
    data = set(call.data)
    for m in range(n):
        try:
            alone = call(*[x[m: m + 1] if j in data else x for j, x in enumerate(inputs)])
        except (RuntimeError, ValueError) as err:  # torch refuses a batch of one (BatchNorm in training)
            raise UnsupportedOpError(
                f"{where}: it fails on one sample alone ({str(err).splitlines()[0]}), so it couples the samples "
                "of a batch. Curvature is defined per sample: BatchNorm must be in eval mode (model.eval()), "
                "and no op may reduce over the batch") from err
        if not isinstance(alone, torch.Tensor) or alone.shape != out[m: m + 1].shape or \
                float((alone - out[m: m + 1]).abs().max()) > rtol * scale:
            raise UnsupportedOpError(
                f"{where}: it mixes samples -- its output for sample {m} changes with the other samples of "
                "the batch (or it is random). Curvature is defined per sample: BatchNorm must be in eval "
                "mode (model.eval()), dropout in eval mode or p=0, and no op may reduce over the batch")

