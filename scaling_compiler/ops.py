"""The custom ops that rewritten graphs call.

- `torch.ops.scaling_compiler.block_sparse_attention`: attention over given block masks (WEST+FAST).
- `torch.ops.scaling_compiler.step_masks`: the current step's masks, picked from the timestep in-graph.

(A policy's own run-time op lives with the policy: `policies/dfsattn/op.py`.)

Each is a `torch.library.custom_op` with a fake implementation, so dynamo/AOT/inductor treat it
as one opaque node and compile everything around it (fullgraph=True holds). Sparse attention
runs what `kernels.dispatch` picks: the Triton kernel for CUDA tensors it supports, otherwise a
block-wise PyTorch implementation that never materialises an Sq x Sk matrix.
"""
from __future__ import annotations

import logging

import torch

from .kernels import dispatch

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
    return sparse_attention(q, k, v, mask_words, scale, key_padding)


@block_sparse_attention_op.register_fake
def _(q, k, v, mask_words, scale, key_padding=None):
    return q.new_empty(q.shape)


def sparse_attention(q, k, v, mask_words, scale, key_padding) -> torch.Tensor:
    """The op's body (also DFSAttn's on its sparse steps): (B, H, Sq, D), contiguous."""
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
    return pick_step_masks(words, level_index, timestep, step_timesteps)


@step_masks.register_fake
def _(words, level_index, timestep, step_timesteps):
    return words.new_empty(words.shape[1:])


def pick_step_masks(words: torch.Tensor, level_index: torch.Tensor, timestep: torch.Tensor,
                    step_timesteps: torch.Tensor) -> torch.Tensor:
    """`step_masks` as a plain function (the report's `masks_at` calls it outside any graph)."""
    t = timestep.reshape(-1)[:1].to(step_timesteps.device, torch.float32)
    step = (step_timesteps - t).abs().argmin().reshape(1)
    levels = level_index.index_select(0, step).squeeze(0)  # (H,)
    heads = torch.arange(levels.shape[0], device=words.device)
    return words[levels, heads]
