"""Mask decoding for the block-sparse attention kernel: packed mask rows -> kept-block lists.

One tiny program per mask row turns its int32 words into an ascending list of kept key blocks
(a prefix sum over the row's bits) and a count; the attention kernel walks that list.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..bitmask import num_blocks
from . import list_cache


@triton.jit
def _decode_mask_rows(Words, KvIdx, KvCnt,  #
                      N_K_BLOCKS, N_WORDS, IDX_STRIDE,  #
                      NK_PAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, NK_PAD)
    in_row = offs < N_K_BLOCKS
    words = tl.load(Words + row * N_WORDS + offs // 32, mask=in_row, other=0)
    bits = (words >> (offs % 32)) & 1  # '& 1' also drops the sign extension of bit 31
    bits = tl.where(in_row, bits, 0)
    pos = tl.cumsum(bits, 0) - bits  # slot of each kept block in the compact list
    tl.store(KvIdx + row * IDX_STRIDE + pos, offs, mask=bits != 0)
    tl.store(KvCnt + row, tl.sum(bits, 0))


def decode_mask(mask_words: torch.Tensor, num_k_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact kept-block lists of a packed mask.

    ``mask_words`` int32 ``(..., Nq, W)`` -> ``kv_idx`` int32 ``(..., Nq, Nk)`` whose first
    ``kv_cnt[..., r]`` entries of row r are its kept key blocks in increasing order (the rest is
    unspecified) and ``kv_cnt`` int32 ``(..., Nq)``. One tiny Triton launch, no host sync.
    """
    words = mask_words.reshape(-1, mask_words.shape[-1]).contiguous()
    rows = words.shape[0]
    kv_idx = torch.empty((rows, num_k_blocks), dtype=torch.int32, device=words.device)
    kv_cnt = torch.empty((rows,), dtype=torch.int32, device=words.device)
    if rows > 0:
        _decode_mask_rows[(rows,)](words, kv_idx, kv_cnt, num_k_blocks, words.shape[1], num_k_blocks,
                                   NK_PAD=max(16, triton.next_power_of_2(num_k_blocks)), num_warps=4)
    return kv_idx.reshape(*mask_words.shape[:-1], num_k_blocks), kv_cnt.reshape(mask_words.shape[:-1])


class BlockLists(NamedTuple):
    """Kept-block lists of a packed mask, as the attention kernel reads them."""
    kv_idx: torch.Tensor  # int32 (..., Nq, Nk): kept key blocks of each row, ascending, first kv_cnt valid
    kv_cnt: torch.Tensor  # int32 (..., Nq)
    order: torch.Tensor  # int32 (..., Nq): the order in which each head's query blocks are launched


def prepare_block_lists(mask_words: torch.Tensor, kv_len: int, lpt_order: bool = True, *,
                        pin: bool = False) -> BlockLists:
    """Decode ``mask_words`` into the kernel's block lists; with ``lpt_order`` each head's query
    blocks run heaviest first (longest-processing-time order shortens the last wave). Decoded
    once per mask tensor (``list_cache``; ``pin``: a compiled graph's constant mask)."""
    return list_cache.cached("rows", mask_words, lambda: _block_lists(mask_words, kv_len, lpt_order), kv_len,
                             lpt_order, pin=pin)


def _block_lists(mask_words: torch.Tensor, kv_len: int, lpt_order: bool) -> BlockLists:
    nq = mask_words.shape[-2]
    kv_idx, kv_cnt = decode_mask(mask_words, num_blocks(kv_len))
    if lpt_order:
        order = torch.argsort(kv_cnt, dim=-1, descending=True, stable=True).to(torch.int32)
    else:
        order = torch.arange(nq, dtype=torch.int32, device=mask_words.device).expand(kv_cnt.shape)
    return BlockLists(kv_idx, kv_cnt, order.contiguous())



