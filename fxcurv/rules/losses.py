"""Losses: their gradient, Hessian, symmetric Hessian factorization and Hessian diagonal w.r.t. the
model output ``f``.

Closed forms:

* ``cross_entropy`` (softmax cross-entropy, HBP Sec. C.2; HesScale App. A.1): per sample
  ``H = w (sum_c t_c) (diag p - p p^T)`` with ``p = softmax(f)``, target distribution ``t`` and sample
  weight ``w`` (``1/N`` for ``reduction="mean"``). Its factor ``S = diag(sqrt p) - p sqrt(p)^T``
  (``S S^T = H`` because ``sum p = 1``) has ``C`` columns; Monte Carlo columns are ``p - onehot(c)``
  with ``c ~ Cat(p)`` (``E[.(.)^T] = H``).
* ``mse_loss`` (HBP Sec. C.1): ``H = 2 w I`` with ``w = 1/numel`` for ``"mean"``; Monte Carlo columns
  are ``sqrt(2 w) z`` with ``z ~ N(0, I)``.

Any other loss torch.fx can trace takes the **general path** (``general_loss``): the per-sample
Hessian blocks ``d2L/df_n^2`` come from torch.func (one Hessian-vector product per output
coordinate, vectorized, valid because a sample-separable loss has a block-diagonal Hessian -- checked
when the program is built) and are factorized by eigendecomposition, ``H_n = U diag(lam) U^T``, into
``S = U sqrt|lam|`` with ``sign = sign(lam)`` where the loss is not convex (EA-CG eq. 14).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, LossError, UnsupportedOpError
from .registry import Match, define_op

# ---- softmax cross-entropy ----------------------------------------------------------------------


def cross_entropy(f, y, reduction="mean", ignore_index=-100, label_smoothing=0.0):
    return F.cross_entropy(f, y, reduction=reduction, ignore_index=ignore_index,
                           label_smoothing=label_smoothing)


def _check_cross_entropy(f, y, reduction, ignore_index, label_smoothing):
    if f.dim() != 2:
        raise InputError(
            f"cross_entropy: the model output has shape {tuple(f.shape)}; the closed form takes "
            "logits [N, C] (other shapes take the general loss path)"
        )
    n, c = f.shape
    if y.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        if y.shape != (n,):
            raise InputError(
                f"target y: cross_entropy with class-index targets expects shape [{n}] (one class "
                f"per sample), got {tuple(y.shape)}"
            )
    elif y.is_floating_point():
        if y.shape != f.shape:
            raise InputError(
                f"target y: cross_entropy with class-probability targets expects shape "
                f"{tuple(f.shape)}, got {tuple(y.shape)}"
            )
        if y.dtype != f.dtype:
            raise InputError(f"target y: dtype {y.dtype} differs from the model output's {f.dtype}")
    else:
        raise InputError(
            f"target y: cross_entropy takes int64 class indices [N] or float class probabilities "
            f"[N, C]; got dtype {y.dtype}"
        )


ce = define_op("cross_entropy", "losses", cross_entropy, inputs=("f", "y"), is_loss=True,
               check=_check_cross_entropy, sqrt_columns=lambda shape: max(shape[1] - 1, 0))


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


@ce.derived("probs")
def ce_probs(f):
    return torch.softmax(f, dim=1)


@ce.derived("target_dist")
def ce_target_dist(f, y, ignore_index, label_smoothing):
    """The target distribution ``t`` per sample (one-hot, smoothed; zero where ignored)."""
    c = f.shape[1]
    if y.is_floating_point():
        t = y
    else:
        valid = y != ignore_index
        t = F.one_hot(torch.where(valid, y, 0).long(), c).to(f.dtype) * valid.unsqueeze(1)
    if label_smoothing:
        # torch smooths towards the uniform distribution: probability targets get eps/C whatever
        # their mass; class-index targets only where not ignored.
        uniform = label_smoothing / c
        if not y.is_floating_point():
            uniform = uniform * valid.unsqueeze(1).to(f.dtype)
        t = (1 - label_smoothing) * t + uniform
    return t


@ce.derived("sample_weight")
def ce_sample_weight(f, y, reduction, ignore_index):
    """``w_n``: the weight of sample ``n``'s loss in the reduced loss."""
    n = f.shape[0]
    if reduction == "sum":
        return f.new_ones(n)
    if y.is_floating_point():
        return f.new_full((n,), 1.0 / n)
    valid = (y != ignore_index).to(f.dtype)
    return valid / valid.sum().clamp(min=1)


