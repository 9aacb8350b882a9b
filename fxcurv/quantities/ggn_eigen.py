"""``ggn_eigen``: the GGN's nonzero eigenpairs through its Gram matrix (ViViT A.1-A.2, B.3, C.1-C.2).

The GGN of the trainable parameters is ``G = V D V^T``, ``V [P, K N]`` with columns
``a_kn = sum_u J_{u,n}^T S^u_kn`` (``u`` over the uses of each parameter, ``S^u`` the loss's factor
columns at the output of use ``u``, ``K = C - 1`` for cross-entropy) and ``D`` the columns' signs. The
program never forms ``V``: at every parameter use it emits the op's ``gram`` rule, that parameter's
share ``A A^T`` of the Gram matrix (ViViT eq. S.23; ``(S S^T) o (x x^T)`` for a linear layer, C.1), and
sums the shares of a block's parameters in place into one ``[K N, K N]`` matrix. A parameter used more
than once contributes the Gram matrix of its summed per-sample factors (the ops' ``per_sample`` rules,
summed over uses): the cross terms between its uses are in, so the Gram matrix is exact on weight-tied
graphs; on residual graphs the columns of one origin are summed over paths where they meet.

ViViT's four approximations (B.1): the factor columns are the exact ones (``FactorSource.LOSS``) or
``mc_samples`` Monte Carlo columns per sample (``mc=True``, ``FactorSource.MC``, the count set by
``fxcurv.compile(..., mc_samples=)``); and all samples enter ``V`` or a subset of ``N_s`` of them
(``subsample=``). A subset's columns are scaled by ``sqrt(N / N_s)``: the block is then
``(N / N_s) sum_{n in subset} G_n``, an unbiased estimate of the mini-batch GGN on the same scale (ViViT's
own implementation scales its Gram matrix by the same ``N / N_s``). The gradients (first directional
derivatives, Newton steps) always use the whole batch, as in ViViT B.1. A fraction's subset is the
batch's first ``N_s`` samples: their columns are cut at the loss and propagated on those samples alone
(``Needs.prefix``; ``K N_s`` columns pass the network, not ``K N``), unless another quantity of the
program needs the columns on the whole batch; subsets given as indices are cut at each parameter use.

What the user gets is :class:`fxcurv.operators.GramEigen` (or one per group,
:class:`fxcurv.operators.BlockDiagonalEigen`, with ``groups=``): the Gram matrix, its eigenvalues and,
lazily, the eigenvectors, directional derivatives and damped Newton steps, for which the program keeps
each use's op inputs, factor columns and gradient (``vectors=False`` keeps nothing: the Gram matrix and
eigenvalues only, at the Gram path's memory).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from ..curvature.accumulate import Finalized, ParamEnd, ParamUse
from ..curvature.messages import FactorSource, Needs, Origin
from ..errors import InputError, MemoryBudgetError, UnsupportedOpError
from ..gram import PackedGram, gram_into, packed_numel
from ..node_info import Kind, info
from ..operators.gram_eigen import BlockDiagonalEigen, BudgetChoice, GramEigen, packed_storage
from ..passes.memory import MemoryEstimate
from ..rules import registry
from ..rules.registry import Rule, RuleKind
from ..targets import Fusion, LabeledTarget, TargetInfo, target
from .base import Quantity, register
from .combine import Accumulator, refuse
from .gram_memory import GramMemory, decomposition_bytes
from .uses import OpUse, UseSpec, keep, vjp_sum

# The block name of the whole network (groups=None).
NETWORK = "network"

Groups = None | str | Mapping[str, Sequence[str]] | Sequence[Sequence[str]]
Subsample = None | float | Sequence[int]


# ---- graph-node targets ---------------------------------------------------------------------------

@target("ggn_eigen.samples", view=True)
def sample_prefix(t: torch.Tensor, stop: int, dim: int) -> torch.Tensor:
    """The first ``stop`` samples of ``t`` along its batch dimension ``dim`` (a view)."""
    return t.narrow(dim, 0, stop)


@target("ggn_eigen.samples[index]", fresh=True)
def sample_index(t: torch.Tensor, index: list[int], dim: int) -> torch.Tensor:
    """The samples ``index`` of ``t`` along its batch dimension ``dim``."""
    return t.index_select(dim, torch.tensor(index, device=t.device))


@target("ggn_eigen.scale", fresh=True)
def scale_columns(s: torch.Tensor, scale: float) -> torch.Tensor:
    """Subsampled columns times ``sqrt(N / N_s)``: the subset's GGN on the mini-batch's scale."""
    return s * scale


@dataclass(frozen=True)
class GramInto(LabeledTarget):
    """Op ``op``'s ``gram`` rule as a node that adds into a block's running Gram matrix: ``(total, S,
    **ctx) -> total`` in place (a view of ``total``), or ``(S, **ctx)`` -> a fresh matrix for the block's
    first share (``first``). Never merged with an equal-looking node: a total is written in place."""

    op: str
    key: str
    first: bool
    packed: bool = False  # the block's first share starts packed storage where packed_storage allows

    @property
    def info(self) -> TargetInfo:  # type: ignore[override]
        label = f"{self.op}.gram[{self.key}]" + ("" if self.first else " (+=)")
        return TargetInfo(label, Fusion(fresh=self.first, view=not self.first, impure=True))

    def __call__(self, *args: Any, **ctx: Any) -> torch.Tensor:
        fn = registry.GRAM[(self.op, self.key)].fn
        if self.first:
            (s,) = args
            total = packed_total(s) if self.packed else None
            return fn(s, **ctx) if total is None else fn(s, total=total, **ctx)
        total, s = args
        return fn(s, total=total, **ctx)


def packed_total(s: torch.Tensor) -> torch.Tensor | None:
    """Zeros in packed storage (1-D, :class:`fxcurv.gram.PackedGram`) for the Gram matrix of columns
    ``s [K, N_s, ...]`` where :func:`fxcurv.operators.gram_eigen.packed_storage` allows, else ``None``."""
    m = s.shape[0] * s.shape[1]
    return s.new_zeros(packed_numel(m)) if packed_storage(s.device, s.dtype, m) else None


@dataclass(frozen=True)
class FactorGramInto(LabeledTarget):
    """The Gram matrix of per-sample factors ``a [K, N, *param]`` (a parameter used more than once: its
    factors summed over uses, so that the uses' cross terms are in), added into ``total`` in place or
    fresh for the block's first share (``first``)."""

    first: bool
    packed: bool = False  # as GramInto's

    @property
    def info(self) -> TargetInfo:  # type: ignore[override]
        return TargetInfo("ggn_eigen.factor_gram" + ("" if self.first else " (+=)"),
                          Fusion(fresh=self.first, view=not self.first, impure=True))

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        total, a = ((packed_total(args[0]) if self.packed else None), args[0]) if self.first else args
        return gram_into(a.reshape(a.shape[0] * a.shape[1], -1), total, a.shape[0])


# ---- what the program keeps ---------------------------------------------------------------------

@dataclass
class _Summary:
    """Build-time facts shared by all parameters' static data (complete once the program is built)."""

    batch: int = 0
    index: None | slice | list[int] = None
    scale: float = 1.0
    last: dict[str, str] = field(default_factory=dict)  # group -> the parameter holding its final Gram matrix


@dataclass
class _Network:
    """The program-wide state while it is built: each group's running Gram matrix."""

    summary: _Summary = field(default_factory=_Summary)
    total: dict[str, fx.Node] = field(default_factory=dict)


@dataclass
class _State:
    """One parameter's contributions and what it keeps for the lazy products."""

    # A parameter used once: its op's gram rule, (op, key, S, bound arguments), emitted when the block's
    # running total is known (none where an earlier parameter of the op includes this one's share).
    grams: list[tuple[str, str, fx.Node, dict[str, Any]]] = field(default_factory=list)
    per_sample: list[fx.Node] = field(default_factory=list)  # the uses of a parameter used more than once
    uses: list[tuple[UseSpec, tuple[Any, ...]]] = field(default_factory=list)
    columns: list[fx.Node] = field(default_factory=list)  # S at each use's output (batch or subset, unscaled)
    grads: list[fx.Node] = field(default_factory=list)  # g at each use's output
    sign: fx.Node | None = None
    batch: int = 0


@dataclass(frozen=True)
class _Static:
    group: str | None
    uses: tuple[UseSpec, ...]
    summary: _Summary


# ---- the quantity -------------------------------------------------------------------------------

class GGNEigen(Quantity):
    """The GGN's nonzero eigenpairs from its Gram matrix (ViViT).

    ``top_k``: keep the ``top_k`` largest eigenvalues of each block. ``groups``: ``None`` (the whole
    network, one block), ``"layer"`` (the parameters of one module: ``"1.weight"`` and ``"1.bias"``),
    ``"parameter"`` (one block each), or explicit groups ``{name: [parameter names]}`` (or a list of
    lists; parameters in no group are left out): block-diagonal eigenpairs (ViViT C.2). ``mc``: Monte
    Carlo factor columns (``mc_samples`` of ``fxcurv.compile``) instead of the exact ones.
    ``subsample``: the samples whose columns enter ``V``: a fraction (the first ``ceil(f N)`` samples) or
    indices; their columns are scaled by ``sqrt(N / N_s)`` (see the module docstring). ``vectors``: keep
    what eigenvectors, directional derivatives and Newton steps need (default); ``False`` gives the Gram
    matrix and eigenvalues only. ``keep_gram=False`` (with ``vectors=False``): the eigenvalues at the
    least memory, as ViViT's ``EigvalshComputation`` returns eigenvalues alone -- the Gram matrix is
    accumulated in packed storage (its upper triangle, half the memory) where
    :func:`fxcurv.operators.gram_eigen.packed_storage` allows, and its eigenvalues are computed in that
    storage by LAPACK's unblocked ``?spevd`` (slower than ``?syevd``), which consumes it: ``.gram`` must
    be read before ``.values``. ``min_value``: also drop eigenvalues of magnitude at or below it.
    """

    per_parameter = False
    shaped_like_parameter = False
    reference = "ViViT A.1-A.2, B.3, C.1-C.2"

    def __init__(self, *, top_k: int | None = None, groups: Groups = None, mc: bool = False,
                 subsample: Subsample = None, vectors: bool = True, min_value: float = 0.0,
                 memory_budget: float | None = None, keep_gram: bool = True, name: str | None = None):
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
            raise ValueError(f"GGNEigen: top_k must be a positive integer or None, got {top_k!r}")
        if isinstance(groups, str) and groups not in ("layer", "parameter"):
            raise ValueError(f"GGNEigen: groups must be None, 'layer', 'parameter' or explicit groups, got {groups!r}")
        if isinstance(subsample, float) and not 0 < subsample <= 1:
            raise ValueError(f"GGNEigen: a subsample fraction must be in (0, 1], got {subsample!r}")
        if not min_value >= 0:
            raise ValueError(f"GGNEigen: min_value must be >= 0, got {min_value!r}")
        if memory_budget is not None and not memory_budget > 0:
            raise ValueError(f"GGNEigen: memory_budget must be a positive number of bytes or None, "
                             f"got {memory_budget!r}")
        if memory_budget is not None and subsample is not None:
            raise ValueError("GGNEigen: memory_budget= chooses the subsample itself; pass one of memory_budget= and "
                             "subsample=")
        self.top_k, self.mc, self.subsample, self.vectors, self.min_value = top_k, mc, subsample, vectors, min_value
        if not keep_gram and vectors:
            raise ValueError("GGNEigen: keep_gram=False is for vectors=False (eigenvalues alone); the eigenvectors "
                             "need the Gram matrix")
        self.keep_gram = keep_gram
        self.memory_budget = memory_budget
        self.choice: BudgetChoice | None = None  # set on the copy specialize() configures for a budget
        self.groups = groups
        self._member = _membership(groups)
        self.source = FactorSource.MC if mc else FactorSource.LOSS
        # A prefix fraction: the columns are propagated on the subset's samples alone where the program
        # allows (Needs.prefix); indices (or a program that needs the whole batch's columns) select them
        # at each parameter use instead.
        # With vectors, each use's g is kept (directional derivatives, Newton steps): the program carries it.
        self.needs = (Needs(prefix=frozenset({(self.source, subsample)}), gradient=vectors)
                      if isinstance(subsample, float) else Needs(factors=frozenset({self.source}), gradient=vectors))
        self.name = name or ("ggn_eigen_mc" if mc else "ggn_eigen")
        self.description = (f"GGN eigenpairs from the Gram matrix ({self.setting}"
                            f"{', per ' + str(groups) if isinstance(groups, str) else ''}"
                            f"{', groups' if groups is not None and not isinstance(groups, str) else ''})")

    @property
    def setting(self) -> str:
        """ViViT's name of the approximation (B.1): ``exact`` or ``MC``, ``full`` or ``frac`` (with the
        fraction or the number of samples)."""
        if self.subsample is None:
            frac = "full"
        elif isinstance(self.subsample, float):
            frac = f"frac {self.subsample:g}"
        else:
            frac = f"frac ({len(self.subsample)} samples)"
        return f"{'MC' if self.mc else 'exact'}, {frac}"

    def _options(self) -> dict[str, Any]:
        return dict(top_k=self.top_k, groups=self.groups, mc=self.mc, subsample=self.subsample, vectors=self.vectors,
                    min_value=self.min_value, keep_gram=self.keep_gram, name=self.name)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self._options(), self.memory_budget))

    # ---- memory -------------------------------------------------------------------------------------
    def memory(self, engine: Any, x: torch.Tensor, y: Any) -> GramMemory:
        """The estimated peak memory of ``engine(x, y)`` for this quantity (the engine compiled with it)
        and the eigendecomposition of its blocks, without running anything (:class:`GramMemory`): the
        program's estimate from shapes and liveness plus, in closed form, the Gram rules' temporaries and
        the eigendecomposition. Where ``memory_budget`` chose an approximation, it is that choice's."""
        prog = engine.program(x, y)
        chosen = next((q for q in prog.quantities if q.name == self.name), None)
        if not isinstance(chosen, GGNEigen):
            raise ValueError(f"{self.name} is not one of this engine's quantities "
                             f"({[q.name for q in prog.quantities]})")
        return chosen._memory_of(prog.memory, prog.gm.graph, x.device)

    def _memory_of(self, estimate: MemoryEstimate, graph: fx.Graph, device: torch.device) -> GramMemory:
        grams = [n for n in graph.nodes if n.op == "call_function" and isinstance(n.target, _GRAM_TARGETS)]
        sizes = [_gram_size(shape) for n in grams if (shape := info(n).shape)]
        packed = any(len(shape) == 1 for n in grams if (shape := info(n).shape))
        dtype = next((d for n in grams if (d := info(n).dtype) is not None), torch.float32)
        itemsize = torch.empty((), dtype=dtype).element_size()
        return GramMemory.of(estimate, graph, _GRAM_TARGETS, sizes, itemsize, self.vectors, self.setting, device,
                             packed=packed, keep_gram=self.keep_gram)

    def specialize(self, trial: Callable[[Quantity], Any], x: torch.Tensor, y: Any) -> Quantity:
        """With ``memory_budget``: the most accurate of ViViT's approximations (B.1) whose estimated peak
        (:meth:`memory`) fits, tried in this order -- the exact factor on the whole batch, on 1/2, 1/4, 1/8
        of it, then Monte Carlo columns (``mc_samples``) on the whole batch and on halved fractions down
        to one sample -- recorded on the copy returned (``choice``) and on its results. A candidate whose
        Gram matrix and eigendecomposition alone exceed the budget is ruled out without building it."""
        if self.memory_budget is None:
            return self
        batch = x.shape[0]
        tried: list[tuple[str, int]] = []
        columns: dict[bool, int] = {}
        for mc, fraction in _candidates(self.mc, batch):
            n_sub = max(1, math.ceil(fraction * batch))
            candidate = GGNEigen(**{**self._options(), "mc": mc, "subsample": None if fraction == 1 else fraction})
            k = columns.get(mc)
            if k is not None:
                m = k * n_sub
                dtype = x.dtype if x.dtype.is_floating_point else torch.get_default_dtype()
                packed = not self.keep_gram and packed_storage(x.device, dtype, m)
                floor = (decomposition_bytes(m, _itemsize(x), self.vectors, x.device, packed, self.keep_gram)
                         + _itemsize(x) * (packed_numel(m) if packed else m * m))
                if floor > self.memory_budget:
                    tried.append((candidate.setting, floor))
                    continue
            build = trial(candidate)
            memory = candidate._memory_of(build.memory, build.graph, x.device)
            sizes = [_gram_size(shape) for n in build.graph.nodes if n.op == "call_function"
                     and isinstance(n.target, _GRAM_TARGETS) and (shape := info(n).shape)]
            if sizes:
                columns[mc] = sizes[0] // n_sub
            tried.append((candidate.setting, memory.peak))
            if memory.peak <= self.memory_budget:
                candidate.choice = BudgetChoice(self.memory_budget, memory, tuple(tried))
                return candidate
        mib = 2**20
        raise MemoryBudgetError(
            f"{self.name}: no approximation fits memory_budget={self.memory_budget / mib:.1f} MiB for a batch of "
            f"{batch}; "
            "estimated peaks: " + "; ".join(f"{s} {b / mib:.1f} MiB" for s, b in tried)
            + ". Use a smaller batch or raise the budget")

    def _group_of(self, name: str) -> str | None:
        if self.groups is None:
            return NETWORK
        if self.groups == "parameter":
            return name
        if self.groups == "layer":
            return name.rsplit(".", 1)[0] if "." in name else name
        return self._member.get(name)

    def accumulator(self) -> Accumulator[Any]:
        """Refused: the eigenpairs come from the Gram matrix ``V^T V`` over every sample of the batch;
        the data set's has cross blocks ``V_b^T V_c`` between batches that no batch's eigenpairs hold."""
        raise refuse(self.name, "its eigenpairs come from the Gram matrix of all samples' factor columns, whose "
                     "blocks between two batches are in no batch's result; compute it on one batch (engine(x, y), "
                     "subsample= for a large one), or accumulate block_ggn / diag_ggn / kflr for the data set")

    # ---- building the program ------------------------------------------------------------------
    def start(self) -> _State:
        return _State()

    def start_network(self) -> _Network:
        return _Network()

    def collect(self, use: ParamUse, state: _State) -> None:
        if self._group_of(use.name) is None:
            return
        origin = Origin(self.source)
        cols = use.columns.get(origin)
        if cols is None:
            return  # no curvature reaches this use (a loss without factor columns)
        s, sign = use.dense(cols)
        if sign is not None and state.sign is None:
            state.sign = sign
        batch = state.batch = _batch_of(use)
        index, n_sub = self._samples(batch)
        kind = RuleKind.PER_SAMPLE if use.shared else RuleKind.GRAM
        rule = use.emit.find_rule(kind, use.node, use.input)
        include = None if use.shared else self._included(use, rule)
        context: dict[str, Any] = {}
        if cols.samples is not None and cols.samples != n_sub:
            raise AssertionError(f"columns of {cols.samples} samples reach {use.name}, expected {n_sub}")
        if index is not None and (use.shared or include):
            _check_subsampling_reads(rule, use)
            if cols.samples is None:  # the whole batch's columns: the subset's here
                s = self._select(use, s, index, 1)
            s = self._node(use, scale_columns, (s, math.sqrt(batch / n_sub)), "S[frac]")
            op = use.emit.op_of(use.node)
            for name, value in use.emit.inputs_of(use.node).items():
                if op.is_batched(name) and isinstance(value, fx.Node):
                    context[name] = self._select(use, use.emit.env[value], index, 0)
        if use.shared:
            state.per_sample.append(use.emit.rule(rule, (s,), use.node, context, kind=Kind.PARAM, message="J^T S",
                                                  stream=origin.label, at=use.param))
        elif include:
            context["include"] = include

            def resolve(name: str) -> Any:
                return context[name] if name in context else use.emit.resolve(use.node, name)

            state.grams.append((rule.op, use.input, s, registry.bind(rule, resolve, 1)))
        if self.vectors:
            state.uses.append(keep(use))
            state.columns.append(use.dense(cols)[0])
            state.grads.append(use.g)

    def _included(self, use: ParamUse, rule: Rule) -> tuple[str, ...]:
        """The parameters of the use's op whose Gram shares one rule call adds at this use: those with the
        same ``gram`` rule that are trainable, used once and in this use's block, if this use is the first
        of them (in the op's input order); none where an earlier one includes this use's share."""
        op = use.emit.op_of(use.node)
        inputs = use.emit.inputs_of(use.node)
        group = self._group_of(use.name)

        def joins(name: str) -> bool:
            value = inputs.get(name)
            if not isinstance(value, fx.Node) or value.op != "placeholder" or not info(value).requires_grad:
                return False
            if sum(1 for u in value.users for a in u.args if a is value) != 1:
                return False
            return (self._group_of(info(value).param or value.name) == group
                    and registry.GRAM.get((op.name, name)) is rule)

        # Every input of a generic op may be a parameter (``joins`` checks which are).
        joint = tuple(n for n in op.inputs if (op.variadic or n in op.params) and joins(n))
        return joint if joint and joint[0] == use.input else ()

    def _samples(self, batch: int) -> tuple[None | slice | list[int], int]:
        """The subsample as a slice (a prefix) or indices, and its size, for a batch of ``batch``."""
        spec = self.subsample
        if spec is None:
            return None, batch
        if isinstance(spec, float):
            n_sub = max(1, math.ceil(spec * batch))
            return (None if n_sub == batch else slice(0, n_sub)), n_sub
        index = [int(i) for i in spec]
        bad = [i for i in index if not 0 <= i < batch]
        if bad or len(set(index)) != len(index) or not index:
            raise InputError(f"{self.name}: subsample indices must be distinct samples of the batch of {batch}; got "
                             f"{index if len(index) < 20 else str(index[:20])[:-1] + ', ...]'}")
        return index, len(index)

    def _select(self, use: ParamUse, value: fx.Node, index: slice | list[int], dim: int) -> fx.Node:
        if isinstance(index, slice):
            return self._node(use, sample_prefix, (value, index.stop, dim), "samples")
        return self._node(use, sample_index, (value, index, dim), "samples")

    @staticmethod
    def _node(use: ParamUse, fn: Any, args: tuple[Any, ...], message: str) -> fx.Node:
        return use.emit.node(fn, args, kind=Kind.PARAM, of=use.node, message=message, at=use.param)

    def finalize(self, end: ParamEnd, state: _State) -> Any:
        group = self._group_of(end.name)
        network: _Network = end.network[self.name]
        static = _Static(group, tuple(u for u, _ in state.uses), network.summary)
        kept = (tuple(v for _, v in state.uses), tuple(state.columns), tuple(state.grads), state.sign)
        if group is None or not (state.grams or state.per_sample):
            return Finalized((None, kept), static)
        total = network.total.get(group)
        if state.per_sample:
            summed = end.sum(state.per_sample, message="J^T S", shaped=False)
            args = (summed,) if total is None else (total, summed)
            factor_target = FactorGramInto(total is None, packed=not self.keep_gram)
            total = end.node(factor_target, args, message="gram", shaped=False)
        for op, key, s, kwargs in state.grams:
            args = (s,) if total is None else (total, s)
            target = GramInto(op, key, total is None, packed=not self.keep_gram)
            total = end.node(target, args, message="gram", shaped=False, kwargs=kwargs)
        assert total is not None
        network.total[group] = total
        network.summary.last[group] = end.name
        if not network.summary.batch:
            index, n_sub = self._samples(state.batch)
            network.summary.batch, network.summary.index = state.batch, index
            network.summary.scale = math.sqrt(state.batch / n_sub)
        return Finalized((total, kept), static)

    # ---- what the user gets ----------------------------------------------------------------------
    def wrap_network(self, values: dict[str, Any], params: dict[str, torch.Tensor],
                     statics: dict[str, Any]) -> GramEigen | BlockDiagonalEigen:
        if isinstance(self.groups, (Mapping, list, tuple)):
            unknown = sorted(set(self._member) - set(params))
            if unknown:
                raise ValueError(f"{self.name}: groups name parameters the model has not (or are frozen): {unknown}; "
                                 f"trainable parameters: {list(params)}")
        summary = next((s.summary for s in statics.values() if s is not None), _Summary())
        members: dict[str, list[str]] = {}
        for name in params:
            group = self._group_of(name)
            if group is not None:
                members.setdefault(group, []).append(name)
        blocks = {g: self._block(names, values, params, statics, summary) for g, names in members.items()}
        if self.groups is None:
            if not blocks:  # no trainable parameters
                any_param = next(iter(params.values()), torch.empty(0))
                return GramEigen(any_param.new_zeros(0, 0), columns=0, setting=self.setting, choice=self.choice)
            return blocks[NETWORK]
        return BlockDiagonalEigen(blocks, setting=self.setting, choice=self.choice)

    def _block(self, names: list[str], values: dict[str, Any], params: dict[str, torch.Tensor],
               statics: dict[str, Any], summary: _Summary) -> GramEigen:
        group = statics[names[0]].group
        holder = summary.last.get(group)
        like = params[names[0]]
        if holder is None:  # the loss's columns reach none of the group's parameters
            return GramEigen(like.new_zeros(0, 0), columns=0, names=names, setting=self.setting, choice=self.choice)
        value = values[holder][0]
        gram = PackedGram.of(value) if value.dim() == 1 else value
        sign = next((values[n][1][3] for n in names if values[n][1][3] is not None), None)
        n_sub = _subset_size(summary)
        columns = (gram.size if isinstance(gram, PackedGram) else gram.shape[0]) // n_sub
        if sign is not None:
            sign = _subset(sign, summary.index, 1).reshape(-1)
        factor = None
        if self.vectors:
            factor = _Factor({n: (statics[n].uses, values[n][1]) for n in names}, params, summary, columns)
        return GramEigen(gram, columns=columns, sign=sign, factor=factor, top_k=self.top_k, choice=self.choice,
                         min_value=self.min_value, names=names, setting=self.setting, keep_gram=self.keep_gram)


