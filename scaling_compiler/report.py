"""PassReport: what the backend did to one compiled graph, as a table and as JSON; and the summary
of all graphs a backend compiled (how many dynamo made, why it broke the model, where attention is).

The figures are kept from contradicting each other: predicted times come from the fraction the
masks really keep (plan.py), a site that keeps every block says so, and when a site's block grid
is too coarse for the density asked (one key block per query block is always kept) a note says
why its density is higher.
"""
from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

from .kernels.bitmask import num_blocks
from .policies import POLICIES
from .policies.base import PolicyState
from .sites import FP8, GraphRecord, Site, SitePlan


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
    requires_grad: bool  # q, k or v requires grad: a training graph, autograd runs the site's backward
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
    attention_dtype: str  # what the attention computes in: "fp8" (option attention_dtype), else `dtype`
    fp8_reason: str | None  # option attention_dtype "fp8" asked for it: why this site does not run FP8
    model_heads: tuple[int, ...] | None = None  # under Ulysses: which of the model's heads this rank's site holds

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
    subgraph_attention: int = 0  # SDPA calls inside subgraphs (activation checkpointing): not rewritten, dense
    # the graph_index of the same dynamo graph compiled for the first parameters it ran with, when this is
    # its compile for another module's (a repeated block, see per_weights.py); None for a graph's first
    same_graph_as: int | None = None
    # the plans of the sparse sites, the step timesteps, WEST's topology (not in the JSON)
    plans: dict[str, SitePlan] = dataclasses.field(default_factory=dict, repr=False)
    step_timesteps: torch.Tensor | None = dataclasses.field(default=None, repr=False)  # (steps,)
    topology: Any = dataclasses.field(default=None, repr=False)
    # the policy's run-time state (DFSAttn: its DFSRegistry, whose figures grow as the graph runs)
    policy_state: Any = dataclasses.field(default=None, repr=False)

    @property
    def policy(self) -> str:
        return self.config["policy"]

    @property
    def token_order(self) -> str:
        return self.config["token_order"]

    def masks_at(self, timestep: float | None = None) -> dict[str, torch.Tensor]:
        """Packed masks (H, Nq, W) each sparse site uses at `timestep` (None: the first step); sites
        whose masks are chosen at run time are left out."""
        t = float(self.step_timesteps[0]) if timestep is None else float(timestep)
        masks = {name: plan.masks_at(t) for name, plan in self.plans.items()}
        return {name: mask for name, mask in masks.items() if mask is not None}

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
            **{policy.report_key: None for policy in POLICIES.values() if policy.report_key},
            **(self.policy_state.report_json() if isinstance(self.policy_state, PolicyState) else {}),
            "topology_origin": self.topology_origin,
            "calibration_seconds": self.calibration_seconds,
            "schedule": self.schedule,
            "step_source": self.step_source,
            "predicted_speedup": self.predicted_speedup,
            "mask_bytes": self.mask_bytes,
            "subgraph_attention": self.subgraph_attention,
            "same_graph_as": self.same_graph_as,
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

    @property
    def requested_density(self) -> float | None:
        """The `density` option when it asks for sparsity (below 1), else None."""
        density = self.config.get("density")
        return float(density) if isinstance(density, (int, float)) and density < 1.0 else None

    def coarse_grid_notes(self) -> list[str]:
        """Sites whose block grid cannot go as low as the density asked: every query block keeps at
        least one key block, so with Nk key blocks no mask keeps less than 1/Nk of them."""
        asked = self.requested_density
        if asked is None:
            return []
        coarse: dict[int, list[str]] = {}
        for s in self.sites:
            if s.kind == "cross" or not (s.status == "sparse" or s.reason.startswith("cost model")):
                continue
            if 1.0 / num_blocks(s.kv_len) > asked:
                coarse.setdefault(num_blocks(s.kv_len), []).append(s.name)
        return [f"{', '.join(names)}: {blocks} key block{'s' if blocks > 1 else ''} of 128 tokens per query block, "
                f"at least one kept, so no mask keeps less than {1.0 / blocks:.2f}"
                for blocks, names in sorted(coarse.items())]

    def save_pictures(self, directory: str | Path) -> list[Path]:
        """Write PNGs: each sparse site's per-head block masks at a few steps, and the density of each
        (layer, step, head); returns the files written (none when no site is sparse)."""
        from .pictures import save_report_pictures

        return save_report_pictures(self, Path(directory))

    def subgraph_note(self) -> str:
        """A line on the attention calls inside subgraphs (empty without any)."""
        if not self.subgraph_attention:
            return ""
        calls = self.subgraph_attention
        return (f"\nnote: {calls} attention call{'s' if calls != 1 else ''} inside subgraphs (activation "
                "checkpointing, e.g. enable_gradient_checkpointing()) run dense: the backend does not rewrite "
                "inside them; compile without gradient checkpointing to make them sparse")

    def fp8_note(self) -> str:
        """Lines on option attention_dtype "fp8": how many sparse sites run FP8 and why the others do not
        (empty without the option)."""
        if self.config.get("attention_dtype") != FP8:
            return ""
        fp8 = sum(s.attention_dtype == FP8 for s in self.sparse_sites)
        others = "; ".join(f"{s.name}: {s.fp8_reason}" for s in self.sparse_sites if s.fp8_reason)
        return (f"\nattention_dtype fp8: {fp8} of {len(self.sparse_sites)} sparse sites run the FP8 op (where the "
                "cost model's FP8 rows predict it faster than the 16-bit kernel, or it has none; predicted times "
                "are the 16-bit kernel's)"
                + (f"; in their own dtype: {others}" if others else ""))

    def __str__(self) -> str:
        if not self.sites:
            return (f"scalingattn graph {self.graph_index}: no softmax attention in this graph, nothing to rewrite "
                    "(it runs as dynamo captured it)" + self.subgraph_note())
        rows = [
            [
                s.name, s.kind, "x".join(map(str, s.shape)) + ("" if s.kv_len == s.shape[2] else f" kv{s.kv_len}"),
                "x".join(map(str, s.token_grid)) if s.token_grid else "-", s.token_order,
                _status(s), s.attention_dtype, f"{s.density:.3f}", _heads(s.head_densities),
                _heads(s.head_recall) if s.head_recall else "-", f"{s.flops_saved / 1e9:.3g}", s.reason,
            ]
            for s in self.sites
        ]
        table = tabulate(
            rows, headers=["site", "kind", "B x H x S x D", "grid", "order", "status", "attn dtype", "density",
                           "per-head density", "per-head recall", "GFLOP saved", "reason"]
        )
        saved = self.flops_saved / self.attention_flops if self.attention_flops else 0.0
        speedup = self.predicted_speedup
        summary = (
            f"scalingattn graph {self.graph_index}: {len(self.sparse_sites)} sparse, {len(self.dense_sites)} dense "
            f"sites; attention FLOPs {self.attention_flops / 1e9:.3g} G, saved {_percent(saved)} by the masks"
            + (f"; sparse sites predicted {speedup:.2f}x as fast as dense" if speedup is not None else "")
            + f"\nmasks: {self.topology_origin} ({self.mask_bytes / 2**20:.2f} MiB on the device); "
            f"schedule: {self.schedule or '-'}; steps: {self.step_source}"
            + "\n" + (self.policy_state.report_line() if isinstance(self.policy_state, PolicyState)
                      else f"policy: {self.policy}")
        )
        trained = sum(site.requires_grad for site in self.sparse_sites)
        if trained:
            summary += (f"\ntraining graph: autograd runs the block-sparse backward of {trained} sparse "
                        f"site{'s' if trained != 1 else ''} with the forward's masks (constants, no gradient)")
        if all(site.kind == "cross" for site in self.sites):
            summary += ("\nnote: only cross-attention in this graph, which stays dense: no softmax self-attention to "
                        "make sparse (linear attention, as Sana's, is not softmax attention)")
        if self.same_graph_as is not None:
            summary += (f"\nsame dynamo graph as graph {self.same_graph_as}, run with another module's parameters "
                        "(a repeated block): compiled again with masks for them")
        summary += self.subgraph_note() + self.fp8_note()
        notes = self.coarse_grid_notes()
        if notes:
            summary += (f"\nnote: too few blocks for density {self.requested_density:g} (the sequence is short): "
                        + "; ".join(notes))
        return f"{summary}\n{table}"


