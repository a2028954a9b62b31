"""Flatten pass: tensor-subclass weights (torchao's quantised ones) reach the inner compiler as their
plain inner tensors, and are rebuilt inside the graph.

AOTAutograd compiles a graph with tensor-subclass inputs for their inner tensors and, on every call,
unwraps each such input before the compiled code runs. In torch 2.11 that is generic Python
(`runtime_unwrap_tensor_subclasses`: `__tensor_flatten__` and a recursion per input). For Wan2.1-1.3B
with torchao float8 linears (300 `Float8Tensor` weights) a step spent 15-21 ms on an H200's host
before its ~165 ms of GPU work, CUDA graphs or not, and that unwrapping was the largest part of it
(cProfile: 22 of 38 ms; benchmarks/NOTES.md, session 13). torch 2.13 unwraps in generated code.

Weights are the same tensors from call to call, so this pass moves the flattening to compile time:
each subclass weight's placeholder is replaced by placeholders for its inner tensors, appended after
the graph's other inputs, and a `RebuildSubclass` module in the graph makes the subclass again from
them. AOTAutograd then traces through that rebuild as it traces through its own, and at run time sees
plain tensors only. `FlatWeights` maps a call's arguments to the new inputs by reading each weight's
inner tensors (attribute reads). Dynamo's guards still check each subclass weight's metadata on every
call; this pass does not change them.

Only weights that take no gradient are flattened (a rebuilt weight would pass its gradient to the
inner tensors, not to the parameter); other subclass inputs (activations) stay as they are.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from .dynamo_metadata import keep_dynamo_metadata
from .inputs import InputKind, graph_inputs


@dataclasses.dataclass(frozen=True)
class SubclassLayout:
    """How to rebuild a subclass tensor from its plain leaves, in the order `leaves` returns them."""

    cls: type
    context: Any  # the second value of __tensor_flatten__
    size: torch.Size
    stride: tuple[int, ...]
    children: dict[str, SubclassLayout | None]  # inner attribute -> its layout (None: a plain tensor)

    @classmethod
    def of(cls, tensor: torch.Tensor) -> SubclassLayout:
        attrs, context = tensor.__tensor_flatten__()
        children = {}
        for attr in attrs:
            inner = getattr(tensor, attr)
            children[attr] = cls.of(inner) if is_traceable_wrapper_subclass(inner) else None
        return cls(type(tensor), context, tensor.size(), tensor.stride(), children)

    def leaves(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for attr, child in self.children.items():
            inner = getattr(tensor, attr)
            out.extend([inner] if child is None else child.leaves(inner))
        return out

    def count(self) -> int:
        return sum(1 if child is None else child.count() for child in self.children.values())

    def rebuild(self, leaves: list[torch.Tensor]) -> torch.Tensor:
        """The subclass tensor over `leaves` (consumed from the front)."""
        inner = {}
        for attr, child in self.children.items():
            inner[attr] = leaves.pop(0) if child is None else child.rebuild(leaves)
        return self.cls.__tensor_unflatten__(inner, self.context, self.size, self.stride)


class RebuildSubclass(torch.nn.Module):
    """A graph's module that makes one subclass weight from its inner tensors."""

    def __init__(self, layout: SubclassLayout) -> None:
        super().__init__()
        self.layout = layout

    def forward(self, *leaves: torch.Tensor) -> torch.Tensor:
        return self.layout.rebuild(list(leaves))


@dataclasses.dataclass(frozen=True)
class FlatWeights:
    """A call's arguments for a graph whose subclass weights were flattened: the other inputs in order,
    then (after the caller's extra inputs) every flattened weight's inner tensors, read from the
    call's own weights (a few attribute reads each: weights updated in place, or another module's
    weights in a graph dynamo reuses, are read as they are; dynamo's guards hold their layout)."""

    kept: list[int]  # positions of the inputs passed as they are
    layouts: dict[int, SubclassLayout]  # position of each flattened weight -> its layout

    def other_inputs(self, args: Sequence[Any]) -> list[Any]:
        return [args[i] for i in self.kept]

    def leaves(self, args: Sequence[Any]) -> list[torch.Tensor]:
        return [leaf for position, layout in self.layouts.items() for leaf in layout.leaves(args[position])]


def flatten_weights(gm: torch.fx.GraphModule, example_inputs: list[Any]
                    ) -> tuple[torch.fx.GraphModule, FlatWeights | None, list[Any]]:
    """`gm` with its subclass weights flattened (a new graph module over `gm`'s modules; `gm`'s graph is
    left as it is), the plan that maps a call's arguments, and the inner tensors' examples (to pass
    after the caller's extra inputs); or `gm`, None and [] when no weight is a subclass.

    `example_inputs` are the graph's original inputs; placeholders after them (the rewrite's extra
    inputs) stay where they are, before the inner tensors'."""
    kinds = [graph_input.kind for graph_input in graph_inputs(gm)]
    positions = [i for i, x in enumerate(example_inputs)
                 if i < len(kinds) and kinds[i] is InputKind.PARAMETER and is_traceable_wrapper_subclass(x)
                 and not x.requires_grad]
    if not positions:
        return gm, None, []
    copy = torch.fx.Graph()
    copies: dict[torch.fx.Node, torch.fx.Node] = {}
    copy.output(copy.graph_copy(gm.graph, copies))
    placeholders = [n for n in copy.nodes if n.op == "placeholder"]
    layouts = {i: SubclassLayout.of(example_inputs[i]) for i in positions}
    anchor = placeholders[-1]
    modules: dict[str, torch.nn.Module] = {}
    inner: list[torch.fx.Node] = []
    for position, layout in layouts.items():
        old = placeholders[position]
        leaves = []
        for k in range(layout.count()):
            with copy.inserting_after(anchor):
                anchor = copy.placeholder(f"{old.name}_inner_{k}")
            leaves.append(anchor)
        name = f"scalingattn_rebuild_{position}"
        modules[name] = RebuildSubclass(layout)
        with copy.inserting_after(anchor):
            rebuilt = copy.call_module(name, tuple(leaves))
        old.replace_all_uses_with(rebuilt)
        copy.erase_node(old)
        inner.extend(leaves)
    copy.lint()
    for name, module in modules.items():
        gm.add_submodule(name, module)
    flat = torch.fx.GraphModule(gm, copy)
    original = [n for n in gm.graph.nodes if n.op == "placeholder"]
    removed = {original[position] for position in layouts}
    keep_dynamo_metadata(gm, flat, {n: c for n, c in copies.items() if n not in removed}, inner)
    plan = FlatWeights([i for i in range(len(example_inputs)) if i not in layouts], layouts)
    return flat, plan, plan.leaves(example_inputs)
