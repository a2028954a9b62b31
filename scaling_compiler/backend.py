"""The `scalingattn` dynamo backend: detect -> calibrate (WEST) -> tune (FAST) -> rewrite -> inner compiler.

`torch.compile(model, backend="scalingattn", options={...})` reaches
`scalingattn_backend` through the `torch_dynamo_backends` entry point (no import needed).
`ScalingAttnBackend(**options)` is the same backend as an object that keeps the reports.

Masks depend on sequence lengths. When dynamo hands over a graph with symbolic shapes
(its automatic-dynamic recompile after a shape change), the backend specialises it per
concrete input shape at call time, so every shape runs with masks made for it.
"""
from __future__ import annotations

import dataclasses
import enum
import logging
from typing import Any, Callable, Sequence

import torch
import torch.fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from .config import Config, InnerCompiler, MaskRule
from .cost_model import CostModel
from .passes.calibrate import graph_inputs, west_topology
from .passes.detect import detect_sites
from .passes.rewrite import rewrite_graph
from .ops import step_timesteps
from .passes.tune import SitePlan, plan_sites
from .report import PassReport, site_report

log = logging.getLogger(__name__)

CompiledFn = Callable[..., Any]


class ScalingAttnBackend:
    """A torch.compile backend object: `torch.compile(model, backend=ScalingAttnBackend(density=0.5))`."""

    def __init__(self, **options: Any) -> None:
        self.config = Config.from_options(options)
        self.reports: list[PassReport] = []

    @property
    def report(self) -> PassReport | None:
        """The report of the most recently compiled graph."""
        return self.reports[-1] if self.reports else None

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> CompiledFn:
        if any(_is_symbolic(x) for x in example_inputs):
            log.info("graph has symbolic shapes: specialising per concrete shape at call time")
            return _PerShapeCompiled(self, gm)
        return self.compile_static(gm, list(example_inputs))

    def compile_static(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> CompiledFn:
        """Run the passes on a graph whose example inputs have concrete shapes."""
        config = self.config
        sites = detect_sites(gm, config.token_grid)
        rewritable = [site for site in sites if site.rewritable]
        topology, origin, calibration_seconds = None, "no masks needed", 0.0
        if rewritable and config.sparse:
            if config.masks is MaskRule.WEST:
                topology, origin, calibration_seconds = west_topology(gm, example_inputs, rewritable, config)
            else:
                origin = f"{config.masks.value} rule"
        timestep_input, timestep_max = _timestep_input(gm, example_inputs, config)
        steps = config.num_steps if timestep_input is not None else 1
        timesteps = step_timesteps(timestep_max, steps, config.timesteps if timestep_input is not None else None)
        plans, schedule = ({}, None)
        if rewritable:
            cost = CostModel.for_device(rewritable[0].device)
            plans, schedule = plan_sites(rewritable, topology, config, steps, cost)
        sparse_plans = {name: plan for name, plan in plans.items() if isinstance(plan, SitePlan)}

        report = PassReport(
            graph_index=len(self.reports), config=_config_dict(config), sites=[], topology_origin=origin,
            calibration_seconds=calibration_seconds,
            schedule=schedule.kind if schedule else None,
            step_source=_step_source(timestep_input, steps, timestep_max, config),
            plans=sparse_plans, step_timesteps=timesteps, topology=topology,
        )
        for site in sites:
            plan = plans.get(site.name, site.dense_reason)
            report.sites.append(site_report(site, plan))
        rewritten, extra_inputs = rewrite_graph(gm, sites, sparse_plans, timestep_input, timesteps)
        report.mask_bytes = sum(t.numel() * t.element_size() for t in extra_inputs)
        self.reports.append(report)
        # asked for explicitly: shown at the default log level; else TORCH_LOGS="+scaling_compiler"
        log.log(logging.WARNING if config.report else logging.DEBUG, "%s", report)

        compiled = _inner_compile(config.compiler, rewritten, example_inputs + extra_inputs)
        return lambda *args: compiled(*args, *extra_inputs)


class _PerShapeCompiled:
    """Compiles a symbolic-shape graph once per concrete input shape, on first use."""

    def __init__(self, backend: ScalingAttnBackend, gm: torch.fx.GraphModule) -> None:
        self.backend, self.gm = backend, gm
        self.by_shape: dict[tuple, CompiledFn] = {}

    def __call__(self, *args: Any) -> Any:
        key = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args)
        compiled = self.by_shape.get(key)
        if compiled is None:
            gm = torch.fx.GraphModule(self.gm, _copy_graph(self.gm.graph))
            with torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True) as mode:
                FakeTensorProp(gm, mode).propagate(*args)
            compiled = self.by_shape[key] = self.backend.compile_static(gm, list(args))
        return compiled(*args)


def scalingattn_backend(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], options: dict[str, Any] | None = None
) -> CompiledFn:
    """Entry point for `torch.compile(..., backend="scalingattn", options={...})`."""
    return ScalingAttnBackend(**(options or {}))(gm, example_inputs)


def _inner_compile(compiler: InnerCompiler, gm: torch.fx.GraphModule, inputs: list[Any]) -> CompiledFn:
    if compiler is InnerCompiler.INDUCTOR:
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, inputs)
    if compiler is InnerCompiler.AOT_EAGER:
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, inputs)
    return gm.forward


def _timestep_input(gm: torch.fx.GraphModule, example_inputs: list[Any], config: Config) -> tuple[int | None, float]:
    """Position of the model's `timestep` input among the graph inputs, and its value at step 0."""
    for position, ((name, is_weight), example) in enumerate(zip(graph_inputs(gm), example_inputs)):
        if name == "timestep" and not is_weight and isinstance(example, torch.Tensor) and example.numel() >= 1:
            default = 1000.0 if float(example.float().abs().max()) > 1.0 else 1.0
            return position, config.timestep_max or default
    return None, config.timestep_max or 1000.0


def _step_source(timestep_input: int | None, steps: int, timestep_max: float, config: Config) -> str:
    if timestep_input is None:
        return "no timestep input: one schedule for every step"
    if config.timesteps is not None:
        return f"timestep input #{timestep_input}, nearest of the {steps} given timesteps"
    return f"timestep input #{timestep_input}, nearest of {steps} even bins from {timestep_max:g} to 0"


def _is_symbolic(x: Any) -> bool:
    if isinstance(x, torch.SymInt):
        return True
    return isinstance(x, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in x.shape)


def _copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    copy = torch.fx.Graph()
    copy.output(copy.graph_copy(graph, {}))
    return copy


def _config_dict(config: Config) -> dict[str, Any]:
    """The config as JSON values (user calibration inputs are summarised by their count)."""
    result = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name == "calibration_inputs" and value is not None:
            value = f"{len(value)} user inputs"
        result[field.name] = value.value if isinstance(value, enum.Enum) else value
    return result
