"""Backend options: validated once into a frozen dataclass.

`torch.compile(model, backend="scalingattn", options={...})` hands the options dict to the
backend. `Config.from_options` splits it into the options every policy shares (the fields
below) and the active policy's own (its `options_class`, in `policies/<name>/`), rejecting
unknown keys and another policy's keys with an error that names the option and what it accepts.
Each option is validated in one place: the common ones here, a policy's in its options class.
"""
from __future__ import annotations

import dataclasses
import enum
import math
import os
from typing import Any, Mapping

from .policies import DEFAULT_POLICY, POLICIES, policy_class
from .policies.base import PolicyOptions
from .policies.token_order import TokenOrder
from .sites import FP8

DEFAULT_NUM_STEPS = 50
REPORT_ENV_VAR = "SCALINGATTN_REPORT"


class InnerCompiler(str, enum.Enum):
    """What compiles the rewritten graph."""

    INDUCTOR = "inductor"  # the default: inductor fuses everything around our op
    AOT_EAGER = "aot_eager"  # AOT tracing without code generation (debugging, fast tests)
    EAGER = "eager"  # run the rewritten FX graph as it is


@dataclasses.dataclass(frozen=True)
class Config:
    policy: str = DEFAULT_POLICY
    """Where sparse blocks come from: "west_fast" (ScalingAttention, the default) or "dfsattn"."""

    options: PolicyOptions | None = None
    """The policy's own options (its `options_class`); None: its defaults."""

    report: bool = False
    """Log the PassReport table of every compiled graph (also: SCALINGATTN_REPORT=1)."""

    compiler: InnerCompiler = InnerCompiler.INDUCTOR
    """Compiler for the rewritten graph: "inductor", "aot_eager" or "eager"."""

    mode: str | None = None
    """Inductor mode for the rewritten graph, as `torch.compile(mode=...)` takes it (e.g.
    "reduce-overhead": CUDA graphs). `torch.compile(model, backend="scalingattn", mode=...)` sets it."""

    token_grid: tuple[int, int, int] | None = None
    """(frames, height, width) of the video tokens, for models whose patch embedding
    does not reveal it (e.g. LTX-Video, which patchifies outside the model)."""

    token_order: TokenOrder | None = None
    """Order of the video tokens inside each rewritten attention: "raster" (the model's), "morton" or
    "hilbert" (3-D curves: compact 128-token blocks); default: the policy's ("hilbert" with dfsattn,
    else "raster"). Topologies are cached per order."""

    num_steps: int = DEFAULT_NUM_STEPS
    """Steps of the schedule when `timesteps` is not given: even bins from timestep_max to 0."""

    timesteps: tuple[float, ...] | None = None
    """The sampler's timesteps (e.g. `scheduler.timesteps`), noisiest first: one schedule step
    each; at run time the model's timestep input picks the nearest."""

    timestep_max: float | None = None
    """Timestep at the first (noisiest) step; default: 1000 if the example timestep is > 1, else 1."""

    cache: bool = True
    """Reuse WEST topologies from the on-disk cache ($SCALINGATTN_CACHE_DIR)."""

    linear_branch: bool = False
    """SALAD: add a gated linear-attention branch (zero-initialised, trainable) beside each sparse
    site; its parameters are the backend's `linear_branches`."""

    linear_branch_weights: str | None = None
    """A safetensors file of tuned branches (`LinearBranches.save`) to load; needs `linear_branch`."""

    attention_dtype: str | None = None
    """None: sparse sites compute in their own dtype; "fp8": they run the FP8 op where it can
    (inference, fp16/bf16, head dim 64 or 128; the report says why a site does not)."""

    def __post_init__(self) -> None:
        policy = policy_class(self.policy)
        if self.options is None:
            object.__setattr__(self, "options", policy.options_class())
        elif not isinstance(self.options, policy.options_class):
            raise ValueError(f"policy {self.policy!r} takes {policy.options_class.__name__}, "
                             f"got {type(self.options).__name__}")
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
        self._check_steps()
        if not isinstance(self.cache, bool):
            raise ValueError(f"option 'cache' must be True or False, got {self.cache!r}")
        self._check_linear_branch()
        if self.attention_dtype not in (None, FP8):
            raise ValueError(f"option 'attention_dtype' must be None (each site's own dtype) or {FP8!r}, "
                             f"got {self.attention_dtype!r}")
        if self.token_grid is not None:
            grid = tuple(self.token_grid)
            if len(grid) != 3 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in grid):
                raise ValueError(
                    f"option 'token_grid' must be three positive ints (frames, height, width), got {self.token_grid!r}"
                )
            object.__setattr__(self, "token_grid", grid)
        if self.token_order is None:
            object.__setattr__(self, "token_order", policy.default_token_order)
        _check_choice(self, "token_order", TokenOrder)
        self.options.check(self)

    def _check_linear_branch(self) -> None:
        if not isinstance(self.linear_branch, bool):
            raise ValueError(f"option 'linear_branch' must be True or False, got {self.linear_branch!r}")
        if self.linear_branch_weights is not None:
            if not isinstance(self.linear_branch_weights, (str, os.PathLike)):
                raise ValueError(f"option 'linear_branch_weights' must be a path, got {self.linear_branch_weights!r}")
            if not self.linear_branch:
                raise ValueError("option 'linear_branch_weights' needs linear_branch=True")
            object.__setattr__(self, "linear_branch_weights", os.fspath(self.linear_branch_weights))

    def _check_steps(self) -> None:
        if self.timesteps is not None:
            try:
                values = tuple(float(t) for t in self.timesteps)
            except (TypeError, ValueError):
                values = ()
            if not values:
                raise ValueError(f"option 'timesteps' must be a non-empty sequence of numbers, got {self.timesteps!r}")
            # each call picks the nearest step: NaN or an unordered list would pick one step for every call
            if not all(math.isfinite(t) for t in values):
                raise ValueError(f"option 'timesteps' must be finite numbers, got {_preview(values)}")
            rising = next((i for i in range(1, len(values)) if values[i] >= values[i - 1]), None)
            if rising is not None:
                raise ValueError(
                    "option 'timesteps' must be strictly decreasing (noisiest first, as scheduler.timesteps), "
                    f"got {values[rising - 1]:g} then {values[rising]:g} at positions {rising - 1}, {rising}"
                )
            if self.num_steps not in (DEFAULT_NUM_STEPS, len(values)):
                raise ValueError(f"options 'num_steps'={self.num_steps} and 'timesteps' ({len(values)} values) disagree")
            object.__setattr__(self, "timesteps", values)
            object.__setattr__(self, "num_steps", len(values))
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"option 'num_steps' must be an int >= 1, got {self.num_steps!r}")
        if self.timestep_max is not None and not (isinstance(self.timestep_max, (int, float))
                                                  and math.isfinite(self.timestep_max) and self.timestep_max > 0):
            raise ValueError(f"option 'timestep_max' must be a positive number, got {self.timestep_max!r}")

    def as_dict(self) -> dict[str, Any]:
        """The options as JSON values, flat as the user gives them (the policy's after the common
        ones; user calibration inputs summarised by their count)."""
        result = {}
        for holder in (self, self.options):
            for field in dataclasses.fields(holder):
                if holder is self and field.name == "options":
                    continue
                value = getattr(holder, field.name)
                if field.name == "calibration_inputs" and value is not None:
                    value = f"{len(value)} user inputs"
                result[field.name] = value.value if isinstance(value, enum.Enum) else value
        return result

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None) -> "Config":
        """Build a Config from torch.compile's `options` dict, naming any unknown or misplaced key."""
        options = options_dict(options)
        policy = policy_class(options.get("policy", DEFAULT_POLICY))
        common = [f.name for f in dataclasses.fields(cls) if f.name != "options"]
        own = [f.name for f in dataclasses.fields(policy.options_class)]
        others = {f.name: (other.name, f.default) for other in POLICIES.values() if other is not policy
                  for f in dataclasses.fields(other.options_class)}
        for name in sorted(set(options) - set(common) - set(own)):
            if name in others:  # another policy's option: harmless at its default, an error otherwise
                owner, default = others[name]
                value = options.pop(name)
                if (tuple(value) if isinstance(value, list) else value) != default:
                    raise ValueError(f"option {name!r} does not apply to policy={policy.name!r} "
                                     f"(it is an option of policy={owner!r})")
        unknown = sorted(set(options) - set(common) - set(own))
        if unknown:
            valid = own + common + list(others)
            raise ValueError(f"unknown scalingattn option(s) {unknown}; valid options are {valid}")
        if "report" not in options and os.environ.get(REPORT_ENV_VAR, "") not in ("", "0"):
            options["report"] = True
        policy_options = policy.options_class(**{name: options.pop(name) for name in own if name in options})
        return cls(options=policy_options, **options)


def options_dict(options: Any) -> dict[str, Any]:
    """torch.compile's `options` as a fresh dict, or a TypeError naming `options` (torch passes
    whatever it was given; `**options` on a list would fail with a message naming nothing)."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise TypeError(f"scalingattn: 'options' must be a dict of option names to values, e.g. "
                        f"options={{'density': 0.5}}; got {type(options).__name__} {_short(repr(options))}")
    bad = [name for name in options if not isinstance(name, str)]
    if bad:
        raise TypeError(f"scalingattn: 'options' keys must be option names (str), got {_short(repr(bad))}")
    return dict(options)


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_choice(config: Config, name: str, choices: type[enum.Enum]) -> None:
    try:
        object.__setattr__(config, name, choices(getattr(config, name)))
    except ValueError:
        valid = ", ".join(repr(c.value) for c in choices)
        raise ValueError(f"option {name!r} must be one of {valid}, got {getattr(config, name)!r}") from None


def _preview(values: tuple[float, ...], limit: int = 8) -> str:
    shown = ", ".join(f"{v:g}" for v in values[:limit])
    return f"({shown}{', ...' if len(values) > limit else ''})"
