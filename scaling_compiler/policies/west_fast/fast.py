"""FAST: how sparse each head is at each diffusion step (the "tune" stage of WEST+FAST).

WEST fixes *where* each head's blocks are (threshold maps); FAST fixes *how many*, per
(layer, step, head), so that a global density target is met with the best fidelity. Everything
here is a pure function of the fidelity curves and a frozen `FitSettings`.

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
  fidelity meets its target, but never one below `head_floor` x the density of the sparse steps. beta may
  exceed 1 (up to `beta_max`): the target then falls below zero, where any density will do, after the
  first cells, which is what lets low density targets be met at all. (beta, gamma, w) are fitted so the mean density over all
  (layer, step, head) meets the `density` option, maximising mean fidelity with early steps
  weighted more (`step_weight`); or, with `min_fidelity`, beta = 1 - min_fidelity and (gamma, w)
  minimise density.
- Dense first steps: the surface reaches target 1 only at x = 0, but on the trained tiny DiT
  fully dense first steps place the objects where the dense video has them (benchmarks/NOTES.md,
  "FAST's fit on the GPU"). So the fit also chooses a dense warm-up from `warmups`, with the
  surface over the steps after it, by the same step-weighted score, among those that leave the
  sparse steps at least `head_floor` x the target (the `warmup` option fixes it).
- Uniform density (optionally with dense warm-up steps) is the ablation FAST must beat.
"""
from __future__ import annotations

import dataclasses
import enum
import itertools
import logging

import torch

from ...kernels.bitmask import BLOCK_SIZE
from .topology import SiteTopology

log = logging.getLogger(__name__)

# Densities a head can take at a step: each is one precomputed mask per site, so the ladder
# length bounds memory (the report's mask_bytes).
DENSITY_LADDER = (1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.12, 0.1, 0.08, 0.06, 0.05, 0.04, 0.03)


class ScheduleKind(str, enum.Enum):
    """How densities vary over heads and diffusion steps."""

    FAST = "fast"  # per (layer, step, head) from fidelity curves and a budget surface (WEST masks only)
    UNIFORM = "uniform"  # every head and step at `density` (after `warmup` dense steps)


@dataclasses.dataclass(frozen=True)
class FitSettings:
    """The constants of FAST's fit (benchmarks/policies/fast_ablation.py varies them).

    The defaults were chosen by ablation on the H100 (benchmarks/NOTES.md, "FAST's fit on the GPU").
    """

    step_weight: float = 1.0
    """The fit scores a surface by its mean predicted fidelity with step t of T weighted by
    (1 - (t + 1/2) / T) ** step_weight: an error at step t is carried through the T - t later steps,
    which per-row fidelity (the same curves at every step) cannot see. Unweighted (0), the fit
    spreads density evenly over steps."""

    head_floor: float = 0.75
    """No head of any (layer, step) below this fraction of the density target (after warm-up).
    Recall-based fidelity rates some heads as fine with one or two key blocks per row; on the trained
    tiny DiT those heads matter more than it says: 0.75 against 0.5 costs 0.4 dB PSNR at density 0.25
    and gains 1.2 dB at 0.1."""

    warmups: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2)
    """Dense warm-up fractions the fit chooses from when the `warmup` option is not given."""

    gammas: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0)
    omegas: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    beta_max: float = 16.0
    ladder: tuple[float, ...] = DENSITY_LADDER  # descending, starting at 1.0


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
    """Per head, the fidelity of the WEST mask at each of `densities`."""
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

    kind: ScheduleKind
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
                  warmup: float | None = None, settings: FitSettings = FitSettings()) -> Schedule:
    """Fit the budget surface to a density target (or a fidelity floor) and pick per-cell densities.

    With `warmup`, the first round(warmup * steps) steps are dense and the surface is fitted over
    the others, with the density left after the dense steps. Without it, a density target fits
    the warm-up too: of `settings.warmups`, those that leave the sparse steps `head_floor` x the
    target, the best step-weighted fidelity wins.
    """
    if warmup is not None or min_fidelity is not None:
        fractions = (warmup or 0.0,)
    else:
        fractions = tuple(f for f in settings.warmups if _leaves_floor(density, steps, round(f * steps), settings))
    fits = [_after_dense_steps(curves, steps, density, min_fidelity, f, settings) for f in fractions]
    meeting = [fit for fit, met in fits if met]
    if meeting:
        return max(meeting, key=lambda fit: step_weighted_fidelity(fit, settings.step_weight))
    closest = min((fit for fit, _ in fits), key=lambda fit: _miss(fit, density))
    # the schedule's mean is in ladder densities, not the masks' kept fractions: the report gives those
    log.warning("scalingattn: FAST cannot meet density %.3g within 1%% with ladder %s; using the closest "
                "schedule (each site's density is in the report)", density, settings.ladder)
    return closest


