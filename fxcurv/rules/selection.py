"""The rules of a parameter that an op copies into its output: a 0/1 selection.

Per sample, ``z_n = ... + P_n p`` with ``J_p,n = P_n`` a 0/1 matrix that copies each entry of ``p`` to the
output positions it reaches: ``x + p`` broadcasting ``p`` over positions (learned positions, a bias written by
hand: :mod:`fxcurv.rules.add`), ``cat([p.expand(N, ...), x])`` placing ``p`` at its block (ViT's class token:
:mod:`fxcurv.rules.concat`). Every parameter rule is then the one per-sample function ``J_p,n^T v_n`` (the
entries of ``v_n`` that ``P_n`` picks, summed where one entry of ``p`` reaches several positions), reduced in
the rule's own way:

* ``grad``: ``dL/dp = sum_n J_p,n^T g_n``;
* ``diag_sqrt``: HBP eq. S.8b, ``diag(sum_{k,n} sign_kn J_p,n^T S_kn S_kn^T J_p,n) = sum_{k,n} sign_kn
  (J_p,n^T S_kn)^2``;
* ``diag_diag``: HesScale eq. 9, ``sum_n (J_p,n o J_p,n)^T d_n = sum_n J_p,n^T d_n`` -- a 0/1 matrix is its
  own elementwise square, so this is the per-sample function applied to ``d``;
* ``batch_l2`` and ``batch_diag_sqrt``: ``|J_p,n^T g_n|^2`` and ``sum_k sign_kn (J_p,n^T S_kn)^2`` per sample;
* ``gram``: ViViT eq. S.23, the Gram matrix of the per-sample factor columns ``J_p,n^T S_kn``.

The op is linear in ``p``: it adds no second derivative of its own (no ``param_residual`` rule).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from ..factors import signed_column_squares, signed_square_sum
from ..gram import gram_into
from .registry import OpDef, RuleKind, signature


def define_selection_parameter(op: OpDef, key: str, per_sample: Callable[..., torch.Tensor]) -> None:
    """Register the parameter rules of ``op``'s 0/1-selected parameter ``key`` (``grad``, ``per_sample``,
    ``diag_sqrt``, ``diag_diag``, ``batch_l2``, ``batch_diag_sqrt``, ``gram``) from ``per_sample(v, ...)``:
    ``J_p,n^T v_n`` for a message ``v [*lead, N, *out]`` as ``[*lead, N, *p.shape]``.

    ``per_sample`` reads the op's context by name after the message, like any rule, and must read ``key``
    itself (the rules count the message's leading axes from the parameter's shape). It is registered as the
    ``per_sample`` rule as it is; every other rule takes the same context (each is named, and placed in the
    module, as ``per_sample``'s op would name a rule it wrote: ``<op>_<kind>_<key>``, ``<op>_gram``).
    """
    context = list(signature(per_sample).parameters.values())[1:]
    if key not in {c.name for c in context}:
        raise ValueError(f"{op.name}: the per-sample rule of '{key}' must read '{key}' (it reads "
                         f"{[c.name for c in context]})")

    def grad(g, **ctx):
        """``dL/dp = sum_n J_p,n^T g_n``: the per-sample products summed over the batch."""
        return per_sample(g, **ctx).sum(0)

    def diag_sqrt(S, sign, **ctx):
        """HBP eq. S.8b: ``diag(sum_{k,n} sign J_p,n^T S_kn S_kn^T J_p,n)``, the signed squares of the per-sample
        columns ``J_p,n^T S_kn`` summed over columns and batch."""
        per = per_sample(S, **ctx)  # [*lead, N, *p.shape]
        return signed_square_sum(per, sign, per.dim() - 1 - ctx[key].dim())

    def diag_diag(d, **ctx):
        """HesScale eq. 9 with a 0/1 ``J_p,n``: ``sum_n (J_p,n o J_p,n)^T d_n = sum_n J_p,n^T d_n``."""
        return per_sample(d, **ctx).sum(0)

    def batch_l2(g, **ctx):
        """``|J_p,n^T g_n|^2`` per sample, ``[N]``."""
        per = per_sample(g, **ctx)
        return (per * per).flatten(1).sum(1)

    def batch_diag_sqrt(S, sign, **ctx):
        """``sum_k sign_kn (J_p,n^T S_kn)^2`` per sample, ``[N, *p.shape]``."""
        return signed_column_squares(per_sample(S, **ctx), sign)

    def gram(S, include=(key,), total=None, **ctx):
        """ViViT eq. S.23: the Gram matrix ``[K N, K N]`` of the per-sample factor columns ``J_p,n^T S_kn``
        (``k``-major), added in place into ``total`` where given."""
        k, n = S.shape[0], S.shape[1]
        return gram_into(per_sample(S, **ctx).reshape(k * n, -1), total, k)

    rules = ((RuleKind.GRAD, grad), (RuleKind.PER_SAMPLE, per_sample), (RuleKind.DIAG_SQRT, diag_sqrt),
             (RuleKind.DIAG_DIAG, diag_diag), (RuleKind.BATCH_L2, batch_l2),
             (RuleKind.BATCH_DIAG_SQRT, batch_diag_sqrt), (RuleKind.GRAM, gram))
    for kind, fn in rules:
        if fn is not per_sample:
            _take_context(fn, context, per_sample.__module__,
                          f"{op.name}_gram" if kind is RuleKind.GRAM else f"{op.name}_{kind.value}_{key}")
        op.rule(kind, key)(fn)


def _take_context(fn: Any, context: list[inspect.Parameter], module: str, name: str) -> None:
    """Give ``fn(*messages, **ctx)`` (options with defaults after the messages: the Gram rule's ``include``,
    ``total``) the signature ``(*messages, *context, *options)``, by which the registry binds its context,
    and its name: the program listing names a rule by its module and name."""
    own = [p for p in inspect.signature(fn).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    messages = [p for p in own if p.default is inspect.Parameter.empty]
    options = [p for p in own if p.default is not inspect.Parameter.empty]
    fn.__signature__ = inspect.Signature(messages + context + options)
    fn.__name__ = fn.__qualname__ = name
    fn.__module__ = module
