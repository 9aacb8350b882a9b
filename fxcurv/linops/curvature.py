"""Matrix-free curvature matrices of a data set's loss over trainable parameters: GGN, Hessian, empirical
Fisher, Monte Carlo Fisher.

For a batch ``b`` with model output ``f_b = f(x_b; theta)`` ``[N, *out]``, its Jacobian ``J_b = df_b/dtheta``
and loss ``L_b(f_b, y_b)``, each operator is ``A = sum_b w_b A_b`` (weights of :mod:`fxcurv.linops.base`)
with

* :class:`GGN`: ``A_b = J_b^T H_b J_b``, ``H_b = d2L_b/df_b2`` (block diagonal over samples);
* :class:`Hessian`: ``A_b = d2L_b/dtheta2`` (the GGN plus the network's second-order terms);
* :class:`EmpiricalFisher`: ``A_b = W_b sum_n J_n^T g_n g_n^T J_n`` with ``g_n = dL_b/df_n`` the gradient at
  sample ``n``'s output and ``W_b`` the batch's normalizer (1 for a summed loss). With the per-sample loss
  terms ``l_n`` of ``L_b = (1/W_b) sum_n l_n`` this is ``(1/W_b) sum_n grad l_n grad l_n^T``, and over the
  data set ``(1/W) sum_n grad l_n grad l_n^T`` (``sum_n`` for a summed loss): curvlinops'
  ``EFLinearOperator`` convention;
* :class:`MCFisher`: ``A_b = J_b^T S_b S_b^T J_b``, ``S_b [M, N, *out]`` the loss's Monte Carlo columns
  (``mc_samples = M`` draws per sample from the model's likelihood, scaled by ``1/sqrt(M)`` and the
  reduction): ``E[S_b S_b^T] = H_b`` for cross-entropy and squared error, so ``E[A] = GGN``. curvlinops'
  ``FisherMCLinearOperator`` is the same estimator (its would-be gradients ``p - onehot(c)`` for
  cross-entropy and ``sqrt(2) z`` for squared error, scaled alike); with the same ``seed`` it even draws the
  same samples (both reseed at every product and draw batch by batch, ``torch.multinomial`` on the softmax
  rows, a standard normal), which the tests check.

The GGN, EF and MC Fisher products are ``J_b^T (M_b (J_b V))`` with a per-sample matrix ``M_b`` at the
output, one forward pass carrying a column's tangents and one reverse pass. Column by column (``chunk=1``)
on a program of linear layers, activations and reshapes, the program's own ops run both passes
(:mod:`fxcurv.linops.rop`, no autograd, parameter shares written into the result); elsewhere
``torch.func.jvp`` (vectorized over a chunk of columns with ``vmap``) inside one ``torch.func.vjp`` over
the engine's traced model with its current parameters (``torch.func.functional_call``); no graph outlives
a product. The Hessian's products are forward-over-reverse, ``jvp`` of ``grad`` of the batch loss, or
reverse-over-reverse where an op has no forward-mode derivative in torch.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ..api import Engine, Program
from ..data import LossScale
from ..rules.losses import NO_FORWARD_AD_MESSAGE
from ..rules.registry import RuleKind
from . import rop
from .base import DEFAULT_CHUNK, Batch, LinearOperator, traced_of
from .loss import LossOp, factor_products, loss_op

Params = dict[str, torch.Tensor]

# What torch raises where forward-over-reverse fails: an op without a forward-mode derivative
# (F.huber_loss), and torch 2.13's forward-mode rule of F.mse_loss's backward, which writes into the
# target's zero tangent (a ZeroTensor) -- the Hessian then takes reverse-over-reverse products.
_FORWARD_MODE_FAILURES = (NO_FORWARD_AD_MESSAGE, "ZeroTensors are immutable")


class TangentWorkspace:
    """Buffers, one per parameter and shaped like it, that hold one column's tangents during a product.

    Forward-mode AD (``torch.func.jvp``) takes a tangent as it is only where it has the primal's layout
    in storage of its own; a view into the vector ``v`` would be copied into fresh memory at every
    product. Copying into buffers kept from the previous product touches memory already mapped:
    on the MNIST MLP's 1.3M parameters (one thread) that copy takes 0.8 ms where a fresh one takes 4 ms
    (page faults). The buffers cost ``P`` entries for the operator's
    lifetime; they are reallocated where a parameter changes shape, dtype or device."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def fill(self, V: Params) -> Params:
        """The first column of ``V {name: [K, *shape]}`` copied into the buffers, ``{name: [*shape]}``."""
        out: Params = {}
        for name, t in V.items():
            buf = self.buffers.get(name)
            if buf is None or buf.shape != t.shape[1:] or buf.dtype != t.dtype or buf.device != t.device:
                buf = self.buffers[name] = torch.empty(t.shape[1:], dtype=t.dtype, device=t.device)
            out[name] = buf.copy_(t[0])
        return out


