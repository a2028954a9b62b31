"""The custom ops that rewritten graphs call.

- `torch.ops.scaling_compiler.block_sparse_attention`: attention over given block masks (WEST+FAST),
  differentiable in q, k, v: it is `block_sparse_attention_lse` (out and lse, with an autograd
  formula calling `block_sparse_attention_backward`) without the lse.
- `torch.ops.scaling_compiler.block_sparse_attention_fp8`: the same attention with e4m3 operands
  (q, k per 128-token block, k smoothed by its mean, v per channel, P in e4m3); inference only.
- `torch.ops.scaling_compiler.step_masks`: the current step's masks, picked from the timestep in-graph.
- `torch.ops.scaling_compiler.gelu_tanh_float8_rows`: GELU (tanh) and torchao's rowwise float8
  quantisation of a feed-forward hidden state, which `passes/float8_activations.py` puts in inductor's
  graphs in place of torchao's decomposed quantisation.

(A policy's own run-time op lives with the policy: `policies/dfsattn/op.py`.)

Each is a `torch.library.custom_op` with a fake implementation, so dynamo/AOT/inductor treat it
as one opaque node and compile everything around it (fullgraph=True holds), in the forward and
the backward graph. Sparse attention runs what `kernels.dispatch` picks: the Triton kernels for
CUDA tensors they support, otherwise a block-wise PyTorch implementation that never
materialises an Sq x Sk matrix.
"""
from __future__ import annotations

import logging

import torch

from .kernels import dispatch

log = logging.getLogger(__name__)


@torch.library.custom_op("scaling_compiler::block_sparse_attention_lse", mutates_args=())
def block_sparse_attention_lse(
    q: torch.Tensor,  # (B, H, Sq, D), any strides
    k: torch.Tensor,  # (B, H, Sk, D)
    v: torch.Tensor,  # (B, H, Sk, D)
    mask_words: torch.Tensor,  # int32 (H, Nq, W) or (B, H, Nq, W): bit-packed 128x128 block mask
    scale: float,
    key_padding: torch.Tensor | None = None,  # bool (B or 1, Sk): False marks keys to ignore
) -> tuple[torch.Tensor, torch.Tensor]:  # out (B, H, Sq, D) in q's layout, lse float32 (B, H, Sq)
    """Attention of q over the kept 128x128 key blocks, and the natural-log log-sum-exp of its
    scores. A query row with no kept key returns zeros and lse = -inf. Differentiable in q, k, v
    (through out and lse); the mask and padding are constants. `out` is laid out like q
    (`torch.empty_like(q)`), as SDPA's output: after a model's transpose back to (B, S, H, D) it is
    a view, so no copy follows the op."""
    return dispatch.block_sparse_attention(q, k, v, mask_words, scale, key_padding)


@block_sparse_attention_lse.register_fake
def _(q, k, v, mask_words, scale, key_padding=None):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("scaling_compiler::block_sparse_attention_backward", mutates_args=())
def block_sparse_attention_backward(
    grad_out: torch.Tensor,  # (B, H, Sq, D)
    grad_lse: torch.Tensor | None,  # float32 (B, H, Sq), or None
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    mask_words: torch.Tensor,
    scale: float,
    key_padding: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # dq, dk, dv in the layouts of q, k, v
    """The backward of `block_sparse_attention_lse`: an op of its own, so that AOTAutograd puts one
    opaque node in the backward graph."""
    return dispatch.block_sparse_attention_backward(q, k, v, out, lse, grad_out, mask_words, scale,
                                                    key_padding=key_padding, grad_lse=grad_lse)


@block_sparse_attention_backward.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, mask_words, scale, key_padding=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, mask_words, scale, key_padding = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask_words, key_padding)
    ctx.scale = scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, mask_words, key_padding = ctx.saved_tensors
    dq, dk, dv = block_sparse_attention_backward(grad_out, grad_lse, q, k, v, out, lse, mask_words, ctx.scale,
                                                 key_padding)
    return dq, dk, dv, None, None, None


block_sparse_attention_lse.register_autograd(_backward, setup_context=_setup_context)

# The op the rewritten graphs call: `block_sparse_attention_lse` without the lse. Composite, so
# AOTAutograd traces it into that op (and its backward) while its callers keep one output.
_LIB = torch.library.Library("scaling_compiler", "FRAGMENT")
_LIB.define("block_sparse_attention(Tensor q, Tensor k, Tensor v, Tensor mask_words, float scale, "
            "Tensor? key_padding=None) -> Tensor")


@torch.library.impl(_LIB, "block_sparse_attention", "CompositeImplicitAutograd")
def block_sparse_attention_op(q, k, v, mask_words, scale, key_padding=None):
    """Attention of q over the kept 128x128 key blocks (softmax renormalised over them): the
    output of `block_sparse_attention_lse`. A query row with no kept key returns zeros."""
    return torch.ops.scaling_compiler.block_sparse_attention_lse(q, k, v, mask_words, scale, key_padding)[0]


@torch.library.custom_op("scaling_compiler::block_sparse_attention_fp8", mutates_args=())
def block_sparse_attention_fp8(
    q: torch.Tensor,  # (B, H, Sq, D), fp16 or bf16, D 64 or 128, any strides
    k: torch.Tensor,  # (B, H, Sk, D)
    v: torch.Tensor,  # (B, H, Sk, D)
    mask_words: torch.Tensor,  # int32 (H, Nq, W) or (B, H, Nq, W): bit-packed 128x128 block mask
    scale: float,
    key_padding: torch.Tensor | None = None,  # bool (B or 1, Sk): False marks keys to ignore
) -> torch.Tensor:  # out (B, H, Sq, D), q's dtype and layout
    """`block_sparse_attention` with FP8 (e4m3) dots: the Triton FP8 kernel on CUDA, the torch
    emulation of the same quantisation elsewhere. Inference only: no autograd formula is
    registered, so a backward through it raises; a query row with no kept key returns zeros."""
    return dispatch.block_sparse_attention_fp8(q, k, v, mask_words, scale, key_padding)


@block_sparse_attention_fp8.register_fake
def _(q, k, v, mask_words, scale, key_padding=None):
    return torch.empty_like(q)


@torch.library.custom_op("scaling_compiler::gelu_tanh_float8_rows", mutates_args=())
def gelu_tanh_float8_rows(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 ``gelu(h, approximate="tanh")`` scaled per row, float32 scales ``h.shape[:-1] + (1,)``): the
    activation torchao's float8 rowwise linear computes from ``h``, with torchao's semantics
    (`kernels/activation_quant.py`). h: fp16 or bf16, any shape."""
    return dispatch.gelu_tanh_float8_rows(h)


@gelu_tanh_float8_rows.register_fake
def _(h):
    return h.new_empty(h.shape, dtype=torch.float8_e4m3fn), h.new_empty((*h.shape[:-1], 1), dtype=torch.float32)


def sparse_attention(q, k, v, mask_words, scale, key_padding) -> torch.Tensor:
    """The forward alone, outside autograd (DFSAttn's op on its sparse steps): (B, H, Sq, D), contiguous."""
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
