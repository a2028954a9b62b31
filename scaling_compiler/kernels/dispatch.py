"""Which implementation runs block-sparse attention on these tensors, or why none can; and run it.

The one place that knows the device rules (detection asks `unsupported_reason`, `ops.py` calls
`block_sparse_attention`, the cost model keys its tables by `Implementation`):

- CUDA tensors run the Triton kernel (`kernels/triton/`). GPUs with TMA (capability >= 9:
  Hopper, Blackwell) read K/V through TMA descriptors when the layout allows; GPUs without it
  (Ampere, Ada) and layouts it cannot describe take the pointer-load path of the same kernel.
- Other devices run the block-wise PyTorch path (`kernels/reference.py`). Both take a boolean
  key-padding mask (the Triton kernel as a compile-time switch, so unpadded calls are unchanged).

The backward (`block_sparse_attention_backward`) is picked by the same rules: the Triton backward
(`kernels/triton/block_sparse_attention_bwd.py`, TMA or pointer loads as the forward) or the
block-wise torch backward; `ops.py` registers it as the op's autograd formula. On Hopper (sm_90) the
TMA implementation's backward is the one-pass Gluon kernel (`kernels/gluon/`, dq by TMA reductions)
where `gluon_backward_reason` allows, the Triton one otherwise.

The FP8 forward (`block_sparse_attention_fp8`, inference only) runs on Hopper the Gluon kernel
(`kernels/gluon/block_sparse_attention.py`) where `gluon_fp8_reason` allows, on other CUDA GPUs
(and with key padding) the Triton FP8 kernel (`kernels/triton/block_sparse_attention_fp8.py`), and
elsewhere its torch emulation (the same quantisation, block by block), so a CPU run measures FP8's
error rather than another arithmetic; `fp8_unsupported_reason` says which inputs it refuses.

Where a new implementation goes: a member of `Implementation`, a branch in `implementation_for`
and in both functions here, and its own rows in the cost tables.
"""
from __future__ import annotations

import enum
import logging

import torch

from .activation_quant import gelu_tanh_float8_rows_reference
from .reference import blockwise_attention, blockwise_attention_backward, blockwise_attention_fp8
from .triton import activation_quant as triton_activation_quant
from .triton import block_sparse_attention as triton_forward
from .triton import block_sparse_attention_bwd as triton_backward
from .triton import block_sparse_attention_fp8 as triton_fp8
from .triton import mask_decode

try:  # Gluon (triton.experimental.gluon) with its Hopper modules: Triton >= 3.5
    from .gluon import block_sparse_attention as gluon_forward
    from .gluon import block_sparse_attention_bwd as gluon_backward
except (ImportError, AttributeError):  # pragma: no cover - depends on the installed Triton
    gluon_forward = gluon_backward = None

log = logging.getLogger(__name__)


class Implementation(str, enum.Enum):
    """An implementation of block-sparse attention (keys of the cost tables, with a direction)."""
    TRITON_TMA = "triton_tma"  # Triton kernel, K/V through TMA descriptors (capability >= 9)
    TRITON_POINTER = "triton_pointer"  # the same kernel with pointer loads (Ampere, Ada, odd layouts)
    TORCH_BLOCKWISE = "torch_blockwise"  # pure PyTorch, block by block (CPU and other devices)


def device_capability(device: torch.device) -> tuple[int, int]:
    """The CUDA compute capability of `device` (a function, so tests can pretend another GPU); (0, 0),
    no kernel feature, where this process cannot query CUDA (fake CUDA tensors traced without a GPU:
    torch's query would fail an assertion)."""
    if not torch.cuda.is_available():
        return (0, 0)
    return torch.cuda.get_device_capability(device)


def device_implementation(device: torch.device) -> Implementation:
    """The implementation that runs on `device` for inputs of the usual layout (contiguous or
    transposed (B, S, H, D) views, head dim a power of two): what the cost model times."""
    if device.type != "cuda":
        return Implementation.TORCH_BLOCKWISE
    if triton_forward.TensorDescriptor is not None and \
            device_capability(device)[0] >= triton_forward.TMA_MIN_CAPABILITY:
        return Implementation.TRITON_TMA
    return Implementation.TRITON_POINTER


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding: bool = False) -> str | None:
    """Why no implementation runs these inputs on their device (None if one does).

    The tensors may be fake (detection passes the graph's example values). `key_padding`: the
    call also has a boolean key-padding mask (every implementation takes one). Detection keeps a
    site with a reason dense.
    """
    return triton_forward.unsupported_reason(q, k, v)  # input rules shared by every implementation


