"""AttentionSite: everything the detection pass learned about one attention call."""
from __future__ import annotations

import dataclasses
import enum

import torch
import torch.fx


class SiteKind(str, enum.Enum):
    SELF = "self"  # queries and keys from the same token sequence
    JOINT = "joint"  # self-attention over text tokens concatenated with video tokens
    CROSS = "cross"  # keys from another sequence (text conditioning): always dense


class Pattern(str, enum.Enum):
    SDPA = "sdpa"  # F.scaled_dot_product_attention
    SOFTMAX = "softmax"  # softmax(q @ k^T * scale) @ v written out by hand


@dataclasses.dataclass
class AttentionSite:
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
    key_padding: bool  # the mask is a boolean (B, 1, 1, Sk) key-padding mask we can honour
    is_causal: bool
    dropout_p: float
    token_grid: tuple[int, int, int] | None  # (frames, height, width) of the video tokens
    grid_source: str  # where token_grid came from, or why it is unknown
    text_spans: tuple[tuple[int, int], ...]  # token ranges [start, end) of text in joint attention
    dense_reason: str | None = None  # why the site cannot be rewritten; None: it can
    token_order: str = "raster"  # order of the video tokens the attention sees (passes/reorder.py)
    # FX nodes of the call, its q/k/v and mask inputs (graph internals, not reported).
    node: torch.fx.Node | None = dataclasses.field(default=None, repr=False, compare=False)
    q_node: torch.fx.Node | None = dataclasses.field(default=None, repr=False, compare=False)
    k_node: torch.fx.Node | None = dataclasses.field(default=None, repr=False, compare=False)
    v_node: torch.fx.Node | None = dataclasses.field(default=None, repr=False, compare=False)
    mask_node: torch.fx.Node | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def rewritable(self) -> bool:
        return self.dense_reason is None

    @property
    def dense_flops(self) -> int:
        """FLOPs of the dense attention: two matrix products of 2*Sq*Sk*D each, per (batch, head)."""
        return 4 * self.batch * self.heads * self.q_len * self.kv_len * self.head_dim
