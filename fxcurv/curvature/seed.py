"""Seeding: the messages that start at the loss.

The loss op's rules give, w.r.t. the model output ``f``: the gradient ``g = dL/df``; for the exact
factor stream a square-root factor ``S`` of the per-sample Hessian (``sum_k sign_k S_k S_k^T =
d2L/df_n^2``, HBP Sec. C); for the Monte Carlo stream sampled columns with that expectation; for
HesScale the Hessian's exact diagonal (HesScale App. A). ``g`` and the columns are stacked into the
bundle ``[g; S_loss; S_mc]``.

Where the program's quantities want a factor source on a prefix of the batch only (``Needs.prefix``,
ggn_eigen's ``subsample=``), its columns start as the first ``N_s`` samples' (``[K, N_s, ...]``) outside
the bundle and are propagated on those samples alone (:meth:`Emitter.resolve_samples`): the backward
pass of the factor columns costs ``K N_s`` instead of ``K N`` columns, while the gradient still covers
the whole batch (ViViT B.1).
"""

from __future__ import annotations

import math

import torch.fx as fx

from .. import factors
from ..errors import UnsupportedOpError
from ..node_info import Kind, info
from ..rules import registry
from ..rules.registry import OpDef, RuleKind
from .emit import Emitter
from .messages import LOSS, MC, BundleLayout, Columns, FactorSource, Inbox, Needs, Origin
from .propagate import check_dense_size


def loss_columns(op: OpDef, shape: tuple[int, ...]) -> int:
    """How many exact factor columns the loss has per sample for a model output of ``shape``."""
    if op.sqrt_columns is not None:
        return op.sqrt_columns(tuple(shape))
    n = 1
    for s in shape[1:]:
        n *= s
    return n


def prefix_samples(needs: Needs, source: FactorSource, batch: int) -> int | None:
    """``N_s``, where ``source``'s columns start on the batch's first ``N_s < N`` samples only: every
    quantity wanting them asks for one prefix fraction ``f`` (``N_s = max(1, ceil(f N))``), none for the
    whole batch nor (exact factor) for the batch-averaged matrices seeded from them; else ``None``."""
    fractions = {f for s, f in needs.prefix if s is source}
    if source in needs.factors or len(fractions) != 1 or (source is FactorSource.LOSS and needs.dense):
        return None
    n_sub = max(1, math.ceil(fractions.pop() * batch))
    return n_sub if n_sub < batch else None


def _post_prefix(emit: Emitter, inbox: Inbox, origin: Origin, s: fx.Node, sign: fx.Node | None, n_sub: int,
                 f: fx.Node, loss: fx.Node) -> None:
    """Post the first ``n_sub`` samples' columns (and signs) of ``origin`` at the model output ``f``."""
    label = origin.label
    s = emit.node(factors.first_samples, (s, n_sub, 1), kind=Kind.SQRT, of=loss, message="S", stream=label,
                  name=f"S{'' if origin == LOSS else 'mc'}_samples_{f.name}")
    if sign is not None:
        sign = emit.node(factors.first_samples, (sign, n_sub, 1), kind=Kind.SQRT, of=loss, message="sign",
                         stream=label, name=f"sign_samples_{f.name}")
    inbox.columns[origin] = [Columns(origin, s, sign, samples=n_sub)]