def jacobian_sandwich(model: nn.Module, params: Params, x: Any, V: Params, middle: Any,
                      workspace: TangentWorkspace | None = None) -> Params:
    """``J^T middle(f, J V)`` for columns ``V {name: [K, *shape]}``: ``f`` and ``J V [K, N, *out]`` from one
    forward pass with tangents (``torch.func.jvp``), ``middle(f, JV) -> [K, N, *out]``, then one
    vectorized vector-Jacobian product through the same pass (``torch.func.vjp``). One column's tangents
    are copied into ``workspace`` where given.

    (Forward-mode autograd with ``torch.autograd.grad`` instead of the torch.func transforms was measured
    too: faster on the MNIST MLP, which now takes :mod:`fxcurv.linops.rop`, but on the c3d3 net slower and
    with 18% more peak memory, the tangents' operations being recorded for the reverse pass.)"""
    if not V:
        return {}

    def forward(p: Params) -> torch.Tensor:
        return torch.func.functional_call(model, p, (x,))

    if _columns(V) == 1:  # one vector: no vmap
        v = (workspace or TangentWorkspace()).fill(V)

        def with_tangent(p: Params) -> tuple[torch.Tensor, torch.Tensor]:
            primal_tangent: Any = torch.func.jvp(forward, (p,), (v,))
            return primal_tangent[0], primal_tangent[1].unsqueeze(0)

        f, pullback, JV = _vjp_with_aux(with_tangent, params)
        (out,) = pullback(middle(f.detach(), JV)[0])
        return {name: t.unsqueeze(0) for name, t in out.items()}

    def with_tangents(p: Params) -> Any:
        # The primal output does not depend on the (batched) tangents: vmap leaves it unbatched.
        return torch.func.vmap(lambda t: torch.func.jvp(forward, (p,), (t,)), out_dims=_UNBATCHED_FIRST)(V)

    f, pullback, JV = _vjp_with_aux(with_tangents, params)
    return torch.func.vmap(pullback)(middle(f.detach(), JV))[0]


# vmap's out_dims for (primal output, tangents): the first unbatched (torch's annotation omits None in tuples).
_UNBATCHED_FIRST: Any = (None, 0)


def _vjp_with_aux(fn: Any, params: Params) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """``torch.func.vjp(fn, params, has_aux=True)``: ``(output, pullback, aux)``."""
    result: Any = torch.func.vjp(fn, params, has_aux=True)
    return result[0], result[1], result[2]


def _columns(V: Params) -> int:
    return next(iter(V.values())).shape[0]


