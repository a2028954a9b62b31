"""The dfsattn policy: masks scored at run time from q and k (DFSAttn), nothing calibrated.

Every rewritable self/joint site that is not one of `dense_layers` calls the DFSAttn op with the
model's timestep and an id naming its run-time state (`registry.py`): dense SDPA on the first
steps, masks scored on refresh steps and cached in between. Without a timestep input the plan
cannot be followed and every site stays dense.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx

from ...cost_model import CostModel
from ...passes.inputs import step_source, step_timesteps
from ...sites import GraphRecord, Site, SitePlan, SitePlanSummary
from ..base import Policy, PolicyOptions
from ..token_order import TokenOrder
from . import op  # noqa: F401  (registers torch.ops.scaling_compiler.dfs_attention)
from .registry import DFSRegistry
from .schedule import (
    DEFAULT_DENSE_LAYERS, DEFAULT_DENSE_STEPS, DEFAULT_KEEP_RATIOS, DEFAULT_REFRESH_INTERVAL, DFSSchedule,
)

_DFS_OP = torch.ops.scaling_compiler.dfs_attention.default


@dataclasses.dataclass(frozen=True)
class DFSAttnOptions(PolicyOptions):
    dense_steps: int = DEFAULT_DENSE_STEPS
    """dfsattn: the first steps that run dense attention."""

    refresh_interval: int = DEFAULT_REFRESH_INTERVAL
    """dfsattn: steps between mask refreshes (refresh i at step dense_steps + i * refresh_interval)."""

    keep_ratios: tuple[float, ...] = DEFAULT_KEEP_RATIOS
    """dfsattn: fraction of key blocks kept per head and query block at each refresh, in order;
    the last masks serve to the end."""

    dense_layers: tuple[int, ...] = DEFAULT_DENSE_LAYERS
    """dfsattn: indices (among the rewritable self/joint attention sites) that always run dense."""

    cfg_reuse: bool = True
    """dfsattn: an even batch is CFG's [cond, uncond] halves: masks are scored on the cond half
    and reused by the uncond half."""

    def __post_init__(self) -> None:
        schedule = DFSSchedule(**dataclasses.asdict(self))  # validates every field (the one place)
        object.__setattr__(self, "keep_ratios", schedule.keep_ratios)
        object.__setattr__(self, "dense_layers", schedule.dense_layers)

    def schedule(self, num_steps: int) -> DFSSchedule:
        return DFSSchedule(num_steps=num_steps, **dataclasses.asdict(self))


@dataclasses.dataclass
class DFSPlan(SitePlan):
    registry: DFSRegistry
    site_id: int
    cost: CostModel

    def emit(self, rewriter, site: Site, q, k, v, key_padding) -> torch.fx.Node:
        return rewriter.graph.call_function(_DFS_OP, (q, k, v, rewriter.timestep, self.site_id, site.scale,
                                                      key_padding))

    def fp8_refusal(self) -> str | None:
        return "DFSAttn's op (dense steps, masks scored at run time) has no FP8 path"

    def summary(self, site: Site) -> SitePlanSummary:
        """The plan's nominal densities: masks are chosen at run time, so these are the schedule's top-k
        budgets (alike for every head); what really ran is in the registry (`density_per_step`)."""
        registry = self.registry
        per_step = registry.nominal_step_densities(site)
        mean = sum(per_step) / len(per_step)
        picks = torch.linspace(0, len(per_step) - 1, min(10, len(per_step))).round().long().tolist()
        cost = self.cost
        dense_ms = cost.dense_ms(site.dense_flops)
        step_ms = [dense_ms if p.dense else cost.sparse_ms(site.dense_flops, torch.tensor([d]))
                   for p, d in zip(registry.plan, per_step)]
        schedule = registry.schedule
        dense = {0: "no dense steps", 1: "dense step 0"}.get(schedule.dense_steps,
                                                             f"dense steps 0-{schedule.dense_steps - 1}")
        reason = (f"DFSAttn: {dense}, refresh at steps {registry.refresh_steps} keeping "
                  f"{'/'.join(f'{r:g}' for r in schedule.keep_ratios)}"
                  + (", CFG halves share masks" if registry.cache.cfg_batch and schedule.cfg_reuse else ""))
        return SitePlanSummary(reason=reason, head_densities=[mean] * site.heads, head_recall=None,
                               step_densities=[round(per_step[i], 4) for i in picks],
                               predicted_ms=sum(step_ms) / len(step_ms), dense_ms=dense_ms)


class DFSAttnPolicy(Policy):
    name = "dfsattn"
    options_class = DFSAttnOptions
    default_token_order = TokenOrder.HILBERT
    report_key = "dfsattn"

    def admit(self, graph: GraphRecord) -> None:
        """Dense layers (and every site, without a timestep input) stay dense. The layer index of a site
        is its position among the rewritable sites, kept by name for `plan` (reordering replaces sites)."""
        graph.policy_state = [site.name for site in graph.rewritable]
        for layer, site in enumerate(graph.rewritable):
            if graph.timestep is None:
                site.dense_reason = "DFSAttn needs the model's timestep input to follow its step plan"
            elif layer in self.options.dense_layers:
                site.dense_reason = f"DFSAttn dense layer {layer} (option dense_layers)"
            elif site.requires_grad:
                site.dense_reason = "inputs require grad (DFSAttn's run-time scoring has no backward)"

    def plan(self, graph: GraphRecord) -> None:
        config = self.config
        timestep_max = graph.timestep.timestep_max if graph.timestep else (config.timestep_max or 1000.0)
        timesteps = step_timesteps(timestep_max, config.num_steps, config.timesteps)
        by_name = {site.name: site for site in graph.sites}
        layers = [by_name[name] for name in graph.policy_state] if graph.timestep is not None else []
        cfg_batch = self.options.cfg_reuse and all(site.batch % 2 == 0 for site in layers)
        registry = DFSRegistry(self.options.schedule(config.num_steps), layers, timesteps.tolist(), cfg_batch)
        for site in graph.rewritable:
            site.plan = DFSPlan(registry, registry.site_ids[site.name], self.cost_model(site.device))
        graph.policy_state = registry
        graph.masks_origin = "DFSAttn: scored at run time from q and k"
        graph.schedule = "dfsattn"
        graph.step_timesteps = timesteps
        graph.step_source = step_source(graph.timestep, config.num_steps, config.timesteps is not None)
