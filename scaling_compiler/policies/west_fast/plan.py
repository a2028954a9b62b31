"""Per-site plans of the west_fast policy: masks at each density a head uses, the per-step choice,
and the cost model's verdict.

A `MaskPlan` holds a site's block masks at the densities its schedule uses (L of them) and, per
step, which one each head takes. The rewritten graph gets the packed masks as extra inputs: one
(H, Nq, W) tensor when every step uses the same masks, else all L levels plus the per-step
choice, which `ops.step_masks` resolves from the model's timestep input inside the graph.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import torch.fx

from ...cost_model import CostModel, qkv_bytes
from ...kernels import dispatch
from ...kernels.bitmask import BLOCK_SIZE, num_blocks, pack_block_mask
from ...ops import pick_step_masks
from ...sites import Site, SitePlan, SitePlanSummary

_OP = torch.ops.scaling_compiler.block_sparse_attention.default
_FP8_OP = torch.ops.scaling_compiler.block_sparse_attention_fp8.default
_STEP_MASKS_OP = torch.ops.scaling_compiler.step_masks.default
STEP_TIMESTEPS_INPUT = "scalingattn_timesteps"  # one graph input shared by every step-varying site
MIN_PREDICTED_GAIN = 0.05  # a site goes sparse only if predicted this much faster than dense


@dataclasses.dataclass
class MaskPlan(SitePlan):
    """What the rewritten graph passes the op for one site."""

    densities: tuple[float, ...]  # the site's mask densities, descending
    block_masks: torch.Tensor  # bool (L, H, Nq, Nk): the mask at each density
    level_index: torch.Tensor  # int64 (steps, H): the density each head uses at each step bin
    step_timesteps: torch.Tensor  # float32 (steps,): the timestep of each step bin
    reason: str
    recall: list[float] | None  # per head, calibration recall at the step of median density (WEST)
    predicted_ms: float  # mean over steps, from the cost model (a training site: forward + backward)
    dense_ms: float  # SDPA, in the same directions
    fp8_predicted_ms: float | None = None  # the FP8 op's, where the cost model has FP8 rows (inference only)

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

    def emit(self, rewriter, site: Site, q, k, v, key_padding) -> torch.fx.Node:
        graph, device = rewriter.graph, site.device
        if self.static:  # one step: each head's own level
            heads = torch.arange(site.heads, device=device)
            words = self.words.to(device)[self.level_index[0].to(device), heads]
            dispatch.decode_constant_mask(words, site.kv_len, backward=site.requires_grad)
            mask = rewriter.add_input(words)
        else:
            if rewriter.timestep is None:
                raise ValueError(f"site {site.name}: masks vary by step but the graph has no timestep input")
            words = rewriter.add_input(self.words.to(device))
            levels = rewriter.add_input(self.level_index.to(device))
            step_times = rewriter.add_input(self.step_timesteps.to(device), name=STEP_TIMESTEPS_INPUT)
            mask = graph.call_function(_STEP_MASKS_OP, (words, levels, rewriter.timestep, step_times))
        return graph.call_function(_FP8_OP if site.runs_fp8 else _OP, (q, k, v, mask, site.scale, key_padding))

    def fp8_refusal(self) -> str | None:
        """FP8 costs accuracy, so it must buy time: refused where the cost model's FP8 rows predict it
        less than MIN_PREDICTED_GAIN faster than the 16-bit kernel (no FP8 rows: no objection)."""
        if self.fp8_predicted_ms is None or self.fp8_predicted_ms < self.predicted_ms * (1.0 - MIN_PREDICTED_GAIN):
            return None
        return (f"cost model: FP8 {self.fp8_predicted_ms:.3g} ms (quantisation included) is not "
                f"{MIN_PREDICTED_GAIN:.0%} below the 16-bit kernel's {self.predicted_ms:.3g} ms")

    def masks_at(self, timestep: float) -> torch.Tensor:
        steps = self.step_timesteps[: self.level_index.shape[0]]  # a static plan has one step
        return pick_step_masks(self.words, self.level_index, torch.tensor([float(timestep)]), steps)

    def step_head_densities(self, q_len: int, kv_len: int) -> torch.Tensor:
        return step_head_fraction(self.block_masks, self.level_index, q_len, kv_len)

    def summary(self, site: Site) -> SitePlanSummary:
        per_step = self.step_head_densities(site.q_len, site.kv_len)
        return SitePlanSummary(
            reason=self.reason, head_densities=per_step.mean(0).tolist(), head_recall=self.recall,
            step_densities=self.step_densities(), predicted_ms=self.predicted_ms, dense_ms=self.dense_ms,
        )


def build_plan(site: Site, block_masks: torch.Tensor, densities: tuple[float, ...], level_index: torch.Tensor,
               step_timesteps: torch.Tensor, reason: str, recall: list[float] | None, cost: CostModel) -> MaskPlan:
    """A site's plan with the cost model's predicted times (mean over steps).

    The times are predicted from the fraction of token pairs the masks really keep, not from the
    densities asked for: on a coarse block grid the two differ (2x2 blocks cannot keep 20%), and a
    prediction from the asked density would promise speed the masks cannot give.

    `cost` is the site's model: for a training site (`site.requires_grad`) the forward's plus the
    backward's (`CostModel.for_training`: our backward's rows against SDPA's backward rows), so the
    times and `unless_slower`'s verdict count what autograd runs too.
    """
    per_head = step_head_fraction(block_masks, level_index, site.q_len, site.kv_len)  # (steps, H)
    predicted = sum(cost.sparse_ms(site.dense_flops, row) for row in per_head) / len(per_head)
    qkv = qkv_bytes(site.batch, site.heads, site.q_len, site.kv_len, site.head_dim, site.kv_heads, site.dtype.itemsize)
    fp8 = cost.fp8_sparse_ms(site.dense_flops, per_head.mean(0), qkv)  # linear in density: the mean over steps
    return MaskPlan(densities, block_masks, level_index.contiguous(), step_timesteps, reason, recall,
                    predicted, cost.dense_ms(site.dense_flops), fp8)


def full_mask(site: Site) -> torch.Tensor:
    """bool (H, Nq, Nk): every block."""
    return torch.ones(site.heads, num_blocks(site.q_len), num_blocks(site.kv_len), dtype=torch.bool)


def unless_slower(plan: MaskPlan, cost: CostModel) -> MaskPlan | str:
    """The plan, or why the site stays dense: it must be predicted at least MIN_PREDICTED_GAIN faster.

    The margin covers what the isolated kernel table misses in a model: in Wan2.1-1.3B (H100) the op
    took 1.41 ms per site where the table has 1.29 ms, and all-block masks (density 1.0, which always
    runs the op) ran the step at 0.96x of dense although the table predicted 1.01x.
    """
    if plan.predicted_ms < plan.dense_ms * (1.0 - MIN_PREDICTED_GAIN):
        return plan
    return (f"cost model ({cost.source}): sparse {plan.predicted_ms:.3g} ms is not "
            f"{MIN_PREDICTED_GAIN:.0%} below dense {plan.dense_ms:.3g} ms")


def median_step_mask(masks: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The masks of the step of median density (the report gives their calibration recall)."""
    heads = torch.arange(index.shape[1])
    median_step = index.double().mean(-1).argsort()[len(index) // 2]
    return masks[index[median_step], heads]


def step_head_fraction(block_masks: torch.Tensor, level_index: torch.Tensor, q_len: int, kv_len: int
                       ) -> torch.Tensor:
    """float64 (steps, H): the fraction of token pairs each head keeps at each step, from the masks at
    each level (L, H, Nq, Nk) and each step's level per head (steps, H)."""
    return torch.gather(kept_pair_fraction(block_masks, q_len, kv_len), 0, level_index.to(torch.int64))


def kept_pair_fraction(block_mask: torch.Tensor, q_len: int, kv_len: int) -> torch.Tensor:
    """Per head, the fraction of (query, key) token pairs inside kept blocks (tails counted exactly)."""

    def block_sizes(n: int) -> torch.Tensor:
        sizes = torch.full((-(-n // BLOCK_SIZE),), BLOCK_SIZE, dtype=torch.float64)
        sizes[-1] = n - BLOCK_SIZE * (len(sizes) - 1)
        return sizes

    pairs = block_sizes(q_len)[:, None] * block_sizes(kv_len)[None, :]
    return (block_mask.to(torch.float64) * pairs).sum(dim=(-2, -1)) / (q_len * kv_len)