def implementation_for(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding: bool = False) -> Implementation:
    """The implementation that `block_sparse_attention` runs for these inputs.

    CUDA inputs that some kernel takes run it (TMA or pointer loads by GPU and layout); anything
    else runs the block-wise PyTorch path (a direct call of the op with inputs detection would
    keep dense still gets an answer, slowly).
    """
    if q.device.type != "cuda" or unsupported_reason(q, k, v, key_padding) is not None:
        return Implementation.TORCH_BLOCKWISE
    implementation = device_implementation(q.device)
    if implementation is Implementation.TRITON_TMA and not triton_forward.tma_layout_ok(k, v):
        return Implementation.TRITON_POINTER
    return implementation


def block_sparse_attention(
    q: torch.Tensor,  # (B, H, Sq, D), any strides
    k: torch.Tensor,  # (B, H, Sk, D)
    v: torch.Tensor,  # (B, H, Sk, D)
    mask_words: torch.Tensor,  # int32 (H, Nq, W) or (B, H, Nq, W), on q's device
    scale: float,
    key_padding: torch.Tensor | None = None,  # bool (B or 1, Sk): False marks keys to ignore
    *,
    implementation: Implementation | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # out (B, H, Sq, D) in q's layout, lse float32 (B, H, Sq)
    """Block-sparse attention forward by the implementation `implementation_for` picks.

    `implementation` forces one (tests: a Triton path on CPU tensors under TRITON_INTERPRET=1,
    e.g. the pointer path that GPUs without TMA take). Empty mask rows give out = 0, lse = -inf.
    `out` has q's layout (`torch.empty_like(q)`), as SDPA's output does: a model that transposes
    the attention back to (B, S, H, D) then gets a view, not a copy.
    """
    if implementation is None:
        implementation = implementation_for(q, k, v, key_padding is not None)
    implementation = Implementation(implementation)
    if implementation is Implementation.TORCH_BLOCKWISE:
        out, lse = blockwise_attention(q, k, v, mask_words, scale, key_padding=key_padding)
        return in_layout_of(q, out), lse
    return triton_forward.block_sparse_attention(q, k, v, mask_words, scale, key_padding=key_padding,
                                                 use_tma=implementation is Implementation.TRITON_TMA)


def decode_constant_mask(mask_words: torch.Tensor, kv_len: int, backward: bool) -> None:
    """Decode a mask that every call of a compiled graph passes unchanged (a constant of the rewrite)
    now, at compile time, into the Triton kernels' cache of block lists (`kernels/triton/list_cache.py`),
    pinned: the rows the forward walks, and with `backward` the columns of the dk/dv pass. Calls then
    launch no decoding, under CUDA graphs too: warm-up and capture (on a side stream, where nothing
    new is kept) find the lists, and a captured graph reads lists that live as long as the mask. Other
    devices run the block-wise path, which decodes nothing."""
    if mask_words.device.type != "cuda":
        return
    mask_decode.prepare_block_lists(mask_words, kv_len, pin=True)
    if backward:
        mask_decode.prepare_column_lists(mask_words, kv_len, pin=True)


def block_sparse_attention_backward(
    q: torch.Tensor,  # (B, H, Sq, D), any strides
    k: torch.Tensor,  # (B, H, Sk, D)
    v: torch.Tensor,  # (B, H, Sk, D)
    out: torch.Tensor,  # (B, H, Sq, D): the forward's output
    lse: torch.Tensor,  # float32 (B, H, Sq): the forward's lse
    grad_out: torch.Tensor,  # (B, H, Sq, D)
    mask_words: torch.Tensor,  # the forward's mask
    scale: float,
    key_padding: torch.Tensor | None = None,
    grad_lse: torch.Tensor | None = None,  # float32 (B, H, Sq), or None when lse has no gradient
    *,
    implementation: Implementation | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # dq, dk, dv in the dtypes and layouts of q, k, v
    """Gradients of `block_sparse_attention` by the implementation `implementation_for` picks (the
    forward's): the Triton backward streams its tiles through TMA on the TMA implementation (where
    grad_out's layout allows too), through pointer loads otherwise.
    """
    if implementation is None:
        implementation = implementation_for(q, k, v, key_padding is not None)
    implementation = Implementation(implementation)
    if implementation is Implementation.TORCH_BLOCKWISE:
        return blockwise_attention_backward(q, k, v, out, lse, grad_out, mask_words, scale,
                                            key_padding=key_padding, grad_lse=grad_lse)
    if implementation is Implementation.TRITON_TMA and gluon_backward_reason(q, k, v, grad_out, key_padding) is None:
        return gluon_backward.block_sparse_attention_backward(q, k, v, out, lse, grad_out, mask_words, scale,
                                                              grad_lse)
    return triton_backward.block_sparse_attention_backward(q, k, v, out, lse, grad_out, mask_words, scale,
                                                           key_padding=key_padding, grad_lse=grad_lse,
                                                           use_tma=implementation is Implementation.TRITON_TMA)


def gluon_backward_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor,
                          key_padding: torch.Tensor | None = None) -> str | None:
    """Why the TMA implementation's backward on these inputs is the Triton one rather than the one-pass
    Gluon kernel (None: the Gluon kernel runs)."""
    if gluon_backward is None:
        return "this Triton has no Gluon Hopper modules"
    if q.device.type != "cuda":
        return f"device {q.device.type}"
    return gluon_backward.unsupported_reason(q, k, v, grad_out, key_padding, device_capability(q.device))


def fp8_unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           key_padding: torch.Tensor | None = None) -> str | None:
    """Why `block_sparse_attention_fp8` cannot take these inputs (None if it can; tensors may be fake):
    the FP8 kernel's rules on CUDA, none beyond the 16-bit ones elsewhere (the emulation runs there)."""
    return triton_fp8.fp8_unsupported_reason(q, k, v, key_padding)


