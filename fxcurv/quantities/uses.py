"""A parameter's uses kept by a program for products after it ran (``block_ggn``, ``ggn_eigen``).

Matrix-free products with per-sample factors ``a_kn = sum_u J_{u,n}^T S^u_kn`` need, per use ``u`` of
the parameter, the op's inputs and the columns at its output. A quantity keeps them with
:func:`keep` (the op, which input the parameter is and the op's attributes as static data; the input
values as graph nodes the program returns) and multiplies with :class:`OpUse`: forward-mode products
``J_u v`` and reverse-mode products ``J_u^T m`` are torch.func's JVPs and VJPs of the op's own forward,
so nothing here depends on the op, and sums over uses are exact for weights used more than once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from ..curvature.accumulate import ParamUse
from ..node_info import info
from ..rules import registry


@dataclass(frozen=True)
class UseSpec:
    """The static part of a use: the op, the input the parameter is, the op's attributes."""

    op: str
    param_input: str
    attrs: tuple[tuple[str, Any], ...]


def keep(use: ParamUse) -> tuple[UseSpec, tuple[Any, ...]]:
    """The use's static part and its op's input values (graph nodes, ``None`` where absent)."""
    op = use.emit.op_of(use.node)
    inputs = use.emit.inputs_of(use.node)
    values = tuple(use.emit.env[v] if isinstance(v, fx.Node) else v for v in inputs.values())
    attrs = dict(use.node.kwargs)
    if op.variadic:  # a generic op: its call is static data (the graph holds it as an attribute)
        attrs["call"] = info(use.node).call
    return UseSpec(op.name, use.input, tuple(sorted(attrs.items()))), values


class OpUse:
    """One use with its input values: the op's output as a function of the parameter, and its JVPs
    and VJPs per sample."""

    def __init__(self, spec: UseSpec, inputs: Sequence[Any]):
        self.spec = spec
        self.op = registry.OPS[spec.op]
        self.inputs = tuple(inputs)
        self.position = self.op.inputs.index(spec.param_input)
        self.attrs = dict(spec.attrs)
        # Which inputs carry the batch: the op's data inputs, or a generic call's data slots.
        data = set(self.attrs["call"].data) if self.op.variadic else {i for i, n in enumerate(self.op.inputs)
                                                                        if self.op.is_batched(n)}
        self.batched = tuple(i in data and isinstance(v, torch.Tensor) for i, v in enumerate(self.inputs))

    @property
    def param(self) -> torch.Tensor:
        return self.inputs[self.position]

    @property
    def batch(self) -> int:
        """The number of samples of the op's data inputs."""
        for batched, value in zip(self.batched, self.inputs):
            if batched:
                return value.shape[0]
        raise ValueError(f"op {self.op.name} has no data input")

    def forward(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The op's output as a function of the parameter (its other inputs held)."""
        args = list(self.inputs)

        if self.op.variadic:  # a generic node's slots, as many as it has
            args = args[: len(self.attrs["call"].kinds)]

        def f(p: torch.Tensor) -> torch.Tensor:
            args[self.position] = p
            return self.op.forward(*args, **self.attrs)

        return f

    def samples(self, index: Any | None) -> OpUse:
        """The use restricted to samples ``index`` (a slice or index tensor; ``None``: all) of its data
        inputs; parameters are shared by the samples."""
        if index is None:
            return self
        values = [v[index] if batched else v for batched, v in zip(self.batched, self.inputs)]
        return OpUse(self.spec, values)

    def jvp(self, vs: torch.Tensor) -> torch.Tensor:
        """``J_u v`` for each of the ``M`` parameter-shaped tangents ``vs [M, *param]``: ``[M, N, *out]``."""
        f, p = self.forward(), self.param
        return torch.func.vmap(lambda v: torch.func.jvp(f, (p,), (v,))[1])(vs)

    def vjp(self, cotangents: torch.Tensor) -> torch.Tensor:
        """``sum_n J_{u,n}^T m_n`` for each of the ``M`` cotangents ``[M, N, *out]``: ``[M, *param]``."""
        pull = torch.func.vjp(self.forward(), self.param)[1]
        return torch.func.vmap(lambda c: pull(c)[0])(cotangents)


def vjp_sum(uses: Sequence[OpUse], cotangents: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_u J_u^T m_u`` over the uses, each ``[M, N, *out_u]``: ``[M, *param]``."""
    total = None
    for use, m in zip(uses, cotangents):
        part = use.vjp(m)
        total = part if total is None else total + part
    if total is None:
        raise ValueError("vjp_sum of no uses")
    return total
