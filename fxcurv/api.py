"""``fxcurv.compile``: the user's entry point, and the compiled engine it returns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from . import passes
from .errors import InputError
from .listing import ProgramView, listing, to_dot
from .quantities import normalize
from .trace import Traced, trace


class Result(Mapping):
    """Loss, gradient and quantities of one call, keyed by the model's parameter names.

    ``result.loss`` (scalar), ``result.grad["1.weight"]``, ``result["diag_ggn"]["1.weight"]``; iterating
    gives the quantity names (``"grad"`` included).
    """

    def __init__(self, loss: torch.Tensor, values: dict[str, dict[str, torch.Tensor]]):
        self.loss = loss
        self._values = values

    @property
    def grad(self) -> dict[str, torch.Tensor]:
        return self._values["grad"]

    def __getitem__(self, quantity: str) -> dict[str, torch.Tensor]:
        try:
            return self._values[quantity]
        except KeyError:
            raise KeyError(f"{quantity!r} was not requested; this result has {list(self._values)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Result(loss={self.loss.item():.6g}, quantities={list(self._values)})"


class _Recorder(fx.Interpreter):
    """Runs a program once and records the shape of every value (for the listing)."""

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if isinstance(value, torch.Tensor):
            n.meta["shape"] = tuple(value.shape)
            n.meta["dtype"] = value.dtype
        return value


BACKENDS = ("fused", "eager", "inductor")


@dataclass
class Program:
    """The compiled curvature program of one input signature.

    ``gm`` is the program as a ``torch.fx.GraphModule``; ``runner`` is what executes it (the module
    itself, or its ``torch.compile``d version for the inductor backend).
    """

    gm: fx.GraphModule
    placeholders: list[str]
    param_of: dict[str, str]  # placeholder -> parameter name
    quantities: tuple[str, ...]
    backend: str = "fused"
    runner: Any = None
    prepared: bool = False

    def arguments(self, x, y, params: dict[str, torch.Tensor], generator) -> list:
        args = []
        for name in self.placeholders:
            if name == "x":
                args.append(x)
            elif name == "y":
                args.append(y)
            elif name == "generator":
                args.append(generator)
            else:
                args.append(params[self.param_of[name]])
        return args

    def run(self, x, y, params, generator=None) -> dict[str, torch.Tensor]:
        args = self.arguments(x, y, params, generator)
        with torch.no_grad():
            if not self.prepared:
                self._record_shapes(args, generator)
                self.prepared = True
                self._finalize()
            return (self.gm if self.runner is None else self.runner)(*args)

    def _record_shapes(self, args: list, generator) -> None:
        """Every value's shape and dtype, which fusion and the listing need, without computing.

        Fake tensors propagate shapes at no cost and draw no random numbers. Should an op lack a
        fake implementation, the program runs once for real, with the random state restored after,
        so that every call -- the first included -- runs the same (fused) program on the same draws.
        """
        try:
            mode = FakeTensorMode(allow_non_fake_inputs=True)
            FakeTensorProp(self.gm, mode).propagate(*args)
            for n in self.gm.graph.nodes:
                val = n.meta.pop("val", None)
                if isinstance(val, torch.Tensor):
                    n.meta["shape"], n.meta["dtype"] = tuple(val.shape), val.dtype
            return
        except Exception:  # noqa: BLE001 - fall back to a real run
            pass
        devices = [a.device for a in args if isinstance(a, torch.Tensor) and a.device.type == "cuda"]
        state = generator.get_state() if generator is not None else None
        with torch.random.fork_rng(devices=devices):
            _Recorder(self.gm).run(*args)
        if generator is not None:
            generator.set_state(state)

    def _finalize(self) -> None:
        graph = self.gm.graph
        if self.backend == "fused":
            passes.fuse(graph)
            passes.eliminate_dead_code(graph)
        passes.free_messages(graph)
        self.gm.recompile()
        if self.backend == "inductor":
            self.runner = torch.compile(self.gm, backend="inductor", dynamic=False)


def build_program(traced: Traced, x, y, quantities: tuple[str, ...], mc_samples: int = 1,
                  backend: str = "fused") -> Program:
    """Trace -> canonical graph -> curvature program -> shared, pruned, (fused,) scheduled program.

    ``backend``: ``"eager"`` runs the unfused program op by op; ``"fused"`` runs the fused program
    (Triton kernels on CUDA tensors, their torch references on the CPU); ``"inductor"`` hands the
    unfused program to ``torch.compile``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    canon = passes.canonicalize(traced, x, y)
    graph = passes.insert_curvature(canon, quantities, mc_samples)
    passes.share_products(graph)
    passes.eliminate_dead_code(graph)
    passes.free_messages(graph)
    gm = fx.GraphModule(canon.root, graph, "CurvatureProgram")
    placeholders = [n.name for n in graph.nodes if n.op == "placeholder"]
    param_of = {n.name: n.meta["param"] for n in graph.nodes if n.op == "placeholder" and n.meta.get("param")}
    return Program(gm, placeholders, param_of, quantities, backend)


