"""The `scalingattn` dynamo backend: detect -> masks -> rewrite -> inner compiler.

`torch.compile(model, backend="scalingattn", options={...})` reaches
`scalingattn_backend` through the `torch_dynamo_backends` entry point (no import needed).
`ScalingAttnBackend(**options)` is the same backend as an object that keeps the reports.

Masks depend on sequence lengths. When dynamo hands over a graph with symbolic shapes
(its automatic-dynamic recompile after a shape change), the backend specialises it per
concrete input shape at call time, so every shape runs with masks made for it.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Sequence

import torch
import torch.fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from .config import Config, InnerCompiler
from .kernels.bitmask import pack_block_mask
from .masks import local_band_mask
from .passes.detect import detect_sites
from .passes.rewrite import rewrite_graph
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
        sites = detect_sites(gm, self.config.token_grid)
        report = PassReport(graph_index=len(self.reports), config=_config_dict(self.config), sites=[])
        mask_names, mask_tensors = [], []
        for site in sites:
            if not site.rewritable:
                report.sites.append(site_report(site, None, site.dense_reason))
                continue
            block_mask = local_band_mask(site, self.config.density)
            words = pack_block_mask(block_mask).to(site.device)
            mask_names.append(site.name)
            mask_tensors.append(words)
            report.masks[site.name] = words
            report.sites.append(site_report(site, block_mask, f"local band at density {self.config.density:g}"))
        self.reports.append(report)
        if self.config.report:
            log.warning("%s", report)  # asked for explicitly: shown at the default log level
        else:
            log.info("%s", report)

        rewritten = rewrite_graph(gm, sites, mask_names)
        compiled = _inner_compile(self.config.compiler, rewritten, example_inputs + mask_tensors)
        return lambda *args: compiled(*args, *mask_tensors)


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
    return {k: (v.value if hasattr(v, "value") else v) for k, v in dataclasses.asdict(config).items()}
