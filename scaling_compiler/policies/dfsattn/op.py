"""`torch.ops.scaling_compiler.dfs_attention`: DFSAttn's run-time op (masks chosen from q and k)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...ops import sparse_attention
from .registry import site_handle


# cudagraph_unsafe: the op reads the step on the host and keeps the masks it scores between calls, neither
# of which a CUDA graph can capture; under mode="reduce-overhead" inductor runs it outside the graphs
# (graph partitions) instead of failing the capture.
@torch.library.custom_op("scaling_compiler::dfs_attention", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def dfs_attention_op(
    q: torch.Tensor,  # (B, H, Sq, D), tokens in the site's token order
    k: torch.Tensor,  # (B, H, Sk, D)
    v: torch.Tensor,  # (B, H, Sk, D)
    timestep: torch.Tensor,  # the model's timestep input, (B,) or scalar: picks the schedule step
    site_id: int,  # the site's entry in registry.py's table
    scale: float,
    key_padding: torch.Tensor | None = None,  # bool (B or 1, Sk): False marks keys to ignore
) -> torch.Tensor:  # (B, H, Sq, D), contiguous
    """DFSAttn at one site: dense SDPA on dense steps and dense layers; otherwise attention over the
    site's cached block masks, recomputed from this call's q and k when the schedule refreshes them.

    Reads the step from `timestep` on the host: one device sync per call (see registry.py).
    """
    handle = site_handle(site_id)
    mask_words = handle.registry.masks(handle.name, timestep, q, k, scale)
    if mask_words is None:
        attn_mask = None if key_padding is None else key_padding.reshape(-1, 1, 1, k.shape[2])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale).contiguous()
    return sparse_attention(q, k, v, mask_words.to(q.device), scale, key_padding)


@dfs_attention_op.register_fake
def _(q, k, v, timestep, site_id, scale, key_padding=None):
    return q.new_empty(q.shape)
