"""The records the passes fill in, in flow order.

`Site`: one attention call. Detection writes what it is (shapes, kind, mask, grid, the FX nodes);
a policy may mark it dense (`dense_reason`); the reorder pass records its token order; the policy's
planning gives it a `SitePlan` (or a dense reason); the rewrite pass asks the plan for the op call;
the report reads the plan's `SitePlanSummary`. Nothing is matched by name between stages.

`GraphRecord`: one compiled graph: the graph module, its example inputs, the sites, the timestep
input found by detection, and what the policy and the rewrite add for the report and at run time.
"""
from __future__ import annotations

import abc
import dataclasses
import enum
from typing import TYPE_CHECKING, Any

import torch
import torch.fx

if TYPE_CHECKING:
    from .config import Config

FP8 = "fp8"  # option attention_dtype's value, and the attention dtype of sites that run `block_sparse_attention_fp8`


class SiteKind(str, enum.Enum):
    SELF = "self"  # queries and keys from the same token sequence
    JOINT = "joint"  # self-attention over text tokens concatenated with video tokens
    CROSS = "cross"  # keys from another sequence (text conditioning): always dense


class Pattern(str, enum.Enum):
    SDPA = "sdpa"  # F.scaled_dot_product_attention
    SOFTMAX = "softmax"  # softmax(q @ k^T * scale) @ v written out by hand


@dataclasses.dataclass(frozen=True)
class SitePlanSummary:
    """What the report prints of a sparse site's plan."""

    reason: str  # which rule made it sparse, with its parameters
    head_densities: list[float]  # per head, kept fraction of token pairs (mean over steps)
    head_recall: list[float] | None  # per head, calibration attention mass kept (WEST), else None
    step_densities: list[float] | None  # mean density over heads at up to 10 evenly spaced steps
    predicted_ms: float  # cost model, mean over steps
    dense_ms: float


class SitePlan(abc.ABC):
    """A policy's decision for one sparse site: how the rewritten graph computes it."""

    @abc.abstractmethod
    def emit(self, rewriter: Any, site: "Site", q: torch.fx.Node, k: torch.fx.Node, v: torch.fx.Node,
             key_padding: torch.fx.Node | None) -> torch.fx.Node:
        """Insert the op call for `site` into `rewriter.graph` (before the site) and return its node.

        `rewriter` (passes/rewrite.py) adds extra graph inputs and knows the timestep node.
        """

    @abc.abstractmethod
    def summary(self, site: "Site") -> SitePlanSummary:
        """The plan as the report shows it."""

    def step_head_densities(self, q_len: int, kv_len: int) -> torch.Tensor | None:
        """float64 (steps, H): the fraction of token pairs each head keeps at each step; None where
        masks are chosen at run time."""
        return None

    def masks_at(self, timestep: float) -> torch.Tensor | None:
        """Packed masks (H, Nq, W) this site uses at `timestep`; None where masks are chosen at run time."""
        return None

    def fp8_refusal(self) -> str | None:
        """Why this plan cannot run the site in FP8 (None: it can, and `emit` calls
        `block_sparse_attention_fp8` where the rewrite set `site.runs_fp8`)."""
        return "this policy's op has no FP8 path"


