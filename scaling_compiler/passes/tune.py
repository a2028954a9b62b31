"""Tuning pass (FAST): how sparse each head is at each diffusion step.

WEST fixes *where* each head's blocks are (threshold maps); this pass fixes *how many*, per
(layer, step, head), so that a global density target is met with the best fidelity.

- Fidelity of a sparse row is `1 - Hellinger(P, P_sparse) = 1 - sqrt(1 - sqrt(r))` for a
  row keeping attention mass r (softmax renormalised over kept blocks). r comes from the
  query rows that calibration sampled with exact softmax (16 per batch entry and sample,
  stratified over query blocks): a head's fidelity at a density is the mean fidelity of its
  rows (not the fidelity of a query block's mean recall: rows of one block can disagree,
  and fidelity is not linear in r). A map without sampled rows
  (transferred to another grid) falls back to the block means of its calibration mass.
- The budget surface: with x = (l + w * t) / (N_L + w * N_T) over layer l and step t (cell
  centres: l + 1/2, t + 1/2), the
  target fidelity is `beta * (1 - x)**gamma + (1 - beta)`: strict for early steps and shallow
  layers, looser later. Each (layer, step, head) takes the smallest ladder density whose
  fidelity meets its target, but never one below HEAD_FLOOR x the density of the sparse steps. beta may
  exceed 1 (up to 16): the target then falls below zero, where any density will do, after the
  first cells, which is what lets low density targets be met at all. (beta, gamma, w) are fitted so the mean density over all
  (layer, step, head) meets the `density` option, maximising mean fidelity with early steps
  weighted more (STEP_WEIGHT); or, with `min_fidelity`, beta = 1 - min_fidelity and (gamma, w)
  minimise density.
- Dense first steps: the surface reaches target 1 only at x = 0, but on the trained tiny DiT
  fully dense first steps place the objects where the dense video has them (benchmarks/NOTES.md,
  "FAST's fit on the GPU"). So the fit also chooses a dense warm-up from FIT_WARMUPS, with the
  surface over the steps after it, by the same step-weighted score, among those that leave the
  sparse steps at least HEAD_FLOOR x the target (the `warmup` option fixes it).
- Uniform density (optionally with dense warm-up steps) is the ablation FAST must beat.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import logging

import torch

from ..config import Config, MaskRule, ScheduleKind
from ..cost_model import CostModel
from ..kernels.bitmask import BLOCK_SIZE, num_blocks, pack_block_mask
from ..masks import local_band_mask, window_3d_mask, with_text_dense
from ..sites import AttentionSite
from ..topology import SiteTopology, Topology

log = logging.getLogger(__name__)

# Densities a head can take at a step: each is one precomputed mask per site, so the ladder
# length bounds memory (see Schedule.mask_bytes).
DENSITY_LADDER = (1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.12, 0.1, 0.08, 0.06, 0.05, 0.04, 0.03)
_GAMMAS = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0)
_OMEGAS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
_BETA_MAX = 16.0
# No head of any (layer, step) below this fraction of the density target (after warm-up). Recall-based
# fidelity rates some heads as fine with one or two key blocks per row; on the trained tiny DiT those
# heads matter more than it says. Ablation on the H100 (benchmarks/NOTES.md, "FAST's fit on the GPU"):
# 0.75 against 0.5 costs 0.4 dB PSNR at density 0.25 and gains 1.2 dB at 0.1.
HEAD_FLOOR = 0.75
# The fit scores a surface by its mean predicted fidelity with step t of T weighted by
# (1 - (t + 1/2) / T) ** STEP_WEIGHT: an error at step t is carried through the T - t later steps,
# which per-row fidelity (the same curves at every step) cannot see. Unweighted (0), the fit
# spreads density evenly over steps.
STEP_WEIGHT = 1.0
# Dense warm-up fractions the fit chooses from when the `warmup` option is not given.
FIT_WARMUPS = (0.0, 0.05, 0.1, 0.2)
MIN_PREDICTED_GAIN = 0.05  # a site goes sparse only if predicted this much faster than dense


def fidelity_from_recall(recall: torch.Tensor) -> torch.Tensor:
    """1 - Hellinger distance between a softmax row and its renormalised sparse version."""
    return 1.0 - (1.0 - recall.clamp(0.0, 1.0).sqrt()).clamp_min(0.0).sqrt()


@dataclasses.dataclass
class FidelityCurve:
    """Per head, the fidelity of the WEST mask at each ladder density."""

    densities: tuple[float, ...]  # descending
    fidelity: torch.Tensor  # float64 (H, len(densities)): non-increasing along densities
    kept: torch.Tensor  # float64 (H, len(densities)): kept-block fraction of each mask (>= 1 block per row)

    def at_least(self, floor: float) -> "FidelityCurve":
        """The curve over the ladder densities >= floor only."""
        keep = [i for i, density in enumerate(self.densities) if density >= floor - 1e-12]
        return FidelityCurve(tuple(self.densities[i] for i in keep), self.fidelity[:, keep], self.kept[:, keep])


def fidelity_curve(site_map: SiteTopology, densities: tuple[float, ...] = DENSITY_LADDER) -> FidelityCurve:
    row_mass, row_blocks = _rows(site_map)  # (H, R, Nk), (R,)
    columns, kept = [], []
    for density in densities:
        mask, _ = site_map.mask_for_density(density)
        recall = (row_mass * mask.cpu()[:, row_blocks]).sum(-1)  # (H, R)
        columns.append(fidelity_from_recall(recall).mean(-1))
        kept.append(mask.flatten(1).double().mean(-1).cpu())
    fidelity = torch.stack(columns, dim=1)
    return FidelityCurve(densities, torch.cummin(fidelity, dim=1).values, torch.stack(kept, dim=1))


def _rows(site_map: SiteTopology) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (H, R, Nk) key-block mass of each row (summing to 1) and int64 (R,) its query block."""
    if site_map.row_mass is not None:
        row_mass = site_map.row_mass.double().cpu()
        row_blocks = site_map.row_blocks.cpu()
    elif site_map.mass is not None:  # one "row" per query block: its mean
        keys = torch.full((site_map.mass.shape[-1],), BLOCK_SIZE, dtype=torch.float64)
        keys[-1] = site_map.kv_len - BLOCK_SIZE * (len(keys) - 1)
        row_mass = site_map.mass.double().cpu() * keys
        row_blocks = torch.arange(row_mass.shape[1])
    else:
        raise ValueError("FAST needs the calibration mass of the site (a calibrated or transferred map)")
    # rows with no key (all padded) carry no mass: they count as fully recalled
    total = row_mass.sum(-1, keepdim=True)
    return torch.where(total > 0, row_mass / total.clamp_min(1e-30), 1.0 / row_mass.shape[-1]), row_blocks