def step_weighted_fidelity(schedule: Schedule, step_weight: float) -> float:
    """The fit's score: mean predicted fidelity, step t of T weighted by (1 - (t + 1/2) / T) ** step_weight."""
    steps = len(schedule.step_fidelity)
    weights = (1.0 - (torch.arange(steps, dtype=torch.float64) + 0.5) / steps) ** step_weight
    return float((weights * schedule.step_fidelity).sum() / weights.sum())


def _leaves_floor(density: float, steps: int, dense_steps: int, settings: FitSettings) -> bool:
    """Whether the steps after `dense_steps` dense ones keep `head_floor` x `density` on average. A fitted
    warm-up must: the score overrates dense steps bought with starved sparse ones (on the tiny DiT,
    20% at 0.25 and 5% at 0.1 lost 3-4 dB; benchmarks/NOTES.md)."""
    if dense_steps == 0:
        return True
    return (density * steps > dense_steps
            and after_warmup(density, steps, dense_steps) >= settings.head_floor * density - 1e-12)


def _after_dense_steps(curves, steps, density, min_fidelity, warmup: float, settings: FitSettings
                       ) -> tuple[Schedule, bool]:
    """The fit after round(warmup * steps) dense steps, and whether it meets the density target."""
    dense_steps = round(warmup * steps)
    if dense_steps and density is not None:
        density = after_warmup(density, steps, dense_steps)
    rest, met = _fit(curves, steps - dense_steps, density, min_fidelity, settings)
    if dense_steps:
        rest.index = [torch.cat([torch.zeros(dense_steps, i.shape[1], dtype=torch.int64), i]) for i in rest.index]
        rest.step_fidelity = torch.cat([torch.ones(dense_steps, dtype=torch.float64), rest.step_fidelity])
        rest.dense_steps = dense_steps
    return rest, met


def _fit(curves, steps, density, min_fidelity, settings: FitSettings) -> tuple[Schedule, bool]:
    """The surface over `steps` (no dense warm-up) that best meets the target, and whether it meets
    the density within 1% (if none does: the surface whose density comes closest)."""
    if density is not None:
        curves = [curve.at_least(settings.head_floor * density) for curve in curves]
    best: tuple[float, Schedule] | None = None
    closest: Schedule | None = None
    for gamma, omega in itertools.product(settings.gammas, settings.omegas):
        if min_fidelity is not None:
            schedule = _cells(curves, steps, BudgetSurface(1.0 - min_fidelity, gamma, omega))
            score = -schedule.mean_density  # the floor holds everywhere: be as sparse as possible
        else:
            schedule = _fit_beta(curves, steps, gamma, omega, density, settings.beta_max)
            if not _meets(schedule, density):
                if closest is None or _miss(schedule, density) < _miss(closest, density):
                    closest = schedule
                continue
            score = step_weighted_fidelity(schedule, settings.step_weight)
        if best is None or score > best[0]:
            best = (score, schedule)
    return (closest, False) if best is None else (best[1], True)


def _miss(schedule: Schedule, density: float) -> float:
    return abs(schedule.mean_density - density)


def _meets(schedule: Schedule, density: float) -> bool:
    return _miss(schedule, density) <= 0.01 * density


def _fit_beta(curves, steps, gamma, omega, density, beta_max: float) -> Schedule:
    """Bisect beta so the mean density meets `density` within 1% (relative); if no beta does, the
    loosest surface when even it keeps too much, else the closest below the target."""
    low, high = 0.0, beta_max  # density decreases as beta grows
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
    return Schedule(ScheduleKind.FAST, [c.densities for c in curves], index, surface, torch.stack(fidelity).mean(0),
                    [c.kept for c in curves])


def after_warmup(density: float, steps: int, dense_steps: int) -> float:
    """The density of the non-dense steps that makes the mean over all steps `density`."""
    if dense_steps >= steps or density * steps <= dense_steps:
        raise ValueError(f"option 'warmup': {dense_steps} dense steps of {steps} exceed density {density:g}")
    return (density * steps - dense_steps) / (steps - dense_steps)


def uniform_schedule(heads: list[int], steps: int, density: float, warmup: float = 0.0) -> Schedule:
    """Every head at one density, after `warmup` (a fraction of the steps) of dense steps.

    The density after warm-up is lowered so that the mean over all steps meets `density`.
    """
    dense_steps = round(warmup * steps)
    sparse = after_warmup(density, steps, dense_steps) if dense_steps else density
    densities = (1.0, sparse) if sparse < 1.0 else (1.0,)
    index = torch.full((steps, 1), len(densities) - 1, dtype=torch.int64)
    index[:dense_steps] = 0
    return Schedule(ScheduleKind.UNIFORM, [densities] * len(heads), [index.expand(steps, h).clone() for h in heads],
                    None, None, dense_steps=dense_steps)
