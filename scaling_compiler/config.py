"""Backend options: validated once into a frozen dataclass.

`torch.compile(model, backend="scalingattn", options={...})` hands the options dict to
the backend; `Config.from_options` rejects unknown keys and bad values with an error that
names the option and what it accepts, instead of silently ignoring them.
"""
from __future__ import annotations

import dataclasses
import enum
import os
from typing import Any, Mapping

import torch

from .policies.dfsattn import (
    DEFAULT_DENSE_LAYERS, DEFAULT_DENSE_STEPS, DEFAULT_KEEP_RATIOS, DEFAULT_REFRESH_INTERVAL, DFSSchedule,
)
from .policies.token_order import TokenOrder

DEFAULT_DENSITY = 1.0
DEFAULT_CALIBRATION_SAMPLES = 8
DEFAULT_NUM_STEPS = 50
REPORT_ENV_VAR = "SCALINGATTN_REPORT"


class Policy(str, enum.Enum):
    """How the sparse blocks are chosen."""

    WEST_FAST = "west_fast"  # ScalingAttention: masks from the weights (WEST), densities tuned offline (FAST)
    DFSATTN = "dfsattn"  # DFSAttn: masks scored at run time from q and k, cached over steps


# options that one policy reads and the other does not: giving one to the other policy is an error
_WEST_FAST_OPTIONS = ("density", "masks", "schedule", "min_fidelity", "warmup", "calibration_samples",
                      "calibration_seed", "calibration_inputs", "topology_file")
_DFSATTN_OPTIONS = ("dense_steps", "refresh_interval", "keep_ratios", "dense_layers", "cfg_reuse")


class InnerCompiler(str, enum.Enum):
    """What compiles the rewritten graph."""

    INDUCTOR = "inductor"  # the default: inductor fuses everything around our op
    AOT_EAGER = "aot_eager"  # AOT tracing without code generation (debugging, fast tests)
    EAGER = "eager"  # run the rewritten FX graph as it is


class MaskRule(str, enum.Enum):
    """Where the block masks come from."""

    WEST = "west"  # per-head threshold maps calibrated from the weights (ScalingAttention)
    LOCAL_BAND = "local_band"  # the same diagonal band for every head (masks.local_band_mask)
    WINDOW_3D = "window_3d"  # the same 3-D local window for every head (masks.window_3d_mask)


class ScheduleKind(str, enum.Enum):
    """How densities vary over heads and diffusion steps."""

    FAST = "fast"  # per (layer, step, head) from fidelity curves and a budget surface (WEST masks only)
    UNIFORM = "uniform"  # every head and step at `density` (after `warmup` dense steps)


