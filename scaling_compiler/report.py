"""PassReport: what the backend did to one compiled graph, as a table and as JSON."""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch
from tabulate import tabulate

from .cost_model import CostModel
from .kernels.bitmask import BLOCK_SIZE
from .ops import step_masks
from .passes.tune import SitePlan
from .policies.dfs_registry import DFSRegistry
from .sites import AttentionSite
from .topology import Topology


@dataclasses.dataclass
class SiteReport:
    name: str
    kind: str  # self | joint | cross
    pattern: str  # sdpa | softmax
    shape: tuple[int, int, int, int]  # (B, H, Sq, D)
    q_stride: tuple[int, ...]
    kv_len: int
    kv_heads: int
    dtype: str
    scale: float | None
    attn_mask: str | None
    is_causal: bool
    dropout_p: float
    token_grid: tuple[int, int, int] | None
    grid_source: str
    text_spans: tuple[tuple[int, int], ...]
    status: str  # "sparse" | "dense"
    reason: str  # why dense, or which mask rule made it sparse
    head_densities: list[float]  # kept fraction of token pairs per head (1.0 for dense sites)
    head_recall: list[float] | None  # calibration attention mass kept per head (WEST), else None
    step_densities: list[float] | None  # mean density over heads at 10 evenly spaced steps
    dense_flops: int
    flops_saved: int
    predicted_ms: float | None  # cost model, mean over steps (None for dense sites)
    dense_ms: float | None
    token_order: str  # order of the video tokens the attention sees: raster | morton | hilbert

    @property
    def density(self) -> float:
        return sum(self.head_densities) / len(self.head_densities) if self.head_densities else 1.0


