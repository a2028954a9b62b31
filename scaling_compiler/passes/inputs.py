"""The graph's inputs: which are weights, which is the model's timestep, and the schedule's steps.

Dynamo's graph takes the model's parameters and buffers as placeholders beside the forward
arguments; each placeholder's `grapharg` source names which it is (`L['self']...._parameters['w']`
or `L['timestep']`). Calibration needs the weights (kept) and the activations (randomised); the
step-aware policies need the timestep input, which the rewritten graph reads at run time.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx

from ..sites import TimestepInput

TIMESTEP_ARGUMENT = "timestep"  # diffusers' DiTs all call it this


@dataclasses.dataclass(frozen=True)
class GraphInput:
    name: str  # the forward argument's name (or the parameter's), else the placeholder's
    is_weight: bool  # a parameter or buffer of the model


def graph_inputs(gm: torch.fx.GraphModule) -> list[GraphInput]:
    """Each placeholder's argument name and whether it is a weight, from dynamo's source of it."""
    result = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        grapharg = node.meta.get("grapharg")
        source = grapharg.source.name if grapharg is not None else node.name
        source = source() if callable(source) else source  # a method in torch 2.11, a property in 2.13
        is_weight = "._parameters[" in source or "._buffers[" in source
        name = source.rsplit("['", 1)[-1].rstrip("']") if "['" in source else node.name
        result.append(GraphInput(name, is_weight))
    return result


def find_timestep(gm: torch.fx.GraphModule, example_inputs: list[Any], timestep_max: float | None
                  ) -> TimestepInput | None:
    """The model's timestep input, with the first step's timestep (`timestep_max`, else 1000 when the
    example is above 1, else 1); None when the graph has none."""
    for position, (graph_input, example) in enumerate(zip(graph_inputs(gm), example_inputs)):
        if (graph_input.name == TIMESTEP_ARGUMENT and not graph_input.is_weight
                and isinstance(example, torch.Tensor) and example.numel() >= 1):
            default = 1000.0 if float(example.float().abs().max()) > 1.0 else 1.0
            return TimestepInput(position, timestep_max or default)
    return None


def step_timesteps(timestep_max: float, steps: int, timesteps: tuple[float, ...] | None) -> torch.Tensor:
    """float32 (steps,): the given sampler timesteps, else `steps` even bins from timestep_max to 0."""
    if timesteps is not None:
        return torch.tensor(timesteps, dtype=torch.float32)
    return timestep_max * (1.0 - (torch.arange(steps, dtype=torch.float32) + 0.5) / steps)


def step_source(timestep: TimestepInput | None, steps: int, given: bool) -> str:
    """The report's sentence on what picks a step's masks at run time."""
    if timestep is None:
        return "no timestep input: one schedule for every step"
    if given:
        return f"timestep input #{timestep.position}, nearest of the {steps} given timesteps"
    return f"timestep input #{timestep.position}, nearest of {steps} even bins from {timestep.timestep_max:g} to 0"
