"""The `scalingattn` dynamo backend: detect -> calibrate (WEST) -> masks -> rewrite -> inner compiler.

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
from .kernels.bitmask import num_blocks, pack_block_mask
from .masks import local_band_mask, window_3d_mask, with_text_dense
from .passes.calibrate import west_topology
from .passes.detect import detect_sites
from .passes.rewrite import rewrite_graph
from .report import PassReport, site_report
from .sites import AttentionSite
from .topology import Topology

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
        if rewritable and config.density < 1.0:
            if config.masks is MaskRule.WEST:
                topology, origin, calibration_seconds = west_topology(gm, example_inputs, rewritable, config)
            else:
                origin = f"{config.masks.value} rule"
        report = PassReport(graph_index=len(self.reports), config=_config_dict(config), sites=[],
                            topology_origin=origin, calibration_seconds=calibration_seconds, topology=topology)
        mask_names, mask_tensors = [], []
        for site in sites:
            if not site.rewritable:
                report.sites.append(site_report(site, None, site.dense_reason))
                continue
            block_mask, recall, reason = self._site_mask(site, topology)
            words = pack_block_mask(block_mask).to(site.device)
            mask_names.append(site.name)
            mask_tensors.append(words)
            report.masks[site.name] = words
            report.sites.append(site_report(site, block_mask, reason, recall))
        self.reports.append(report)
        # asked for explicitly: shown at the default log level; else TORCH_LOGS="+scaling_compiler"
        log.log(logging.WARNING if config.report else logging.DEBUG, "%s", report)

        rewritten = rewrite_graph(gm, sites, mask_names)
        compiled = _inner_compile(config.compiler, rewritten, example_inputs + mask_tensors)
        return lambda *args: compiled(*args, *mask_tensors)

    def _site_mask(self, site: AttentionSite, topology: Topology | None):
        """(bool block mask (H, Nq, Nk), per-head calibration recall or None, reason) of a site."""
        density = self.config.density
        if density == 1.0:
            shape = (site.heads, num_blocks(site.q_len), num_blocks(site.kv_len))
            return torch.ones(shape, dtype=torch.bool), None, "density 1: every block"
        if self.config.masks is MaskRule.LOCAL_BAND:
            return local_band_mask(site, density), None, f"local band at density {density:g}"
        if self.config.masks is MaskRule.WINDOW_3D:
            grid = "3-D window" if site.token_grid else "no grid: 1-D band"
            return window_3d_mask(site, density), None, f"{grid} at density {density:g}"
        site_map = topology.sites[site.name]
        block_mask, levels = site_map.mask_for_density(density)
        block_mask = with_text_dense(block_mask, site.text_spans)
        reason = f"WEST ({site_map.source}) p {min(levels):.3f}..{max(levels):.3f}"
        return block_mask, site_map.recall(block_mask), reason


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