@dataclasses.dataclass(frozen=True)
class BudgetSurface:
    beta: float
    gamma: float
    omega: float

    def targets(self, layers: int, steps: int) -> torch.Tensor:
        """(layers, steps) target fidelity, at cell centres (so x is in (0, 1) even for one cell)."""
        l = torch.arange(layers, dtype=torch.float64)[:, None] + 0.5
        t = torch.arange(steps, dtype=torch.float64)[None, :] + 0.5
        x = (l + self.omega * t) / (layers + self.omega * steps)
        return self.beta * (1.0 - x) ** self.gamma + (1.0 - self.beta)


@dataclasses.dataclass
class Schedule:
    """Per site, the ladder density of each head at each step bin."""

    kind: str  # "fast" | "uniform"
    densities: list[tuple[float, ...]]  # per site: the densities its masks are built at, descending
    index: list[torch.Tensor]  # per site: int64 (steps, H) into its densities
    surface: BudgetSurface | None
    step_fidelity: torch.Tensor | None  # float64 (steps,): mean predicted fidelity over layers and heads, FAST only
    kept: list[torch.Tensor] | None = None  # per site: (H, L) kept-block fraction of each mask, if known
    dense_steps: int = 0  # the first steps, dense everywhere

    def density(self, site: int) -> torch.Tensor:
        """float64 (steps, H) density of each head of `site` at each step (what its masks keep)."""
        if self.kept is None:
            return torch.tensor(self.densities[site], dtype=torch.float64)[self.index[site]]
        return torch.gather(self.kept[site].T.expand(len(self.index[site]), -1, -1), 1,
                            self.index[site][:, None, :]).squeeze(1)

    @property
    def mean_density(self) -> float:
        """Mean over (layer, step, head), dense steps included."""
        return torch.cat([self.density(i).flatten() for i in range(len(self.index))]).mean().item()


