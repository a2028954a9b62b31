"""The west_fast policy (ScalingAttention): WEST masks from the weights, FAST densities per (layer, step, head).

calibrate (WEST, `calibrate.py`): per-head threshold maps from running the graph at compile time,
from a topology file or the on-disk cache; or a static rule (`policies/static/`) for every head.
tune (FAST, `fast.py`): the density of each head at each step, meeting the `density` target; or
one uniform density. Then per site a `MaskPlan` (`plan.py`) with its masks and the cost model's
verdict: a site stays dense unless sparse is predicted to pay.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping

import torch

from ...cost_model import CostModel
from ...passes.ulysses import agree, permute_heads
from ...passes.inputs import step_source, step_timesteps
from ...sites import GraphRecord, Site
from ..base import Policy, PolicyOptions
from ..block_masks import with_text_dense
from ..static import RULES
from ..token_order import TokenOrder
from .calibrate import CalibrationError, west_topology
from .fast import FitSettings, Schedule, ScheduleKind, fast_schedule, fidelity_curve, uniform_schedule
from .parallel import RankTimes, balance, head_ms, local_view, rank_times, total_heads
from .plan import build_plan, full_mask, median_step_mask, unless_slower
from .topology import Topology

log = logging.getLogger(__name__)

WEST = "west"  # the `masks` value of calibrated per-head masks; the static rules' names are the others
DEFAULT_DENSITY = 1.0
DEFAULT_CALIBRATION_SAMPLES = 8


@dataclasses.dataclass(frozen=True)
class WestFastOptions(PolicyOptions):
    density: float = DEFAULT_DENSITY
    """Fraction of 128x128 key blocks kept per head and query block. 1.0 runs every block through
    the sparse op (the compiled model then equals eager: a check of the whole path and of the op's
    overhead); below 1.0 the cost model keeps a site dense unless sparse is predicted 5% faster."""

    masks: str = WEST
    """Mask rule: "west" (calibrated per head) or a static rule of `policies/static/` ("local_band",
    "window_3d": all heads alike)."""

    schedule: ScheduleKind | None = None
    """Density per head and step: "fast" (fidelity-aware, needs masks="west") or "uniform";
    default: "fast" with WEST masks, "uniform" with the static rules."""

    min_fidelity: float | None = None
    """FAST only: keep every (layer, step, head) at or above this fidelity instead of meeting
    `density` (the two are exclusive)."""

    warmup: float | None = None
    """The fraction of steps that run dense before the sparse ones; the `density` target counts
    them, so the sparse steps run sparser. None: uniform has none, and FAST's fit chooses it
    (`FitSettings.warmups`); 0 turns FAST's dense steps off."""

    calibration_samples: int = DEFAULT_CALIBRATION_SAMPLES
    """Calibration runs of the graph for WEST, each on a batch shaped like the example inputs
    (a CFG batch of 2 calibrates on 2 videos per run)."""

    calibration_seed: int = 0
    """Seed of the prompt-agnostic calibration inputs."""

    calibration_inputs: tuple[Mapping[str, torch.Tensor], ...] | None = None
    """Your own calibration inputs: dicts from forward-argument name to tensor, used in turn."""

    topology_file: str | None = None
    """A topology written by `scalingattn calibrate`; resized to each site's token grid."""

    balance_heads: bool = False
    """Under diffusers' Ulysses context parallelism: permute each site's heads around its all-to-alls so
    that every rank's predicted attention time is about equal (FAST gives heads different densities)."""

    @property
    def sparse(self) -> bool:
        """Whether any mask can drop a block."""
        return self.density < 1.0 or self.min_fidelity is not None

    def __post_init__(self) -> None:
        if isinstance(self.density, bool) or not isinstance(self.density, (int, float)):
            raise ValueError(f"option 'density' must be a number in (0, 1], got {self.density!r}")
        if not 0.0 < float(self.density) <= 1.0:
            raise ValueError(f"option 'density' must be in (0, 1], got {self.density!r}")
        object.__setattr__(self, "density", float(self.density))
        rules = [WEST, *RULES]
        if self.masks not in rules:
            raise ValueError(f"option 'masks' must be one of {', '.join(map(repr, rules))}, got {self.masks!r}")
        for name in ("calibration_samples", "calibration_seed"):
            value, least = getattr(self, name), int(name == "calibration_samples")
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"option {name!r} must be an int >= {least}, got {value!r}")
        if self.calibration_inputs is not None:
            inputs = tuple(self.calibration_inputs)
            if not inputs or not all(isinstance(d, Mapping) and all(torch.is_tensor(t) for t in d.values())
                                     for d in inputs):
                raise ValueError("option 'calibration_inputs' must be a non-empty list of dicts {argument name: tensor}")
            object.__setattr__(self, "calibration_inputs", inputs)
        self.check_topology_file()
        if not isinstance(self.balance_heads, bool):
            raise ValueError(f"option 'balance_heads' must be True or False, got {self.balance_heads!r}")
        self._check_schedule()
        if self.warmup is not None and (isinstance(self.warmup, bool) or not isinstance(self.warmup, (int, float))
                                        or not 0.0 <= self.warmup < 1.0):
            raise ValueError(f"option 'warmup' must be a fraction in [0, 1), got {self.warmup!r}")

    def _check_schedule(self) -> None:
        schedule = self.schedule
        if schedule is None:
            schedule = ScheduleKind.FAST if self.masks == WEST else ScheduleKind.UNIFORM
        try:
            object.__setattr__(self, "schedule", ScheduleKind(schedule))
        except ValueError:
            valid = ", ".join(repr(c.value) for c in ScheduleKind)
            raise ValueError(f"option 'schedule' must be one of {valid}, got {schedule!r}") from None
        if self.schedule is ScheduleKind.FAST and self.masks != WEST:
            raise ValueError(f"option 'schedule'='fast' needs masks='west' (got masks={self.masks!r})")
        if self.min_fidelity is not None:
            if not isinstance(self.min_fidelity, (int, float)) or not 0.0 < self.min_fidelity < 1.0:
                raise ValueError(f"option 'min_fidelity' must be in (0, 1), got {self.min_fidelity!r}")
            if self.density != DEFAULT_DENSITY:
                raise ValueError("options 'density' and 'min_fidelity' are exclusive: give one target")
            if self.schedule is not ScheduleKind.FAST:
                raise ValueError("option 'min_fidelity' needs schedule='fast' and masks='west'")

    def check_warmup(self, steps: int, timestep_input: bool = True) -> None:
        """A fixed `warmup` must leave sparse steps and room under `density`: checked when the number
        of steps is known (the options, then each graph before calibration), not after calibrating."""
        if self.warmup is None or not self.sparse:
            return
        dense_steps = round(self.warmup * steps)
        where = "" if timestep_input else " (the graph has no timestep input: one step)"
        if dense_steps and dense_steps >= steps:
            raise ValueError(f"option 'warmup'={self.warmup:g}: {dense_steps} dense steps of {steps}{where} leave "
                             "no sparse step; lower warmup")
        if dense_steps and self.min_fidelity is None and self.density * steps <= dense_steps:
            raise ValueError(f"option 'warmup'={self.warmup:g}: {dense_steps} dense steps of {steps}{where} already "
                             f"exceed option 'density'={self.density:g} (the density counts the dense steps); "
                             "lower warmup or raise density")

    def check_topology_file(self) -> None:
        """Read the topology file once, so that a bad one fails with the option's name before any graph."""
        if self.topology_file is None:
            return
        if not os.path.isfile(self.topology_file):
            raise ValueError(f"option 'topology_file': no such file {self.topology_file!r}")
        try:
            Topology.load(self.topology_file)
        except (ValueError, OSError) as error:  # TopologyFileError is a ValueError
            raise ValueError(f"option 'topology_file': {error}") from error

    def check(self, config: Any) -> None:
        self.check_warmup(config.num_steps)
        order = config.token_order
        if order is TokenOrder.RASTER:
            return
        if self.masks != WEST and RULES[self.masks].raster_only:
            raise ValueError(f"option 'token_order'={order.value!r} needs a rule built in any order, not "
                             f"masks={self.masks!r} (it is built in raster order)")
        if self.topology_file is not None:
            raise ValueError(f"option 'token_order'={order.value!r} cannot use a topology_file "
                             "(topology files are in raster order)")


