"""The loss's derivatives w.r.t. the model output ``f`` of one batch, from the loss rules of
:mod:`fxcurv.rules.losses` as the engine's program binds them.

The program of a batch (``engine.program(x, y)``) holds one loss op node: a closed-form loss
(``cross_entropy``, ``mse_loss``) with its attributes, or the general path (any traced loss, with the
Hessian-vector product mode the engine chose for it). From its rules:

* ``output_hessian_products``: ``H T`` for columns ``T [K, N, *f]``, ``H = d2L_b/df2`` (block diagonal
  over samples): ``H_n t = sum_r sign_rn s_rn <s_rn, t>`` with the closed-form square-root factor
  ``S [R, N, *f]`` (``R = C - 1`` for cross-entropy, HBP Sec. C.2), or torch.func's Hessian-vector
  products of the traced loss on the general path (forward-over-reverse, or reverse-over-reverse where
  an op of the loss has no forward-mode derivative);
* ``gradient``: ``dL_b/df``, ``[N, *f]``;
* ``mc_factor``: sampled columns ``S_mc [M, N, *f]`` with ``E[S_mc S_mc^T] = H`` per sample (the loss's
  likelihood: ``p - onehot(c)``, ``c ~ Cat(p)``, for cross-entropy; Gaussian for squared error).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from ..api import Engine, Program
from ..errors import UnsupportedOpError
from ..node_info import has_info, info
from ..rules import losses, registry
from ..rules.registry import OpDef, RuleKind, Unresolved


@dataclass(frozen=True)
class LossOp:
    """A batch's loss op and its attributes (plain values; the general path's traced loss module and
    ``hvp`` mode among them)."""

    op: OpDef
    attrs: dict[str, Any]

    @property
    def closed_form(self) -> bool:
        return self.op is not losses.general

    def _bind(self, kind: RuleKind, f: torch.Tensor, y: Any, extra: dict[str, Any] | None = None) -> Any:
        """Call the op's ``kind`` rule at ``(f, y)``, its arguments bound by name (derived values computed
        on the way, once each)."""
        rule = registry.TABLES[kind].get((self.op.name, "f"))
        if rule is None:
            have = sorted(o for (o, _) in registry.TABLES[kind])
            raise UnsupportedOpError(f"the loss op {self.op.name} has no {kind.value} rule; losses that have one: "
                                     f"{', '.join(have)}")
        derived: dict[str, Any] = {}
        given = {"f": f, "y": y, **self.attrs, **(extra or {})}

        def resolve(name: str) -> Any:
            if name in given:
                return given[name]
            if name in derived:
                return derived[name]
            rule_d = registry.DERIVED.get((self.op.name, name))
            if rule_d is None:
                raise Unresolved(name)
            derived[name] = rule_d.fn(**registry.bind(rule_d, resolve, 0))
            return derived[name]

        return rule.fn(**registry.bind(rule, resolve, 0))

    def gradient(self, f: torch.Tensor, y: Any) -> torch.Tensor:
        """``dL/df``, shaped like ``f``."""
        return self._bind(RuleKind.LOSS_GRAD, f, y)

    def output_hessian_products(self, f: torch.Tensor, y: Any, T: torch.Tensor) -> torch.Tensor:
        """``H t`` for every column ``t`` of ``T [K, *f]``, ``H = d2L/df2``."""
        if not self.closed_form:
            return losses.hessian_vector_products(self.attrs["loss_fn"], f, y, T, self.attrs["hvp"])
        S, sign = self._bind(RuleKind.LOSS_SQRT_HESSIAN, f, y)
        return factor_products(S, sign, T)

    def mc_factor(self, f: torch.Tensor, y: Any, mc_samples: int, generator: torch.Generator) -> torch.Tensor:
        """``S_mc [mc_samples, N, *f]``: sampled columns whose outer products have the Hessian as their
        expectation (the rule's scaling: ``1 / mc_samples`` and the loss's reduction are in)."""
        return self._bind(RuleKind.LOSS_SQRT_HESSIAN_MC, f, y, {"mc_samples": mc_samples, "generator": generator})

    def require(self, kind: RuleKind, what: str) -> None:
        """UnsupportedOpError unless the op has a ``kind`` rule (``what`` names the operator needing it)."""
        if (self.op.name, "f") not in registry.TABLES[kind]:
            have = sorted(o for (o, _) in registry.TABLES[kind])
            raise UnsupportedOpError(
                f"{what} needs a loss with a likelihood to sample from; this loss ({self.op.name}) has none. "
                f"Loss ops with a sampler: {', '.join(have)} (nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss)")


def factor_products(S: torch.Tensor, sign: torch.Tensor | None, T: torch.Tensor) -> torch.Tensor:
    """``sum_r sign_rn s_rn <s_rn, t_kn>`` per sample ``n``: the product of the per-sample matrix
    ``sum_r sign_rn s_rn s_rn^T`` with columns ``T [K, N, *f]``, for a factor ``S [R, N, *f]``."""
    r, n = S.shape[:2]
    k = T.shape[0]
    s = S.reshape(r, n, -1)
    coef = torch.einsum("rnd,knd->rkn", s, T.reshape(k, n, -1))
    if sign is not None:
        coef = coef * sign.unsqueeze(1)
    return torch.einsum("rkn,rnd->knd", coef, s).reshape(T.shape)


def _loss_node(prog: Program) -> fx.Node:
    for node in prog.gm.graph.nodes:
        if not has_info(node):
            continue
        op = registry.OPS.get(info(node).op or "")
        if op is not None and op.is_loss:
            return node
    raise UnsupportedOpError("the engine's program has no loss op node")


def loss_op(engine: Engine, x: Any, y: Any) -> LossOp:
    """The loss op of the engine's program for ``(x, y)`` (built and cached by the engine)."""
    prog = engine.program(x, y)
    node = _loss_node(prog)
    attrs: dict[str, Any] = {}
    for key, value in node.kwargs.items():
        if isinstance(value, fx.Node):
            assert value.op == "get_attr", f"loss attribute {key} is a computed node"
            value = getattr(prog.gm, str(value.target))
        attrs[key] = value
    return LossOp(registry.OPS[str(info(node).op)], attrs)