@triton.jit
def _decode_mask_columns(Words, QIdx, QCnt,  #
                         N_Q_BLOCKS, N_K_BLOCKS, N_WORDS,  #
                         NQ_PAD: tl.constexpr):
    # one program per (mask row group g, key block kb): which query blocks of g keep kb
    g = tl.program_id(0).to(tl.int64)
    kb = tl.program_id(1)
    offs = tl.arange(0, NQ_PAD)
    in_col = offs < N_Q_BLOCKS
    words = tl.load(Words + (g * N_Q_BLOCKS + offs) * N_WORDS + kb // 32, mask=in_col, other=0)
    bits = (words >> (kb % 32)) & 1
    bits = tl.where(in_col, bits, 0)
    pos = tl.cumsum(bits, 0) - bits
    col = g * N_K_BLOCKS + kb
    tl.store(QIdx + col * N_Q_BLOCKS + pos, offs, mask=bits != 0)
    tl.store(QCnt + col, tl.sum(bits, 0))


def decode_mask_columns(mask_words: torch.Tensor, num_k_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The column view of a packed mask, for the backward's pass over key blocks.

    ``mask_words`` int32 ``(..., Nq, W)`` -> ``q_idx`` int32 ``(..., Nk, Nq)`` whose first
    ``q_cnt[..., c]`` entries of column c are the query blocks keeping key block c, ascending,
    and ``q_cnt`` int32 ``(..., Nk)``. Decoded from the same words as the rows (no transpose of
    the mask is stored); one tiny launch, no host sync.
    """
    nq, nw = mask_words.shape[-2:]
    words = mask_words.reshape(-1, nq, nw).contiguous()
    groups = words.shape[0]
    q_idx = torch.empty((groups, num_k_blocks, nq), dtype=torch.int32, device=words.device)
    q_cnt = torch.empty((groups, num_k_blocks), dtype=torch.int32, device=words.device)
    if groups > 0 and nq > 0:
        _decode_mask_columns[(groups, num_k_blocks)](words, q_idx, q_cnt, nq, num_k_blocks, nw,
                                                     NQ_PAD=max(16, triton.next_power_of_2(nq)), num_warps=4)
    lead = mask_words.shape[:-2]
    return q_idx.reshape(*lead, num_k_blocks, nq), q_cnt.reshape(*lead, num_k_blocks)


def prepare_column_lists(mask_words: torch.Tensor, kv_len: int, *, pin: bool = False) -> BlockLists:
    """The backward's column lists: per (mask group, key block) the query blocks that keep it.

    Fields as in :class:`BlockLists`, over columns: ``kv_idx`` holds query-block indices
    ``(..., Nk, Nq)``, ``kv_cnt`` is ``(..., Nk)``; ``order`` is one flat permutation of all
    columns (``(G * Nk,)``, G the mask's leading size) in launch order: columns kept by at least
    twice their head's mean number of query blocks (global blocks, attention sinks) first,
    heaviest first, across all heads; then head by head (that head's q and do stay in L2),
    heaviest first. Launched head by head, one sink column per head would start last and finish
    long after the others. Decoded once per mask tensor (``list_cache``; ``pin`` as for the rows).
    """
    return list_cache.cached("columns", mask_words, lambda: _column_lists(mask_words, kv_len), kv_len, pin=pin)


def _column_lists(mask_words: torch.Tensor, kv_len: int) -> BlockLists:
    q_idx, q_cnt = decode_mask_columns(mask_words, num_blocks(kv_len))
    counts = q_cnt.reshape(-1, q_cnt.shape[-1]).to(torch.int64)  # (G, Nk)
    groups, nk = counts.shape
    heavy = counts >= 2 * counts.float().mean(-1, keepdim=True).clamp_min(1.0)
    group = torch.arange(groups, device=counts.device)[:, None].expand(groups, nk)
    # descending sort key: heavy columns by count, then the rest by (group ascending, count descending)
    key = torch.where(heavy, (groups + 1) << 32 | counts, (groups - group) << 32 | counts)
    order = torch.argsort(key.reshape(-1), descending=True, stable=True).to(torch.int32)
    return BlockLists(q_idx, q_cnt, order.contiguous())
