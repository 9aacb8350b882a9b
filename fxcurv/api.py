"""``fxcurv.compile``: the user's entry point, and the compiled engine it returns."""

from __future__ import annotations

import copy
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .data import LossReduction, LossScale
from .errors import InputError, LossError, MemoryBudgetError, UnsupportedOpError
from .guards import fingerprint
from .listing import ProgramView, listing, to_dot
from .node_info import GENERATOR, INPUT, TARGET, info
from .operators import Kronecker, KroneckerLayout
from .passes.canonicalize import loss_scale, target_check, unsupported_nodes
from .passes.memory import MemoryEstimate
from .passes.pipeline import BACKENDS, Build, run_pipeline
from .quantities import QUANTITIES, Quantity, resolve
from .rules import registry
from .trace import Capture, Traced, check_callables, parse_capture, trace, unwrap_parallel
from .writeback import write_grad

QuantitySpec = str | Quantity | Iterable[str | Quantity]
# Traced versions of a model kept at once (a model switched between train() and eval() every step
# reuses both); older ones are dropped with their programs.
_VERSIONS_KEPT = 4


class Result(Mapping):
    """Loss, gradient and quantities of one call, keyed by the model's parameter names in
    ``named_parameters()`` order.

    ``result.loss`` (scalar), ``result.grad["1.weight"]``, ``result["diag_ggn"]["1.weight"]``; iterating
    gives the quantity names (``"grad"`` first).

    Saving: ``torch.save(result, path)`` and, where fxcurv is imported, ``torch.load(path,
    weights_only=True)`` give it back (tensors, and Kronecker blocks with their factors);
    ``result.to_dict()`` is the same content as plain tensors and tuples, which any process loads with
    ``weights_only=True``. Matrix-free blocks (``block_ggn``, ``block_hessian``) hold products over the
    program's tensors and are refused by both: save their ``to_dense()`` or ``diag()``.
    """

    def __init__(self, loss: torch.Tensor, values: dict[str, dict[str, Any]]):
        self.loss = loss
        self._values = values

    @property
    def grad(self) -> dict[str, torch.Tensor]:
        if "grad" not in self._values:
            raise KeyError("this result has no gradient: its engine was compiled with grad=False (curvature "
                           f"only); it has {list(self._values)}")
        return self._values["grad"]

    def __getitem__(self, quantity: str) -> Any:
        try:
            return self._values[quantity]
        except KeyError:
            raise KeyError(f"{quantity!r} was not requested; this result has {list(self._values)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def write_grad(self, model: nn.Module) -> None:
        """Put the gradient into ``p.grad`` of ``model``'s parameters as ``loss.backward()`` does:
        ``p.grad = g`` (a copy) where it is ``None``, ``p.grad += g`` in place otherwise, so an optimizer
        steps as after ``loss.backward()`` and calls without ``zero_grad()`` accumulate
        (:mod:`fxcurv.writeback`). ``model`` is the module the engine was compiled for; a result of
        another model is refused with an InputError before anything is written."""
        write_grad(model, self.grad)

    def __repr__(self) -> str:
        return f"Result(loss={self.loss.item():.6g}, quantities={list(self._values)})"

    # ---- saving ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """``{"loss": tensor, quantity: {param name: value}}`` with plain values only: tensors, and for a
        Kronecker block the tuple of its factors (``(G, A)`` or ``(G,)``, BackPACK's order; rebuild with
        ``fxcurv.Kronecker(factors, shape, layout=...)``, ``KroneckerLayout.TRANSPOSED`` for a transposed
        convolution's weight). Loads with ``torch.load(..., weights_only=True)`` anywhere."""
        return {"loss": self.loss, **{q: _plain(v, q, factors_only=True) for q, v in self._values.items()}}

    def __reduce__(self) -> tuple[Any, ...]:
        # torch.save(result): rebuilt by Result(loss, values); weights_only loading allows Result,
        # Kronecker and its KroneckerLayout (torch.serialization.add_safe_globals below) and nothing else
        # of fxcurv.
        return (Result, (self.loss, {q: _plain(v, q, factors_only=False) for q, v in self._values.items()}))

    def __deepcopy__(self, memo: dict[int, Any]) -> Result:
        # copies need not be saveable (a matrix-free block copies as before): not through __reduce__
        return Result(copy.deepcopy(self.loss, memo), copy.deepcopy(self._values, memo))


def _plain(value: Any, where: str, *, factors_only: bool) -> Any:
    """``value`` with every part saveable for ``torch.load(weights_only=True)``, or a TypeError naming it."""
    if isinstance(value, (torch.Tensor, int, float, bool, str)) or value is None:
        return value
    if isinstance(value, Kronecker):
        return value.factors if factors_only else value
    if isinstance(value, dict):
        return {k: _plain(v, f"{where}[{k!r}]", factors_only=factors_only) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_plain(v, f"{where}[{i}]", factors_only=factors_only) for i, v in enumerate(value))
    raise TypeError(
        f"result[{where}] is a {type(value).__name__}, which cannot be saved: a matrix-free operator computes "
        "its products from the program's tensors. Save what you need of it as tensors (to_dense() for small "
        "layers, diag()), or request a quantity with an explicit result (diag_ggn, kflr, sqrt_ggn, ...)")


# Results load with torch.load(..., weights_only=True): the two fxcurv types a saved result contains.
torch.serialization.add_safe_globals([Result, Kronecker, KroneckerLayout])


@dataclass
class Program:
    """The compiled curvature program of one input signature.

    ``gm`` is the program as a ``torch.fx.GraphModule``; ``runner`` executes it (the module itself,
    or its ``torch.compile``d version for the inductor backend); ``memory`` is its estimated peak.
    """

    gm: fx.GraphModule
    quantities: tuple[Quantity, ...]
    backend: str
    memory: MemoryEstimate
    runner: Callable[..., Any]
    param_of: dict[str, str]  # placeholder -> parameter name
    placeholders: tuple[str, ...]
    statics: dict[tuple[str, str], Any]  # (quantity, parameter) -> static data for the quantity's wrap
    # check_target(y): the loss's target check (shape, dtype, values), run before every call.
    check_target: Callable[[Any], None] | None = None
    # scale(y): how the batch's loss enters a data set's loss; None where the loss does not declare it.
    scale: Callable[[Any], LossScale] | None = None

    @classmethod
    def from_build(cls, build: Build) -> Program:
        assert build.canonical is not None and build.graph is not None and build.memory is not None
        gm = fx.GraphModule(build.canonical.root, build.graph, "CurvatureProgram")
        runner: Callable[..., Any] = gm
        if build.backend == "inductor":
            runner = torch.compile(gm, backend="inductor", dynamic=False)
        placeholders = tuple(n.name for n in build.graph.nodes if n.op == "placeholder")
        param_of = {n.name: str(info(n).param) for n in build.graph.nodes
                    if n.op == "placeholder" and info(n).param is not None}
        return cls(gm, build.quantities, build.backend, build.memory, runner, param_of, placeholders, build.statics,
                   check_target=target_check(build.canonical), scale=loss_scale(build.canonical))

    def run(self, x: torch.Tensor, y: Any, params: dict[str, torch.Tensor],
            generator: torch.Generator | None) -> dict[str, Any]:
        fixed = {INPUT: x, TARGET: y, GENERATOR: generator}
        args = [fixed[n] if n in fixed else params[self.param_of[n]] for n in self.placeholders]
        with torch.no_grad():
            return self.runner(*args)


@dataclass
class _Version:
    """One trace of the model and loss, and the programs built from it per input signature."""

    fingerprint: tuple[Any, ...]
    traced: Traced
    programs: dict[tuple[Any, ...], Program]


def available_memory(device: torch.device) -> int | None:
    """Bytes this process could still allocate on ``device`` (``None`` where unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    if hasattr(os, "sysconf") and "SC_AVPHYS_PAGES" in os.sysconf_names:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return None


class Engine:
    """A model and loss compiled for a set of quantities; call it as ``engine(x, y)``.

    Programs are cached per input signature (shapes, dtypes, devices of ``x``, ``y`` and the
    parameters): calling again with the same shapes reuses the program, a new batch size or dtype
    builds another. Each call checks that the model and loss are still what the programs were built
    from (:mod:`fxcurv.guards`) and traces them anew where they are not. ``graph``/``code``/
    ``to_dot()`` show the most recently used program.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[..., Any], quantities: QuantitySpec = ("grad",), *,
                 mc_samples: int = 1, seed: int | None = None, backend: str = "fused",
                 memory_budget: float | None = None, capture: str = "fx", grad: bool = True):
        self.capture = parse_capture(capture)
        if not isinstance(mc_samples, int) or isinstance(mc_samples, bool) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
        if memory_budget is not None and not memory_budget > 0:
            raise ValueError(f"memory_budget must be a positive number of bytes (or None), got {memory_budget!r}")
        self.model = model
        self.loss_fn = loss_fn
        if not isinstance(grad, bool):
            raise TypeError(f"grad must be True or False, got {grad!r}")
        self.grad = grad
        self.quantities = resolve(quantities, grad=grad)
        self.mc_samples = mc_samples
        self.seed = seed
        self.backend = backend
        self.memory_budget = memory_budget
        self._versions: OrderedDict[tuple[Any, ...], _Version] = OrderedDict()
        self._current: _Version | None = None
        self._generators: dict[torch.device, torch.Generator] = {}
        self._last: Program | None = None
        if self.capture is Capture.FX:
            self._version()  # trace now: errors at compile time (capture="aten": at the first call)
        else:
            check_callables(unwrap_parallel(model), loss_fn)

    # ---- the model as it is now ----------------------------------------------------------------
    def _version(self, x: torch.Tensor | None = None) -> _Version:
        """The trace of the model and loss as they are now (guarded: traced anew when they changed).

        ``capture="aten"`` exports the model on ``x``: one export serves every batch size (the batch is
        symbolic), a new per-sample shape, dtype or device of ``x`` exports anew."""
        model = unwrap_parallel(self.model)
        fp = fingerprint(model, self.loss_fn)
        if self.capture is Capture.ATEN:
            if x is None:
                if self._current is not None and self._current.fingerprint[:2] == fp:
                    return self._current
                raise RuntimeError("capture='aten' captures the model at the first call: call the engine "
                                   "(engine(x, y)) or engine.program(x, y) first")
            fp = fp + ((tuple(x.shape[1:]), x.dtype, x.device),)
        current = self._current
        if current is not None and current.fingerprint == fp:
            return current
        found = self._versions.get(fp)
        if found is None:
            traced = trace(model, self.loss_fn, self.capture, x)
            problems = unsupported_nodes(traced)
            if problems:
                raise UnsupportedOpError(
                    f"{len(problems)} node(s) of the model are outside fxcurv's vocabulary:\n  "
                    + "\n  ".join(problems)
                    + f"\nSupported ops and the torch calls that map to them:\n  {registry.supported_sources()}")
            found = _Version(fp, traced, {})
            self._versions[fp] = found
            while len(self._versions) > _VERSIONS_KEPT:
                self._versions.popitem(last=False)
        self._versions.move_to_end(fp)
        self._current = found
        return found

    def traced(self, x: torch.Tensor | None = None) -> Traced:
        """The trace of the model and loss as they are now: the graph every program of this engine is
        built from, traced anew where the guards say the model or loss changed (for code that runs the
        captured model itself, such as :mod:`fxcurv.linops`). ``capture="aten"`` captures on inputs like
        ``x`` (without ``x``: the current capture, if the model has not changed since)."""
        return self._version(x).traced

    @property
    def quantity_names(self) -> tuple[str, ...]:
        return tuple(q.name for q in self.quantities)

    # ---- calling -------------------------------------------------------------------------------
    @staticmethod
    def signature(version: _Version, x: Any, y: Any) -> tuple[Any, ...]:
        def sig(t: Any) -> tuple[Any, ...]:
            return (tuple(t.shape), t.dtype, t.device) if isinstance(t, torch.Tensor) else (type(t).__name__,)

        params = tuple((p.dtype, p.device) for p in version.traced.params.values())
        return sig(x), sig(y), params

    def program(self, x: torch.Tensor, y: Any) -> Program:
        """The program for inputs like ``(x, y)``, built on first use."""
        _check_call(x, y)
        version = self._version(x)
        key = self.signature(version, x, y)
        prog = version.programs.get(key)
        if prog is None:
            prog = self._build(version, x, y)
            version.programs[key] = prog
        self._last = prog
        return prog

    def _build(self, version: _Version, x: torch.Tensor, y: Any) -> Program:
        params = {name: p.detach() for name, p in version.traced.params.items()}
        quantities = self._specialized(version, x, y, params)
        build = run_pipeline(Build(version.traced, x, y, params, quantities, self.mc_samples, self.backend))
        prog = Program.from_build(build)
        budget = self.memory_budget if self.memory_budget is not None else available_memory(x.device)
        if budget is not None and prog.memory.peak_bytes > budget:
            raise MemoryBudgetError(
                f"the curvature program for inputs {tuple(x.shape)} would need about "
                f"{prog.memory.peak_bytes / 2**20:.0f} MiB at its peak, at node '{prog.memory.at}' "
                f"({prog.memory.at_description}), more than the budget of {budget / 2**20:.0f} MiB"
                f"{' (the memory available now)' if self.memory_budget is None else ''}. Use a smaller batch, "
                "fewer quantities, Monte Carlo instead of exact factors (diag_ggn_mc), or raise memory_budget=")
        return prog

    def _specialized(self, version: _Version, x: torch.Tensor, y: Any,
                     params: dict[str, torch.Tensor]) -> tuple[Quantity, ...]:
        """The quantities configured for inputs like ``(x, y)`` (:meth:`Quantity.specialize`): each may
        try candidates by building (not running) the program with a candidate in its place."""
        chosen = list(self.quantities)
        for i, q in enumerate(chosen):
            def trial(candidate: Quantity, i: int = i) -> Build:
                trying = tuple(chosen[:i]) + (candidate,) + tuple(chosen[i + 1:])
                return run_pipeline(Build(version.traced, x, y, params, trying, self.mc_samples, self.backend),
                                    check=False)

            chosen[i] = q.specialize(trial, x, y)
        return tuple(chosen)

    def memory_estimate(self, x: torch.Tensor, y: Any) -> MemoryEstimate:
        """The estimated peak memory of the program for inputs like ``(x, y)`` (see
        :mod:`fxcurv.passes.memory`), without running it."""
        _check_call(x, y)
        version = self._version(x)
        key = self.signature(version, x, y)
        prog = version.programs.get(key)
        if prog is not None:
            return prog.memory
        budget = self.memory_budget
        self.memory_budget = float("inf")  # an estimate never refuses
        try:
            return self._build(version, x, y).memory
        finally:
            self.memory_budget = budget

    def loss_scale(self, x: torch.Tensor, y: Any, reduction: str | None = None) -> LossScale:
        """How the loss of the batch ``(x, y)`` enters the loss of a data set of batches
        (:mod:`fxcurv.data`): its reduction and, for ``"mean"``, its normalizer (the number of samples,
        output entries or non-ignored targets it averages over).

        Closed-form losses know their own. A general loss (any traced function) does not: pass
        ``reduction="mean"`` (it averages over the batch's samples) or ``"sum"``; for a closed-form
        loss a ``reduction`` that contradicts the loss's is an error."""
        prog = self.program(x, y)
        if reduction is not None and reduction not in ("mean", "sum"):
            raise ValueError(f"reduction={reduction!r}: supported: 'mean' (over samples), 'sum'")
        if prog.scale is None:
            if reduction is None:
                raise LossError(
                    "the loss is a general function: fxcurv does not know how it reduces over the batch, "
                    "which weights batches in a data set. Pass reduction='mean' if it averages over the "
                    "samples, reduction='sum' if it sums them")
            if reduction == "sum":
                return LossScale(LossReduction.SUM)
            return LossScale(LossReduction.MEAN, float(x.shape[0]))
        prog_check = prog.check_target
        if prog_check is not None:
            prog_check(y)
        scale = prog.scale(y)
        if reduction is not None and reduction != scale.reduction.value:
            raise LossError(f"reduction={reduction!r} contradicts the loss's own reduction "
                            f"{scale.reduction.value!r}")
        return scale

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def __call__(self, x: torch.Tensor, y: Any, *, generator: torch.Generator | None = None) -> Result:
        prog = self.program(x, y)
        if prog.check_target is not None:  # target values change per call: check every call
            prog.check_target(y)
        version = self._current
        assert version is not None
        if generator is None:
            generator = self._generator(x.device)
        params = {name: p.detach() for name, p in version.traced.params.items()}
        out = prog.run(x, y, params, generator)
        values: dict[str, Any] = {}
        for q in prog.quantities:
            if q.per_parameter:
                values[q.name] = {name: q.wrap(v, params[name], prog.statics.get((q.name, name)))
                                  for name, v in out[q.name].items()}
            else:
                values[q.name] = q.wrap_network(out[q.name], {name: params[name] for name in out[q.name]},
                                                {name: prog.statics.get((q.name, name)) for name in out[q.name]})
        return Result(out["loss"], values)

    def accumulate(self, loader: Iterable[Any], *, reduction: str | None = None, progress: bool | None = None,
                   distributed: bool | None = None, group: Any = None,
                   generator: torch.Generator | None = None) -> Result:
        """The loss, gradient and every quantity on the whole data set made of ``loader``'s ``(x, y)``
        batches (read once), as one :class:`Result`: what one call on the concatenated batches would give.

        Batches are weighted as the loss of the concatenated data (a mean-reduced loss by its normalizers
        ``W_b / sum W_b``, a summed one by 1; :mod:`fxcurv.data`); each quantity combines exactly as it
        declares (:meth:`Quantity.accumulator`) or is refused before the first batch
        (:class:`~fxcurv.errors.NotCombinableError`: ``kfra``, ``hbp_*``, ``ggn_eigen``). ``reduction``:
        ``"mean"`` or ``"sum"`` for a general loss (:meth:`loss_scale`). ``progress``: a tqdm bar (``None``:
        for loaders with 20 batches or more when stderr is a terminal). ``distributed``: combine the
        shards of every process of ``group`` (default group) by all-reduces, the same result on every
        process (``None``: when ``torch.distributed`` is initialized). ``generator``: for the Monte Carlo
        draws of every batch (default: the engine's ``seed``). See :mod:`fxcurv.accumulate`."""
        from .accumulate import accumulate

        return accumulate(self, loader, reduction=reduction, progress=progress, distributed=distributed,
                          group=group, generator=generator)

    # ---- copying -------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        """An engine pickles (and deep-copies) as its model, loss and options; programs are rebuilt."""
        # Registered quantities by name; others (configured instances, GGNEigen(top_k=5)) as themselves.
        quantities = tuple(q.name if QUANTITIES.get(q.name) is q else q for q in self.quantities)
        return {"model": self.model, "loss_fn": self.loss_fn, "quantities": quantities,
                "mc_samples": self.mc_samples, "seed": self.seed, "backend": self.backend,
                "memory_budget": self.memory_budget, "capture": self.capture.value, "grad": self.grad}

    def __setstate__(self, state: dict[str, Any]) -> None:
        model, loss_fn = state.pop("model"), state.pop("loss_fn")
        self.__init__(model, loss_fn, **state)  # type: ignore[misc]

    # ---- inspecting ----------------------------------------------------------------------------
    def _require_program(self) -> Program:
        if self._last is None:
            raise RuntimeError("no program built yet: call the engine (engine(x, y)) or engine.program(x, y) first")
        return self._last

    @property
    def graph(self) -> ProgramView:
        """The curvature program (``print`` it for the listing; ``.fx_graph`` is the torch.fx Graph)."""
        return ProgramView(self._require_program().gm.graph)

    @property
    def code(self) -> str:
        """The generated Python of the program."""
        return self._require_program().gm.code

    @property
    def graph_module(self) -> fx.GraphModule:
        return self._require_program().gm

    def listing(self) -> str:
        return listing(self._require_program().gm.graph)

    def to_dot(self) -> str:
        return to_dot(self._require_program().gm.graph)

    def __repr__(self) -> str:
        programs = sum(len(v.programs) for v in self._versions.values())
        return f"Engine({type(self.model).__name__}, quantities={self.quantity_names}, programs={programs})"


def _check_call(x: Any, y: Any) -> None:
    if not isinstance(x, torch.Tensor):
        raise InputError(f"input x must be a tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise InputError("input x must have a batch dimension (dim 0), got a 0-d tensor")
    if not isinstance(y, torch.Tensor):
        raise InputError(f"target y must be a tensor, got {type(y).__name__}")
    if y.dim() == 0 or y.shape[0] != x.shape[0]:
        raise InputError(
            f"target y has shape {tuple(y.shape)} but the input batch has {x.shape[0]} samples; "
            "y's dim 0 must be the batch"
        )


def compile(model: nn.Module, loss_fn: Callable[..., Any], quantities: QuantitySpec = ("grad",), *,  # noqa: A001
            mc_samples: int = 1, seed: int | None = None, backend: str = "fused",
            memory_budget: float | None = None, capture: str = "fx", grad: bool = True) -> Engine:
    """Compile ``loss_fn(model(x), y)`` into a curvature program computing ``quantities``.

    ``quantities``: names (or configured :class:`fxcurv.quantities.Quantity` objects such as
    ``GGNEigen(top_k=5)``) from ``fxcurv.QUANTITIES``: the diagonal family (``diag_ggn``,
    ``diag_ggn_mc``, ``diag_hessian``, ``hesscale``, ``hesscale_gn``), the Kronecker and block family
    (``kflr``, ``kfac``, ``kfra``, ``hbp_*``, ``block_ggn``, ``block_hessian``), the per-sample family
    (``batch_grad``, ``batch_l2_grad``, ``sum_grad_squared``, ``variance``, ``batch_diag_ggn(_mc)``,
    ``sqrt_ggn(_mc)``) and ``ggn_eigen(_mc)``; the gradient is returned too, unless ``grad=False``:
    curvature only, the program then computes no weight gradients and, where no requested quantity reads
    the gradient message ``g`` (``diag_ggn``, the Kronecker factors, ``ggn_eigen(vectors=False)``, ...),
    does not backpropagate it either. ``mc_samples``
    columns are drawn for the Monte Carlo quantities; ``seed`` makes them reproducible (or pass
    ``generator=`` per call).
    ``backend``: ``"fused"`` (default), ``"eager"`` (unfused, op by op) or ``"inductor"``
    (``torch.compile``); all give the same numbers. ``memory_budget``: bytes the program's values may
    take at their peak (estimated before it runs); default: the memory available when it is built.
    ``capture``: ``"fx"`` (default) traces the model with torch.fx, nn layers kept whole, now: tracing
    errors are raised here. ``"aten"`` captures it with ``torch.export`` as ATen ops with a symbolic batch
    size (:mod:`fxcurv.capture_aten`) at the first call, on its input -- so capture errors (data-dependent
    control flow, train-mode BatchNorm) are raised by the first call, not here; one capture serves every
    batch size. The loss is traced by torch.fx in both.
    """
    return Engine(model, loss_fn, quantities, mc_samples=mc_samples, seed=seed, backend=backend,
                  memory_budget=memory_budget, capture=capture, grad=grad)