@ce.loss_grad()
def ce_grad(probs, target_dist, sample_weight):
    """``dL/df = w ((sum t) p - t)`` (HesScale App. A.1: ``q - p`` for one-hot targets)."""
    return sample_weight.unsqueeze(1) * (target_dist.sum(1, keepdim=True) * probs - target_dist)


@ce.loss_sqrt_hessian()
def ce_sqrt_hessian(probs, target_dist, sample_weight):
    """A rank-``(C - 1)`` factor of HBP Sec. C.2's ``H = diag(p) - p p^T``: ``[C - 1, N, C]``.

    ``H`` annihilates the ones vector, so ``C - 1`` columns suffice (one fewer than the ``C`` columns
    of ``diag(sqrt p) - p sqrt(p)^T``, which is every factor product 10% cheaper for ``C = 10``). With
    ``q = sqrt(p)`` (a unit vector) and ``Q`` an orthonormal basis of ``q``'s orthogonal complement,
    ``S = diag(q) Q`` gives ``S S^T = diag(q) (I - q q^T) diag(q) = H``. ``Q`` is the Householder
    reflection mapping ``q`` to ``e_m`` without its column ``m``, ``m = argmin q`` so that
    ``|q - e_m|^2 = 2 - 2 q_m >= 2 - 2 / sqrt(C)`` keeps the reflection well conditioned.
    """
    n, c = probs.shape
    scale = (sample_weight * target_dist.sum(1)).sqrt()  # [N]
    if c == 1:  # a single class: the loss is constant in f
        return probs.new_zeros((0, n, 1)), None
    q = probs.sqrt()
    m = q.argmin(dim=1)
    onehot = F.one_hot(m, c).to(probs.dtype)
    v = q - onehot
    reflection = torch.eye(c, dtype=probs.dtype, device=probs.device) - (2 / (v * v).sum(1)).view(n, 1, 1) * (
        v.unsqueeze(2) * v.unsqueeze(1))  # [N, C, C], symmetric: rows are columns
    # The rows (= columns) other than m, gathered (a fixed shape, unlike a boolean mask).
    rows = torch.arange(c - 1, device=probs.device).unsqueeze(0)
    rows = rows + (rows >= m.unsqueeze(1)).long()  # [N, C - 1]: 0..C-1 without m
    basis = reflection.gather(1, rows.unsqueeze(2).expand(n, c - 1, c))
    factor = basis * (q * scale.unsqueeze(1)).unsqueeze(1)  # column j: q o Q_j, scaled
    return factor.transpose(0, 1).contiguous(), None


@ce.loss_sqrt_hessian_mc()
def ce_sqrt_hessian_mc(probs, target_dist, sample_weight, mc_samples, generator):
    """``(p - onehot(c_k)) sqrt(w sum t / K)`` with ``c_k ~ Cat(p)``, ``[K, N, C]``."""
    n, c = probs.shape
    classes = torch.multinomial(probs, mc_samples, replacement=True, generator=generator)  # [N, K]
    onehot = F.one_hot(classes.T, c).to(probs.dtype)  # [K, N, C]
    scale = (sample_weight * target_dist.sum(1) / mc_samples).sqrt().unsqueeze(-1)
    return (probs.unsqueeze(0) - onehot) * scale


@ce.loss_hessian_diag()
def ce_hessian_diag(probs, target_dist, sample_weight):
    """HesScale App. A.1: ``diag(H) = q - q^2`` (times the sample's weight)."""
    return (sample_weight * target_dist.sum(1)).unsqueeze(1) * (probs - probs * probs)


