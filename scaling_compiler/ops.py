"""The custom ops that rewritten graphs call.

- `torch.ops.scaling_compiler.block_sparse_attention`: attention over given block masks (WEST+FAST).
- `torch.ops.scaling_compiler.dfs_attention`: DFSAttn, masks chosen at run time from q and k.

Each is a `torch.library.custom_op` with a fake implementation, so dynamo/AOT/inductor treat it
as one opaque node and compile everything around it (fullgraph=True holds). Sparse attention
runs what `kernels.dispatch` picks: the Triton kernel for CUDA tensors it supports, otherwise a
block-wise PyTorch implementation that never materialises an Sq x Sk matrix.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .kernels import dispatch
from .policies.dfs_registry import site_handle

log = logging.getLogger(__name__)


@torch.library.custom_op("scaling_compiler::block_sparse_attention", mutates_args=())
def block_sparse_attention_op(
    q: torch.Tensor,  # (B, H, Sq, D), any strides
    k: torch.Tensor,  # (B, H, Sk, D)
    v: torch.Tensor,  # (B, H, Sk, D)
    mask_words: torch.Tensor,  # int32 (H, Nq, W) or (B, H, Nq, W): bit-packed 128x128 block mask
    scale: float,
    key_padding: torch.Tensor | None = None,  # bool (B or 1, Sk): False marks keys to ignore
) -> torch.Tensor:  # (B, H, Sq, D), contiguous
    """Attention of q over the kept 128x128 key blocks (softmax renormalised over them).

    A query row with no kept key returns zeros.
    """
    return _sparse_attention(q, k, v, mask_words, scale, key_padding)


@block_sparse_attention_op.register_fake
def _(q, k, v, mask_words, scale, key_padding=None):
    return q.new_empty(q.shape)


@torch.library.custom_op("scaling_compiler::dfs_attention", mutates_args=())
def dfs_attention_op(
    q: torch.Tensor,  # (B, H, Sq, D), tokens in the site's token order
    k: torch.Tensor,  # (B, H, Sk, D)
    v: torch.Tensor,  # (B, H, Sk, D)
    timestep: torch.Tensor,  # the model's timestep input, (B,) or scalar: picks the schedule step
    site_id: int,  # the site's entry in policies.dfs_registry
    scale: float,
    key_padding: torch.Tensor | None = None,  # bool (B or 1, Sk): False marks keys to ignore
) -> torch.Tensor:  # (B, H, Sq, D), contiguous
    """DFSAttn at one site: dense SDPA on dense steps and dense layers; otherwise attention over the
    site's cached block masks, recomputed from this call's q and k when the schedule refreshes them.

    Reads the step from `timestep` on the host: one device sync per call (see policies.dfs_registry).
    """
    handle = site_handle(site_id)
    mask_words = handle.registry.masks(handle.name, timestep, q, k, scale)
    if mask_words is None:
        attn_mask = None if key_padding is None else key_padding.reshape(-1, 1, 1, k.shape[2])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale).contiguous()
    return _sparse_attention(q, k, v, mask_words.to(q.device), scale, key_padding)


@dfs_attention_op.register_fake
def _(q, k, v, timestep, site_id, scale, key_padding=None):
    return q.new_empty(q.shape)


def _sparse_attention(q, k, v, mask_words, scale, key_padding) -> torch.Tensor:
    out, _ = dispatch.block_sparse_attention(q, k, v, mask_words, scale, key_padding)
    return out.contiguous()


@torch.library.custom_op("scaling_compiler::step_masks", mutates_args=())
def step_masks(
    words: torch.Tensor,  # int32 (L, H, Nq, W): packed masks at each of the site's densities
    level_index: torch.Tensor,  # int64 (steps, H): the density each head uses at each step
    timestep: torch.Tensor,  # the model's timestep input, (B,) or scalar
    step_timesteps: torch.Tensor,  # float32 (steps,): the timestep of each step
) -> torch.Tensor:  # int32 (H, Nq, W)
    """The masks of the current diffusion step, picked on the device from the timestep.

    Called inside the rewritten graph, so masks follow the sampler with no host sync, hook or
    recompilation: the step is the one whose timestep is nearest. All batch entries share the
    first entry's step (CFG's two halves run the same step). An opaque op rather than traced
    indexing: a few tiny kernels per call, and the inner compiler sees plain tensors in and out.
    """
    t = timestep.reshape(-1)[:1].to(step_timesteps.device, torch.float32)
    step = (step_timesteps - t).abs().argmin().reshape(1)
    levels = level_index.index_select(0, step).squeeze(0)  # (H,)
    heads = torch.arange(levels.shape[0], device=words.device)
    return words[levels, heads]


@step_masks.register_fake
def _(words, level_index, timestep, step_timesteps):
    return words.new_empty(words.shape[1:])


def step_timesteps(timestep_max: float, steps: int, timesteps: tuple[float, ...] | None) -> torch.Tensor:
    """float32 (steps,): the given sampler timesteps, else `steps` even bins from timestep_max to 0."""
    if timesteps is not None:
        return torch.tensor(timesteps, dtype=torch.float32)
    return timestep_max * (1.0 - (torch.arange(steps, dtype=torch.float32) + 0.5) / steps)