@dataclasses.dataclass
class UlyssesPlan:
    """west_fast's run-time state under Ulysses: what the report says of the ranks' balance."""

    rank_times: RankTimes
    balanced: bool  # the heads were permuted to the balanced order (option balance_heads)

    def report_line(self) -> str:
        applied = "heads permuted to the balanced order" if self.balanced else "heads in the model's order"
        return f"Ulysses: {self.rank_times.line()}; {applied}"

    def report_json(self) -> dict:
        return {"ulysses": {"rank_ms_before": list(self.rank_times.before),
                            "rank_ms_balanced": list(self.rank_times.after), "balanced": self.balanced}}


def _dense_on_every_rank(site: Site) -> None:
    """A site the cost model keeps dense on one Ulysses rank runs dense on all: one decision per site."""
    if site.plan is not None:
        site.plan, site.dense_reason = None, "cost model: sparse does not pay on another Ulysses rank's heads"


def _add(total: list[float] | None, times: tuple[float, ...]) -> list[float]:
    return list(times) if total is None else [a + b for a, b in zip(total, times)]


class WestFastPolicy(Policy):
    name = "west_fast"
    options_class = WestFastOptions

    def __init__(self, config: Any, cost_model: CostModel | None = None, fast_fit: FitSettings | None = None) -> None:
        super().__init__(config, cost_model)
        self.fit = fast_fit or FitSettings()

    def plan(self, graph: GraphRecord) -> None:
        config, options = self.config, self.options
        steps = config.num_steps if graph.timestep is not None else 1
        options.check_warmup(steps, graph.timestep is not None)  # before calibration, not after it
        timestep_max = graph.timestep.timestep_max if graph.timestep else (config.timestep_max or 1000.0)
        graph.step_timesteps = step_timesteps(timestep_max, steps,
                                              config.timesteps if graph.timestep is not None else None)
        graph.step_source = step_source(graph.timestep, steps, config.timesteps is not None)
        sites = graph.rewritable
        if not sites:
            return
        if not options.sparse:  # every block through the op, whatever the cost: the exactness and overhead check
            if any(site.ulysses is not None for site in sites):
                heads = [total_heads(site) for site in sites]
                graph.policy_state = self._balance(graph, sites, uniform_schedule(heads, steps, 1.0))
            for site in sites:
                site.plan = build_plan(site, full_mask(site)[None], (1.0,), torch.zeros(1, site.heads, dtype=torch.int64),
                                       graph.step_timesteps, "density 1: every block", None, self._cost(site))
            return
        topology = None
        if options.masks == WEST:
            try:
                topology, graph.masks_origin, graph.calibration_seconds = west_topology(graph, sites, options)
            except CalibrationError as error:
                self._calibration_failed(graph, sites, error)
                return
            graph.topology = topology
        else:
            graph.masks_origin = f"{options.masks} rule"
        schedule = self._schedule(sites, topology, steps)  # all heads of the model, on every rank
        graph.schedule = schedule.kind.value
        if any(site.ulysses is not None for site in sites):
            graph.policy_state = self._balance(graph, sites, schedule)
            topology, schedule = local_view(topology, schedule, sites)  # this rank's heads
        for i, site in enumerate(sites):
            self._plan_site(site, schedule, i, topology, graph.step_timesteps, self._cost(site))
        for site in sites:
            if site.ulysses is not None and not agree(site.plan is not None, site.ulysses, site.device):
                _dense_on_every_rank(site)

    def _balance(self, graph: GraphRecord, sites: list[Site], schedule: Schedule) -> "UlyssesPlan":
        """Each rank's predicted attention time with the model's head order and with `balance`'s; with
        option `balance_heads`, the graph's heads permuted around the all-to-alls to the balanced order."""
        parallel = [(i, site) for i, site in enumerate(sites) if site.ulysses is not None]
        before: list[float] | None = None
        after: list[float] | None = None
        orders = []
        for i, site in parallel:
            times, world = head_ms(site, schedule, i, self._cost(site)), site.ulysses.world
            orders.append(balance(times, world, after))
            before = _add(before, rank_times(times, range(len(times)), world))
            after = _add(after, rank_times(times, orders[-1], world))
        # the model's order where balancing predicts no gain (e.g. FAST's densities already even out over sites)
        applied = (self.options.balance_heads and RankTimes.spread(after) <= RankTimes.spread(before)
                   and self._permutable(parallel))
        if applied:
            for (_, site), order in zip(parallel, orders):
                site.ulysses = permute_heads(graph.gm.graph, site.ulysses, order)
            graph.gm.recompile()
        return UlyssesPlan(RankTimes(tuple(before), tuple(after)), applied)

    @staticmethod
    def _permutable(parallel: list[tuple[int, Site]]) -> bool:
        unknown = [site.name for _, site in parallel if site.ulysses.head_out is None]
        if unknown:
            log.warning("scalingattn: option 'balance_heads': the Ulysses all-to-alls of %s are not recognised; "
                        "heads keep the model's order", unknown)
        return not unknown

    def _cost(self, site: Site) -> CostModel:
        """A training site (inputs requiring grad) is timed forward plus backward, on both sides."""
        return self.cost_model(site.device, site.requires_grad)

    @staticmethod
    def _calibration_failed(graph: GraphRecord, sites: list[Site], error: CalibrationError) -> None:
        """Keep this graph's sites dense: a model calibration cannot run must still compile and run."""
        reason = f"WEST calibration failed ({error})"
        log.warning("scalingattn: %s; the graph's %d attention sites stay dense", reason, len(sites))
        log.debug("scalingattn: calibration failure", exc_info=error.__cause__)
        graph.masks_origin = reason
        for site in sites:
            site.dense_reason = reason

    def _schedule(self, sites: list[Site], topology: Topology | None, steps: int) -> Schedule:
        options = self.options
        if options.schedule is ScheduleKind.FAST:
            curves = [fidelity_curve(topology.sites[site.name], self.fit.ladder) for site in sites]
            density = None if options.min_fidelity else options.density
            return fast_schedule(curves, steps, density, options.min_fidelity, options.warmup, self.fit)
        return uniform_schedule([total_heads(site) for site in sites], steps, options.density, options.warmup or 0.0)

    def _plan_site(self, site: Site, schedule: Schedule, i: int, topology: Topology | None,
                   timesteps: torch.Tensor, cost: CostModel) -> None:
        densities, index = schedule.densities[i], schedule.index[i]
        used = sorted({densities[j] for j in index.unique().tolist()}, reverse=True)
        index = torch.tensor([used.index(d) if d in used else -1 for d in densities])[index]  # drop unused
        masks = torch.stack([self._mask(site, topology, d) for d in used])
        site_map = topology.sites[site.name] if topology is not None else None
        recall = site_map.recall(median_step_mask(masks, index)) if site_map is not None else None
        plan = build_plan(site, masks, tuple(used), index, timesteps, self._describe(site, site_map, schedule),
                          recall, cost)
        verdict = unless_slower(plan, cost)
        if isinstance(verdict, str):
            site.dense_reason = verdict
        else:
            site.plan = verdict

    def _mask(self, site: Site, topology: Topology | None, density: float) -> torch.Tensor:
        if density == 1.0:
            return full_mask(site)
        if self.options.masks != WEST:
            return RULES[self.options.masks].mask(site, density)
        mask, _ = topology.sites[site.name].mask_for_density(density)
        return with_text_dense(mask, site.text_spans).cpu()

    def _describe(self, site: Site, site_map, schedule: Schedule) -> str:
        options = self.options
        if options.masks == WEST:
            rule = f"WEST ({site_map.source})" if site_map else "WEST"
        else:
            rule = RULES[options.masks].describe(site)
        warm = f" after {schedule.dense_steps} dense steps" if schedule.dense_steps else ""
        if schedule.kind is ScheduleKind.FAST:
            if options.warmup is None and options.min_fidelity is None:
                warm = f"{warm or ', no dense steps'} (fitted)"
            surface = schedule.surface
            return f"{rule}, FAST beta={surface.beta:.3f} gamma={surface.gamma:g} omega={surface.omega:g}{warm}"
        return f"{rule}, uniform density {options.density:g}{warm}"