@dataclasses.dataclass
class PassReport:
    graph_index: int  # 0 for the first graph this backend compiled, 1 for the next...
    config: dict[str, Any]
    sites: list[SiteReport]
    topology_origin: str  # where the masks came from: rule, topology file, cache or calibration
    calibration_seconds: float  # spent on WEST calibration while compiling this graph
    schedule: str | None  # "fast" | "uniform" | None (no sparse site)
    step_source: str  # what picks the step's masks at run time
    mask_bytes: int = 0  # device memory of the masks and step tables the graph takes as inputs
    # the plans of the sparse sites and the WEST topology (not in the JSON)
    plans: dict[str, SitePlan] = dataclasses.field(default_factory=dict, repr=False)
    step_timesteps: torch.Tensor | None = dataclasses.field(default=None, repr=False)  # (steps,)
    topology: Topology | None = dataclasses.field(default=None, repr=False)
    # DFSAttn's run-time state: its fields below grow as the compiled graph runs
    dfs: DFSRegistry | None = dataclasses.field(default=None, repr=False)

    @property
    def policy(self) -> str:
        return self.config["policy"]

    @property
    def token_order(self) -> str:
        return self.config["token_order"]

    @property
    def refresh_steps(self) -> list[int] | None:
        """DFSAttn: the steps whose q and k recompute the masks."""
        return self.dfs.refresh_steps if self.dfs else None

    @property
    def keep_ratio_per_step(self) -> list[float | None] | None:
        """DFSAttn: keep ratio of the masks in use at each step (None on dense steps)."""
        return self.dfs.keep_ratio_per_step if self.dfs else None

    @property
    def scoring_seconds(self) -> float | None:
        """DFSAttn: time spent so far scoring blocks and building masks on refresh steps (device-synchronised)."""
        return self.dfs.scoring_seconds if self.dfs else None

    def masks_at(self, timestep: float | None = None) -> dict[str, torch.Tensor]:
        """Packed masks (H, Nq, W) each sparse site uses at `timestep` (None: the first step)."""
        steps = self.step_timesteps
        t = torch.tensor([float(steps[0]) if timestep is None else float(timestep)])
        masks = {}
        for name, plan in self.plans.items():
            words = plan.words
            step_times = steps if plan.level_index.shape[0] == len(steps) else steps[:1]
            masks[name] = step_masks(words, plan.level_index, t, step_times)
        return masks

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        return self.masks_at(None)

    @property
    def sparse_sites(self) -> list[SiteReport]:
        return [s for s in self.sites if s.status == "sparse"]

    @property
    def dense_sites(self) -> list[SiteReport]:
        return [s for s in self.sites if s.status == "dense"]

    @property
    def attention_flops(self) -> int:
        return sum(s.dense_flops for s in self.sites)

    @property
    def flops_saved(self) -> int:
        return sum(s.flops_saved for s in self.sites)

    @property
    def predicted_speedup(self) -> float | None:
        """Predicted attention speedup over dense for the sparse sites (cost model)."""
        sparse = [s for s in self.sites if s.predicted_ms is not None]
        if not sparse:
            return None
        return sum(s.dense_ms for s in sparse) / sum(s.predicted_ms for s in sparse)

    def to_dict(self) -> dict[str, Any]:
        return {
            "graph_index": self.graph_index,
            "config": self.config,
            "policy": self.policy,
            "token_order": self.token_order,
            "dfsattn": self.dfs.summary() if self.dfs else None,
            "topology_origin": self.topology_origin,
            "calibration_seconds": self.calibration_seconds,
            "schedule": self.schedule,
            "step_source": self.step_source,
            "predicted_speedup": self.predicted_speedup,
            "mask_bytes": self.mask_bytes,
            "attention_flops": self.attention_flops,
            "flops_saved": self.flops_saved,
            "sites": [dataclasses.asdict(s) | {"density": s.density} for s in self.sites],
        }

    def to_json(self, path: str | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    def __str__(self) -> str:
        rows = [
            [
                s.name, s.kind, "x".join(map(str, s.shape)) + ("" if s.kv_len == s.shape[2] else f" kv{s.kv_len}"),
                "x".join(map(str, s.token_grid)) if s.token_grid else "-", s.token_order,
                s.status, f"{s.density:.3f}", _heads(s.head_densities),
                _heads(s.head_recall) if s.head_recall else "-", f"{s.flops_saved / 1e9:.3g}", s.reason,
            ]
            for s in self.sites
        ]
        table = tabulate(
            rows, headers=["site", "kind", "B x H x S x D", "grid", "order", "status", "density", "per-head density",
                   "per-head recall", "GFLOP saved", "reason"]
        )
        saved = self.flops_saved / self.attention_flops if self.attention_flops else 0.0
        summary = (
            f"scalingattn graph {self.graph_index}: {len(self.sparse_sites)} sparse, {len(self.dense_sites)} dense "
            f"sites; attention FLOPs {self.attention_flops / 1e9:.3g} G, predicted saved {saved:.1%}"
            + (f", predicted attention speedup {self.predicted_speedup:.2f}x" if self.predicted_speedup else "")
            + f"\nmasks: {self.topology_origin} ({self.mask_bytes / 2**20:.2f} MiB on the device); "
            f"schedule: {self.schedule or '-'}; steps: {self.step_source}"
            + (f"\npolicy: {self.policy}" if not self.dfs else
               f"\npolicy: dfsattn; refresh steps {self.refresh_steps}, keep ratios "
               f"{'/'.join(f'{r:g}' for r in self.dfs.schedule.keep_ratios)}; scoring so far "
               f"{self.scoring_seconds:.3g} s over {len(self.dfs.cache.refreshes)} site refreshes")
        )
        return f"{summary}\n{table}"


def site_report(site: AttentionSite, plan: SitePlan | str) -> SiteReport:
    """Report one site: its plan, or the reason (a string) why it stays dense."""
    shape = (site.batch, site.heads, site.q_len, site.head_dim)
    dense = isinstance(plan, str)
    if dense:
        densities, recall, steps, saved, predicted, dense_ms = [1.0] * max(site.heads, 1), None, None, 0, None, None
    else:
        per_level = kept_pair_fraction(plan.block_masks, site.q_len, site.kv_len)  # (L, H)
        per_step = torch.gather(per_level, 0, plan.level_index)  # (steps, H)
        densities = per_step.mean(0).tolist()
        recall, steps = plan.recall, plan.step_densities()
        saved = round(site.dense_flops * (1.0 - sum(densities) / len(densities)))
        predicted, dense_ms = plan.predicted_ms, plan.dense_ms
    return SiteReport(
        name=site.name, kind=site.kind.value, pattern=site.pattern.value, shape=shape, q_stride=site.q_stride,
        kv_len=site.kv_len, kv_heads=site.kv_heads, dtype=str(site.dtype).removeprefix("torch."), scale=site.scale,
        attn_mask=site.attn_mask, is_causal=site.is_causal, dropout_p=site.dropout_p,
        token_grid=site.token_grid, grid_source=site.grid_source, text_spans=site.text_spans,
        status="dense" if dense else "sparse", reason=plan if dense else plan.reason, head_densities=densities,
        head_recall=recall, step_densities=steps, dense_flops=site.dense_flops, flops_saved=saved,
        predicted_ms=predicted, dense_ms=dense_ms, token_order=site.token_order,
    )


def dfs_site_report(site: AttentionSite, registry: DFSRegistry | str, cost: CostModel) -> SiteReport:
    """Report one site under DFSAttn: the plan's nominal densities, or the reason (a string) it stays dense.

    Masks are chosen at run time, so the densities here are the schedule's top-k budgets (alike for
    every head); what really ran is in the report's `dfs` (`density_per_step`).
    """
    if isinstance(registry, str):
        return site_report(site, registry)
    per_step = registry.nominal_step_densities(site)
    mean = sum(per_step) / len(per_step)
    picks = torch.linspace(0, len(per_step) - 1, min(10, len(per_step))).round().long().tolist()
    dense_ms = cost.dense_ms(site.dense_flops)
    step_ms = [dense_ms if p.dense else cost.sparse_ms(site.dense_flops, torch.tensor([d]))
               for p, d in zip(registry.plan, per_step)]
    schedule = registry.schedule
    dense = {0: "no dense steps", 1: "dense step 0"}.get(schedule.dense_steps,
                                                         f"dense steps 0-{schedule.dense_steps - 1}")
    reason = (f"DFSAttn: {dense}, refresh at steps {registry.refresh_steps} keeping "
              f"{'/'.join(f'{r:g}' for r in schedule.keep_ratios)}"
              + (", CFG halves share masks" if registry.cache.cfg_batch and schedule.cfg_reuse else ""))
    return dataclasses.replace(
        site_report(site, reason), status="sparse", head_densities=[mean] * site.heads,
        step_densities=[round(per_step[i], 4) for i in picks], flops_saved=round(site.dense_flops * (1.0 - mean)),
        predicted_ms=sum(step_ms) / len(step_ms), dense_ms=dense_ms,
    )


def kept_pair_fraction(block_mask: torch.Tensor, q_len: int, kv_len: int) -> torch.Tensor:
    """Per head, the fraction of (query, key) token pairs inside kept blocks (tails counted exactly)."""

    def block_sizes(n: int) -> torch.Tensor:
        sizes = torch.full((-(-n // BLOCK_SIZE),), BLOCK_SIZE, dtype=torch.float64)
        sizes[-1] = n - BLOCK_SIZE * (len(sizes) - 1)
        return sizes

    pairs = block_sizes(q_len)[:, None] * block_sizes(kv_len)[None, :]
    return (block_mask.to(torch.float64) * pairs).sum(dim=(-2, -1)) / (q_len * kv_len)


def _heads(densities: list[float]) -> str:
    shown = " ".join(f"{d:.2f}" for d in densities[:8])
    return shown + (" ..." if len(densities) > 8 else "")
