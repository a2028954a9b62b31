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

DEFAULT_DENSITY = 1.0
REPORT_ENV_VAR = "SCALINGATTN_REPORT"


class InnerCompiler(str, enum.Enum):
    """What compiles the rewritten graph."""

    INDUCTOR = "inductor"  # the default: inductor fuses everything around our op
    AOT_EAGER = "aot_eager"  # AOT tracing without code generation (debugging, fast tests)
    EAGER = "eager"  # run the rewritten FX graph as it is


@dataclasses.dataclass(frozen=True)
class Config:
    density: float = DEFAULT_DENSITY
    """Fraction of 128x128 key blocks kept per head and query block (1.0 keeps all)."""

    report: bool = False
    """Log the PassReport table of every compiled graph (also: SCALINGATTN_REPORT=1)."""

    compiler: InnerCompiler = InnerCompiler.INDUCTOR
    """Compiler for the rewritten graph: "inductor", "aot_eager" or "eager"."""

    token_grid: tuple[int, int, int] | None = None
    """(frames, height, width) of the video tokens, for models whose patch embedding
    does not reveal it (e.g. LTX-Video, which patchifies outside the model)."""

    def __post_init__(self) -> None:
        if isinstance(self.density, bool) or not isinstance(self.density, (int, float)):
            raise ValueError(f"option 'density' must be a number in (0, 1], got {self.density!r}")
        if not 0.0 < float(self.density) <= 1.0:
            raise ValueError(f"option 'density' must be in (0, 1], got {self.density!r}")
        object.__setattr__(self, "density", float(self.density))
        if not isinstance(self.report, bool):
            raise ValueError(f"option 'report' must be True or False, got {self.report!r}")
        try:
            object.__setattr__(self, "compiler", InnerCompiler(self.compiler))
        except ValueError:
            valid = ", ".join(repr(c.value) for c in InnerCompiler)
            raise ValueError(f"option 'compiler' must be one of {valid}, got {self.compiler!r}") from None
        if self.token_grid is not None:
            grid = tuple(self.token_grid)
            if len(grid) != 3 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in grid):
                raise ValueError(
                    f"option 'token_grid' must be three positive ints (frames, height, width), got {self.token_grid!r}"
                )
            object.__setattr__(self, "token_grid", grid)

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
