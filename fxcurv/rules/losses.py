"""Losses: their gradient, Hessian, symmetric Hessian factorization and Hessian diagonal w.r.t. the
model output ``f``.

Closed forms:

* ``cross_entropy`` (softmax cross-entropy, HBP Sec. C.2; HesScale App. A.1) on logits ``[N, C]``
  or ``[N, C, d1, ...]`` (one softmax per position): per position ``H = w (sum_c t_c)
  (diag p - p p^T)`` with ``p = softmax(f)``, target distribution ``t`` and weight ``w`` (``1/N``
  for ``reduction="mean"`` on ``[N, C]``); a sample's Hessian is block diagonal over its positions.
  Its factor has ``C - 1`` columns per position; Monte Carlo columns are ``p - onehot(c)`` with
  ``c ~ Cat(p)`` drawn per position (``E[.(.)^T] = H``).
* ``mse_loss`` (HBP Sec. C.1): ``H = 2 w I`` with ``w = 1/numel`` for ``"mean"``; Monte Carlo columns
  are ``sqrt(2 w) z`` with ``z ~ N(0, I)``.
* ``bce_with_logits`` (binary cross-entropy on logits, any output shape): ``H = w diag(s (1 - s))``
  with ``s = sigmoid(f)``, one factor column per output entry; Monte Carlo columns ``s - b`` with
  ``b ~ Bernoulli(s)``.
* ``nll_loss`` on log-probabilities ``[N, C, d1, ...]``: linear in ``f``, ``H = 0`` (no factor
  columns; the convention for ``log_softmax`` + ``NLLLoss`` is explained at its rules).

Any other loss torch.fx can trace takes the **general path** (``general_loss``): the per-sample
Hessian blocks ``d2L/df_n^2`` come from torch.func (one Hessian-vector product per output
coordinate, vectorized, valid because a sample-separable loss has a block-diagonal Hessian --
checked at every call with one more product, :func:`_check_separable`) and are factorized by
eigendecomposition, ``H_n = U diag(lam) U^T``, into ``S = U sqrt|lam|`` with ``sign = sign(lam)``
where the loss is not convex (EA-CG eq. 14).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from ..data import LossReduction, LossScale
from ..errors import InputError, LossError, UnsupportedOpError
from .registry import Match, define_op

# ---- softmax cross-entropy ----------------------------------------------------------------------
#
# The model output is ``[N, C]`` or, for dense predictions (segmentation), ``[N, C, d1, ...]``: one
# C-way softmax per *position* ``a`` of ``(d1, ...)``. Losses of different positions share no
# logits, so each sample's Hessian is block diagonal over its positions, one HBP Sec. C.2 block per
# position. Every rule below works per position: ``probs``/``target_dist`` are ``[N, C, *d]``, the
# weight ``sample_weight`` is ``[N, *d]`` (one per position; ``[N]`` for 2-D outputs).

# Class-index targets are int64, as torch documents: its CPU kernel also takes uint8, but not its
# shape propagation (fake tensors), which every program build runs.
_INDEX_DTYPES = (torch.int64,)


def cross_entropy(f, y, reduction="mean", ignore_index=-100, label_smoothing=0.0):
    return F.cross_entropy(f, y, reduction=reduction, ignore_index=ignore_index,
                           label_smoothing=label_smoothing)


def _check_cross_entropy(shape, dtype, y, reduction, ignore_index, label_smoothing):
    """Raise InputError unless ``y`` is a target cross-entropy takes for a model output of ``shape``
    and ``dtype``: class indices ``[N, d1, ...]`` in ``[0, C)`` or ``ignore_index``, or class
    probabilities shaped like the output. Runs at every call (cost: one min/max over ``y``)."""
    if len(shape) < 2:
        raise InputError(
            f"cross_entropy: the model output has shape {tuple(shape)}; cross_entropy takes logits "
            "[N, C] or [N, C, d1, ...] (class axis 1)"
        )
    c = shape[1]
    index_shape = (shape[0],) + tuple(shape[2:])
    if y.dtype in _INDEX_DTYPES:
        if tuple(y.shape) != index_shape:
            spelled = f"[{shape[0]}] (one class per sample)" if len(shape) == 2 else \
                f"{index_shape} (one class per sample and position)"
            raise InputError(
                f"target y: cross_entropy with class-index targets expects shape {spelled}, got "
                f"{tuple(y.shape)}"
            )
        _check_class_indices(y, c, ignore_index)
    elif y.is_floating_point():
        if tuple(y.shape) != tuple(shape):
            raise InputError(
                f"target y: cross_entropy with class-probability targets expects shape "
                f"{tuple(shape)}, got {tuple(y.shape)}"
            )
        if y.dtype != dtype:
            raise InputError(f"target y: dtype {y.dtype} differs from the model output's {dtype}")
    else:
        raise InputError(
            f"target y: cross_entropy takes int64 class indices {list(index_shape)} or float class "
            f"probabilities {list(shape)}; got dtype {y.dtype}"
        )


def _check_class_indices(y: torch.Tensor, c: int, ignore_index: int) -> None:
    """Every class index in ``[0, c)`` or equal to ``ignore_index``; else InputError naming one.

    The common case costs one ``aminmax`` (8 us for 128 targets on this CPU, with the shape checks;
    one device sync on a GPU), two more ops where some targets carry an out-of-range
    ``ignore_index``; the position of an offender is looked up only when there is one."""
    if y.numel() == 0:
        return
    extremes = torch.aminmax(y)
    lo, hi = extremes.min.item(), extremes.max.item()  # on a GPU, the first item() syncs
    if 0 <= lo and hi < c:
        return
    if ignore_index in (lo, hi):  # ignored targets: the others must be in range
        extremes = torch.aminmax(torch.where(y == ignore_index, 0, y))
        if 0 <= extremes.min.item() and extremes.max.item() < c:
            return
    bad = ((y < 0) | (y >= c)) & (y != ignore_index)
    where = tuple(int(i) for i in bad.nonzero()[0].tolist())
    raise InputError(
        f"target y: class index {int(y[where])} at {where} is out of range for {c} classes; "
        f"cross_entropy takes class indices in [0, {c}) or ignore_index={ignore_index}"
    )


def _positions(shape) -> int:
    """``P = d1 * d2 * ...``, the number of positions per sample (1 for ``[N, C]`` outputs)."""
    return int(torch.Size(shape[2:]).numel())


def _ce_scale(shape, y, reduction, ignore_index, label_smoothing) -> LossScale:
    """``"mean"`` averages over the positions ``N * P`` (probability targets) or over the non-ignored
    class indices, as torch does (:func:`ce_sample_weight`)."""
    if reduction == "sum":
        return LossScale(LossReduction.SUM)
    if y.is_floating_point():
        return LossScale(LossReduction.MEAN, float(shape[0] * _positions(shape)))
    return LossScale(LossReduction.MEAN, float((y != ignore_index).sum()))


ce = define_op("cross_entropy", "losses", cross_entropy, inputs=("f", "y"), is_loss=True,
               check=_check_cross_entropy, scale=_ce_scale,
               sqrt_columns=lambda shape: max(shape[1] - 1, 0) * _positions(shape))


def _ce_attrs(reduction, ignore_index, label_smoothing, weight, size_average=None, reduce=None):
    if size_average is not None or reduce is not None:
        raise UnsupportedOpError("the deprecated size_average/reduce arguments are not supported; use reduction=")
    if reduction not in ("mean", "sum"):
        raise UnsupportedOpError(
            f"cross_entropy with reduction={reduction!r}: the curvature of a non-scalar loss is "
            "undefined; supported: 'mean', 'sum'"
        )
    if weight is not None:
        return None  # class weights: take the general path
    return {"reduction": reduction, "ignore_index": ignore_index, "label_smoothing": label_smoothing}


@ce.module(nn.CrossEntropyLoss)
def _ce_from_module(node, mod):
    attrs = _ce_attrs(mod.reduction, mod.ignore_index, mod.label_smoothing, mod.weight)
    return None if attrs is None else Match({"f": node.args[0], "y": node.args[1]}, attrs)


@ce.function(F.cross_entropy)
def _ce_from_function(node, a):
    attrs = _ce_attrs(a(6, "reduction", "mean"), a(4, "ignore_index", -100),
                      a(7, "label_smoothing", 0.0), a(2, "weight", None),
                      a(3, "size_average", None), a(5, "reduce", None))
    return None if attrs is None else Match({"f": a(0, "input"), "y": a(1, "target")}, attrs)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``[N, C, *d] -> [N * P, C]``: one row per (sample, position), samples major."""
    return t.movedim(1, -1).reshape(-1, t.shape[1])