# ---- squared error ------------------------------------------------------------------------------


def mse_loss(f, y, reduction="mean"):
    return F.mse_loss(f, y, reduction=reduction)


def _check_mse(f, y, reduction):
    if y.shape != f.shape:
        raise InputError(
            f"target y: mse_loss expects the model output's shape {tuple(f.shape)}, got "
            f"{tuple(y.shape)} (broadcasting targets silently changes the loss)"
        )
    if y.dtype != f.dtype:
        raise InputError(f"target y: dtype {y.dtype} differs from the model output's {f.dtype}")


mse = define_op("mse_loss", "losses", mse_loss, inputs=("f", "y"), is_loss=True, check=_check_mse)


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
    return 1.0 / f.numel() if reduction == "mean" else 1.0


@mse.loss_grad()
def mse_grad(f, y, reduction):
    """``dL/df = 2 w (f - y)``."""
    return 2 * _mse_weight(f, reduction) * (f - y)


@mse.loss_sqrt_hessian()
def mse_sqrt_hessian(f, reduction):
    """HBP eq. S.12: ``H = 2 w I``, factor ``sqrt(2 w) I`` with one column per output entry."""
    n, d = f.shape[0], f[0].numel()
    eye = torch.eye(d, dtype=f.dtype, device=f.device) * (2 * _mse_weight(f, reduction)) ** 0.5
    return eye.reshape((d, 1) + f.shape[1:]).expand((d, n) + f.shape[1:]), None


@mse.loss_sqrt_hessian_mc()
def mse_sqrt_hessian_mc(f, reduction, mc_samples, generator):
    z = torch.randn((mc_samples,) + f.shape, dtype=f.dtype, device=f.device, generator=generator)
    return z * (2 * _mse_weight(f, reduction) / mc_samples) ** 0.5


@mse.loss_hessian_diag()
def mse_hessian_diag(f, reduction):
    return torch.full_like(f, 2 * _mse_weight(f, reduction))


# ---- the general path -----------------------------------------------------------------------------


def general_loss(f, y, loss_fn):
    return loss_fn(f, y)


general = define_op("general_loss", "losses", general_loss, inputs=("f", "y"), is_loss=True,
                    psd_hessian=False)


def per_sample_hessians(loss_fn, f, y) -> torch.Tensor:
    """``[N, D, D]``: the blocks ``d2L/df_n^2`` of a sample-separable loss, ``D = f[0].numel()``.

    Separability makes the Hessian block diagonal, so one Hessian-vector product with the ``c``-th
    unit vector repeated in every sample returns column ``c`` of every block at once: ``D`` products
    instead of ``N * D``, vectorized with ``vmap``.
    """
    n, d = f.shape[0], f[0].numel()

    def grad_f(f_):
        return torch.func.grad(lambda ff: loss_fn(ff, y))(f_)

    basis = torch.eye(d, dtype=f.dtype, device=f.device).reshape((d, 1) + f.shape[1:])
    basis = basis.expand((d, n) + f.shape[1:])
    columns = torch.func.vmap(lambda v: torch.func.jvp(grad_f, (f,), (v,))[1])(basis)
    return columns.reshape(d, n, d).permute(1, 2, 0)


@general.derived("hessian")
def general_hessian(f, y, loss_fn):
    return per_sample_hessians(loss_fn, f, y)


@general.loss_grad()
def general_grad(f, y, loss_fn):
    return torch.func.grad(lambda ff: loss_fn(ff, y))(f)


@general.loss_sqrt_hessian()
def general_sqrt_hessian(f, hessian):
    """Signed factors of each ``H_n = U diag(lam) U^T``: columns ``U[:, k] sqrt|lam_k|``, sign ``sign(lam_k)``."""
    lam, u = torch.linalg.eigh(hessian)  # [N, D], [N, D, D]
    s = u * lam.abs().sqrt().unsqueeze(1)  # column k scaled
    n = f.shape[0]
    return s.permute(2, 0, 1).reshape((-1, n) + f.shape[1:]), torch.sign(lam).T.contiguous()