def fast_schedule(curves: list[FidelityCurve], steps: int, density: float | None, min_fidelity: float | None,
                  warmup: float | None = None) -> Schedule:
    """Fit the budget surface to a density target (or a fidelity floor) and pick per-cell densities.

    With `warmup`, the first round(warmup * steps) steps are dense and the surface is fitted over
    the others, with the density left after the dense steps. Without it, a density target fits
    the warm-up too: of FIT_WARMUPS, those that leave the sparse steps HEAD_FLOOR x the target, the
    best step-weighted fidelity wins.
    """
    if warmup is not None or min_fidelity is not None:
        fractions = (warmup or 0.0,)
    else:
        fractions = tuple(f for f in FIT_WARMUPS if _leaves_floor(density, steps, round(f * steps)))
    fits = [_after_dense_steps(curves, steps, density, min_fidelity, f) for f in fractions]
    meeting = [fit for fit, met in fits if met]
    if meeting:
        return max(meeting, key=_step_weighted_fidelity)
    closest = min((fit for fit, _ in fits), key=lambda fit: _miss(fit, density))
    log.warning("scalingattn: FAST cannot meet density %.3g within 1%% with ladder %s; using %.3g",
                density, DENSITY_LADDER, closest.mean_density)
    return closest


def _leaves_floor(density: float, steps: int, dense_steps: int) -> bool:
    """Whether the steps after `dense_steps` dense ones keep HEAD_FLOOR x `density` on average. A fitted
    warm-up must: the score overrates dense steps bought with starved sparse ones (on the tiny DiT,
    20% at 0.25 and 5% at 0.1 lost 3-4 dB; benchmarks/NOTES.md)."""
    if dense_steps == 0:
        return True
    return density * steps > dense_steps and _after_warmup(density, steps, dense_steps) >= HEAD_FLOOR * density - 1e-12


def _after_dense_steps(curves, steps, density, min_fidelity, warmup: float) -> tuple[Schedule, bool]:
    """The fit after round(warmup * steps) dense steps, and whether it meets the density target."""
    dense_steps = round(warmup * steps)
    if dense_steps and density is not None:
        density = _after_warmup(density, steps, dense_steps)
    rest, met = _fit(curves, steps - dense_steps, density, min_fidelity)
    if dense_steps:
        rest.index = [torch.cat([torch.zeros(dense_steps, i.shape[1], dtype=torch.int64), i]) for i in rest.index]
        rest.step_fidelity = torch.cat([torch.ones(dense_steps, dtype=torch.float64), rest.step_fidelity])
        rest.dense_steps = dense_steps
    return rest, met


def _fit(curves, steps, density, min_fidelity) -> tuple[Schedule, bool]:
    """The surface over `steps` (no dense warm-up) that best meets the target, and whether it meets
    the density within 1% (if none does: the surface whose density comes closest)."""
    if density is not None:
        curves = [curve.at_least(HEAD_FLOOR * density) for curve in curves]
    best: tuple[float, Schedule] | None = None
    closest: Schedule | None = None
    for gamma, omega in itertools.product(_GAMMAS, _OMEGAS):
        if min_fidelity is not None:
            schedule = _cells(curves, steps, BudgetSurface(1.0 - min_fidelity, gamma, omega))
            score = -schedule.mean_density  # the floor holds everywhere: be as sparse as possible
        else:
            schedule = _fit_beta(curves, steps, gamma, omega, density)
            if not _meets(schedule, density):
                if closest is None or _miss(schedule, density) < _miss(closest, density):
                    closest = schedule
                continue
            score = _step_weighted_fidelity(schedule)
        if best is None or score > best[0]:
            best = (score, schedule)
    return (closest, False) if best is None else (best[1], True)


def _miss(schedule: Schedule, density: float) -> float:
    return abs(schedule.mean_density - density)


def _meets(schedule: Schedule, density: float) -> bool:
    return _miss(schedule, density) <= 0.01 * density


def _step_weighted_fidelity(schedule: Schedule) -> float:
    steps = len(schedule.step_fidelity)
    weights = (1.0 - (torch.arange(steps, dtype=torch.float64) + 0.5) / steps) ** STEP_WEIGHT
    return float((weights * schedule.step_fidelity).sum() / weights.sum())