def _from_rows(rows: torch.Tensor, shape) -> torch.Tensor:
    """``[K, N * P, C] -> [K, N, C, *d]``, the inverse of :func:`_rows` behind a leading axis."""
    k, c = rows.shape[0], shape[1]
    return rows.reshape((k, shape[0]) + tuple(shape[2:]) + (c,)).movedim(-1, 2)


@ce.derived("probs")
def ce_probs(f):
    return torch.softmax(f, dim=1)


@ce.derived("target_dist")
def ce_target_dist(f, y, ignore_index, label_smoothing):
    """The target distribution ``t`` per position, ``[N, C, *d]`` (one-hot, smoothed; zero where ignored)."""
    c = f.shape[1]
    if y.is_floating_point():
        t = y
    else:
        valid = (y != ignore_index).unsqueeze(1)
        t = F.one_hot(torch.where(y != ignore_index, y, 0).long(), c).movedim(-1, 1).to(f.dtype) * valid
    if label_smoothing:
        # torch smooths towards the uniform distribution: probability targets get eps/C whatever
        # their mass; class-index targets only where not ignored.
        uniform = label_smoothing / c
        if not y.is_floating_point():
            uniform = uniform * valid.to(f.dtype)
        t = (1 - label_smoothing) * t + uniform
    return t


@ce.derived("sample_weight")
def ce_sample_weight(f, y, reduction, ignore_index):
    """``w [N, *d]``: the weight of each position's loss in the reduced loss. ``"mean"`` divides
    by the number of positions ``N * P`` (probability targets) or of non-ignored ones (class
    indices), as torch does; with none (an empty batch) the weights are an empty tensor."""
    shape = torch.Size((f.shape[0],) + tuple(f.shape[2:]))
    if reduction == "sum":
        return f.new_ones(shape)
    if y.is_floating_point():
        return f.new_full(shape, 1.0 / max(shape.numel(), 1))
    valid = (y != ignore_index).to(f.dtype)
    return valid / valid.sum().clamp(min=1)


@ce.loss_grad()
def ce_grad(probs, target_dist, sample_weight):
    """``dL/df = w ((sum t) p - t)`` per position (HesScale App. A.1: ``q - p`` for one-hot targets)."""
    return sample_weight.unsqueeze(1) * (target_dist.sum(1, keepdim=True) * probs - target_dist)