@dataclasses.dataclass
class Site:
    # --- detection: what the call is ---
    name: str  # module path, e.g. "blocks.0.attn1"
    pattern: Pattern
    kind: SiteKind
    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    q_stride: tuple[int, ...]
    scale: float | None  # None: not a constant, the site stays dense
    attn_mask: str | None  # description of the mask argument, None when absent
    key_padding: bool  # the mask is a boolean (B, 1, 1, Sk) key-padding mask we can honour (or has one: below)
    is_causal: bool
    dropout_p: float
    token_grid: tuple[int, int, int] | None  # (frames, height, width) of the video tokens
    grid_source: str  # where token_grid came from, or why it is unknown
    text_spans: tuple[tuple[int, int], ...]  # token ranges [start, end) of text in joint attention
    requires_grad: bool = False  # q, k or v requires grad: the graph is a training graph (autograd runs the backward)
    # --- detection, policy admission or planning: why the site stays dense (None: it can be rewritten) ---
    dense_reason: str | None = None
    # the mask is separable (passes/masks.py): key padding (in mask_node) plus query padding, whose
    # rows the rewritten graph zeroes as eager SDPA does for fully masked rows
    query_padding: bool = False
    # diffusers' Ulysses context parallelism: which of the model's heads this rank's site holds
    # (passes/ulysses.py), None outside it
    ulysses: Any = None
    # --- reorder: order of the video tokens the attention sees ---
    token_order: str = "raster"
    # --- planning: the policy's plan (None: dense) ---
    plan: SitePlan | None = dataclasses.field(default=None, repr=False, compare=False)
    # --- rewrite: the plan emits the FP8 op (option attention_dtype "fp8"), or why not where it was asked for ---
    runs_fp8: bool = False
    fp8_reason: str | None = None
    # FX nodes of the call, its q/k/v and mask inputs (graph internals, not reported).
    node: torch.fx.Node | None = dataclasses.field(default=None, repr=False, compare=False)
    q_node: torch.fx.Node | None = dataclasses.field(default=None, repr=False, compare=False)
    k_node: torch.fx.Node | None = dataclasses.field(default=None, repr=False, compare=False)
    v_node: torch.fx.Node | None = dataclasses.field(default=None, repr=False, compare=False)
    mask_node: torch.fx.Node | None = dataclasses.field(default=None, repr=False, compare=False)
    # bool (B or 1, 1, Sq, 1) valid queries of a separable mask (mask_node is then its (B or 1, 1, 1, Sk) keys)
    query_padding_node: torch.fx.Node | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def rewritable(self) -> bool:
        return self.dense_reason is None

    @property
    def attention_dtype(self) -> str:
        """What the attention computes in: "fp8", else the site's dtype ("bfloat16", "float32", ...)."""
        return FP8 if self.runs_fp8 else str(self.dtype).removeprefix("torch.")

    @property
    def dense_flops(self) -> int:
        """FLOPs of the dense attention: two matrix products of 2*Sq*Sk*D each, per (batch, head)."""
        return 4 * self.batch * self.heads * self.q_len * self.kv_len * self.head_dim


@dataclasses.dataclass(frozen=True)
class TimestepInput:
    """The model's `timestep` among the graph inputs (found by detection)."""

    position: int  # index among the graph's placeholders
    timestep_max: float  # the first (noisiest) step's timestep: the option, else 1000 or 1 from the example


@dataclasses.dataclass
class GraphRecord:
    """One graph going through the passes: inputs, sites, and what each pass adds."""

    gm: torch.fx.GraphModule
    example_inputs: list[Any]
    config: "Config"
    sites: list[Site] = dataclasses.field(default_factory=list)
    timestep: TimestepInput | None = None  # detection
    subgraph_attention: int = 0  # detection: SDPA calls inside subgraphs (checkpointed regions), left dense
    # planning (the policy): for the report
    masks_origin: str = "no masks needed"
    calibration_seconds: float = 0.0
    schedule: str | None = None  # the schedule's kind, None with no sparse site
    step_timesteps: torch.Tensor | None = None  # float32 (steps,): timestep of each schedule step
    step_source: str = ""  # what picks a step's masks at run time
    policy_state: Any = None  # what the policy keeps for the report and at run time (DFSAttn: its registry)
    topology: Any = None  # WEST's topology (the report keeps it for analysis)
    # rewrite: tensors the rewritten graph takes after the original inputs
    extra_inputs: list[torch.Tensor] = dataclasses.field(default_factory=list)

    @property
    def rewritable(self) -> list[Site]:
        return [site for site in self.sites if site.rewritable]
