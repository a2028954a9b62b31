"""west_fast under diffusers' Ulysses context parallelism: every rank plans the whole model, then
keeps its heads.

Each rank's site holds H/N of the model's H heads over the whole sequence (passes/ulysses.py).
Calibration runs the captured graph on every rank at once (its all-to-alls run in the same order
everywhere, so it cannot deadlock), each rank measuring its own heads; `gather_topology` puts the
heads of all ranks together, so every rank holds the whole model's topology, the same one a single
process calibrates, and FAST plans all H heads identically on every rank. `local_view` then cuts
the topology and schedule down to the rank's heads: its masks are its slice of the whole plan.

Head balancing (`balance_heads`): FAST gives heads different densities, so the ranks of a site
would wait on the slowest one. The assignment moves heads between ranks so that each rank's
predicted time (cost model) is about equal; `RankTimes` reports it before and after.
"""
from __future__ import annotations

import dataclasses
import heapq
from typing import Sequence

import torch

from ...cost_model import CostModel
from ...passes.ulysses import UlyssesSlice, all_gather_heads
from ...sites import Site
from .fast import Schedule
from .topology import SiteTopology, Topology


def total_heads(site: Site) -> int:
    """The model's heads at `site` (all ranks together)."""
    return site.ulysses.total_heads if site.ulysses is not None else site.heads


def gather_topology(topology: Topology, sites: list[Site]) -> Topology:
    """The topology with each Ulysses site's maps over all H heads (every rank calls this, same order)."""
    maps = dict(topology.sites)
    for site in sites:
        if site.ulysses is not None and maps[site.name].thresholds.shape[0] == site.heads:
            maps[site.name] = _gather_map(maps[site.name], site.ulysses, site.device)
    return dataclasses.replace(topology, sites=maps)


def _gather_map(site_map: SiteTopology, ulysses: UlyssesSlice, device: torch.device) -> SiteTopology:
    gathered = {name: all_gather_heads(getattr(site_map, name), ulysses, device)
                for name in ("thresholds", "mass", "row_mass") if getattr(site_map, name) is not None}
    return dataclasses.replace(site_map, **gathered)


def local_view(topology: Topology | None, schedule: Schedule, sites: list[Site]
               ) -> tuple[Topology | None, Schedule]:
    """The whole model's topology and schedule cut down to each site's heads on this rank."""
    heads = [list(site.ulysses.heads) if site.ulysses is not None else None for site in sites]
    index = [i if h is None else i[:, h] for i, h in zip(schedule.index, heads)]
    kept = None if schedule.kept is None else [k if h is None else k[h] for k, h in zip(schedule.kept, heads)]
    local = dataclasses.replace(schedule, index=index, kept=kept)
    if topology is None:
        return None, local
    maps = dict(topology.sites)
    for site, h in zip(sites, heads):
        if h is not None and site.name in maps:
            maps[site.name] = slice_map(maps[site.name], h)
    return dataclasses.replace(topology, sites=maps), local


def slice_map(site_map: SiteTopology, heads: Sequence[int]) -> SiteTopology:
    """The site's maps of `heads` only (in that order)."""
    sliced = {name: getattr(site_map, name)[list(heads)]
              for name in ("thresholds", "mass", "row_mass") if getattr(site_map, name) is not None}
    return dataclasses.replace(site_map, **sliced)


# ---------------------------------------------------------------------------------------
# Balancing heads between ranks
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RankTimes:
    """Predicted attention time of each rank (ms per model call, mean over steps)."""

    before: tuple[float, ...]  # heads in the model's order (rank r: heads [r*H/N, (r+1)*H/N))
    after: tuple[float, ...]  # heads as assigned by `balance`

    @staticmethod
    def spread(times: Sequence[float]) -> float:
        """(slowest - fastest) / slowest: 0 when balanced."""
        return (max(times) - min(times)) / max(times) if max(times) > 0 else 0.0

    def line(self) -> str:
        show = lambda times: " ".join(f"{t:.3g}" for t in times)  # noqa: E731
        return (f"per-rank predicted attention ms: before {show(self.before)} (spread {self.spread(self.before):.1%}), "
                f"balanced {show(self.after)} (spread {self.spread(self.after):.1%})")


def head_ms(site: Site, schedule: Schedule, i: int, cost: CostModel) -> list[float]:
    """Predicted ms of each of the site's H heads (all ranks), mean over steps; the op's per-call
    overhead is the same on every rank and left out."""
    per_head_flops = site.dense_flops / site.heads  # the rank's site: B x (H/N) heads, full sequence
    densities = schedule.density(i).mean(dim=0)  # (H,)
    return [float(d) * per_head_flops * cost.sparse_ms_per_flop for d in densities]


def balance(times: Sequence[float], world: int, loads: Sequence[float] | None = None) -> tuple[int, ...]:
    """A head order whose consecutive groups of H/N heads (one per rank) have near-equal total time,
    counting each rank's `loads` from earlier sites (so sites even each other out).

    Longest processing time first, each rank taking H/N heads, then swaps between the slowest and
    the fastest rank while one narrows their gap. Deterministic (ties by head and rank index), so
    every rank computes the same order.
    """
    per_rank = len(times) // world
    start = list(loads) if loads is not None else [0.0] * world
    groups: list[list[int]] = [[] for _ in range(world)]
    heap = [(start[r], r) for r in range(world)]
    for head in sorted(range(len(times)), key=lambda h: (-times[h], h)):
        full = []
        load, rank = heapq.heappop(heap)
        while len(groups[rank]) == per_rank:
            full.append((load, rank))
            load, rank = heapq.heappop(heap)
        groups[rank].append(head)
        heapq.heappush(heap, (load + times[head], rank))
        for entry in full:
            heapq.heappush(heap, entry)
    _improve_by_swaps(groups, times, start)
    return tuple(head for group in groups for head in sorted(group))


def _improve_by_swaps(groups: list[list[int]], times: Sequence[float], start: list[float], rounds: int = 64) -> None:
    total = lambda r: start[r] + sum(times[h] for h in groups[r])  # noqa: E731
    for _ in range(rounds):
        slow = max(range(len(groups)), key=lambda r: (total(r), -r))
        fast = min(range(len(groups)), key=lambda r: (total(r), r))
        gap = total(slow) - total(fast)
        best = None
        for a in groups[slow]:
            for b in groups[fast]:
                delta = times[a] - times[b]
                if 0 < delta < gap and (best is None or abs(gap - 2 * delta) < abs(gap - 2 * best[2])):
                    best = (a, b, delta)
        if best is None:
            return
        a, b, _ = best
        groups[slow][groups[slow].index(a)] = b
        groups[fast][groups[fast].index(b)] = a


def rank_times(times: Sequence[float], order: Sequence[int], world: int) -> tuple[float, ...]:
    """Total time of each rank's consecutive group of heads in `order`."""
    per_rank = len(order) // world
    return tuple(sum(times[h] for h in order[r * per_rank:(r + 1) * per_rank]) for r in range(world))
