"""Run-time state of DFSAttn in compiled graphs: step lookup, mask cache, scoring time.

A rewritten graph calls `torch.ops.scaling_compiler.dfs_attention(q, k, v, timestep, site_id,
scale)` at each DFSAttn site. An int is all a graph node can carry, so the op finds its state
here: `site_id` names a (registry, site) pair in a process-wide table. Each compiled graph owns
one :class:`DFSRegistry` (the backend's compiled function and its report keep it alive; the
table holds it weakly), so the masks cached between steps live outside the graph and the graph
is compiled once for every step.

The step is read from the model's timestep input on the host (:meth:`DFSRegistry.step_of`):
one device-to-host copy per op call. That sync is the price of this first version; picking
the step on the device would need the masks to be computed inside the graph.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import time
import weakref
from typing import Any, Sequence

import torch

from ...kernels.bitmask import num_blocks
from ...sites import Site
from .schedule import DFSSchedule, MaskCache
from .scoring import block_scores, text_block_indices

log = logging.getLogger(__name__)

_SITES: weakref.WeakValueDictionary[int, "SiteHandle"] = weakref.WeakValueDictionary()
_NEXT_ID = itertools.count()


@dataclasses.dataclass(eq=False)
class SiteHandle:
    """What a `site_id` stands for."""

    registry: "DFSRegistry"
    name: str


def site_handle(site_id: int) -> SiteHandle:
    handle = _SITES.get(site_id)
    if handle is None:
        raise RuntimeError(f"DFSAttn site id {site_id} is unknown: the compiled graph that used it was released")
    return handle


class DFSRegistry:
    """DFSAttn state of one compiled graph: which step runs, the cached masks, what scoring cost.

    ``sites``: the rewritable self/joint attention sites in execution order (their positions are
    the layer indices of ``schedule.dense_layers``); the sites that are not dense layers get an id
    (``site_ids``). ``step_timesteps``: the timestep of each schedule step; a call's step is the
    nearest one. A call at a lower step than the previous call starts a new sample: cached masks
    are dropped (so are they on every dense step; :meth:`reset` does it by hand).
    """

    def __init__(self, schedule: DFSSchedule, sites: Sequence[Site], step_timesteps: Sequence[float],
                 cfg_batch: bool) -> None:
        self.schedule = schedule
        self.step_timesteps = tuple(float(t) for t in step_timesteps)
        self.plan = schedule.plan(len(self.step_timesteps))
        self.cache = MaskCache(schedule, sites, len(self.step_timesteps), cfg_batch=cfg_batch)
        self._handles = [SiteHandle(self, site.name) for i, site in enumerate(sites)
                         if i not in schedule.dense_layers]
        self.site_ids: dict[str, int] = {}
        for handle in self._handles:
            self.site_ids[handle.name] = site_id = next(_NEXT_ID)
            _SITES[site_id] = handle
        self.scoring_seconds = 0.0  # scoring, top-k and packing on refreshes, device-synchronised
        self.step_density: dict[tuple[str, int], float] = {}  # kept block fraction at the last call of a step
        self._density: dict[str, float] = {}  # kept fraction of each site's masks in use
        self._last_step = -1

    def reset(self) -> None:
        """Drop every cached mask: the next call starts a new sample."""
        self.cache.reset()
        self._last_step = -1

    def step_of(self, timestep: torch.Tensor) -> int:
        """The schedule step whose timestep is nearest the first entry of `timestep` (a host sync)."""
        t = float(timestep.reshape(-1)[0])
        return min(range(len(self.step_timesteps)), key=lambda i: abs(self.step_timesteps[i] - t))

    def masks(self, name: str, timestep: torch.Tensor, q: torch.Tensor, k: torch.Tensor, scale: float
              ) -> torch.Tensor | None:
        """Packed masks int32 (B, H, Nq, W) for this call of site `name`, or None to run it dense.

        q (B, H, Sq, D) and k (B, H, Sk, D) are scored only when the schedule refreshes the masks;
        a key-padding mask does not enter the scores (padded keys only widen the tile softmax).
        """
        step = self.step_of(timestep)
        if step < self._last_step:
            self.cache.reset()
        self._last_step = step
        refreshes = len(self.cache.refreshes)
        started: list[float] = []

        def scores(rows: slice) -> torch.Tensor:
            _sync(q)
            started.append(time.perf_counter())
            return block_scores(q[rows], k[rows], scale)

        words = self.cache.masks_for(name, step, scores)
        if started:
            _sync(q)
            self.scoring_seconds += time.perf_counter() - started[0]
        if len(self.cache.refreshes) > refreshes:
            self._density[name] = self.cache.refreshes[-1].density
        self.step_density[(name, step)] = 1.0 if words is None else self._density[name]
        return words

    @property
    def refresh_steps(self) -> list[int]:
        """Steps at which the plan recomputes masks."""
        return [p.step for p in self.plan if p.refresh]

    @property
    def keep_ratio_per_step(self) -> list[float | None]:
        """Keep ratio of the masks in use at each step (None: dense step)."""
        return [p.keep_ratio for p in self.plan]

    def density_per_step(self, name: str) -> list[float | None]:
        """Kept block fraction site `name` used at each step when last run (None: step not run yet)."""
        return [self.step_density.get((name, step)) for step in range(len(self.plan))]

    def nominal_step_densities(self, site: Site) -> list[float]:
        """Kept block fraction the plan gives `site` at each step: 1 on dense steps, else the top-k
        budget ``max(1, floor(keep * Nk))`` per row (text blocks counted, text rows dense)."""
        nq, nk = num_blocks(site.q_len), num_blocks(site.kv_len)
        text = text_block_indices(site.text_spans).numel()
        densities = []
        for p in self.plan:
            if p.dense:
                densities.append(1.0)
                continue
            per_row = max(1, int(p.keep_ratio * nk + 1e-9))
            if text:
                per_row = min(nk, max(per_row, text + 1))
            densities.append(((nq - text) * per_row + text * nk) / (nq * nk))
        return densities

    def summary(self) -> dict[str, Any]:
        """JSON fields for the report: the plan, what ran, and what scoring cost."""
        refreshes = self.cache.refreshes
        return {
            "dense_steps": self.schedule.dense_steps, "refresh_interval": self.schedule.refresh_interval,
            "keep_ratios": list(self.schedule.keep_ratios), "dense_layers": list(self.schedule.dense_layers),
            "cfg_reuse": self.schedule.cfg_reuse and self.cache.cfg_batch,
            "refresh_steps": self.refresh_steps, "keep_ratio_per_step": self.keep_ratio_per_step,
            "refreshes_run": len(refreshes), "scoring_seconds": self.scoring_seconds,
            "scoring_seconds_per_refresh": self.scoring_seconds / len(refreshes) if refreshes else None,
        }


    def report_line(self) -> str:
        """The report's policy line (run-time figures so far)."""
        return (f"policy: dfsattn; refresh steps {self.refresh_steps}, keep ratios "
                f"{'/'.join(f'{r:g}' for r in self.schedule.keep_ratios)}; scoring so far "
                f"{self.scoring_seconds:.3g} s over {len(self.cache.refreshes)} site refreshes")

    def report_json(self) -> dict[str, Any]:
        return {"dfsattn": self.summary()}


def _sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