@general.loss_hessian_diag()
def general_hessian_diag(f, hessian):
    return hessian.diagonal(dim1=1, dim2=2).reshape(f.shape)


# ---- validating a general loss --------------------------------------------------------------------

# Ops through which the model output cannot be differentiated (zero or undefined derivatives).
_NON_DIFFERENTIABLE_FUNCTIONS = {
    torch.argmax, torch.argmin, torch.round, torch.floor, torch.ceil, torch.sign, torch.trunc,
    torch.detach, torch.gt, torch.lt, torch.ge, torch.le, torch.eq, torch.ne, torch.heaviside,
    operator.gt, operator.lt, operator.ge, operator.le, operator.eq, operator.ne,
    operator.floordiv, operator.mod,
}
_NON_DIFFERENTIABLE_METHODS = {
    "argmax", "argmin", "round", "floor", "ceil", "sign", "trunc", "detach", "detach_", "long",
    "int", "short", "bool", "byte", "char", "item", "tolist", "numpy", "gt", "lt", "ge", "le", "eq",
    "ne", "requires_grad_",
}


def check_general_loss(loss_gm: torch.fx.GraphModule, f: torch.Tensor, y) -> None:
    """Reject a traced loss that cannot be differentiated twice w.r.t. ``f``, or that couples samples."""
    placeholders = [n for n in loss_gm.graph.nodes if n.op == "placeholder"]
    depends = {placeholders[0]}
    for node in loss_gm.graph.nodes:
        if node.op in ("placeholder", "output") or not any(a in depends for a in node.all_input_nodes):
            continue
        depends.add(node)
        bad = (node.op == "call_function" and node.target in _NON_DIFFERENTIABLE_FUNCTIONS) or (
            node.op == "call_method" and node.target in _NON_DIFFERENTIABLE_METHODS)
        if node.op == "call_method" and node.target == "to" and any(
                isinstance(a, torch.dtype) and not a.is_floating_point for a in node.args[1:]):
            bad = True
        if bad:
            name = getattr(node.target, "__name__", node.target)
            raise LossError(
                f"loss node '{node.name}' ({name}) is not differentiable w.r.t. the model output: "
                "its derivative is zero or undefined, so the loss has no Hessian in its traced form. "
                "Supported: losses built from differentiable torch ops (e.g. softmax, log, exp, "
                "pow, sum, mean), nn.CrossEntropyLoss, nn.MSELoss"
            )
    with torch.enable_grad():
        try:
            value = loss_gm(f, y)
        except Exception as err:  # noqa: BLE001 - re-raised with context
            raise LossError(f"the loss failed on the model output {tuple(f.shape)}: {err}") from err
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise LossError(
                f"the loss must return a scalar tensor; it returned "
                f"{type(value).__name__}{'' if not isinstance(value, torch.Tensor) else tuple(value.shape)}"
            )
        try:
            hess = per_sample_hessians(loss_gm, f, y)
        except Exception as err:  # noqa: BLE001
            raise LossError(f"the loss cannot be differentiated twice with torch.func: {err}") from err
        if not torch.isfinite(hess).all():
            raise LossError("the loss's Hessian w.r.t. the model output is not finite at these inputs")
        if f.shape[0] > 1:
            # A loss that couples samples (e.g. normalizing by a batch statistic) has off-diagonal
            # blocks that the per-sample factorization would silently drop.
            probe = torch.zeros_like(f)
            probe[0] = torch.randn_like(f[0])
            grad_f = lambda ff: torch.func.grad(lambda z: loss_gm(z, y))(ff)  # noqa: E731
            hvp = torch.func.jvp(grad_f, (f,), (probe,))[1]
            scale = hvp[0].abs().max().clamp(min=torch.finfo(f.dtype).tiny)
            if hvp[1:].abs().max() > 1e-6 * scale + 1e-12:
                raise LossError(
                    "the loss couples samples: its Hessian w.r.t. the model output is not block "
                    "diagonal over the batch. fxcurv supports losses that are a sum or mean of "
                    "per-sample terms"
                )