def _fit_beta(curves, steps, gamma, omega, density) -> Schedule:
    """Bisect beta so the mean density meets `density` within 1% (relative); if no beta does, the
    loosest surface when even it keeps too much, else the closest below the target."""
    low, high = 0.0, _BETA_MAX  # density decreases as beta grows
    best = _cells(curves, steps, BudgetSurface(high, gamma, omega))
    if best.mean_density > density:
        return best
    for _ in range(40):
        beta = (low + high) / 2
        schedule = _cells(curves, steps, BudgetSurface(beta, gamma, omega))
        if schedule.mean_density > density:
            low = beta
        else:
            high, best = beta, schedule
        if _meets(best, density):
            break
    return best


def _cells(curves: list[FidelityCurve], steps: int, surface: BudgetSurface) -> Schedule:
    targets = surface.targets(len(curves), steps)  # (layers, steps)
    index, fidelity = [], []
    for layer, curve in enumerate(curves):
        meets = curve.fidelity[None, :, :] >= targets[layer][:, None, None] - 1e-12  # (steps, H, L)
        # the last (sparsest) ladder entry that meets the target; density 1 always meets it
        position = torch.arange(len(curve.densities))
        chosen = torch.where(meets, position, 0).amax(dim=-1)  # (steps, H)
        index.append(chosen)
        fidelity.append(torch.gather(curve.fidelity.expand(steps, -1, -1), 2, chosen[..., None]).squeeze(-1).mean(-1))
    return Schedule("fast", [c.densities for c in curves], index, surface, torch.stack(fidelity).mean(0),
                    [c.kept for c in curves])


def _after_warmup(density: float, steps: int, dense_steps: int) -> float:
    """The density of the non-dense steps that makes the mean over all steps `density`."""
    if dense_steps >= steps or density * steps <= dense_steps:
        raise ValueError(f"option 'warmup': {dense_steps} dense steps of {steps} exceed density {density:g}")
    return (density * steps - dense_steps) / (steps - dense_steps)


def uniform_schedule(heads: list[int], steps: int, density: float, warmup: float = 0.0) -> Schedule:
    """Every head at one density, after `warmup` (a fraction of the steps) of dense steps.

    The density after warm-up is lowered so that the mean over all steps meets `density`.
    """
    dense_steps = round(warmup * steps)
    sparse = _after_warmup(density, steps, dense_steps) if dense_steps else density
    densities = (1.0, sparse) if sparse < 1.0 else (1.0,)
    index = torch.full((steps, 1), len(densities) - 1, dtype=torch.int64)
    index[:dense_steps] = 0
    return Schedule("uniform", [densities] * len(heads), [index.expand(steps, h).clone() for h in heads], None, None,
                    dense_steps=dense_steps)


@dataclasses.dataclass
class SitePlan:
    """What the rewritten graph passes the op for one site."""

    densities: tuple[float, ...]  # the site's mask densities, descending
    block_masks: torch.Tensor  # bool (L, H, Nq, Nk): the mask at each density
    level_index: torch.Tensor  # int64 (steps, H): the density each head uses at each step bin
    reason: str
    recall: list[float] | None  # per head, calibration recall at the step of median density (WEST)
    predicted_ms: float  # mean over steps, from the cost model
    dense_ms: float

    @property
    def static(self) -> bool:
        """Every step uses the same masks (one step, or a schedule flat over steps)."""
        return bool((self.level_index == self.level_index[:1]).all())

    @functools.cached_property
    def words(self) -> torch.Tensor:
        """int32 (L, H, Nq, W): `block_masks` bit-packed for the kernel."""
        return pack_block_mask(self.block_masks)

    def step_densities(self, bins: int = 10) -> list[float]:
        """Mean kept-block density over heads at `bins` evenly spaced steps (for the report)."""
        per_step = torch.tensor(self.densities, dtype=torch.float64)[self.level_index].mean(-1)
        picks = torch.linspace(0, len(per_step) - 1, min(bins, len(per_step))).round().long()
        return [round(float(per_step[i]), 4) for i in picks]


