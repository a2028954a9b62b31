"""The `scalingattn` dynamo backend: detect -> reorder -> calibrate (WEST) -> tune (FAST) -> rewrite -> inner compiler.

With `policy="dfsattn"` there is no calibration or tuning: the rewrite emits the DFSAttn op,
which picks its blocks at run time (`policies/dfs_registry.py` holds its state).

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
from torch._guards import detect_fake_mode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from .config import Config, InnerCompiler, MaskRule, Policy
from .cost_model import CostModel
from .passes.calibrate import graph_inputs, west_topology
from .passes.detect import detect_sites
from .passes.reorder import reorder_sites
from .passes.rewrite import rewrite_graph, rewrite_graph_dfs
from .ops import step_timesteps
from .passes.tune import SitePlan, plan_sites
from .policies.dfs_registry import DFSRegistry
from .policies.token_order import TokenOrder
from .report import PassReport, dfs_site_report, site_report

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

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any], mode: str | None = None
                 ) -> CompiledFn:
        if mode is not None:  # torch.compile(..., backend=ScalingAttnBackend(...), mode=...)
            self.config = dataclasses.replace(self.config, mode=mode)
        if any(_is_symbolic(x) for x in example_inputs):
            log.info("graph has symbolic shapes: specialising per concrete shape at call time")
            return _PerShapeCompiled(self, gm)
        return self.compile_static(gm, list(example_inputs))

    def compile_static(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> CompiledFn:
        """Run the passes on a graph whose example inputs have concrete shapes."""
        config = self.config
        sites = detect_sites(gm, config.token_grid)
        if config.policy is Policy.DFSATTN:
            return self._compile_dfsattn(gm, example_inputs, sites)
        gm, sites = reorder_sites(gm, sites, config.token_order)
        rewritable = [site for site in sites if site.rewritable]
        topology, origin, calibration_seconds = None, "no masks needed", 0.0
        if rewritable and config.sparse:
            if config.masks is MaskRule.WEST:
                # the on-disk cache's key has no token order: only raster topologies are cached
                raster = config.token_order is TokenOrder.RASTER
                calibration = config if raster else dataclasses.replace(config, cache=False)
                topology, origin, calibration_seconds = west_topology(gm, example_inputs, rewritable, calibration)
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

        compiled = _inner_compile(config, rewritten, example_inputs + _static_examples(extra_inputs, example_inputs))
        return lambda *args: compiled(*args, *extra_inputs)

    def _compile_dfsattn(self, gm: torch.fx.GraphModule, example_inputs: list[Any], sites: list) -> CompiledFn:
        """DFSAttn: every rewritable site not in `dense_layers` is reordered and calls the DFSAttn op;
        nothing is calibrated."""
        config = self.config
        rewritable = [site for site in sites if site.rewritable]
        timestep_input, timestep_max = _timestep_input(gm, example_inputs, config)
        timesteps = step_timesteps(timestep_max, config.num_steps, config.timesteps)
        cfg_batch = config.cfg_reuse and all(site.batch % 2 == 0 for site in rewritable)
        registry = DFSRegistry(config.dfs_schedule(), rewritable if timestep_input is not None else [],
                               timesteps.tolist(), cfg_batch)
        gm, sites = reorder_sites(gm, sites, config.token_order, names=registry.site_ids)
        report = PassReport(
            graph_index=len(self.reports), config=_config_dict(config), sites=[],
            topology_origin="DFSAttn: scored at run time from q and k", calibration_seconds=0.0, schedule="dfsattn",
            step_source=_step_source(timestep_input, config.num_steps, timestep_max, config),
            step_timesteps=timesteps, dfs=registry,
        )
        reasons = {site.name: site.dense_reason for site in sites}
        for layer, site in enumerate(rewritable):
            if site.name not in registry.site_ids:
                reasons[site.name] = (f"DFSAttn dense layer {layer} (option dense_layers)" if timestep_input is not None
                                      else "DFSAttn needs the model's timestep input to follow its step plan")
        cost = CostModel.for_device(rewritable[0].device) if rewritable else None
        for site in sites:
            report.sites.append(dfs_site_report(site, reasons[site.name] or registry, cost))
        rewritten = rewrite_graph_dfs(gm, sites, registry.site_ids, timestep_input) if registry.site_ids else gm
        self.reports.append(report)
        log.log(logging.WARNING if config.report else logging.DEBUG, "%s", report)
        return _WithState(_inner_compile(config, rewritten, example_inputs), registry)


@dataclasses.dataclass
class _WithState:
    """A compiled graph and the run-time state its ops look up by id (alive as long as the graph)."""

    compiled: CompiledFn
    state: Any

    def __call__(self, *args: Any) -> Any:
        return self.compiled(*args)


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
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], options: dict[str, Any] | None = None,
    mode: str | None = None,
) -> CompiledFn:
    """Entry point for `torch.compile(..., backend="scalingattn", options={...})` (or `mode=...`:
    torch.compile takes one of the two)."""
    return ScalingAttnBackend(**(options or {}))(gm, example_inputs, mode)


def _inner_compile(config: Config, gm: torch.fx.GraphModule, inputs: list[Any]) -> CompiledFn:
    compiler = config.compiler
    if compiler is InnerCompiler.INDUCTOR:
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, inputs, config_patches=list_mode_options(config.mode) if config.mode else None)
    if compiler is InnerCompiler.AOT_EAGER:
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, inputs)
    return gm.forward


def _static_examples(extra_inputs: list[torch.Tensor], example_inputs: list[Any]) -> list[torch.Tensor]:
    """The mask tensors as fake tensors of fixed shape in dynamo's fake mode.

    Handed over as real tensors, AOT autograd fakeifies them with fresh dynamic size symbols that
    dynamo's guards cannot name (no source): a guard on one fails the whole compile with
    "sources must not be empty for symbol sN".
    """
    fake_mode = detect_fake_mode(example_inputs)
    if fake_mode is None:
        return extra_inputs
    return [fake_mode.from_tensor(tensor, static_shapes=True) for tensor in extra_inputs]


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
    """The config as JSON values, the active policy's options only (user calibration inputs are
    summarised by their count)."""
    result = {}
    for field in dataclasses.fields(config):
        if field.name in config.foreign_options():
            continue
        value = getattr(config, field.name)
        if field.name == "calibration_inputs" and value is not None:
            value = f"{len(value)} user inputs"
        result[field.name] = value.value if isinstance(value, enum.Enum) else value
    return result