class Engine:
    """A model and loss compiled for a set of quantities; call it as ``engine(x, y)``.

    Programs are cached per input signature (shapes, dtypes, devices of ``x``, ``y`` and the
    parameters): calling again with the same shapes reuses the program, a new batch size or dtype
    builds another. ``graph``/``code``/``to_dot()`` show the most recently used program.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, quantities=("grad",), *, mc_samples: int = 1,
                 seed: Optional[int] = None, backend: str = "fused"):
        self.model = model
        self.loss_fn = loss_fn
        self.quantities = normalize(quantities)
        if not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}")
        self.mc_samples = mc_samples
        self.seed = seed
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
        self.backend = backend
        self.traced = trace(model, loss_fn)
        self._programs: dict[tuple, Program] = {}
        self._generators: dict[torch.device, torch.Generator] = {}
        self._last: Optional[Program] = None

    # ---- calling -------------------------------------------------------------------------------
    def _params(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.traced.params.items()}

    def signature(self, x, y) -> tuple:
        def sig(t):
            return (tuple(t.shape), t.dtype, t.device) if isinstance(t, torch.Tensor) else (type(t).__name__,)

        params = tuple((p.dtype, p.device, p.requires_grad) for p in self.traced.params.values())
        return sig(x), sig(y), params

    def program(self, x, y) -> Program:
        """The program for inputs like ``(x, y)``, built on first use."""
        key = self.signature(x, y)
        prog = self._programs.get(key)
        if prog is None:
            prog = build_program(self.traced, x, y, self.quantities, self.mc_samples, self.backend)
            self._programs[key] = prog
        self._last = prog
        return prog

    def _generator(self, device: torch.device) -> Optional[torch.Generator]:
        if self.seed is None:
            return None
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def __call__(self, x: torch.Tensor, y: Any, *, generator: Optional[torch.Generator] = None) -> Result:
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
        prog = self.program(x, y)
        if generator is None and "diag_ggn_mc" in self.quantities:
            generator = self._generator(x.device)
        flat = prog.run(x, y, self._params(), generator)
        values: dict[str, dict[str, torch.Tensor]] = {q: {} for q in ("grad",) + tuple(
            q for q in self.quantities if q != "grad")}
        for key, value in flat.items():
            if key == "loss":
                continue
            q, name = key.split("/", 1)
            values[q][name] = value
        # A parameter the loss never reads has zero derivatives of every order.
        for name, p in self.traced.params.items():
            if p.requires_grad and name not in values["grad"]:
                for q in values:
                    values[q][name] = torch.zeros_like(p.detach())
        return Result(flat["loss"], values)

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
        return f"Engine({type(self.model).__name__}, quantities={self.quantities}, programs={len(self._programs)})"


def compile(model: nn.Module, loss_fn: Callable, quantities=("grad",), *, mc_samples: int = 1,
            seed: Optional[int] = None, backend: str = "fused") -> Engine:  # noqa: A001 - mirrors torch.compile
    """Compile ``loss_fn(model(x), y)`` into a curvature program computing ``quantities``.

    ``quantities``: any of ``grad``, ``diag_ggn``, ``diag_ggn_mc``, ``diag_hessian``, ``hesscale``,
    ``hesscale_gn`` (the gradient is always returned). ``mc_samples`` columns are drawn for
    ``diag_ggn_mc``; ``seed`` makes them reproducible (or pass ``generator=`` per call).
    ``backend``: ``"fused"`` (default), ``"eager"`` (unfused, op by op) or ``"inductor"``
    (``torch.compile``); all give the same numbers.
    """
    return Engine(model, loss_fn, quantities, mc_samples=mc_samples, seed=seed, backend=backend)
