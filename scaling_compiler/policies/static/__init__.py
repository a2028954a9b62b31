"""Static mask rules: the same blocks for every head, from the site's shape alone (no calibration).

A rule is one small file with a function `(site, density) -> bool (H, Nq, Nk)` and a `StaticRule`
naming it; registering it (one line in `RULES` below, or `register_rule` from your own code)
makes it a value of the `masks` option, planned by the west_fast policy with a uniform schedule.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ...sites import Site

MaskFn = Callable[[Site, float], torch.Tensor]  # (site, density) -> bool (H, Nq, Nk)


@dataclasses.dataclass(frozen=True)
class StaticRule:
    name: str  # the `masks` option's value
    mask: MaskFn
    describe: Callable[[Site], str]  # the report's name of the rule at a site
    raster_only: bool = False  # built from raster positions: no curve token order


RULES: dict[str, StaticRule] = {}


def register_rule(rule: StaticRule) -> StaticRule:
    """Make `rule` a value of the `masks` option."""
    RULES[rule.name] = rule
    return rule


from . import local_band, window_3d  # noqa: E402  (the rules import StaticRule from here)

for _rule in (local_band.RULE, window_3d.RULE):
    register_rule(_rule)
