"""Compressed row masks: 128x128 block masks packed into 32-bit words.

The block-sparse kernel reads, for each (head, query block of 128 tokens), one bit per key
block of 128 tokens. Bits are packed in aligned 32-bit words so that one load decodes 32 key
blocks:

    bit j of word w  <->  key block 32 * w + j        (j = 0 is the least significant bit)

Words are stored as ``torch.int32`` holding the uint32 bit pattern (so key block 32 * w + 31
is the sign bit). torch's ``uint32`` dtype lacks most operators (shifts, ``&``, comparisons on
CUDA), while int32 has them all, and the kernel only ever tests bits, for which the signed
view is equivalent. Padding bits past the last key block are zero.

Shapes: a boolean block mask is ``(..., Nq, Nk)`` with ``Nq = num_blocks(q_len)`` and
``Nk = num_blocks(kv_len)``; its packed form is ``(..., Nq, ceil(Nk / 32))``. The kernel takes
``(H, Nq, W)`` (shared over the batch) or ``(B, H, Nq, W)`` (one mask per batch entry).
"""
import functools

import torch

BLOCK_SIZE = 128  # tokens per mask block, in both the query and the key direction
WORD_BITS = 32


def num_blocks(seq_len: int) -> int:
    """Number of 128-token mask blocks covering ``seq_len`` tokens (the last may be partial)."""
    return (seq_len + BLOCK_SIZE - 1) // BLOCK_SIZE


def num_words(num_k_blocks: int) -> int:
    """Number of 32-bit words holding ``num_k_blocks`` bits."""
    return (num_k_blocks + WORD_BITS - 1) // WORD_BITS


def _bit_weights(device) -> torch.Tensor:
    return torch.bitwise_left_shift(torch.ones(WORD_BITS, dtype=torch.int64, device=device),
                                    torch.arange(WORD_BITS, dtype=torch.int64, device=device))


def pack_block_mask(block_mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean block mask ``(..., Nq, Nk)`` into int32 words ``(..., Nq, ceil(Nk / 32))``.

    Bit ``j`` of word ``w`` is key block ``32 * w + j``; the int32 holds the uint32 bit pattern.
    """
    if block_mask.dtype != torch.bool:
        raise TypeError(f"block_mask must be bool, got {block_mask.dtype}")
    if block_mask.dim() < 2:
        raise ValueError(f"block_mask must have at least 2 dims (..., Nq, Nk), got {tuple(block_mask.shape)}")
    nk = block_mask.shape[-1]
    w = num_words(nk)
    bits = torch.nn.functional.pad(block_mask.to(torch.int64), (0, w * WORD_BITS - nk))
    bits = bits.reshape(*block_mask.shape[:-1], w, WORD_BITS)
    words = (bits * _bit_weights(block_mask.device)).sum(-1)  # uint32 values in int64
    words = torch.where(words >= 2**31, words - 2**32, words)  # same bit pattern as int32
    return words.to(torch.int32).contiguous()


def unpack_block_mask(words: torch.Tensor, num_k_blocks: int) -> torch.Tensor:
    """Inverse of :func:`pack_block_mask`: int32 words ``(..., Nq, W)`` -> bool ``(..., Nq, Nk)``."""
    if words.dtype != torch.int32:
        raise TypeError(f"words must be int32, got {words.dtype}")
    if words.shape[-1] != num_words(num_k_blocks):
        raise ValueError(f"{words.shape[-1]} words cannot hold exactly {num_k_blocks} key blocks "
                         f"(expected {num_words(num_k_blocks)})")
    shifts = torch.arange(WORD_BITS, dtype=torch.int64, device=words.device)
    bits = torch.bitwise_and(torch.bitwise_right_shift(words.to(torch.int64)[..., None], shifts), 1)
    bits = bits.reshape(*words.shape[:-1], words.shape[-1] * WORD_BITS)
    return bits[..., :num_k_blocks].to(torch.bool)


def to_flex_block_mask(block_mask: torch.Tensor, q_len: int, kv_len: int):
    """FlexAttention ``BlockMask`` that keeps exactly the blocks set in ``block_mask``.

    ``block_mask``: bool ``(H, Nq, Nk)`` (batch dimension 1, broadcast by flex_attention) or
    ``(B, H, Nq, Nk)``, with ``Nq = num_blocks(q_len)`` and ``Nk = num_blocks(kv_len)``.
    Kept blocks that lie wholly inside ``kv_len`` are "full" blocks (computed without a
    mask_mod, the fast path); a kept last key block that is only partly inside ``kv_len`` is a
    partial block whose mask_mod keeps ``kv_idx < kv_len``. Used by the benchmarks and as a
    test reference.
    """
    from torch.nn.attention.flex_attention import BlockMask

    if block_mask.dtype != torch.bool:
        raise TypeError(f"block_mask must be bool, got {block_mask.dtype}")
    if block_mask.dim() == 3:
        block_mask = block_mask[None]
    if block_mask.dim() != 4:
        raise ValueError(f"block_mask must be (H, Nq, Nk) or (B, H, Nq, Nk), got {tuple(block_mask.shape)}")
    nq, nk = num_blocks(q_len), num_blocks(kv_len)
    if tuple(block_mask.shape[-2:]) != (nq, nk):
        raise ValueError(f"block_mask {tuple(block_mask.shape)} does not cover q_len={q_len}, kv_len={kv_len} "
                         f"(expected (..., {nq}, {nk}))")

    partial_tail = kv_len % BLOCK_SIZE != 0
    full = block_mask.clone()
    partial = torch.zeros_like(block_mask)
    if partial_tail:
        partial[..., -1] = block_mask[..., -1]
        full[..., -1] = False

    def _lists(m):
        counts = m.sum(-1, dtype=torch.int32)
        # stable sort puts kept indices first, in increasing order
        order = torch.sort((~m).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
        return counts.contiguous(), order.contiguous()

    kv_num, kv_idx = _lists(partial)
    full_num, full_idx = _lists(full)

    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=BLOCK_SIZE,
                                    mask_mod=_keys_below(kv_len), seq_lengths=(q_len, kv_len))


@functools.lru_cache(maxsize=None)
def _keys_below(kv_len: int):
    # one function object per length: torch.compile'd flex_attention guards on the mask_mod's
    # identity, so a fresh closure per BlockMask would recompile on every new mask
    def keys_below(b, h, q_idx, kv_idx):
        return kv_idx < kv_len

    return keys_below