def _membership(groups: Groups) -> dict[str, str]:
    """Parameter name -> group for explicit groups (each parameter in one group at most)."""
    if groups is None or isinstance(groups, str):
        return {}
    items = groups.items() if isinstance(groups, Mapping) else ((str(i), g) for i, g in enumerate(groups))
    member: dict[str, str] = {}
    for group, names in items:
        if isinstance(names, str):
            raise TypeError(f"GGNEigen: group {group!r} must list parameter names, got the string {names!r}")
        for n in names:
            if n in member:
                raise ValueError(f"GGNEigen: parameter {n!r} is in two groups ({member[n]!r} and {group!r})")
            member[n] = str(group)
    return member


def _batch_of(use: ParamUse) -> int:
    shape = info(use.node).shape
    assert shape is not None, "shapes are recorded before curvature insertion"
    return shape[0]


def _check_subsampling_reads(rule: Rule, use: ParamUse) -> None:
    """A subset of samples reaches a rule through its data inputs only: refuse a rule that reads the
    op's output, saved or derived values (they would still hold the whole batch)."""
    op = use.emit.op_of(use.node)
    whole = [n for n in rule.context_names(1)
             if n == "out" or n in op.saved or (op.name, n) in registry.DERIVED]
    if whole:
        raise UnsupportedOpError(
            f"{use.where()}: its {rule.label} rule reads {whole}, which would hold the whole batch; subsample= "
            "needs rules that read samples only through the op's inputs")