@dataclasses.dataclass(frozen=True)
class Config:
    density: float = DEFAULT_DENSITY
    """Fraction of 128x128 key blocks kept per head and query block. 1.0 runs every block through
    the sparse op (the compiled model then equals eager: a check of the whole path and of the op's
    overhead); below 1.0 the cost model keeps a site dense unless sparse is predicted 5% faster."""

    report: bool = False
    """Log the PassReport table of every compiled graph (also: SCALINGATTN_REPORT=1)."""

    compiler: InnerCompiler = InnerCompiler.INDUCTOR
    """Compiler for the rewritten graph: "inductor", "aot_eager" or "eager"."""

    token_grid: tuple[int, int, int] | None = None
    """(frames, height, width) of the video tokens, for models whose patch embedding
    does not reveal it (e.g. LTX-Video, which patchifies outside the model)."""

    masks: MaskRule = MaskRule.WEST
    """Mask rule: "west" (calibrated per head), "local_band" or "window_3d" (static, all heads alike)."""

    calibration_samples: int = DEFAULT_CALIBRATION_SAMPLES
    """Calibration runs of the graph for WEST, each on a batch shaped like the example inputs
    (a CFG batch of 2 calibrates on 2 videos per run)."""

    calibration_seed: int = 0
    """Seed of the prompt-agnostic calibration inputs."""

    calibration_inputs: tuple[Mapping[str, torch.Tensor], ...] | None = None
    """Your own calibration inputs: dicts from forward-argument name to tensor, used in turn."""

    topology_file: str | None = None
    """A topology written by `scalingattn calibrate`; resized to each site's token grid."""

    cache: bool = True
    """Reuse WEST topologies from the on-disk cache ($SCALINGATTN_CACHE_DIR)."""

    schedule: ScheduleKind | None = None
    """Density per head and step: "fast" (fidelity-aware, needs masks="west") or "uniform";
    default: "fast" with WEST masks, "uniform" with the static rules."""

    min_fidelity: float | None = None
    """FAST only: keep every (layer, step, head) at or above this fidelity instead of meeting
    `density` (the two are exclusive)."""

    num_steps: int = DEFAULT_NUM_STEPS
    """Steps of the schedule when `timesteps` is not given: even bins from timestep_max to 0."""

    timesteps: tuple[float, ...] | None = None
    """The sampler's timesteps (e.g. `scheduler.timesteps`), noisiest first: one schedule step
    each; at run time the model's timestep input picks the nearest."""

    warmup: float | None = None
    """The fraction of steps that run dense before the sparse ones; the `density` target counts
    them, so the sparse steps run sparser. None: uniform has none, and FAST's fit chooses it
    (`passes/tune.py` FIT_WARMUPS); 0 turns FAST's dense steps off."""

    timestep_max: float | None = None
    """Timestep at the first (noisiest) step; default: 1000 if the example timestep is > 1, else 1."""

    mode: str | None = None
    """Inductor mode for the rewritten graph, as `torch.compile(mode=...)` takes it (e.g.
    "reduce-overhead": CUDA graphs). `torch.compile(model, backend="scalingattn", mode=...)` sets it."""

    policy: Policy = Policy.WEST_FAST
    """Where sparse blocks come from: "west_fast" (ScalingAttention, the default) or "dfsattn"."""

    token_order: TokenOrder | None = None
    """Order of the video tokens inside each rewritten attention: "raster" (the model's), "morton" or
    "hilbert" (3-D curves: compact 128-token blocks); default "hilbert" with dfsattn, else "raster".
    With west_fast a curve order calibrates in that order and without the on-disk cache (its key
    has no token order yet); it needs masks "west" or "local_band" and no topology_file."""

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

    @property
    def sparse(self) -> bool:
        """west_fast: whether any mask can drop a block."""
        return self.density < 1.0 or self.min_fidelity is not None

    def dfs_schedule(self) -> DFSSchedule:
        """DFSAttn's step plan from these options."""
        return DFSSchedule(num_steps=self.num_steps, dense_steps=self.dense_steps,
                           refresh_interval=self.refresh_interval, keep_ratios=self.keep_ratios,
                           dense_layers=self.dense_layers, cfg_reuse=self.cfg_reuse)

    def __post_init__(self) -> None:
        self._check_policy()
        if isinstance(self.density, bool) or not isinstance(self.density, (int, float)):
            raise ValueError(f"option 'density' must be a number in (0, 1], got {self.density!r}")
        if not 0.0 < float(self.density) <= 1.0:
            raise ValueError(f"option 'density' must be in (0, 1], got {self.density!r}")
        object.__setattr__(self, "density", float(self.density))
        if not isinstance(self.report, bool):
            raise ValueError(f"option 'report' must be True or False, got {self.report!r}")
        _check_choice(self, "compiler", InnerCompiler)
        if self.mode is not None:
            from torch._inductor import list_mode_options

            modes = sorted(list_mode_options())
            if self.mode not in modes:
                raise ValueError(f"option 'mode' must be one of {modes}, got {self.mode!r}")
            if self.compiler is not InnerCompiler.INDUCTOR:
                raise ValueError(f"option 'mode' needs compiler='inductor' (got compiler={self.compiler.value!r})")
        _check_choice(self, "masks", MaskRule)
        for name in ("calibration_samples", "calibration_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "calibration_samples" else 0):
                raise ValueError(f"option {name!r} must be an int >= {int(name == 'calibration_samples')}, got {value!r}")
        if self.calibration_inputs is not None:
            inputs = tuple(self.calibration_inputs)
            if not inputs or not all(isinstance(d, Mapping) and all(torch.is_tensor(t) for t in d.values()) for d in inputs):
                raise ValueError("option 'calibration_inputs' must be a non-empty list of dicts {argument name: tensor}")
            object.__setattr__(self, "calibration_inputs", inputs)
        if self.topology_file is not None and not os.path.isfile(self.topology_file):
            raise ValueError(f"option 'topology_file': no such file {self.topology_file!r}")
        if self.schedule is None and self.policy is Policy.WEST_FAST:
            default = ScheduleKind.FAST if self.masks is MaskRule.WEST else ScheduleKind.UNIFORM
            object.__setattr__(self, "schedule", default)
        if self.schedule is not None:
            _check_choice(self, "schedule", ScheduleKind)
        if self.schedule is ScheduleKind.FAST and self.masks is not MaskRule.WEST:
            raise ValueError(f"option 'schedule'='fast' needs masks='west' (got masks={self.masks.value!r})")
        if self.min_fidelity is not None:
            if not isinstance(self.min_fidelity, (int, float)) or not 0.0 < self.min_fidelity < 1.0:
                raise ValueError(f"option 'min_fidelity' must be in (0, 1), got {self.min_fidelity!r}")
            if self.density != DEFAULT_DENSITY:
                raise ValueError("options 'density' and 'min_fidelity' are exclusive: give one target")
            if self.schedule is not ScheduleKind.FAST or self.masks is not MaskRule.WEST:
                raise ValueError("option 'min_fidelity' needs schedule='fast' and masks='west'")
        if self.timesteps is not None:
            try:
                values = tuple(float(t) for t in self.timesteps)
            except (TypeError, ValueError):
                values = ()
            if not values:
                raise ValueError(f"option 'timesteps' must be a non-empty sequence of numbers, got {self.timesteps!r}")
            if self.num_steps not in (DEFAULT_NUM_STEPS, len(values)):
                raise ValueError(f"options 'num_steps'={self.num_steps} and 'timesteps' ({len(values)} values) disagree")
            object.__setattr__(self, "timesteps", values)
            object.__setattr__(self, "num_steps", len(values))
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"option 'num_steps' must be an int >= 1, got {self.num_steps!r}")
        if self.warmup is not None and (isinstance(self.warmup, bool) or not isinstance(self.warmup, (int, float))
                                        or not 0.0 <= self.warmup < 1.0):
            raise ValueError(f"option 'warmup' must be a fraction in [0, 1), got {self.warmup!r}")
        if self.timestep_max is not None and not (isinstance(self.timestep_max, (int, float)) and self.timestep_max > 0):
            raise ValueError(f"option 'timestep_max' must be a positive number, got {self.timestep_max!r}")
        if not isinstance(self.cache, bool):
            raise ValueError(f"option 'cache' must be True or False, got {self.cache!r}")
        if self.token_grid is not None:
            grid = tuple(self.token_grid)
            if len(grid) != 3 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in grid):
                raise ValueError(
                    f"option 'token_grid' must be three positive ints (frames, height, width), got {self.token_grid!r}"
                )
            object.__setattr__(self, "token_grid", grid)
        self._check_token_order()

    def foreign_options(self) -> tuple[str, ...]:
        """Options of the other policy: at their defaults, and meaningless for this config."""
        return _DFSATTN_OPTIONS if self.policy is Policy.WEST_FAST else _WEST_FAST_OPTIONS

    def _check_policy(self) -> None:
        """The policy, its own options, and no option of the other policy."""
        _check_choice(self, "policy", Policy)
        for name in ("keep_ratios", "dense_layers"):  # JSON options arrive as lists
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in self.foreign_options():
            if getattr(self, name) != defaults[name]:
                raise ValueError(f"option {name!r} does not apply to policy={self.policy.value!r}")
        for name, least in (("dense_steps", 0), ("refresh_interval", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"option {name!r} must be an int >= {least}, got {value!r}")
        ratios = self.keep_ratios
        if not isinstance(ratios, tuple) or not ratios or not all(
                isinstance(r, (int, float)) and not isinstance(r, bool) and 0 < r <= 1 for r in ratios):
            raise ValueError(f"option 'keep_ratios' must be a non-empty list of numbers in (0, 1], got {ratios!r}")
        layers = self.dense_layers
        if not isinstance(layers, tuple) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                    for i in layers):
            raise ValueError(f"option 'dense_layers' must be a list of ints >= 0, got {layers!r}")
        if not isinstance(self.cfg_reuse, bool):
            raise ValueError(f"option 'cfg_reuse' must be True or False, got {self.cfg_reuse!r}")

    def _check_token_order(self) -> None:
        if self.token_order is None:
            default = TokenOrder.HILBERT if self.policy is Policy.DFSATTN else TokenOrder.RASTER
            object.__setattr__(self, "token_order", default)
        _check_choice(self, "token_order", TokenOrder)
        if self.policy is Policy.DFSATTN or self.token_order is TokenOrder.RASTER:
            return
        if self.masks is MaskRule.WINDOW_3D:
            raise ValueError(f"option 'token_order'={self.token_order.value!r} needs masks 'west' or 'local_band' "
                             "(the 3-D window is built in raster order)")
        if self.topology_file is not None:
            raise ValueError(f"option 'token_order'={self.token_order.value!r} cannot use a topology_file "
                             "(topology files are in raster order)")

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None) -> "Config":
        """Build a Config from torch.compile's `options` dict, naming any unknown key."""
        options = dict(options or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"unknown scalingattn option(s) {unknown}; valid options are {valid}")
        if "report" not in options and os.environ.get(REPORT_ENV_VAR, "") not in ("", "0"):
            options["report"] = True
        return cls(**options)


def _check_choice(config: Config, name: str, choices: type[enum.Enum]) -> None:
    try:
        object.__setattr__(config, name, choices(getattr(config, name)))
    except ValueError:
        valid = ", ".join(repr(c.value) for c in choices)
        raise ValueError(f"option {name!r} must be one of {valid}, got {getattr(config, name)!r}") from None
