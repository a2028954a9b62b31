"""The policy interface: where a policy's sparse blocks come from and how its sites are computed.

A policy is one folder under `policies/` and one line in `policies/__init__.py`'s registry. It
declares its options (a frozen dataclass, validated once in its `__post_init__`), and the backend
runs it at two points of the pipeline (backend.PIPELINE):

- `admit(graph)`, after detection and before reordering: keep sites dense that the policy will
  not plan (DFSAttn's dense layers);
- `plan(graph)`, after reordering (the "calibrate" and "tune" stages): give each rewritable site
  a `SitePlan` or a dense reason, and fill the graph record's report fields.

A plan's `emit` writes the site's op call at rewrite time; a policy that needs run-time state
(DFSAttn's mask cache) keeps it in `graph.policy_state`, which lives as long as the compiled graph.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch

from ..cost_model import CostModel
from .token_order import TokenOrder

if TYPE_CHECKING:
    from ..config import Config
    from ..sites import GraphRecord


@dataclasses.dataclass(frozen=True)
class PolicyOptions:
    """Base of each policy's options: a frozen dataclass whose fields are backend options."""

    def check(self, config: "Config") -> None:
        """Checks that need the common options too (raise ValueError naming the option)."""


class Policy(abc.ABC):
    name: ClassVar[str]  # the `policy` option's value
    options_class: ClassVar[type[PolicyOptions]]
    default_token_order: ClassVar[TokenOrder] = TokenOrder.RASTER
    report_key: ClassVar[str | None] = None  # the report JSON's key for the policy's run-time figures, if any

    def __init__(self, config: "Config", cost_model: "CostModel | None" = None) -> None:
        self.config = config
        self.options = config.options
        self._cost_model = cost_model  # benchmarks may fix one (e.g. the ideal model, to measure masks alone)

    def cost_model(self, device: torch.device, requires_grad: bool = False) -> "CostModel":
        """The cost model for sites on `device`: the one given, else the device's measured table;
        for a site whose inputs require grad, its forward plus its backward."""
        if self._cost_model is not None:
            return self._cost_model
        return CostModel.for_training(device) if requires_grad else CostModel.for_device(device)

    def admit(self, graph: "GraphRecord") -> None:
        """Mark sites dense that this policy will not plan (before reordering)."""

    @abc.abstractmethod
    def plan(self, graph: "GraphRecord") -> None:
        """Give every rewritable site of `graph` a plan or a dense reason; fill the report fields."""



@runtime_checkable
class PolicyState(Protocol):
    """Run-time state a policy may keep in `GraphRecord.policy_state` for the report, read whenever the
    report is printed or written (so what happened at run time counts)."""

    def report_line(self) -> str: ...

    def report_json(self) -> dict[str, Any]: ...
