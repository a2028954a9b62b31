"""Graphs that dynamo runs with the parameters of several modules, compiled once per set of parameters.

Dynamo passes a module's parameters to the graph as inputs and does not guard on which tensors
they are, so it runs one graph for every module whose forward is the same code: the repeated
blocks of regional compilation (`compile_repeated_blocks`, `torch.compile` of each block), and the
blocks under a diffusers cache hook (FirstBlockCache wraps each block's forward in a hook; dynamo
compiles the hook's forward once, for the first block it meets, and runs that graph for the
others). Masks are made for one layer's weights (WEST calibrates them on its q and k), so the
graph's masks would be those of the first block in every block. A graph with sparse sites is
therefore compiled again, through all the passes, the first time it is called with other
parameters (one compile, calibration and report per block, as if dynamo had not reused it);
graphs without sparse sites do not depend on the weights and are not.

Parameters are told apart by identity (the same tensor objects, updated in place by an optimiser,
keep their masks: masks are fixed at compile time).
"""
from __future__ import annotations

import dataclasses
import logging
import weakref
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.fx

from .passes.inputs import InputKind, graph_inputs
from .per_shape import copy_graph_module

if TYPE_CHECKING:
    from .report import PassReport

log = logging.getLogger(__name__)

CompiledFn = Callable[..., Any]
# (graph, example inputs, index of the report of the graph's first parameters or None) -> compiled, report
CompileOnce = Callable[[torch.fx.GraphModule, list[Any], "int | None"], "tuple[CompiledFn, PassReport]"]
MANY_WEIGHT_SETS = 256  # more sets than any DiT has blocks: warn that parameters change identity per call


def compile_per_weights(compile_once: CompileOnce, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> CompiledFn:
    """`gm` compiled for the example inputs' parameters, and for others the first time it meets them."""
    pristine = copy_graph_module(gm)  # the passes move nodes of the graph they compile
    compiled, report = compile_once(gm, example_inputs, None)
    positions = [i for i, graph_input in enumerate(graph_inputs(gm)) if graph_input.kind is InputKind.PARAMETER]
    if not report.sparse_sites or not positions:
        return compiled
    return PerWeightsCompiled(compile_once, pristine, positions, report.graph_index, compiled, example_inputs)


@dataclasses.dataclass
class _Entry:
    parameters: list[weakref.ref]  # the parameters it was compiled for (an id can be reused once they are gone)
    compiled: CompiledFn


class PerWeightsCompiled:
    """Compiles a graph once per set of parameters it is called with, on first use."""

    def __init__(self, compile_once: CompileOnce, gm: torch.fx.GraphModule, positions: list[int], graph_index: int,
                 compiled: CompiledFn, example_inputs: list[Any]) -> None:
        self.compile_once, self.gm, self.positions, self.graph_index = compile_once, gm, positions, graph_index
        self.by_parameters: dict[tuple[int, ...], _Entry] = {}
        self._store(example_inputs, compiled)

    def __call__(self, *args: Any) -> Any:
        entry = self.by_parameters.get(self._key(args))
        if entry is None or any(ref() is not args[i] for ref, i in zip(entry.parameters, self.positions)):
            entry = self._compile(list(args))
        return entry.compiled(*args)

    def _key(self, args: Any) -> tuple[int, ...]:
        return tuple(id(args[i]) for i in self.positions)

    def _compile(self, args: list[Any]) -> _Entry:
        log.info("scalingattn: graph %d runs with another module's parameters (a repeated block): compiling it "
                 "for them, with masks of their own", self.graph_index)
        if len(self.by_parameters) == MANY_WEIGHT_SETS:
            log.warning("scalingattn: graph %d was called with %d sets of parameters: are parameters made anew "
                        "on every call? each set is compiled and calibrated", self.graph_index, MANY_WEIGHT_SETS)
        compiled, _ = self.compile_once(copy_graph_module(self.gm), args, self.graph_index)
        return self._store(args, compiled)

    def _store(self, args: list[Any], compiled: CompiledFn) -> _Entry:
        entry = _Entry([weakref.ref(args[i]) for i in self.positions], compiled)
        self.by_parameters[self._key(args)] = entry
        return entry
