"""Graphs with symbolic shapes, compiled once per concrete input shape at call time.

Masks depend on sequence lengths, so a graph dynamo hands over with symbolic shapes (its
automatic-dynamic recompile after a shape change, or `dynamic=True`) is specialised per shape:
each gets a copy of the graph with concrete fake values and runs through the backend's passes.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from .passes.inputs import GraphInput, InputKind


class PerShapeCompiled:
    """Compiles a symbolic-shape graph once per concrete input shape, on first use.

    Each shape gets a copy of the graph with the Python numbers dynamo passes as 0-d tensors on
    symbolic graphs (the model's scale or dropout p, a float argument) folded in as the constants
    they are on a static graph (keyed by value, as dynamo keys a static graph), and with fake
    values of the call's concrete shapes in every node's meta. The values keep `requires_grad` as
    the call computes it, so detection's gradient rule sees what it sees on a static graph.
    """

    def __init__(self, compile_static: Callable[[torch.fx.GraphModule, list[Any]], Callable[..., Any]],
                 gm: torch.fx.GraphModule, inputs: list[GraphInput]) -> None:
        self.compile_static, self.gm, self.inputs = compile_static, gm, inputs
        self.by_shape: dict[tuple, Callable[..., Any]] = {}

    def __call__(self, *args: Any) -> Any:
        key = self._key(args)
        compiled = self.by_shape.get(key)
        if compiled is None:
            gm = copy_graph_module(self.gm)
            _fold_scalars(gm, self.inputs, args)
            _propagate(gm, args)
            compiled = self.by_shape[key] = self.compile_static(gm, list(args))
        return compiled(*args)

    def _key(self, args: tuple[Any, ...]) -> tuple:
        """Shapes and dtypes of the tensors, the values of Python numbers (also those passed as tensors)."""
        key: list[Any] = [torch.is_grad_enabled()]
        for graph_input, arg in zip(self.inputs, args):
            if not isinstance(arg, torch.Tensor):
                key.append(arg)
            elif graph_input.kind in _SCALARS and arg.numel() == 1:
                key.append(arg.item())
            else:
                key.append((tuple(arg.shape), arg.dtype, arg.requires_grad))
        return tuple(key)


_SCALARS = (InputKind.SCALAR, InputKind.MODEL_SCALAR)


def _fold_scalars(gm: torch.fx.GraphModule, inputs: list[GraphInput], args: tuple[Any, ...]) -> None:
    """Replace `.item()` of Python numbers passed as 0-d tensors, and SymInt inputs (sizes), by their
    values, then fold the Python arithmetic on them, so an attention's scale or dropout p is a constant
    and sizes are the ints they are on a static graph (a hand-written `scores / n` is then found).

    (Left symbolic, an SDPA scale fails fake propagation: its meta function guards on the value.)"""
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    constants: dict[torch.fx.Node, Any] = {}
    for node, graph_input, arg in zip(placeholders, inputs, args):
        if graph_input.kind in _SCALARS and isinstance(arg, torch.Tensor) and arg.numel() == 1:
            constants.update({user: arg.item() for user in node.users
                              if user.op == "call_method" and user.target == "item"})
        elif isinstance(arg, (int, float)) and not isinstance(arg, bool):
            constants[node] = arg  # a SymInt size (the sequence length in `scores / n`): its value
    if not constants:
        return
    for node in list(gm.graph.nodes):
        if node in constants:
            continue
        foldable = node.op == "call_function" and getattr(node.target, "__module__", None) in ("_operator", "math")
        if foldable and node.all_input_nodes and all(parent in constants for parent in node.all_input_nodes):
            args_, kwargs_ = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: constants[n])
            constants[node] = node.target(*args_, **kwargs_)
    for node, value in constants.items():
        for user in list(node.users):
            user.args, user.kwargs = torch.fx.node.map_arg((user.args, user.kwargs),
                                                           lambda n: value if n is node else n)
    for node in reversed(list(constants)):
        if not node.users and node.op != "placeholder":  # the call still passes every input
            gm.graph.erase_node(node)
    gm.recompile()


class _GradFakeTensorProp(FakeTensorProp):
    """FakeTensorProp that keeps `requires_grad` in the recorded values (its snapshots detach)."""

    def run_node(self, node: torch.fx.Node) -> Any:
        result = super().run_node(node)
        value = node.meta.get("val")
        if isinstance(result, torch.Tensor) and result.requires_grad and isinstance(value, torch.Tensor):
            node.meta["val"] = value.detach().requires_grad_(True)
        return result


def _propagate(gm: torch.fx.GraphModule, args: tuple[Any, ...]) -> None:
    """Fake values of the concrete call in every node's meta.

    Shapes are the call's, fixed; an `.item()` left in the graph (of a tensor, not of a folded
    number) gives an unbacked symbol rather than failing.
    """
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    mode = torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())
    mode.allow_scalar_outputs = True
    fake_args = [mode.from_tensor(a, static_shapes=True) if isinstance(a, torch.Tensor) else a for a in args]
    _GradFakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fake_args)


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of `gm` with its own graph (nodes and their meta copied) that passes can change."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return torch.fx.GraphModule(gm, graph)
