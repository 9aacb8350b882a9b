"""Shape propagation: example values on the traced graph, and fake-tensor shapes on the program.

Canonicalization reads the recorded values: tensor shapes resolve reshapes to per-sample shapes,
and shape queries (``x.size(0)``) fold into constants. A failure names the node and its source.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from ..errors import InputError
from ..node_info import set_value
from ..rules import registry


def describe(node: fx.Node, root: torch.nn.Module | None = None) -> str:
    """``'name' (source)`` for error messages: the module type or the function called."""
    if node.op == "call_module" and root is not None:
        try:
            mod = root.get_submodule(str(node.target))
            return f"'{node.name}' (nn.{type(mod).__name__} at {str(node.target).split('.', 1)[-1]})"
        except AttributeError:
            pass
    if node.op == "call_function":
        return f"'{node.name}' ({registry.source_name(node.target)})"
    if node.op == "call_method":
        return f"'{node.name}' (Tensor.{node.target})"
    return f"'{node.name}' ({node.op} {node.target})"


class ShapeProp(fx.Interpreter):
    """Records ``node.meta['val']``: the example value of every node."""

    def run_node(self, n: fx.Node) -> Any:
        try:
            value = super().run_node(n)
        except Exception as err:  # noqa: BLE001 - re-raised with the node named
            shapes = ", ".join(
                f"{a.name} {tuple(a.meta['val'].shape)}" for a in n.all_input_nodes
                if isinstance(a.meta.get("val"), torch.Tensor)
            )
            raise InputError(
                f"the model/loss failed at node {describe(n, self.module)} with inputs [{shapes}]: "
                f"{str(err).splitlines()[0] if str(err) else type(err).__name__}", node=n) from err
        n.meta["val"] = value
        return value


def propagate_shapes(gm: fx.GraphModule, *example_inputs) -> None:
    interpreter = ShapeProp(gm)
    interpreter.extra_traceback = False  # our message already names the node
    with torch.no_grad():
        interpreter.run(*example_inputs)


def record_shapes(gm: fx.GraphModule, example_args: list[Any]) -> None:
    """Shape and dtype of every value of a program, by fake-tensor propagation: no arithmetic, no
    random numbers drawn. Fusion, the listing and the memory estimate read them."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    FakeTensorProp(gm, mode).propagate(*example_args)
    for n in gm.graph.nodes:
        set_value(n, n.meta.pop("val", None))