def seed(emit: Emitter, loss: fx.Node, needs: Needs, mc_samples: int,
         generator: fx.Node | None) -> tuple[Inbox, BundleLayout]:
    """The messages at the model output ``f`` (the loss's first argument), and the bundle's layout."""
    op = emit.op_of(loss)
    f = loss.args[0]
    assert isinstance(f, fx.Node)
    shape = info(f).shape
    assert shape is not None, "shapes are recorded before curvature insertion"
    inbox = Inbox()
    if needs.diagonals:
        streams = sorted(needs.diagonals, key=lambda s: s.label)
        # One seed serves every diagonal stream; it is labeled with one that the program carries.
        d = emit.rule(emit.find_rule(RuleKind.LOSS_HESSIAN_DIAG, loss, "f"), (), loss, kind=Kind.DIAG,
                      message="d", stream=streams[0].label, shape=shape, at=f)
        for stream in streams:
            inbox.diagonals[stream] = [d]

    rows: dict = {}
    signs: dict = {}
    columns: list[fx.Node] = []
    # Rows after the gradient's; shifted down by one below where the bundle does not carry it.
    start = 1
    k = loss_columns(op, shape)
    batch = shape[0]
    # A loss with no curvature (one class) has no columns: its GGN shares are zero, carried by nothing.
    if (needs.wants(FactorSource.LOSS) or needs.dense) and k > 0:
        rule = emit.find_rule(RuleKind.LOSS_SQRT_HESSIAN, loss, "f")
        both = emit.rule(rule, (), loss, kind=Kind.SQRT, message="(S, sign)", stream="loss",
                         name=f"sqrt_hessian_{f.name}")
        s = emit.pick(both, 0, kind=Kind.SQRT, of=loss, message="S", stream="loss", at=f)
        sign = None if op.psd_hessian else emit.pick(both, 1, kind=Kind.SQRT, of=loss, message="sign",
                                                     stream="loss", at=f)
        n_loss = prefix_samples(needs, FactorSource.LOSS, batch)
        if n_loss is not None:
            _post_prefix(emit, inbox, LOSS, s, sign, n_loss, f, loss)
        elif needs.wants(FactorSource.LOSS):
            columns.append(s)
            signs[LOSS] = sign
            rows[LOSS] = (start, start + k)
            start += k
        if needs.dense:
            # HBP Sec. 3.2 / Botev eq. 29's start: the loss Hessian summed over the batch (its reduction's
            # 1/N is in the factor), BackPACK's loss-Hessian strategy "sum".
            check_dense_size(f)
            m = emit.node(factors.dense_from_columns, (s, sign), kind=Kind.SQRT, of=loss, message="M",
                          stream="dense", at=f)
            for dense in sorted(needs.dense, key=lambda st: st.label):
                inbox.dense[dense] = [m]
    elif needs.dense:  # no curvature at all: the matrices are zeros
        m = emit.node(factors.dense_zeros, (emit.env[f],), kind=Kind.SQRT, of=loss, message="M", stream="dense",
                      at=f)
        for dense in sorted(needs.dense, key=lambda st: st.label):
            inbox.dense[dense] = [m]
    if needs.wants(FactorSource.MC):
        sampler = registry.LOSS_SQRT_HESSIAN_MC.get((op.name, "f"))
        if sampler is None:
            sampled = sorted(o for (o, _) in registry.LOSS_SQRT_HESSIAN_MC)
            raise UnsupportedOpError(
                f"diag_ggn_mc needs a loss with a likelihood to sample from; the loss ({info(loss).source}) "
                f"has none. Supported: nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss (or their "
                f"functional forms; loss ops with a sampler: {', '.join(sampled)})")
        drawn = emit.rule(sampler, (), loss, {"mc_samples": mc_samples, "generator": generator},
                          kind=Kind.SQRT, message="S", stream="mc", at=f)
        n_mc = prefix_samples(needs, FactorSource.MC, batch)
        if n_mc is not None:
            # Sampled for the whole batch, then cut: the first samples' columns are those the whole
            # batch's stream would carry (the same draws from the generator).
            _post_prefix(emit, inbox, MC, drawn, None, n_mc, f, loss)
        else:
            columns.append(drawn)
            signs[MC] = None
            rows[MC] = (start, start + mc_samples)
    # The gradient rides in row 0 where something reads it -- and where no column rides in the bundle, as
    # the message that carries the backward walk (the diagonal and prefix streams travel beside it).
    gradient = needs.carries_gradient or not columns
    if gradient:
        g = emit.rule(emit.find_rule(RuleKind.LOSS_GRAD, loss, "f"), (), loss, kind=Kind.GRAD, message="g",
                      shape=shape, at=f)
        bundle = emit.node(factors.stack_columns, (g, *columns), kind=Kind.BUNDLE, of=loss, message="[g; S]", at=f)
    else:
        rows = {origin: (first - 1, stop - 1) for origin, (first, stop) in rows.items()}
        bundle = emit.node(factors.stack_factors, tuple(columns), kind=Kind.BUNDLE, of=loss, message="[g; S]", at=f)
    inbox.bundles.append(bundle)
    return inbox, BundleLayout(rows, signs, gradient)
