"""DFSAttn's schedule and mask cache: when to run dense, when to recompute masks, and reuse between.

Dense for the first steps, masks recomputed on a few refresh steps with a falling keep ratio and
reused in between, by every later step and by CFG's unconditional half (:class:`DFSSchedule`,
:class:`MaskCache`). Scoring and selection are in ``scoring.py``.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Sequence

import torch

from ...kernels.bitmask import pack_block_mask
from ...sites import Site
from .scoring import text_block_indices, topk_block_mask

log = logging.getLogger(__name__)

DEFAULT_NUM_STEPS = 50
DEFAULT_DENSE_STEPS = 12
DEFAULT_REFRESH_INTERVAL = 12
DEFAULT_KEEP_RATIOS = (0.3, 0.2, 0.1)
DEFAULT_DENSE_LAYERS = (0,)


# ---------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StepPlan:
    step: int
    dense: bool  # the whole step runs dense attention
    refresh: bool  # masks are recomputed from this step's q and k
    keep_ratio: float | None  # keep ratio of the masks in use (None on dense steps)
    mask_from: int | None  # the refresh step whose masks are in use (None on dense steps)


@dataclasses.dataclass(frozen=True)
class DensityReport:
    per_step: tuple[float, ...]  # mean kept fraction over layers at each step (dense = 1.0)
    including_dense_steps: float  # mean over all steps: the honest end-to-end figure
    excluding_dense_steps: float  # mean over sparse steps only (how the paper quotes sparsity)


@dataclasses.dataclass(frozen=True)
class DFSSchedule:
    """When DFSAttn runs dense, recomputes masks and with which keep ratio (the paper's defaults).

    Refresh ``i`` happens at step ``dense_steps + i * refresh_interval`` with ``keep_ratios[i]``;
    after the last one its masks are reused to the end (the authors' code stops refreshing once
    the decreasing ratio would reach 0: with 0.3 - 0.1 per refresh, steps 12, 24, 36 and not 48).
    """

    num_steps: int = DEFAULT_NUM_STEPS  # sampler steps the plan covers by default
    dense_steps: int = DEFAULT_DENSE_STEPS  # steps 0 .. dense_steps-1 run dense
    refresh_interval: int = DEFAULT_REFRESH_INTERVAL  # steps between mask refreshes
    keep_ratios: tuple[float, ...] = DEFAULT_KEEP_RATIOS  # keep ratio of each refresh, in order
    dense_layers: tuple[int, ...] = DEFAULT_DENSE_LAYERS  # layer (site) indices that always run dense
    cfg_reuse: bool = True  # CFG's unconditional half uses the conditional half's masks

    def __post_init__(self):
        """The one validation of DFSAttn's options (the backend's options build this schedule)."""
        for name, least in (("num_steps", 1), ("dense_steps", 0), ("refresh_interval", 1)):
            value = getattr(self, name)
            if not _is_int(value) or value < least:
                raise ValueError(f"option {name!r} must be an int >= {least}, got {value!r}")
        ratios, layers = self.keep_ratios, self.dense_layers
        if not isinstance(ratios, (list, tuple)) or not ratios or not all(
                isinstance(r, (int, float)) and not isinstance(r, bool) and 0 < r <= 1 for r in ratios):
            raise ValueError(f"option 'keep_ratios' must be a non-empty list of numbers in (0, 1], got {ratios!r}")
        if not isinstance(layers, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in layers):
            raise ValueError(f"option 'dense_layers' must be a list of ints >= 0, got {layers!r}")
        object.__setattr__(self, "keep_ratios", tuple(ratios))
        object.__setattr__(self, "dense_layers", tuple(layers))
        if not isinstance(self.cfg_reuse, bool):
            raise ValueError(f"option 'cfg_reuse' must be True or False, got {self.cfg_reuse!r}")

    def plan(self, num_steps: int | None = None) -> list[StepPlan]:
        """One entry per step; steps are absolute indices, whatever ``num_steps`` is."""
        plans = []
        for step in range(self.num_steps if num_steps is None else num_steps):
            if step < self.dense_steps:
                plans.append(StepPlan(step, dense=True, refresh=False, keep_ratio=None, mask_from=None))
                continue
            since, phase = divmod(step - self.dense_steps, self.refresh_interval)
            i = min(since, len(self.keep_ratios) - 1)
            mask_from = self.dense_steps + i * self.refresh_interval
            plans.append(StepPlan(step, dense=False, refresh=phase == 0 and since == i,
                                  keep_ratio=self.keep_ratios[i], mask_from=mask_from))
        return plans

    def density_report(self, num_layers: int, num_steps: int | None = None,
                       num_k_blocks: int | None = None) -> DensityReport:
        """Kept block fraction per step, averaged over ``num_layers`` equal-cost layers.

        Dense steps and ``dense_layers`` count 1.0. With ``num_k_blocks`` the realised fraction
        ``max(1, floor(keep * Nk)) / Nk`` is used instead of the nominal keep ratio; text blocks
        of joint attention (kept on top) are not counted.
        """
        dense_layers = sum(1 for i in set(self.dense_layers) if i < num_layers)
        per_step = []
        for p in self.plan(num_steps):
            if p.dense:
                per_step.append(1.0)
                continue
            kept = p.keep_ratio
            if num_k_blocks is not None:
                kept = max(1, int(kept * num_k_blocks + 1e-9)) / num_k_blocks
            per_step.append((dense_layers + (num_layers - dense_layers) * kept) / num_layers)
        sparse = [d for d, p in zip(per_step, self.plan(num_steps)) if not p.dense]
        return DensityReport(tuple(per_step), sum(per_step) / len(per_step),
                             sum(sparse) / len(sparse) if sparse else 1.0)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------
# Mask cache
# ---------------------------------------------------------------------------------------
ScoresFn = Callable[[slice], torch.Tensor]  # batch rows -> block scores (rows, H, Nq, Nk)


@dataclasses.dataclass
class _Entry:
    words: torch.Tensor  # int32 (B, H, Nq, W): packed masks, the whole batch
    mask_from: int  # the plan's refresh step these masks stand for
    computed_at: int  # the step whose q and k they were computed from


@dataclasses.dataclass(frozen=True)
class Refresh:
    site: str
    step: int
    keep_ratio: float
    density: float  # kept fraction of the new masks (text blocks included)


class MaskCache:
    """The current packed masks of each site, recomputed when the schedule says so.

    Contract:
    - ``sites``: the sparse-eligible self/joint attention sites in execution order; a site's
      position in this list is its layer index for ``schedule.dense_layers``.
    - ``masks_for(name, step, scores_fn)`` returns the site's packed masks for ``step``,
      int32 ``(B, H, Nq, W)``, or ``None`` when the site runs dense at that step.
    - ``scores_fn(rows)`` returns block scores ``(rows, H, Nq, Nk)`` for a slice of the batch;
      it is called only when masks must be (re)computed: on a refresh step, at most once per
      (site, step) so repeated calls within a step (e.g. CFG run as two passes) reuse them, or
      when the masks of the current period are missing (the refresh step was skipped).
    - ``cfg_batch=True``: the batch is ``[cond, uncond]`` halves of one CFG step; with
      ``schedule.cfg_reuse`` only the cond half is scored and its masks serve both halves.
    - No global state: one cache per compiled model. A dense step drops the site's masks, so a
      new sample starts clean; call ``reset()`` between samples when the schedule has no
      dense steps.
    """

    def __init__(self, schedule: DFSSchedule, sites: Sequence[Site], num_steps: int | None = None,
                 cfg_batch: bool = False):
        self.schedule = schedule
        self.plan = schedule.plan(num_steps)
        self.cfg_batch = cfg_batch
        self._sites = {site.name: (layer, site) for layer, site in enumerate(sites)}
        self._text_blocks = {site.name: text_block_indices(site.text_spans) for site in sites}
        self._entries: dict[str, _Entry] = {}
        self.refreshes: list[Refresh] = []  # every (re)computation, for the report

    def reset(self) -> None:
        self._entries.clear()

    def current(self, name: str) -> torch.Tensor | None:
        """The site's packed masks in use: those of its last refresh, None before one or after a dense step."""
        entry = self._entries.get(name)
        return None if entry is None else entry.words

    def masks_for(self, name: str, step: int, scores_fn: ScoresFn) -> torch.Tensor | None:
        layer, site = self._sites[name]
        if not 0 <= step < len(self.plan):
            raise IndexError(f"step {step} is outside the plan's {len(self.plan)} steps")
        plan = self.plan[step]
        if plan.dense:
            self._entries.pop(name, None)  # dense steps open a sample: older masks are stale
            return None
        if layer in self.schedule.dense_layers:
            return None
        entry = self._entries.get(name)
        if entry is None or entry.mask_from != plan.mask_from or (plan.refresh and entry.computed_at != step):
            entry = self._compute(site, step, plan, scores_fn)
        return entry.words

    def _compute(self, site: Site, step: int, plan: StepPlan, scores_fn: ScoresFn) -> _Entry:
        reuse = self.cfg_batch and self.schedule.cfg_reuse
        if reuse and site.batch % 2:
            raise ValueError(f"site {site.name}: a CFG batch needs an even batch size, got {site.batch}")
        rows = slice(0, site.batch // 2) if reuse else slice(0, site.batch)
        mask = topk_block_mask(scores_fn(rows), plan.keep_ratio, self._text_blocks[site.name])
        words = pack_block_mask(mask)
        if reuse:
            words = torch.cat([words, words])  # uncond rows take the cond rows' masks
        entry = _Entry(words, plan.mask_from, step)
        self._entries[site.name] = entry
        density = mask.float().mean().item()
        self.refreshes.append(Refresh(site.name, step, plan.keep_ratio, density))
        log.debug("site %s: masks recomputed at step %d, keep %.3f, density %.3f",
                  site.name, step, plan.keep_ratio, density)
        return entry