def _householder_factor(probs: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``[R, C - 1, C]``: per row ``r`` of ``probs [R, C]``, ``C - 1`` vectors ``s_j`` with
    ``sum_j s_j s_j^T = scale_r^2 (diag p - p p^T)``.

    ``H`` annihilates the ones vector, so ``C - 1`` columns suffice. With ``q = sqrt(p)`` (a unit
    vector) and ``Q`` an orthonormal basis of ``q``'s orthogonal complement, ``S = diag(q) Q`` gives
    ``S S^T = diag(q) (I - q q^T) diag(q) = diag p - p p^T``. ``Q`` is the Householder reflection
    mapping ``q`` to ``e_m`` without its column ``m``, ``m = argmin q`` so that
    ``|q - e_m|^2 = 2 - 2 q_m >= 2 - 2 / sqrt(C)`` keeps the reflection well conditioned.
    """
    r, c = probs.shape
    q = probs.sqrt()
    m = q.argmin(dim=1)
    onehot = F.one_hot(m, c).to(probs.dtype)
    v = q - onehot
    reflection = torch.eye(c, dtype=probs.dtype, device=probs.device) - (2 / (v * v).sum(1)).view(r, 1, 1) * (
        v.unsqueeze(2) * v.unsqueeze(1))  # [R, C, C], symmetric: rows are columns
    # The rows (= columns) other than m, gathered (a fixed shape, unlike a boolean mask).
    others = torch.arange(c - 1, device=probs.device).unsqueeze(0)
    others = others + (others >= m.unsqueeze(1)).long()  # [R, C - 1]: 0..C-1 without m
    basis = reflection.gather(1, others.unsqueeze(2).expand(r, c - 1, c))
    return basis * (q * scale.unsqueeze(1)).unsqueeze(1)  # column j: q o Q_j, scaled


@ce.loss_sqrt_hessian()
def ce_sqrt_hessian(probs, target_dist, sample_weight):
    """A factor of HBP Sec. C.2's ``H = w (sum t) (diag p - p p^T)`` per position, rank ``C - 1``.

    ``[N, C]`` outputs: ``[C - 1, N, C]`` (:func:`_householder_factor`; 10% fewer columns than
    ``diag(sqrt p) - p sqrt(p)^T`` for ``C = 10``). ``[N, C, *d]`` outputs: a sample's Hessian is
    block diagonal over its ``P`` positions, so its factor is block diagonal too:
    ``[(C - 1) P, N, C, *d]``, column ``(j, a)`` holding position ``a``'s ``j``-th vector at
    position ``a`` and zeros elsewhere. One class (``C = 1``): the loss is constant, no columns.
    """
    shape = probs.shape
    n, c = shape[:2]
    if c == 1:
        return probs.new_zeros((0,) + tuple(shape)), None
    scale = (sample_weight * target_dist.sum(1)).sqrt()  # [N, *d]
    factor = _householder_factor(_rows(probs), scale.reshape(-1))  # [N * P, C - 1, C]
    if probs.dim() == 2:
        return factor.transpose(0, 1).contiguous(), None
    p = _positions(shape)
    blocks = probs.new_zeros((c - 1, p, n, c, p))
    # blocks[j, a, n, :, a] = factor[(n, a), j, :]: the diagonal over the two position axes.
    blocks.diagonal(dim1=1, dim2=4).copy_(factor.view(n, p, c - 1, c).permute(2, 0, 3, 1))
    return blocks.view(((c - 1) * p,) + tuple(shape)), None


@ce.loss_sqrt_hessian_mc()
def ce_sqrt_hessian_mc(probs, target_dist, sample_weight, mc_samples, generator):
    """``(p - onehot(c_k)) sqrt(w sum t / K)`` with ``c_k ~ Cat(p)`` drawn per position: ``[K, N, C, *d]``.

    Draws of different positions are independent and ``E[onehot(c)] = p``, so the cross terms of
    two positions vanish in expectation and ``E[S S^T]`` is the block-diagonal Hessian. Positions
    whose probabilities are not finite (a NaN or inf in the input or a weight) get NaN columns, as
    every other quantity propagates NaN; their draw is taken from a uniform stand-in so that
    sampling never fails.
    """
    c = probs.shape[1]
    rows = _rows(probs)  # [R, C]
    finite = torch.isfinite(rows).all(1)  # [R]
    draw_from = torch.where(finite.unsqueeze(1), rows, 1.0 / c)
    classes = torch.multinomial(draw_from, mc_samples, replacement=True, generator=generator)  # [R, K]
    onehot = F.one_hot(classes.T, c).to(probs.dtype)  # [K, R, C]
    scale = (sample_weight * target_dist.sum(1)).reshape(-1) / mc_samples
    scale = torch.where(finite, scale.sqrt(), torch.nan)
    return _from_rows((rows.unsqueeze(0) - onehot) * scale.unsqueeze(-1), probs.shape)


@ce.loss_hessian_diag()
def ce_hessian_diag(probs, target_dist, sample_weight):
    """HesScale App. A.1: ``diag(H) = q - q^2`` per position (times its weight)."""
    return (sample_weight * target_dist.sum(1)).unsqueeze(1) * (probs - probs * probs)


# ---- squared error ------------------------------------------------------------------------------


def mse_loss(f, y, reduction="mean"):
    return F.mse_loss(f, y, reduction=reduction)


def _check_mse(shape, dtype, y, reduction):
    """Raise InputError unless ``y`` has the model output's ``shape`` and ``dtype``."""
    if tuple(y.shape) != tuple(shape):
        raise InputError(
            f"target y: mse_loss expects the model output's shape {tuple(shape)}, got "
            f"{tuple(y.shape)} (broadcasting targets silently changes the loss)"
        )
    if y.dtype != dtype:
        raise InputError(f"target y: dtype {y.dtype} differs from the model output's {dtype}")


def _mse_scale(shape, y, reduction) -> LossScale:
    """``"mean"`` averages over every output entry, ``N * D`` (:func:`_mse_weight`)."""
    if reduction == "sum":
        return LossScale(LossReduction.SUM)
    return LossScale(LossReduction.MEAN, float(torch.Size(shape).numel()))


mse = define_op("mse_loss", "losses", mse_loss, inputs=("f", "y"), is_loss=True, check=_check_mse,
                scale=_mse_scale)


def _mse_attrs(reduction, size_average=None, reduce=None):
    if size_average is not None or reduce is not None:
        raise UnsupportedOpError("the deprecated size_average/reduce arguments are not supported; use reduction=")
    if reduction not in ("mean", "sum"):
        raise UnsupportedOpError(
            f"mse_loss with reduction={reduction!r}: supported: 'mean', 'sum'"
        )
    return {"reduction": reduction}


@mse.module(nn.MSELoss)
def _mse_from_module(node, mod):
    return Match({"f": node.args[0], "y": node.args[1]}, _mse_attrs(mod.reduction))


@mse.function(F.mse_loss)
def _mse_from_function(node, a):
    return Match({"f": a(0, "input"), "y": a(1, "target")},
                     _mse_attrs(a(4, "reduction", "mean"), a(2, "size_average", None), a(3, "reduce", None)))


def _mse_weight(f, reduction):
    """``w``: ``1 / numel`` for ``"mean"`` (any finite value for an empty batch, whose every
    derivative is an empty tensor), ``1`` for ``"sum"``."""
    return 1.0 / max(f.numel(), 1) if reduction == "mean" else 1.0


@mse.loss_grad()
def mse_grad(f, y, reduction):
    """``dL/df = 2 w (f - y)``."""
    return 2 * _mse_weight(f, reduction) * (f - y)


@mse.loss_sqrt_hessian()
def mse_sqrt_hessian(f, reduction):
    """HBP eq. S.12: ``H = 2 w I``, factor ``sqrt(2 w) I`` with one column per output entry."""
    n, d = f.shape[0], f.shape[1:].numel()
    eye = torch.eye(d, dtype=f.dtype, device=f.device) * (2 * _mse_weight(f, reduction)) ** 0.5
    return eye.reshape((d, 1) + f.shape[1:]).expand((d, n) + f.shape[1:]), None


@mse.loss_sqrt_hessian_mc()
def mse_sqrt_hessian_mc(f, reduction, mc_samples, generator):
    z = torch.randn((mc_samples,) + f.shape, dtype=f.dtype, device=f.device, generator=generator)
    return z * (2 * _mse_weight(f, reduction) / mc_samples) ** 0.5


@mse.loss_hessian_diag()
def mse_hessian_diag(f, reduction):
    return torch.full_like(f, 2 * _mse_weight(f, reduction))


# ---- binary cross-entropy with logits ------------------------------------------------------------
#
# ``l(f, y) = sum_e w [softplus(f_e) - y_e f_e] = -sum_e w [y_e log s_e + (1 - y_e) log(1 - s_e)]``
# with ``s = sigmoid(f)`` and one weight ``w`` for every entry (``1 / numel`` for ``"mean"``, ``1``
# for ``"sum"``). Every entry is its own Bernoulli likelihood, so the Hessian w.r.t. ``f`` is diagonal
# and does not depend on the target: ``H = w diag(s (1 - s))``.


def bce_with_logits(f, y, reduction="mean"):
    return F.binary_cross_entropy_with_logits(f, y, reduction=reduction)


def _check_bce(shape, dtype, y, reduction):
    """Raise InputError unless ``y`` has the model output's ``shape`` and floating ``dtype`` and its
    entries are probabilities in ``[0, 1]`` (one ``aminmax`` over ``y``)."""
    if not isinstance(y, torch.Tensor) or not y.is_floating_point():
        raise InputError(
            "target y: binary_cross_entropy_with_logits takes float targets in [0, 1] shaped like the "
            f"model output {list(shape)}; got "
            f"{y.dtype if isinstance(y, torch.Tensor) else type(y).__name__} (cast class labels with y.to(f.dtype))"
        )
    if tuple(y.shape) != tuple(shape):
        raise InputError(
            f"target y: binary_cross_entropy_with_logits expects the model output's shape {tuple(shape)}, "
            f"got {tuple(y.shape)}"
        )
    if y.dtype != dtype:
        raise InputError(f"target y: dtype {y.dtype} differs from the model output's {dtype}")
    if y.numel() == 0:
        return
    extremes = torch.aminmax(y)
    lo, hi = extremes.min.item(), extremes.max.item()
    if not (0.0 <= lo and hi <= 1.0):  # NaN targets fail here too
        bad = ~((y >= 0) & (y <= 1))
        where = tuple(int(i) for i in bad.nonzero()[0].tolist())
        raise InputError(
            f"target y: binary_cross_entropy_with_logits takes probabilities in [0, 1]; y{list(where)} = "
            f"{float(y[where])}"
        )


def _bce_scale(shape, y, reduction) -> LossScale:
    """``"mean"`` averages over every output entry, ``N * D`` (:func:`_bce_weight`)."""
    if reduction == "sum":
        return LossScale(LossReduction.SUM)
    return LossScale(LossReduction.MEAN, float(torch.Size(shape).numel()))


bce = define_op("bce_with_logits", "losses", bce_with_logits, inputs=("f", "y"), is_loss=True,
                check=_check_bce, scale=_bce_scale)


def _bce_attrs(reduction, weight, pos_weight, size_average=None, reduce=None):
    if size_average is not None or reduce is not None:
        raise UnsupportedOpError("the deprecated size_average/reduce arguments are not supported; use reduction=")
    if reduction not in ("mean", "sum"):
        raise UnsupportedOpError(
            f"binary_cross_entropy_with_logits with reduction={reduction!r}: the curvature of a non-scalar "
            "loss is undefined; supported: 'mean', 'sum'"
        )
    if weight is not None or pos_weight is not None:
        return None  # entry or class weights: take the general path
    return {"reduction": reduction}


@bce.module(nn.BCEWithLogitsLoss)
def _bce_from_module(node, mod):
    attrs = _bce_attrs(mod.reduction, mod.weight, mod.pos_weight)
    return None if attrs is None else Match({"f": node.args[0], "y": node.args[1]}, attrs)


@bce.function(F.binary_cross_entropy_with_logits)
def _bce_from_function(node, a):
    attrs = _bce_attrs(a(5, "reduction", "mean"), a(2, "weight", None), a(6, "pos_weight", None),
                       a(3, "size_average", None), a(4, "reduce", None))
    return None if attrs is None else Match({"f": a(0, "input"), "y": a(1, "target")}, attrs)


def _bce_weight(f, reduction) -> float:
    """``w``: ``1 / numel`` for ``"mean"`` (any finite value for an empty batch), ``1`` for ``"sum"``."""
    return 1.0 / max(f.numel(), 1) if reduction == "mean" else 1.0


@bce.derived("probs")
def bce_probs(f):
    """``s = sigmoid(f)``, the Bernoulli probability of every entry."""
    return torch.sigmoid(f)


@bce.loss_grad()
def bce_grad(probs, y, reduction):
    """``dL/df = w (s - y)``."""
    return _bce_weight(probs, reduction) * (probs - y)


@bce.loss_sqrt_hessian()
def bce_sqrt_hessian(probs, reduction):
    """``H = w diag(s (1 - s))`` per sample: one column per output entry ``e``,
    ``S[e] = sqrt(w s_e (1 - s_e)) e_e`` (``[D, N, *f]``, as MSE's ``sqrt(2 w) I``)."""
    n, d = probs.shape[0], probs.shape[1:].numel()
    root = (_bce_weight(probs, reduction) * probs * (1 - probs)).sqrt().reshape(n, d)  # [N, D]
    eye = torch.eye(d, dtype=probs.dtype, device=probs.device)
    return (eye.unsqueeze(1) * root.unsqueeze(0)).reshape((d, n) + probs.shape[1:]), None


@bce.loss_sqrt_hessian_mc()
def bce_sqrt_hessian_mc(probs, reduction, mc_samples, generator):
    """``(s - b_k) sqrt(w / K)`` with ``b_k ~ Bernoulli(s)`` drawn per entry: ``[K, N, *f]``.

    ``E[(s - b)(s - b)^T] = diag(s (1 - s))``: the entries are independent, so the cross terms vanish
    in expectation. Entries whose probability is not finite get NaN columns (drawn from a stand-in
    ``1/2`` so that sampling never fails), as every other quantity propagates NaN."""
    finite = torch.isfinite(probs)
    draw_from = torch.where(finite, probs, 0.5).unsqueeze(0).expand((mc_samples,) + probs.shape)
    # Bernoulli(s) as Binomial(1, s) (torch.binomial): the draws BackPACK's sampler makes from the same
    # generator state, so that sampled quantities can be compared with BackPACK's draw for draw.
    draws = torch.binomial(torch.ones_like(draw_from), draw_from, generator=generator)
    scale = (_bce_weight(probs, reduction) / max(mc_samples, 1)) ** 0.5
    return torch.where(finite, (probs.unsqueeze(0) - draws) * scale, torch.nan)


@bce.loss_hessian_diag()
def bce_hessian_diag(probs, reduction):
    """``w s (1 - s)``."""
    return _bce_weight(probs, reduction) * probs * (1 - probs)


# ---- negative log-likelihood on log-probabilities --------------------------------------------------
#
# ``nll_loss(f, y) = -sum_a w_a f[y_a, a]``: the loss *picks* one input entry per position ``a`` (class
# axis 1; positions as for cross-entropy), so it is **linear** in ``f``. Its Hessian w.r.t. ``f`` is
# zero: a zero-column square-root factor, a zero Hessian diagonal and zero Monte Carlo columns.
#
# Convention. Curvature quantities are defined at the model output ``f`` (the loss's input): the GGN
# ``J^T H J`` of a model ending in ``log_softmax`` and trained with ``NLLLoss`` is therefore zero,
# and the exact Hessian reaches the parameters only through ``log_softmax``'s own second derivative
# (a residual term of the model, not of the loss). The values of ``log_softmax`` + ``NLLLoss`` equal
# ``CrossEntropyLoss`` on the logits, whose GGN w.r.t. the logits is the softmax Fisher; to get that
# GGN (and the Monte Carlo Fisher), return the logits and use ``CrossEntropyLoss``. BackPACK has no
# extension for ``NLLLoss`` (nor ``LogSoftmax``): there is no number of its to match.


def nll_loss(f, y, reduction="mean", ignore_index=-100):
    return F.nll_loss(f, y, reduction=reduction, ignore_index=ignore_index)


def _check_nll(shape, dtype, y, reduction, ignore_index):
    """Raise InputError unless ``y`` holds int64 class indices ``[N, d1, ...]`` in ``[0, C)`` or
    ``ignore_index`` for a model output of ``shape`` ``[N, C, d1, ...]``."""
    if len(shape) < 2:
        raise InputError(
            f"nll_loss: the model output has shape {tuple(shape)}; nll_loss takes log-probabilities "
            "[N, C] or [N, C, d1, ...] (class axis 1)"
        )
    index_shape = (shape[0],) + tuple(shape[2:])
    if not isinstance(y, torch.Tensor) or y.dtype not in _INDEX_DTYPES:
        raise InputError(
            f"target y: nll_loss takes int64 class indices {list(index_shape)}; got "
            f"{y.dtype if isinstance(y, torch.Tensor) else type(y).__name__}"
        )
    if tuple(y.shape) != index_shape:
        raise InputError(f"target y: nll_loss expects shape {index_shape}, got {tuple(y.shape)}")
    _check_class_indices(y, shape[1], ignore_index)


def _nll_scale(shape, y, reduction, ignore_index) -> LossScale:
    """``"mean"`` averages over the non-ignored positions, as torch does."""
    if reduction == "sum":
        return LossScale(LossReduction.SUM)
    return LossScale(LossReduction.MEAN, float((y != ignore_index).sum()))


nll = define_op("nll_loss", "losses", nll_loss, inputs=("f", "y"), is_loss=True, check=_check_nll,
                scale=_nll_scale, sqrt_columns=lambda shape: 0)


def _nll_attrs(reduction, ignore_index, weight, size_average=None, reduce=None):
    if size_average is not None or reduce is not None:
        raise UnsupportedOpError("the deprecated size_average/reduce arguments are not supported; use reduction=")
    if reduction not in ("mean", "sum"):
        raise UnsupportedOpError(
            f"nll_loss with reduction={reduction!r}: the curvature of a non-scalar loss is undefined; "
            "supported: 'mean', 'sum'"
        )
    if weight is not None:
        return None  # class weights: take the general path
    return {"reduction": reduction, "ignore_index": ignore_index}


@nll.module(nn.NLLLoss)
def _nll_from_module(node, mod):
    attrs = _nll_attrs(mod.reduction, mod.ignore_index, mod.weight)
    return None if attrs is None else Match({"f": node.args[0], "y": node.args[1]}, attrs)


@nll.function(F.nll_loss)
def _nll_from_function(node, a):
    attrs = _nll_attrs(a(6, "reduction", "mean"), a(4, "ignore_index", -100), a(2, "weight", None),
                       a(3, "size_average", None), a(5, "reduce", None))
    return None if attrs is None else Match({"f": a(0, "input"), "y": a(1, "target")}, attrs)


@nll.derived("sample_weight")
def nll_sample_weight(f, y, reduction, ignore_index):
    """``w [N, *d]``: each position's weight in the reduced loss, as cross-entropy's
    (:func:`ce_sample_weight` with class-index targets)."""
    valid = (y != ignore_index).to(f.dtype)
    if reduction == "sum":
        return valid
    return valid / valid.sum().clamp(min=1)


@nll.loss_grad()
def nll_grad(f, y, ignore_index, sample_weight):
    """``dL/df = -w onehot(y)`` per position (zero where ignored)."""
    picked = F.one_hot(torch.where(y != ignore_index, y, 0), f.shape[1]).movedim(-1, 1).to(f.dtype)
    return -sample_weight.unsqueeze(1) * picked


@nll.loss_sqrt_hessian()
def nll_sqrt_hessian(f):
    """The Hessian is zero: no columns, ``[0, N, *f]``."""
    return f.new_zeros((0,) + tuple(f.shape)), None


@nll.loss_sqrt_hessian_mc()
def nll_sqrt_hessian_mc(f, mc_samples, generator):
    """``E[S S^T] = 0``: zero columns, ``[K, N, *f]`` (no draw)."""
    return f.new_zeros((mc_samples,) + tuple(f.shape))


@nll.loss_hessian_diag()
def nll_hessian_diag(f):
    return torch.zeros_like(f)


# ---- the general path -----------------------------------------------------------------------------


def general_loss(f, y, loss_fn, hvp="forward"):
    if is_fake(f):  # shape propagation: see _shaped
        return _shaped(f, ())
    return loss_fn(f, y)


general = define_op("general_loss", "losses", general_loss, inputs=("f", "y"), is_loss=True,
                    psd_hessian=False)

# How the general path multiplies the loss Hessian with a vector: forward-over-reverse (``jvp`` of
# ``grad``, the cheaper) or reverse-over-reverse (``vjp`` of ``grad``) for losses with an op that
# has no forward-mode derivative in torch (``F.huber_loss``). Chosen once per program
# (:func:`hvp_mode`) and stored on the loss node as its ``hvp`` attribute.
HVP_MODES = ("forward", "reverse")

# The separability probe is drawn from a private generator per device, seeded once and advancing
# at every call: a fresh direction each call, and the user's random state (which Monte Carlo draws
# use) untouched.
_PROBE_SEED = 0x5EED
_PROBE_GENERATORS: dict[torch.device, torch.Generator] = {}

# The separability check's tolerance, relative to the size of the Hessian-vector product. Rounding
# makes the two products the check compares differ by a few units of the dtype's precision times
# the number of terms summed; eps ** (2/3) (4e-11 in float64, 2e-5 in float32) stays above that
# for D up to ~1e4 output entries per sample while a coupling any larger is refused.
_SEPARABILITY_RTOL_EXPONENT = 2.0 / 3.0


def _shaped(f: torch.Tensor, shape) -> torch.Tensor:
    """An empty tensor of ``shape`` like ``f``. The general path's nodes know their shapes (a scalar
    loss, ``f``'s gradient, ``[N, D, D]`` blocks), so under shape propagation with fake tensors they
    return one instead of running the user's loss, which may not run on fake tensors (a boolean
    mask's data-dependent shape)."""
    return f.new_empty(shape)


def hessian_vector_products(loss_fn, f, y, tangents: torch.Tensor, hvp: str) -> torch.Tensor:
    """``[T, *f]``: ``H v`` for every tangent ``v`` of ``tangents [T, *f]``, ``H = d2L/df2`` of the
    whole batch, vectorized over the tangents. ``hvp="reverse"`` uses ``H v = (v^T H)^T``
    (``H`` is symmetric)."""

    def grad_f(f_):
        return torch.func.grad(lambda ff: loss_fn(ff, y))(f_)

    if hvp == "forward":
        return torch.func.vmap(lambda v: torch.func.jvp(grad_f, (f,), (v,))[1])(tangents)
    if hvp == "reverse":
        pullback = torch.func.vjp(grad_f, f)[1]
        return torch.func.vmap(lambda v: pullback(v)[0])(tangents)
    raise ValueError(f"hvp={hvp!r}: choose from {', '.join(HVP_MODES)}")


def _probe(f: torch.Tensor) -> torch.Tensor:
    gen = _PROBE_GENERATORS.get(f.device)
    if gen is None:
        gen = _PROBE_GENERATORS[f.device] = torch.Generator(device=f.device).manual_seed(_PROBE_SEED)
    return torch.randn(f.shape, dtype=f.dtype, device=f.device, generator=gen)


def per_sample_hessians(loss_fn, f, y, hvp: str = "forward") -> torch.Tensor:
    """``[N, D, D]``: the blocks ``d2L/df_n^2``, ``D = f[0].numel()``; LossError where the loss
    couples samples at these inputs.

    The Hessian-vector product with the ``c``-th unit vector repeated in every sample returns, in
    sample ``n``, column ``c`` of the block row sum ``B_n = sum_m H_nm``: ``D`` products give every
    ``B_n``, and ``B_n`` is the diagonal block ``H_nn`` exactly where the off-diagonal blocks
    vanish. One more product, with a random probe, checks that they do (:func:`_check_separable`):
    ``D + 1`` products instead of ``N D``, vectorized, at every call.
    """
    n, d = f.shape[0], f.shape[1:].numel()
    basis = torch.eye(d, dtype=f.dtype, device=f.device).reshape((d, 1) + f.shape[1:])
    tangents = basis.expand((d, n) + f.shape[1:])
    probe = None
    if n > 1:  # one sample cannot be coupled to another
        probe = _probe(f)
        tangents = torch.cat((tangents, probe.unsqueeze(0)))
    products = hessian_vector_products(loss_fn, f, y, tangents, hvp)
    blocks = products[:d].reshape(d, n, d).permute(1, 2, 0)
    if probe is not None:
        _check_separable(blocks, probe.reshape(n, d), products[d].reshape(n, d))
    return blocks


def _check_separable(blocks: torch.Tensor, probe: torch.Tensor, product: torch.Tensor) -> None:
    """LossError unless ``product = H v`` (``v = probe``) equals the block-diagonal ``B_n v_n``.

    Why this cannot miss a coupling: with ``B_n = sum_m H_nm`` the difference is
    ``r_n = (H v)_n - B_n v_n = sum_{m != n} H_nm (v_m - v_n) = (M v)_n``, where ``M`` has the
    off-diagonal blocks of ``H`` as its own off-diagonal blocks (and their negated row sums on the
    diagonal). So ``M = 0`` exactly when ``H`` is block diagonal, and otherwise ``M v = 0`` only on
    a proper subspace, which a Gaussian ``v`` drawn independently of the loss hits with probability
    zero. The check runs at every call of the general path, on that call's ``(f, y)``: a coupling
    that vanishes there contributes nothing to that call's numbers. In floating point it refuses
    couplings above ``eps ** (2/3)`` of the product's size (both ``|B| |v|`` and ``|H v|``: a
    coupling whose blocks sum to zero, ``(f_1 - f_2)^2``, has ``B = 0``). NaN inputs propagate
    NaN (a NaN residual compares false), as every other quantity does.
    """
    residual = (product - torch.einsum("nij,nj->ni", blocks, probe)).abs().max()
    size = torch.maximum(torch.einsum("nij,nj->ni", blocks.abs(), probe.abs()).max(), product.abs().max())
    rtol = torch.finfo(product.dtype).eps ** _SEPARABILITY_RTOL_EXPONENT
    if residual > rtol * size:
        raise LossError(
            "the loss couples samples: its Hessian w.r.t. the model output is not block diagonal "
            f"over the batch at these inputs (a random probe's Hessian-vector product differs from "
            f"the per-sample blocks' by {float(residual / size):.1e} of its size). fxcurv supports "
            "losses that are a sum or mean of per-sample terms"
        )


@general.derived("hessian")
def general_hessian(f, y, loss_fn, hvp):
    if is_fake(f):
        return _shaped(f, (f.shape[0], f.shape[1:].numel(), f.shape[1:].numel()))
    return per_sample_hessians(loss_fn, f, y, hvp)


@general.loss_grad()
def general_grad(f, y, loss_fn):
    if is_fake(f):
        return _shaped(f, f.shape)
    return torch.func.grad(lambda ff: loss_fn(ff, y))(f)


@general.loss_sqrt_hessian()
def general_sqrt_hessian(f, hessian):
    """Signed factors of each ``H_n = U diag(lam) U^T``: columns ``U[:, k] sqrt|lam_k|``, sign ``sign(lam_k)``."""
    lam, u = torch.linalg.eigh(hessian)  # [N, D], [N, D, D]
    s = u * lam.abs().sqrt().unsqueeze(1)  # column k scaled
    n, d = hessian.shape[:2]
    return s.permute(2, 0, 1).reshape((d, n) + f.shape[1:]), torch.sign(lam).T.contiguous()


@general.loss_hessian_diag()
def general_hessian_diag(f, hessian):
    return hessian.diagonal(dim1=1, dim2=2).reshape(f.shape)


# ---- validating a general loss --------------------------------------------------------------------

# Ops whose *value* has a zero or undefined derivative w.r.t. their input: autograd treats it as a
# constant, so a loss computed from it has no Hessian in its traced form.
_NON_DIFFERENTIABLE_FUNCTIONS = {
    torch.argmax, torch.argmin, torch.round, torch.floor, torch.ceil, torch.sign, torch.trunc,
    torch.detach, torch.heaviside, operator.floordiv, operator.mod,
}
_NON_DIFFERENTIABLE_METHODS = {
    "argmax", "argmin", "round", "floor", "ceil", "sign", "trunc", "detach", "detach_", "long",
    "int", "short", "bool", "byte", "char", "item", "tolist", "numpy", "requires_grad_",
}
# Comparisons make boolean *selectors*: piecewise constant, derivative zero wherever defined. A loss
# that only chooses with them -- ``torch.where(|d| < delta, d^2 / 2, delta (|d| - delta / 2))`` --
# has, off the boundaries between its pieces, the Hessian of the piece selected there.
_COMPARISON_FUNCTIONS = {
    torch.gt, torch.lt, torch.ge, torch.le, torch.eq, torch.ne, torch.greater, torch.less,
    torch.greater_equal, torch.less_equal, torch.not_equal, torch.isnan, torch.isinf, torch.isfinite,
    operator.gt, operator.lt, operator.ge, operator.le, operator.eq, operator.ne,
}
_COMPARISON_METHODS = {"gt", "lt", "ge", "le", "eq", "ne", "greater", "less", "greater_equal",
                       "less_equal", "not_equal", "isnan", "isinf", "isfinite"}
# Ops that take selectors anywhere and give selectors (or values, for a product with a value).
_SELECTOR_FUNCTIONS = {operator.and_, operator.or_, operator.xor, operator.invert, torch.logical_and,
                       torch.logical_or, torch.logical_xor, torch.logical_not, operator.mul, torch.mul}
_SELECTOR_METHODS = {"logical_and", "logical_or", "logical_xor", "logical_not", "mul", "to", "type",
                     "type_as", "float", "double", "half", "bfloat16", "bool", "long", "int", "short",
                     "byte", "char"}
_SELECTOR_USES = ("torch.where's condition, masked_fill's mask, a boolean index, a 0/1 factor of a "
                  "product, logical combinations and casts of selectors")
_SUPPORTED_LOSSES = ("Supported: losses built from differentiable torch ops (e.g. softmax, log, exp, "
                     "pow, sum, mean), comparisons used as selectors, nn.CrossEntropyLoss, nn.MSELoss, "
                     "nn.BCEWithLogitsLoss, nn.NLLLoss")


def _split_arguments(node: torch.fx.Node) -> tuple[set, set]:
    """``(selecting, other)``: the nodes among ``node``'s arguments in which a selector selects
    (a condition, a mask, an index), and the nodes among the others."""
    args, kwargs = list(node.args), dict(node.kwargs)

    def take(index: int, name: str):
        if index < len(args):
            value, args[index] = args[index], None
            return value
        return kwargs.pop(name, None)

    selecting = None
    if node.op == "call_function" and node.target is torch.where:  # where(condition, input, other)
        selecting = take(0, "condition")
    elif node.op == "call_function" and node.target is torch.masked_fill:  # masked_fill(input, mask, value)
        selecting = take(1, "mask")
    elif node.op == "call_function" and node.target is operator.getitem:  # input[index]
        selecting = take(1, "")
    elif node.op == "call_method" and node.target == "where":  # input.where(condition, other)
        selecting = take(1, "condition")
    elif node.op == "call_method" and node.target in ("masked_fill", "masked_fill_"):
        selecting = take(1, "mask")
    return _nodes_in(selecting), _nodes_in((args, kwargs))


# Queries of a tensor's metadata: no value, no derivative (``f.dtype``, ``f.size(0)``).
_METADATA_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "layout", "is_cuda"}
_METADATA_METHODS = {"size", "dim", "numel", "ndimension", "nelement"}