def _subset_size(summary: _Summary) -> int:
    index = summary.index
    if index is None:
        return summary.batch
    return index.stop if isinstance(index, slice) else len(index)


def _subset(t: torch.Tensor, index: None | slice | list[int], dim: int) -> torch.Tensor:
    if index is None:
        return t
    if isinstance(index, slice):
        return t.narrow(dim, 0, index.stop)
    return t.index_select(dim, torch.tensor(index, device=t.device))


class _Factor:
    """Products with ``V`` for one block, from each use's kept op inputs, columns and gradient
    (:class:`fxcurv.operators.gram_eigen.ParameterFactor`)."""

    def __init__(self, kept: dict[str, tuple[tuple[UseSpec, ...], Any]], params: dict[str, torch.Tensor],
                 summary: _Summary, columns: int):
        self.names = tuple(kept)
        self.samples = summary.batch
        self.numel = sum(params[n].numel() for n in self.names)
        self._params = params
        self._columns = columns
        self._uses: dict[str, list[tuple[OpUse, OpUse, torch.Tensor, torch.Tensor]]] = {}
        for name, (specs, (inputs, cols, grads, _)) in kept.items():
            entries = []
            for spec, values, s, g in zip(specs, inputs, cols, grads):
                full = OpUse(spec, values)
                entries.append((full, full.samples(summary.index),
                                _subset(s, summary.index, 1) * summary.scale, g))
            self._uses[name] = entries
        self._gradient: dict[str, torch.Tensor] | None = None

    def apply(self, coeffs: torch.Tensor, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        q = coeffs.shape[1]
        out = {}
        for name in names or self.names:
            uses = self._uses[name]
            if not uses:
                out[name] = self._params[name].new_zeros((q,) + tuple(self._params[name].shape))
                continue
            cots = []
            for _, _, s, _ in uses:
                c = coeffs.reshape(s.shape[0], s.shape[1], q)
                cots.append(torch.einsum("knj,knq->qnj", s.flatten(2), c).reshape((q,) + tuple(s.shape[1:])))
            out[name] = vjp_sum([sub for _, sub, _, _ in uses], cots)
        return out

    def project(self, vectors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        total = None
        for name, v in vectors.items():
            for _, sub, s, _ in self._uses[name]:
                t = sub.jvp(v)  # [q, N_s, *out]
                part = torch.einsum("knj,qnj->knq", s.flatten(2), t.flatten(2))
                total = part if total is None else total + part
        if total is None:
            q = next(iter(vectors.values())).shape[0]
            raise ValueError(f"project: no use of {list(vectors)} keeps columns ({q} vectors)")
        return total.reshape(-1, total.shape[-1])

    def sample_gradient_dots(self, vectors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        total = None
        for name, v in vectors.items():
            for full, _, _, g in self._uses[name]:
                part = torch.einsum("nj,qnj->nq", g.flatten(1), full.jvp(v).flatten(2))
                total = part if total is None else total + part
        assert total is not None, "a block with a Gram matrix has a use"
        return total

    def gradient(self) -> dict[str, torch.Tensor]:
        if self._gradient is None:
            out = {}
            for name in self.names:
                uses = self._uses[name]
                if not uses:
                    out[name] = torch.zeros_like(self._params[name])
                    continue
                out[name] = vjp_sum([full for full, _, _, _ in uses], [g.unsqueeze(0) for _, _, _, g in uses])[0]
            self._gradient = out
        return self._gradient


# The subsample fractions memory_budget tries, after the whole batch: ViViT's 1/8 (B.1, after Zhang et
# al.) and the halvings before it; Monte Carlo columns then continue halving down to one sample.
_EXACT_FRACTIONS = (1.0, 0.5, 0.25, 0.125)


def _candidates(mc_only: bool, batch: int) -> list[tuple[bool, float]]:
    """(Monte Carlo?, fraction of the batch) in the order memory_budget tries them."""
    out = [] if mc_only else [(False, f) for f in _EXACT_FRACTIONS]
    fraction = 1.0
    while True:
        out.append((True, fraction))
        if math.ceil(fraction * batch) <= 1:
            return out
        fraction /= 2


def _gram_size(shape: tuple[int, ...]) -> int:
    """``M`` of a Gram value's shape: ``[M, M]``, or packed ``[M (M + 1) / 2]``."""
    if len(shape) == 1:
        return (math.isqrt(8 * shape[0] + 1) - 1) // 2
    return shape[0]


def _itemsize(x: torch.Tensor) -> int:
    dtype = x.dtype if x.dtype.is_floating_point else torch.get_default_dtype()
    return torch.empty((), dtype=dtype).element_size()


def _rebuild(options: dict[str, Any], memory_budget: float | None) -> GGNEigen:
    return GGNEigen(**options, memory_budget=memory_budget)


_GRAM_TARGETS = (GramInto, FactorGramInto)

GGN_EIGEN = register(GGNEigen())
GGN_EIGEN_MC = register(GGNEigen(mc=True))