class _OutputSandwich(LinearOperator):
    """``A_b = J_b^T M_b J_b`` with a per-sample matrix ``M_b`` at the model output (:meth:`_middle`)."""

    def __init__(self, engine: Engine, data: Iterable[Batch], *, params: Sequence[str] | None = None,
                 reduction: str | None = None, chunk: int = DEFAULT_CHUNK):
        super().__init__(engine, data, params=params, reduction=reduction, chunk=chunk)
        self._ops: dict[int, tuple[Any, LossOp]] = {}
        self._plans: dict[int, tuple[Program, rop.Plan | None]] = {}
        self._workspace = TangentWorkspace()

    def _loss_op(self, x: Any, y: Any) -> LossOp:
        prog = self.engine.program(x, y)
        found = self._ops.get(id(prog))
        if found is None or found[0] is not prog:
            found = self._ops[id(prog)] = (prog, loss_op(self.engine, x, y))
        return found[1]

    def _plan(self, x: Any, y: Any) -> tuple[Program, rop.Plan | None]:
        """The batch's program and its plan (:func:`fxcurv.linops.rop.plan`), cached per program."""
        prog = self.engine.program(x, y)
        found = self._plans.get(id(prog))
        if found is None or found[0] is not prog:
            found = self._plans[id(prog)] = (prog, rop.plan(prog))
        return prog, found[1]

    def _middle(self, op: LossOp, f: torch.Tensor, y: Any, T: torch.Tensor, scale: LossScale) -> torch.Tensor:
        """``M_b T`` for columns ``T [K, N, *out]`` at the output ``f``."""
        raise NotImplementedError

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        """Column by column through the program's own ops (:mod:`fxcurv.linops.rop`) where every batch's
        program has a plan; otherwise by autograd (:meth:`LinearOperator._matmat`)."""
        if self.chunk > 1:
            return super()._matmat(V)
        traced = traced_of(self.engine)
        self.space.current(traced)  # checks the parameters against the space
        params = {name: p.detach() for name, p in traced.params.items()}
        rows = V.mT if V.shape[1] == 1 else V.mT.contiguous()
        result = torch.empty(V.shape[1], V.shape[0], dtype=self.dtype, device=self.device)
        tangents = rop.row_views(rows, self.space.names, self.space.shapes)
        for v, views in zip(tangents, rop.row_views(result, self.space.names, self.space.shapes)):
            out = rop.ParamSlices(views)
            self._begin_pass()
            for _, (x, y), weight, scale in self.data:
                prog, p = self._plan(x, y)
                if p is None:
                    return super()._matmat(V)
                rop.sandwich_into(p, x, params, rop.constant_values(p, prog), v,
                                  self._weighted_middle(x, y, scale, weight), out)
            out.zero_unwritten()
        return result.mT

    def _weighted_middle(self, x: Any, y: Any, scale: LossScale, weight: float) -> Any:
        """``(f, T) -> w_b M_b T`` for the batch ``(x, y)``."""
        op = self._loss_op(x, y)
        return lambda f, T: self._middle(op, f, y, T, scale) * weight

    def _batch_matmat(self, model: nn.Module, loss: nn.Module, params: Params, x: Any, y: Any, V: Params,
                      weight: float, scale: LossScale) -> Params:
        return jacobian_sandwich(model, params, x, V, self._weighted_middle(x, y, scale, weight), self._workspace)


class GGN(_OutputSandwich):
    """The generalized Gauss-Newton matrix ``G = sum_b w_b J_b^T H_b J_b`` of the data set's loss (exact).

    ``GGN(engine, data, params=None, reduction=None, chunk=1)``: ``engine`` from ``fxcurv.compile``;
    ``data`` an iterable of ``(x, y)`` batches (``[(x, y)]`` for one); ``params`` parameter names (default:
    every trainable parameter in ``named_parameters()`` order); ``reduction`` (``"mean"``/``"sum"``) for a
    general loss, whose reduction fxcurv cannot know; ``chunk`` columns per pass, vectorized by ``vmap``
    (faster on MLPs, slower and memory-hungry on convolutions: :data:`fxcurv.linops.base.DEFAULT_CHUNK`).
    ``G @ v`` for ``v [P]`` or ``[P, K]``; ``to_scipy()``; ``to_dense()``."""

    kind = "GGN"

    def _middle(self, op: LossOp, f: torch.Tensor, y: Any, T: torch.Tensor, scale: LossScale) -> torch.Tensor:
        return op.output_hessian_products(f, y, T)


class EmpiricalFisher(_OutputSandwich):
    """The empirical Fisher ``(1/W) sum_n grad l_n grad l_n^T`` of the per-sample loss terms ``l_n``
    (``W`` the data set's normalizer; ``1`` for a summed loss), curvlinops' ``EFLinearOperator`` scaling.
    Arguments as :class:`GGN`'s."""

    kind = "empirical Fisher"

    def _middle(self, op: LossOp, f: torch.Tensor, y: Any, T: torch.Tensor, scale: LossScale) -> torch.Tensor:
        # W_b g_n g_n^T with g_n = dL_b/df_n: the factor sqrt(W_b) g, one column per sample.
        g = op.gradient(f, y).unsqueeze(0) * scale.count ** 0.5
        return factor_products(g, None, T)


