"""The linear-branch pass (option `linear_branch`, SALAD): after planning, each planned site also
gets a gated linear-attention branch on its q, k, v (`salad/branch.py`).

The pass wraps the site's plan: the rewrite emits the policy's sparse op as before, then a
`call_module` of the site's branch on (q, k, v, sparse output). The branch modules become
submodules of the rewritten graph module, so AOTAutograd lifts their parameters like the model's
own and a training step computes their gradients; they live in the backend's `LinearBranches`
(one per site name, shared by every graph and shape that compiles the site).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..salad.branch import BranchWeights, LinearBranch, LinearBranches
from ..sites import GraphRecord, Site, SitePlan, SitePlanSummary


class LinearBranchPlan(SitePlan):
    """A sparse plan plus the site's linear branch added to its output."""

    def __init__(self, sparse: SitePlan, key: str, branch: LinearBranch) -> None:
        self.sparse, self.key, self.branch = sparse, key, branch

    def emit(self, rewriter: Any, site: Site, q: torch.fx.Node, k: torch.fx.Node, v: torch.fx.Node,
             key_padding: torch.fx.Node | None) -> torch.fx.Node:
        sparse_out = self.sparse.emit(rewriter, site, q, k, v, key_padding)
        target = rewriter.add_module(f"scalingattn_linear_branch__{self.key}", self.branch)
        return rewriter.graph.call_module(target, (q, k, v, sparse_out, key_padding))

    def summary(self, site: Site) -> SitePlanSummary:
        summary = self.sparse.summary(site)
        return dataclasses.replace(summary, reason=f"{summary.reason} + linear branch")

    def step_head_densities(self, q_len: int, kv_len: int) -> torch.Tensor | None:
        return self.sparse.step_head_densities(q_len, kv_len)

    def masks_at(self, timestep: float) -> torch.Tensor | None:
        return self.sparse.masks_at(timestep)

    def fp8_refusal(self) -> str | None:
        """The sparse plan's: it emits the sparse part (FP8 or not); the branch computes in the site's dtype."""
        return self.sparse.fp8_refusal()


def add_linear_branches(graph: GraphRecord, branches: LinearBranches, weights: BranchWeights | None) -> None:
    """Give every planned site of `graph` its branch (created, or loaded from `weights`, on first use)."""
    for site in graph.sites:
        if site.plan is not None:
            key, branch = branches.branch_for(site.name, site.heads, site.head_dim, site.device, weights)
            site.plan = LinearBranchPlan(site.plan, key, branch)