def _is_metadata(node: torch.fx.Node) -> bool:
    return (node.op == "call_function" and node.target is getattr and node.args[1] in _METADATA_ATTRIBUTES) or (
        node.op == "call_method" and node.target in _METADATA_METHODS)


def _nodes_in(value) -> set:
    found: set = set()
    torch.fx.node.map_arg(value, lambda n: found.add(n))
    return found


def _is_comparison(node: torch.fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _COMPARISON_FUNCTIONS) or (
        node.op == "call_method" and node.target in _COMPARISON_METHODS)


def _takes_selectors(node: torch.fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _SELECTOR_FUNCTIONS) or (
        node.op == "call_method" and node.target in _SELECTOR_METHODS)


def _name(node: torch.fx.Node) -> str:
    return str(getattr(node.target, "__name__", node.target))


def _not_differentiable(node: torch.fx.Node, why: str) -> LossError:
    return LossError(
        f"loss node '{node.name}' ({_name(node)}) is not differentiable w.r.t. the model output: "
        f"{why}. {_SUPPORTED_LOSSES}"
    )


def check_differentiable(loss_gm: torch.fx.GraphModule) -> None:
    """Refuse a traced loss whose value depends on the model output through an op with zero or
    undefined derivative, except comparisons used only as selectors.

    A forward walk marks the nodes that depend on ``f`` and, among them, the *selectors*: the
    comparisons and what depends on ``f`` only through them (piecewise constant). A selector may
    enter an op only in a selecting argument (:func:`_split_arguments`) or one of
    ``_SELECTOR_FUNCTIONS``/``_METHODS``; anywhere else (``mask.sum()``, ``mask + f``) its zero
    derivative would be the loss's.
    """
    f_node = next(n for n in loss_gm.graph.nodes if n.op == "placeholder")
    depends = {f_node}
    selector_of: dict[torch.fx.Node, torch.fx.Node] = {}  # selector -> the comparison it comes from
    for node in loss_gm.graph.nodes:
        inputs = [a for a in node.all_input_nodes if a in depends]
        if node.op == "placeholder" or not inputs or _is_metadata(node):
            continue
        selectors = [a for a in inputs if a in selector_of]
        misused = selectors
        if selectors and node.op != "output":
            other = set() if _takes_selectors(node) else _split_arguments(node)[1]
            misused = [a for a in selectors if a in other]
        if misused:
            user = f"node '{node.name}' ({_name(node)})" if node.op != "output" else "the loss's value"
            raise _not_differentiable(
                selector_of[misused[0]],
                f"it is a comparison, and its result is used as a value by {user}, where its zero "
                f"derivative makes the loss's Hessian meaningless. Comparisons may select: "
                f"{_SELECTOR_USES}")
        if node.op == "output":
            continue
        depends.add(node)
        if _is_comparison(node):
            selector_of[node] = node
        elif selectors and len(selectors) == len(inputs):
            selector_of[node] = selector_of[selectors[0]]  # piecewise constant in f
        elif (node.op == "call_function" and node.target in _NON_DIFFERENTIABLE_FUNCTIONS) or (
                node.op == "call_method" and node.target in _NON_DIFFERENTIABLE_METHODS) or (
                node.op == "call_method" and node.target == "to" and any(
                    isinstance(a, torch.dtype) and not a.is_floating_point for a in node.args[1:])):
            raise _not_differentiable(
                node, "its derivative is zero or undefined, so the loss has no Hessian in its traced form")


