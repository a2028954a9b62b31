"""The graph's inputs: which are model state, which are activations, which is the timestep, and the steps.

Dynamo's graph takes the model's parameters and buffers as placeholders beside the forward
arguments (and, on a symbolic-shape graph, the sizes as SymInt placeholders). Each placeholder's
`grapharg` records where dynamo found it: a source chain such as
`L['self']._modules['q']._parameters['weight']` or `L['timestep']`, and the real object.
Calibration needs to know which inputs are model state (kept) and which are the caller's
floating activations (randomised); the step-aware policies need the timestep input, which the
rewritten graph reads at run time.

Dynamo removes the `grapharg` records once the backend returns (`OutputGraph.cleanup`), and a
symbolic-shape graph is only specialised per shape later, at call time (backend.py). So the
backend classifies the inputs when dynamo hands the graph over (`annotate_inputs`) and keeps the
result in each placeholder's own meta, which survives the cleanup and every graph copy: static
and symbolic graphs, and each per-shape copy, are then read the same way.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Any

import torch
import torch.fx

from ..sites import TimestepInput

TIMESTEP_ARGUMENT = "timestep"  # diffusers' DiTs all call it this
META_KEY = "scalingattn_input"  # the placeholder meta entry holding its GraphInput


class InputKind(str, enum.Enum):
    ACTIVATION = "activation"  # a tensor the caller passes: a forward argument or an item of one
    PARAMETER = "parameter"  # an nn.Parameter of the model
    BUFFER = "buffer"  # a registered buffer of the model
    CONSTANT = "constant"  # other model state: tensor attributes of modules, globals, lifted constants
    SCALAR = "scalar"  # a caller's Python number: a SymInt size, or a float/int passed as a 0-d tensor
    MODEL_SCALAR = "model scalar"  # a Python number of the model (a scale, dropout p) passed as a 0-d tensor


@dataclasses.dataclass(frozen=True)
class GraphInput:
    name: str  # the forward argument's name (the key inside a dict argument), else the attribute's
    kind: InputKind
    source: str  # dynamo's source name, or the placeholder's name where dynamo recorded none

    @property
    def is_weight(self) -> bool:
        """Model state: kept by calibration and hashed into the cache key."""
        return self.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT)

    @property
    def is_activation(self) -> bool:
        return self.kind is InputKind.ACTIVATION


def annotate_inputs(gm: torch.fx.GraphModule) -> list[GraphInput]:
    """Classify each placeholder while dynamo's records are still there, and keep the result in its meta.

    Placeholders already annotated keep their classification (a copy of an annotated graph).
    """
    result = []
    for node in _placeholders(gm):
        graph_input = node.meta.get(META_KEY)
        if not isinstance(graph_input, GraphInput):
            graph_input = classify_placeholder(node)
            node.meta[META_KEY] = graph_input
        result.append(graph_input)
    return result


def graph_inputs(gm: torch.fx.GraphModule) -> list[GraphInput]:
    """Each placeholder's classification: the one `annotate_inputs` kept, else read from the node now."""
    return [node.meta[META_KEY] if isinstance(node.meta.get(META_KEY), GraphInput) else classify_placeholder(node)
            for node in _placeholders(gm)]


def classify_placeholder(node: torch.fx.Node) -> GraphInput:
    """One placeholder's kind and name, from dynamo's `grapharg` when present."""
    grapharg = node.meta.get("grapharg")
    if grapharg is None:
        return _classify_without_source(node)
    source = grapharg.source
    source_name = _source_name(source)
    chain = _chain(source)
    from_input = type(chain[-1]).__name__ == "LocalSource" and getattr(chain[-1], "is_input", True)
    model_state = not from_input or any(_is_module_source(s) for s in chain)
    if not getattr(grapharg, "is_tensor", True) or getattr(grapharg, "pass_arg_as_tensor", False):
        kind = InputKind.MODEL_SCALAR if model_state and getattr(grapharg, "pass_arg_as_tensor", False) \
            else InputKind.SCALAR
        return GraphInput(_argument_name(source), kind, source_name)
    members = [getattr(s, "member", None) for s in chain]
    if "_parameters" in members or isinstance(_example(grapharg), torch.nn.Parameter):
        return GraphInput(_argument_name(source), InputKind.PARAMETER, source_name)
    if "_buffers" in members:
        return GraphInput(_argument_name(source), InputKind.BUFFER, source_name)
    if model_state:
        return GraphInput(_argument_name(source), InputKind.CONSTANT, source_name)
    return GraphInput(_argument_name(source), InputKind.ACTIVATION, source_name)