def plan_sites(
    sites: list[AttentionSite], topology: Topology | None, config: Config, steps: int, cost: CostModel
) -> tuple[dict[str, SitePlan | str], Schedule | None]:
    """For each site, its plan, or a string saying why it stays dense; and the schedule used."""
    if not config.sparse:  # every block through the op, whatever the cost: the exactness and overhead check
        plans = {site.name: _static_plan(site, config, 1.0, "density 1: every block", None, cost) for site in sites}
        return plans, None
    if config.schedule is ScheduleKind.FAST:
        curves = [fidelity_curve(topology.sites[site.name]) for site in sites]
        schedule = fast_schedule(curves, steps, None if config.min_fidelity else config.density, config.min_fidelity,
                                 config.warmup)
    else:
        schedule = uniform_schedule([site.heads for site in sites], steps, config.density, config.warmup or 0.0)
    plans: dict[str, SitePlan | str] = {}
    for i, site in enumerate(sites):
        densities, index = schedule.densities[i], schedule.index[i]
        used = sorted({densities[j] for j in index.unique().tolist()}, reverse=True)
        index = torch.tensor([used.index(d) if d in used else -1 for d in densities])[index]  # drop unused
        masks = torch.stack([_mask(site, topology, config, d) for d in used])
        site_map = topology.sites[site.name] if topology is not None else None
        plan = SitePlan(
            densities=tuple(used), block_masks=masks, level_index=index.contiguous(),
            reason=_describe(site, config, site_map, schedule), recall=None,
            predicted_ms=_mean_ms(site, used, index, cost), dense_ms=cost.dense_ms(site.dense_flops),
        )
        if site_map is not None:
            plan.recall = site_map.recall(_median_step_mask(masks, index))
        plans[site.name] = _unless_slower(plan, cost)
    return plans, schedule


def _unless_slower(plan: SitePlan, cost: CostModel) -> SitePlan | str:
    """The plan, or why the site stays dense: it must be predicted at least MIN_PREDICTED_GAIN faster.

    The margin covers what the isolated kernel table misses in a model: in Wan2.1-1.3B (H100) the op
    took 1.41 ms per site where the table has 1.29 ms, and all-block masks (density 1.0, which always
    runs the op) ran the step at 0.96x of dense although the table predicted 1.01x.
    """
    if plan.predicted_ms < plan.dense_ms * (1.0 - MIN_PREDICTED_GAIN):
        return plan
    return (f"cost model ({cost.source}): sparse {plan.predicted_ms:.3g} ms is not "
            f"{MIN_PREDICTED_GAIN:.0%} below dense {plan.dense_ms:.3g} ms")


def _mask(site: AttentionSite, topology: Topology | None, config: Config, density: float) -> torch.Tensor:
    if density == 1.0:
        return torch.ones(site.heads, num_blocks(site.q_len), num_blocks(site.kv_len), dtype=torch.bool)
    if config.masks is MaskRule.LOCAL_BAND:
        return local_band_mask(site, density)
    if config.masks is MaskRule.WINDOW_3D:
        return window_3d_mask(site, density)
    mask, _ = topology.sites[site.name].mask_for_density(density)
    return with_text_dense(mask, site.text_spans).cpu()


def _static_plan(site, config, density, reason, topology, cost) -> SitePlan:
    masks = _mask(site, topology, config, density)[None]
    index = torch.zeros(1, site.heads, dtype=torch.int64)
    return SitePlan((density,), masks, index, reason, None, _mean_ms(site, [density], index, cost),
                    cost.dense_ms(site.dense_flops))


def _mean_ms(site: AttentionSite, densities, index: torch.Tensor, cost: CostModel) -> float:
    per_head = torch.tensor(densities, dtype=torch.float64)[index]  # (steps, H)
    return sum(cost.sparse_ms(site.dense_flops, row) for row in per_head) / len(per_head)


def _median_step_mask(masks: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The masks of the step of median density (the report gives their calibration recall)."""
    heads = torch.arange(index.shape[1])
    median_step = index.double().mean(-1).argsort()[len(index) // 2]
    return masks[index[median_step], heads]


def _describe(site, config: Config, site_map, schedule: Schedule) -> str:
    rule = {MaskRule.WEST: f"WEST ({site_map.source})" if site_map else "WEST",
            MaskRule.LOCAL_BAND: "local band", MaskRule.WINDOW_3D: "3-D window" if site.token_grid else
            "3-D window (no grid: 1-D band)"}[config.masks]
    warm = f" after {schedule.dense_steps} dense steps" if schedule.dense_steps else ""
    if schedule.kind == "fast" and config.warmup is None and config.min_fidelity is None:
        warm = f"{warm or ', no dense steps'} (fitted)"
    if schedule.kind == "fast":
        return f"{rule}, FAST beta={schedule.surface.beta:.3f} gamma={schedule.surface.gamma:g} " \
               f"omega={schedule.surface.omega:g}{warm}"
    return f"{rule}, uniform density {config.density:g}{warm}"