# torch's message when an op of the loss has no forward-mode derivative (F.huber_loss).
NO_FORWARD_AD_MESSAGE = "forward AD"


def hvp_mode(loss_fn, f: torch.Tensor, y) -> str:
    """``"forward"`` where every op of the loss has a forward-mode derivative, else ``"reverse"``:
    decided once per program, from one Hessian-vector product at the example inputs (whether torch
    has an op's forward-mode rule does not depend on values)."""
    try:
        hessian_vector_products(loss_fn, f, y, torch.ones_like(f).unsqueeze(0), "forward")
    except NotImplementedError as err:
        if NO_FORWARD_AD_MESSAGE not in str(err):
            raise
        return "reverse"
    return "forward"


def _finite(t) -> bool:
    return not isinstance(t, torch.Tensor) or not t.is_floating_point() or bool(torch.isfinite(t).all())


def check_general_loss(loss_gm: torch.fx.GraphModule, f: torch.Tensor, y) -> str:
    """Reject a traced loss that cannot be differentiated twice w.r.t. ``f``, that is not a scalar,
    or that couples samples at these inputs; return the Hessian-vector product mode
    (:data:`HVP_MODES`) its program uses."""
    check_differentiable(loss_gm)
    with torch.enable_grad():
        try:
            value = loss_gm(f, y)
        except Exception as err:  # noqa: BLE001 - the user's loss; re-raised with context
            raise LossError(f"the loss failed on the model output {tuple(f.shape)}: {err}") from err
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise LossError(
                f"the loss must return a scalar tensor; it returned "
                f"{type(value).__name__}{'' if not isinstance(value, torch.Tensor) else tuple(value.shape)}"
            )
        try:
            mode = hvp_mode(loss_gm, f, y)
            hess = per_sample_hessians(loss_gm, f, y, mode)
        except LossError:
            raise  # the loss couples samples
        except Exception as err:  # noqa: BLE001 - the user's loss under torch.func; re-raised with context
            raise LossError(f"the loss cannot be differentiated twice with torch.func: {err}") from err
        # Non-finite inputs propagate NaN like every other quantity; finite ones must give a finite
        # Hessian.
        if _finite(f) and _finite(y) and not torch.isfinite(hess).all():
            raise LossError("the loss's Hessian w.r.t. the model output is not finite at these inputs")
    return mode