def find_timestep(gm: torch.fx.GraphModule, example_inputs: list[Any], timestep_max: float | None
                  ) -> TimestepInput | None:
    """The model's timestep input, with the first step's timestep (`timestep_max`, else 1000 when the
    example is above 1, else 1); None when the graph has none."""
    for position, (graph_input, example) in enumerate(zip(graph_inputs(gm), example_inputs)):
        if (graph_input.name == TIMESTEP_ARGUMENT and graph_input.is_activation
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


# ---------------------------------------------------------------------------------------
# Reading dynamo's sources
# ---------------------------------------------------------------------------------------


def _placeholders(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [node for node in gm.graph.nodes if node.op == "placeholder"]


def _source_name(source: Any) -> str:
    name = source.name
    return name() if callable(name) else name  # a method in torch 2.11, a property in 2.13


def _chain(source: Any) -> list[Any]:
    """The source and its bases, outermost first: [..._parameters['weight'], ..._parameters, ..., L['self']]."""
    chain = [source]
    while getattr(chain[-1], "base", None) is not None:
        chain.append(chain[-1].base)
    return chain


def _is_module_source(source: Any) -> bool:
    """Whether dynamo reached `source` through an nn.Module (model state, not a caller's value)."""
    guard_source = getattr(source, "guard_source", None)
    guard_source = guard_source() if callable(guard_source) else guard_source
    checks = ("is_specialized_nn_module", "is_unspecialized_nn_module", "is_fsdp_module")
    return guard_source is not None and any(getattr(guard_source, check, lambda: False)() for check in checks)


def _argument_name(source: Any) -> str:
    """The innermost key of the source: `timestep` for `L['timestep']` or `L['kwargs']['timestep']`,
    `pos[1]` for `L['pos'][1]`, `weight` for `..._parameters['weight']`."""
    index = getattr(source, "index", None)
    if isinstance(index, str):
        return index
    if isinstance(index, int) and getattr(source, "base", None) is not None:
        return f"{_argument_name(source.base)}[{index}]"
    for attribute in ("member", "local_name", "global_name"):
        value = getattr(source, attribute, None)
        if isinstance(value, str):
            return value
    base = getattr(source, "base", None)
    return _argument_name(base) if base is not None else _source_name(source)


def _example(grapharg: Any) -> Any:
    """The real object dynamo recorded (held weakly by dynamo: may be gone)."""
    try:
        return grapharg.example
    except Exception:  # noqa: BLE001  (a dead weak reference raises; the source chain still answers)
        return None


def _classify_without_source(node: torch.fx.Node) -> GraphInput:
    """A placeholder with no dynamo record (a graph not made by dynamo): judged by its value and name.

    Dynamo names placeholders after their sources (`L_self_modules_q_parameters_weight_`), which
    still tells parameters and buffers apart; anything else that is a tensor is an argument.
    """
    value = node.meta.get("val", node.meta.get("example_value"))
    name = str(node.target)
    if isinstance(value, (torch.SymInt, torch.SymFloat, int, float)):
        return GraphInput(name, InputKind.SCALAR, name)
    if "_parameters_" in name:
        return GraphInput(name, InputKind.PARAMETER, name)
    if "_buffers_" in name:
        return GraphInput(name, InputKind.BUFFER, name)
    if name.startswith("L_") and name.endswith("_"):
        name = name[2:-1]
    return GraphInput(name, InputKind.ACTIVATION, str(node.target))