class MCFisher(_OutputSandwich):
    """The Monte Carlo Fisher ``sum_b w_b J_b^T S_b S_b^T J_b`` with ``mc_samples`` columns ``S_b`` drawn
    per sample from the loss's likelihood (``E = GGN`` for cross-entropy and squared error).

    The draws restart from ``seed`` at every product (and every chunk of columns), batch by batch in the
    data's order, so the operator is one fixed matrix: ``A @ v`` is linear and symmetric. ``seed=None``
    draws a seed once, at construction. Other arguments as :class:`GGN`'s."""

    kind = "Monte Carlo Fisher"

    def __init__(self, engine: Engine, data: Iterable[Batch], *, mc_samples: int = 1, seed: int | None = None,
                 params: Sequence[str] | None = None, reduction: str | None = None, chunk: int = DEFAULT_CHUNK):
        if not isinstance(mc_samples, int) or isinstance(mc_samples, bool) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}")
        super().__init__(engine, data, params=params, reduction=reduction, chunk=chunk)
        self.mc_samples = mc_samples
        self.seed = secrets.randbits(62) if seed is None else int(seed)  # the global RNG untouched
        self.generator = torch.Generator(device=self.device)
        for _, (x, y), _, _ in self.data:
            self._loss_op(x, y).require(RuleKind.LOSS_SQRT_HESSIAN_MC, "MCFisher")

    def _begin_pass(self) -> None:
        self.generator.manual_seed(self.seed)

    def _middle(self, op: LossOp, f: torch.Tensor, y: Any, T: torch.Tensor, scale: LossScale) -> torch.Tensor:
        return factor_products(op.mc_factor(f, y, self.mc_samples, self.generator), None, T)


class Hessian(LinearOperator):
    """The Hessian ``sum_b w_b d2L_b/dtheta2`` of the data set's loss (exact). Arguments as :class:`GGN`'s.

    Products are forward-over-reverse (``jvp`` of ``grad``); where torch cannot take them (an op without a
    forward-mode derivative, ``F.huber_loss``; ``F.mse_loss`` in torch 2.13), reverse-over-reverse (``vjp``
    of ``grad``), decided at the first product (``mode``)."""

    kind = "Hessian"

    def __init__(self, engine: Engine, data: Iterable[Batch], *, params: Sequence[str] | None = None,
                 reduction: str | None = None, chunk: int = DEFAULT_CHUNK):
        super().__init__(engine, data, params=params, reduction=reduction, chunk=chunk)
        self.mode: str | None = None  # "forward" or "reverse", once known

    def _batch_matmat(self, model: nn.Module, loss: nn.Module, params: Params, x: Any, y: Any, V: Params,
                      weight: float, scale: LossScale) -> Params:
        def batch_loss(p: Params) -> torch.Tensor:
            return loss(torch.func.functional_call(model, p, (x,)), y) * weight

        gradient = torch.func.grad(batch_loss)
        if self.mode is None:
            try:
                out = hessian_products(gradient, params, V, "forward")
            except (NotImplementedError, RuntimeError) as err:
                if not any(known in str(err) for known in _FORWARD_MODE_FAILURES):
                    raise
                self.mode = "reverse"
            else:
                self.mode = "forward"
                return out
        return hessian_products(gradient, params, V, self.mode)


def hessian_products(gradient: Any, params: Params, V: Params, mode: str) -> Params:
    """``H v`` for every column of ``V`` with ``H`` the Jacobian of ``gradient`` at ``params``: ``jvp`` of the
    gradient (``mode="forward"``) or, ``H`` being symmetric, ``vjp`` of it (``"reverse"``)."""
    if not V:
        return {}
    if _columns(V) == 1:  # one vector: no vmap
        v = {name: t[0] for name, t in V.items()}
        if mode == "forward":
            out = torch.func.jvp(gradient, (params,), (v,))[1]
        else:
            pullback: Any = torch.func.vjp(gradient, params)[1]
            out = pullback(v)[0]
        return {name: t.unsqueeze(0) for name, t in out.items()}
    if mode == "forward":
        return torch.func.vmap(lambda t: torch.func.jvp(gradient, (params,), (t,))[1])(V)
    pullback_all: Any = torch.func.vjp(gradient, params)[1]
    return torch.func.vmap(lambda t: pullback_all(t)[0])(V)