def gluon_fp8_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     key_padding: torch.Tensor | None = None) -> str | None:
    """Why the FP8 forward of these inputs runs the Triton FP8 kernel (or the emulation) rather than
    the Gluon one (None: the Gluon kernel runs)."""
    if gluon_forward is None:
        return "this Triton has no Gluon Hopper modules"
    if q.device.type != "cuda":
        return f"device {q.device.type}"
    return gluon_forward.fp8_unsupported_reason(q, k, v, key_padding, device_capability(q.device))


def block_sparse_attention_fp8(
    q: torch.Tensor,  # (B, H, Sq, D), fp16 or bf16, D 64 or 128, any strides
    k: torch.Tensor,  # (B, H, Sk, D)
    v: torch.Tensor,  # (B, H, Sk, D)
    mask_words: torch.Tensor,  # int32 (H, Nq, W) or (B, H, Nq, W), on q's device
    scale: float,
    key_padding: torch.Tensor | None = None,  # bool (B or 1, Sk): False marks keys to ignore
) -> torch.Tensor:  # out (B, H, Sq, D) in q's dtype and layout; empty rows 0
    """FP8 block-sparse attention forward (inference only): the Gluon kernel on Hopper, the Triton FP8
    kernel on other CUDA GPUs, the torch emulation of its quantisation and softmax
    (`reference.blockwise_attention_fp8`) elsewhere. Inputs that `fp8_unsupported_reason` refuses raise
    ValueError."""
    reason = fp8_unsupported_reason(q, k, v, key_padding)
    if reason is not None:
        raise ValueError(f"FP8 block-sparse attention cannot take these inputs: {reason}")
    if gluon_fp8_reason(q, k, v, key_padding) is None:  # (it names any device but CUDA)
        return gluon_forward.block_sparse_attention_fp8(q, k, v, mask_words, scale)
    if q.device.type == "cuda":
        return triton_fp8.block_sparse_attention_fp8(q, k, v, mask_words, scale, key_padding)
    return in_layout_of(q, blockwise_attention_fp8(q, k, v, mask_words, scale, key_padding))


def in_layout_of(q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`out` (q's shape) in the layout `torch.empty_like(q)` gives: the layout every forward returns."""
    like_q = torch.empty_like(q, dtype=out.dtype)
    return out if out.stride() == like_q.stride() else like_q.copy_(out)


def gelu_tanh_float8_rows(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GELU (tanh) and torchao's rowwise e4m3 quantisation (`kernels/activation_quant.py`): the
    one-pass Triton kernel for CUDA inputs it takes on GPUs with e4m3 conversions (capability >= (8, 9),
    as torchao's float8 needs), PyTorch's operations (the reference) otherwise."""
    if h.device.type == "cuda" and tuple(device_capability(h.device)) >= triton_fp8.MIN_CAPABILITY \
            and triton_activation_quant.unsupported_reason(h) is None:
        return triton_activation_quant.gelu_tanh_float8_rows(h)
    return gelu_tanh_float8_rows_reference(h)