def graph_breaks() -> collections.Counter:
    """Dynamo's graph-break reasons so far in this process (first line of each), with counts.

    torch keeps them in `torch._dynamo.utils.counters["graph_break"]` (2.11 and 2.13 alike); a
    backend sees only the graphs, so the reasons come from there. Empty if torch stops keeping them.
    """
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover - torch without dynamo's counters
        return collections.Counter()
    reasons: collections.Counter = collections.Counter()
    for reason, count in counters.get("graph_break", {}).items():
        reasons[str(reason).strip().split("\n", 1)[0].strip()] += count
    return reasons


def graph_break_hint(reason: str) -> str | None:
    """Dynamo's first "Hint:" for a graph-break reason (by its first line), if it gave one."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover
        return None
    for full in counters.get("graph_break", {}):
        lines = [line.strip() for line in str(full).strip().splitlines()]
        if lines and lines[0] == reason:
            return next((line.removeprefix("Hint:").strip() for line in lines if line.startswith("Hint:")), None)
    return None


def compile_summary(reports: list[PassReport], breaks: collections.Counter | None = None) -> str:
    """A few lines over every graph a backend compiled: how many graphs dynamo made, why it broke the
    model where dynamo says, which graphs hold attention, and a hint when none does."""
    breaks = breaks or collections.Counter()
    with_sites = [r for r in reports if r.sites]
    sparse = sum(len(r.sparse_sites) for r in reports)
    sites = sum(len(r.sites) for r in reports)
    graphs = f"{len(reports)} graph{'s' if len(reports) != 1 else ''}"
    lines = [f"scalingattn: dynamo made {graphs}"
             + (f"; {sites} attention site{'s' if sites != 1 else ''} ({sparse} sparse) in {len(with_sites)} of them"
                if reports else "")]
    if breaks:
        total = sum(breaks.values())
        shown = "; ".join(f"{reason} (x{count})" for reason, count in breaks.most_common(5))
        more = f"; {len(breaks) - 5} more reasons" if len(breaks) > 5 else ""
        lines.append(f"graph breaks: {total}: {shown}{more} (TORCH_LOGS=graph_breaks shows where)")
        hint = graph_break_hint(breaks.most_common(1)[0][0])
        if hint:
            lines.append(f"dynamo's hint: {hint}")
    reused = [r for r in reports if r.same_graph_as is not None]
    if reused:
        lines.append(f"{len(reused)} of the graphs are dynamo graphs it runs for several modules (repeated blocks), "
                     "compiled again for each module's parameters with masks of their own")
    hidden = sum(r.subgraph_attention for r in reports)
    if hidden:
        lines.append(f"{hidden} attention call{'s' if hidden != 1 else ''} inside subgraphs (activation checkpointing): "
                     "not rewritten, dense")
    elif reports and not with_sites:
        lines.append("no softmax attention in any graph: nothing was rewritten ("
                     + ("attention in code around the graph breaks runs eagerly, unseen" if breaks else
                        "linear attention, as Sana's, is not softmax attention") + ")")
    elif reports and not any(site.kind != "cross" for r in reports for site in r.sites):
        lines.append("only cross-attention was captured (it stays dense): "
                     + ("self-attention in code around the graph breaks runs eagerly, unrewritten" if breaks else
                        "no softmax self-attention to make sparse (linear attention, as Sana's, is not softmax "
                        "attention)"))
    elif breaks and len(with_sites) < len(reports):
        lines.append(f"{len(reports) - len(with_sites)} of the graphs hold no attention; attention inside code "
                     "dynamo broke off runs eagerly, unrewritten")
    return "\n".join(lines)


def build_report(graph: GraphRecord, graph_index: int, same_graph_as: int | None = None) -> PassReport:
    """The report of one compiled graph, from its final sites."""
    return PassReport(
        graph_index=graph_index, config=graph.config.as_dict(), sites=[site_report(site) for site in graph.sites],
        topology_origin=graph.masks_origin, calibration_seconds=graph.calibration_seconds, schedule=graph.schedule,
        step_source=graph.step_source, mask_bytes=sum(t.numel() * t.element_size() for t in graph.extra_inputs),
        subgraph_attention=graph.subgraph_attention, same_graph_as=same_graph_as,
        plans={site.name: site.plan for site in graph.sites if site.plan is not None},
        step_timesteps=graph.step_timesteps, topology=graph.topology, policy_state=graph.policy_state,
    )


def site_report(site: Site) -> SiteReport:
    """Report one site: its plan's summary, or why it stays dense."""
    shape = (site.batch, site.heads, site.q_len, site.head_dim)
    fields = dict(
        name=site.name, kind=site.kind.value, pattern=site.pattern.value, shape=shape, q_stride=site.q_stride,
        kv_len=site.kv_len, kv_heads=site.kv_heads, dtype=str(site.dtype).removeprefix("torch."), scale=site.scale,
        attn_mask=site.attn_mask, is_causal=site.is_causal, dropout_p=site.dropout_p,
        requires_grad=site.requires_grad, token_grid=site.token_grid, grid_source=site.grid_source, text_spans=site.text_spans,
        dense_flops=site.dense_flops, token_order=site.token_order, attention_dtype=site.attention_dtype,
        fp8_reason=site.fp8_reason,
        model_heads=site.ulysses.heads if site.ulysses is not None else None,
    )
    if site.plan is None:
        return SiteReport(**fields, status="dense", reason=site.dense_reason, head_densities=[1.0] * max(site.heads, 1),
                          head_recall=None, step_densities=None, flops_saved=0, predicted_ms=None, dense_ms=None)
    summary = site.plan.summary(site)
    densities = summary.head_densities
    return SiteReport(
        **fields, status="sparse", reason=summary.reason, head_densities=densities, head_recall=summary.head_recall,
        step_densities=summary.step_densities, flops_saved=round(site.dense_flops * (1.0 - sum(densities) / len(densities))),
        predicted_ms=summary.predicted_ms, dense_ms=summary.dense_ms,
    )


def _status(site: SiteReport) -> str:
    """The table's status: a sparse site that keeps every block says so (it runs the op at density 1)."""
    if site.status == "sparse" and all(d >= 1.0 - 1e-9 for d in site.head_densities):
        return "sparse (all blocks)"
    return site.status


def _percent(fraction: float) -> str:
    """A share as a percentage that never rounds a non-zero share to 0.0%."""
    if 0.0 < fraction < 0.0005:
        return "<0.1%"
    return f"{fraction:.1%}"


def _heads(densities: list[float]) -> str:
    shown = " ".join(f"{d:.2f}" for d in densities[:8])
    return shown + (" ..." if len(densities) > 8 else "")
