"""Block-sparse attention backward in one Gluon pass on Hopper: dk, dv in registers, dq by TMA reductions.

The ``tl`` backward (``kernels/triton/block_sparse_attention_bwd.py``) runs a dk/dv pass over key tiles
and a dq pass over query tiles that recomputes q.k and do.v: 7 products per kept tile pair where 5
would do. Accumulating dq inside the dk/dv pass was slower in ``tl`` with every reduction it offers,
because each warpgroup waited for its own. Here, as in FlashAttention-3, one program per (batch,
head, 128-key block):

- a 1-warp **producer** partition loads the key block's k and v once, then streams 64-row (q, do)
  tiles of the query blocks that keep it (the mask's column list) into a two-slot ring, with the
  tile's lse and delta rows beside them in shared memory;
- two **consumer** warpgroups own 64 keys each and, per query tile, compute ``s^T = k q^T`` and
  ``dp^T = v do^T`` (asynchronous wgmma), ``p^T``, ``ds^T``, then ``dv += p^T do`` and ``dk += ds^T q``
  with the 16-bit operands from registers;
- both write ``scale * ds^T`` to shared memory; after an mbarrier handshake each computes half the
  tile's dq columns, ``ds (64 x 128 keys) @ k[:, half]``, stages it in shared memory and issues an
  asynchronous **TMA reduction** (``cp.reduce.async.bulk.tensor ... add``) into a zeroed float32
  buffer, waited for only when its staging tile comes round again.

Where the time goes (H200, Wan2.1-1.3B shape, ``benchmarks/NOTES.md`` sessions 15 and 16): the
reductions (5.1 GB at density 0.1) stay in L2, whose float32 reductions reach ~3.6 TB/s on a footprint
of one head's dq (~1.5 TB/s only once they miss and go to HBM). What held the kernel back was the
consumers' registers: the lse and delta of a tile, read into registers at the top of each step and
held across the products, made ptxas spill; reading them from shared memory where they are used
removed the spills (11% at density 0.1; Nsight Compute: no local memory in the loop).

Semantics as the ``tl`` backward's: ``delta`` and the exp2-domain lse from its ``preprocess``, empty
rows and columns give zero gradients, keys >= Sk drop out of the partial last block, gradients in
the layouts of q, k, v. ``unsupported_reason`` names what it does not take
(the ``tl`` backward runs those).
"""
from __future__ import annotations

import math

import torch
from triton._C.libtriton import ir
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ..bitmask import BLOCK_SIZE, num_blocks
from ..triton.block_sparse_attention import LOG2E
from ..triton.block_sparse_attention_bwd import preprocess
from ..triton.mask_decode import BlockLists, prepare_column_lists
from .tma import DTYPES, HEAD_DIMS, descriptor, head_origin, hopper_reason, tma_view

HALF = BLOCK_SIZE // 2  # keys per consumer warpgroup, and query rows per streamed tile
NUM_BUF = 2  # (q, do) slots; with 2 dq staging tiles per warpgroup this fills Hopper's 227 KiB at D = 128
DQ_BUFS = 2  # (measured: 3 slots and 1 staging tile were 8-13% slower at the Wan2.1-1.3B shape)
CONSUMER_REGS = 240  # registers per consumer thread (the producer warp's group gets 24)
ROW_SMEM = gl.constexpr(gl.SwizzledSharedLayout(1, 1, 1, [0]))  # a query tile's lse or delta in shared memory


@builtin
def _tma_reduce_add(tensor_desc, coord, src, _semantic=None):
    """``cp.reduce.async.bulk.tensor`` add of shared ``src`` into the descriptor's tensor at ``coord``
    (Gluon builds the op but has no Python wrapper for it in Triton 3.6)."""
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord, src.handle)


@gluon.jit
def _producer(smem, bars, descs, ptrs, tile, qk_scale, sm_scale, KEY_OFF: gl.constexpr, HEAD_DIM: gl.constexpr):
    """The loading partition: the key block's k and v, then per query tile q and do by TMA and its rows'
    lse and delta by plain loads into shared memory, as slots free up. (Every partition takes the same
    arguments: Gluon's worker partitions must.)"""
    k_smem, v_smem, q_ring, do_ring, lse_ring, delta_ring = smem[0], smem[1], smem[2], smem[3], smem[6], smem[7]
    kv_bar, ready, empty = bars[0], bars[1], bars[2]
    q_desc, k_desc, v_desc, do_desc = descs[0], descs[1], descs[2], descs[3]
    q_list, lse2_ptr, delta_ptr = ptrs[0], ptrs[1], ptrs[2]
    n_kept, start_n, q_row0, q_col0, k_row0, k_col0, v_row0, v_col0, do_row0, do_col0 = tile[:10]
    N_Q = tile[11]
    offs_q = gl.arange(0, 64, gl.BlockedLayout([2], [32], [1], [0]))
    NUM_SLOTS: gl.constexpr = q_ring.type.shape[0]
    mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [k_row0 + start_n, k_col0], kv_bar, k_smem)
    tma.async_copy_global_to_shared(v_desc, [v_row0 + start_n, v_col0], kv_bar, v_smem)
    for j in range(2 * n_kept):
        slot = j % NUM_SLOTS
        mbarrier.wait(empty.index(slot), ((j // NUM_SLOTS) & 1) ^ 1)  # a fresh barrier passes phase 1
        start_m = gl.load(q_list + j // 2) * 128 + (j % 2) * 64
        bar = ready.index(slot)
        mbarrier.expect(bar, q_desc.block_type.nbytes + do_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [q_row0 + start_m, q_col0], bar, q_ring.index(slot))
        tma.async_copy_global_to_shared(do_desc, [do_row0 + start_m, do_col0], bar, do_ring.index(slot))
        rows = start_m + offs_q
        lse_ring.index(slot).store(gl.load(lse2_ptr + rows, mask=rows < N_Q, other=float("inf")))  # rows past Sq: p = 0
        delta_ring.index(slot).store(gl.load(delta_ptr + rows, mask=rows < N_Q, other=0.0))
        mbarrier.arrive(bar, count=1)  # the slot's second arrival: its lse and delta are in place


@gluon.jit
def _consumer(smem, bars, descs, ptrs, tile, qk_scale, sm_scale, KEY_OFF: gl.constexpr, HEAD_DIM: gl.constexpr):
    """One warpgroup: keys ``start_n + KEY_OFF ..+64`` against every streamed query tile; its half of
    each tile's dq columns by TMA reduction; then its dk, dv rows."""
    k_smem, v_smem, q_ring, do_ring, ds_smem, dq_smem, lse_ring, delta_ring = smem
    kv_bar, ready, empty, ds_ready, ds_free = bars
    dq_desc = descs[4]
    q_list, DK, DV = ptrs[0], ptrs[3], ptrs[4]
    n_kept, start_n = tile[0], tile[1]
    dq_row0, N_Q, N_K, dk_base, dv_base, stride_dkn, stride_dkd, stride_dvn, stride_dvd = tile[10:]
    NUM_SLOTS: gl.constexpr = q_ring.type.shape[0]
    STAGING: gl.constexpr = dq_smem.type.shape[0] // 2  # dq staging tiles per warpgroup
    ME: gl.constexpr = KEY_OFF // 64
    DQ_COLS: gl.constexpr = HEAD_DIM // 2
    dtype: gl.constexpr = q_ring.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, 64, 16])
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, HEAD_DIM, 16])
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, DQ_COLS, 16])
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)

    k_mine = k_smem.slice(KEY_OFF, 64, dim=0)
    v_mine = v_smem.slice(KEY_OFF, 64, dim=0)
    k_cols = k_smem.slice(ME * DQ_COLS, DQ_COLS, dim=1)  # (128 keys, my dq columns)
    s_zero = gl.zeros([64, 64], gl.float32, s_layout)
    dq_zero = gl.zeros([64, DQ_COLS], gl.float32, dq_layout)
    dk = gl.zeros([64, HEAD_DIM], gl.float32, acc_layout)
    dv = gl.zeros([64, HEAD_DIM], gl.float32, acc_layout)
    keys = start_n + KEY_OFF + gl.arange(0, 64, row_s)
    partial_block = start_n + 128 > N_K  # keys >= N_K must give p = 0 (their k rows are another head's)

    mbarrier.wait(kv_bar, 0)
    for j in range(2 * n_kept):
        slot = j % NUM_SLOTS
        par = j % 2
        start_m = gl.load(q_list + j // 2) * 128 + par * 64
        mbarrier.wait(ready.index(slot), (j // NUM_SLOTS) & 1)
        s_tok = warpgroup_mma(k_mine, q_ring.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        dp_tok = warpgroup_mma(v_mine, do_ring.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s_t = warpgroup_mma_wait(1, deps=(s_tok, ))
        # the tile's lse and delta from shared memory where they are used (held across the products, they spilled)
        p_t = gl.exp2(s_t * qk_scale - lse_ring.index(slot).load(col_s)[None, :])
        if partial_block:
            p_t = gl.where((keys < N_K)[:, None], p_t, 0.0)
        dp_t = warpgroup_mma_wait(0, deps=(dp_tok, ))
        ds_t = p_t * (dp_t - delta_ring.index(slot).load(col_s)[None, :])
        p_op = gl.convert_layout(p_t.to(dtype), op_layout)
        ds_op = gl.convert_layout(ds_t.to(dtype), op_layout)
        dv_tok = warpgroup_mma(p_op, do_ring.index(slot), dv, is_async=True)
        dk_tok = warpgroup_mma(ds_op, q_ring.index(slot), dk, is_async=True)
        # scale * ds^T into my 64 rows of the shared (128 keys, 64 queries) tile; when both halves are
        # there, my dq columns of the tile
        mbarrier.wait(ds_free.index(par), ((j // 2) & 1) ^ 1)
        ds_buf = ds_smem.index(par)
        ds_buf.slice(KEY_OFF, 64, dim=0).store((ds_t * sm_scale).to(dtype))
        fence_async_shared()
        mbarrier.arrive(ds_ready.index(par), count=1)
        mbarrier.wait(ds_ready.index(par), (j // 2) & 1)
        dq_tok = warpgroup_mma(ds_buf.permute((1, 0)), k_cols, dq_zero, use_acc=False, is_async=True)
        tma.store_wait(2 * STAGING - 2)  # the reductions issued from this step's staging tile have read it
        dv, dk, dq = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok, dq_tok))
        mbarrier.arrive(ds_free.index(par), count=1)
        mbarrier.arrive(empty.index(slot), count=1)
        dq_buf = dq_smem.index(ME * STAGING + j % STAGING)
        dq_buf.store(dq)
        fence_async_shared()
        for half in gl.static_range(2):  # a swizzled TMA box is at most 128 bytes wide
            _tma_reduce_add(dq_desc, [dq_row0 + start_m, ME * DQ_COLS + half * DQ_COLS // 2],
                            dq_buf.slice(half * DQ_COLS // 2, DQ_COLS // 2, dim=1))
    tma.store_wait(0)

    acc_rows: gl.constexpr = gl.SliceLayout(1, acc_layout)
    acc_cols: gl.constexpr = gl.SliceLayout(0, acc_layout)
    offs_n = start_n + KEY_OFF + gl.arange(0, 64, acc_rows)
    offs_d = gl.arange(0, HEAD_DIM, acc_cols)
    ok = offs_n[:, None] < N_K
    n64 = offs_n[:, None].to(gl.int64)
    gl.store(DK + dk_base + n64 * stride_dkn + offs_d[None, :] * stride_dkd, (dk * sm_scale).to(dtype), mask=ok)
    gl.store(DV + dv_base + n64 * stride_dvn + offs_d[None, :] * stride_dvd, dv.to(dtype), mask=ok)


@gluon.jit
def _attn_bwd(q_desc, k_desc, v_desc, do_desc, dq_desc, DK, DV, LSE2, Delta,  #
              QIdx, QCnt, Order, qk_scale, sm_scale,  #
              stride_qz, stride_qh, ld_q, stride_kz, stride_kh, ld_k, stride_vz, stride_vh, ld_v,  #
              stride_doz, stride_doh, ld_do,  #
              stride_dkz, stride_dkh, stride_dkn, stride_dkd, stride_dvz, stride_dvh, stride_dvn, stride_dvd,  #
              H, N_GROUPS, N_Q, N_K, N_Q_BLOCKS, N_K_BLOCKS,  #
              HEAD_DIM: gl.constexpr, NUM_SLOTS: gl.constexpr, STAGING: gl.constexpr,
              CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr):
    gl.static_assert(num_warps == 4)  # the default partition is consumer 0; the workers add 4 + 1 warps
    dtype: gl.constexpr = q_desc.dtype
    # program -> (batch * H + head, key block), as the tl backward's _locate_column: ``Order`` permutes
    # the (mask group, key block) columns, heavy ones first; shared masks repeat it per batch entry
    n_cols = N_GROUPS * N_K_BLOCKS
    pid = gl.program_id(0)
    column = gl.load(Order + pid % n_cols)
    off_hz = (pid // n_cols) * H + column // N_K_BLOCKS
    off_z = off_hz // H
    off_h = off_hz % H
    start_n = (column % N_K_BLOCKS) * 128
    q_list = QIdx + column.to(gl.int64) * N_Q_BLOCKS
    n_kept = gl.load(QCnt + column)
    q_row0, q_col0 = head_origin(off_z, off_h, stride_qz, stride_qh, ld_q)
    k_row0, k_col0 = head_origin(off_z, off_h, stride_kz, stride_kh, ld_k)
    v_row0, v_col0 = head_origin(off_z, off_h, stride_vz, stride_vh, ld_v)
    do_row0, do_col0 = head_origin(off_z, off_h, stride_doz, stride_doh, ld_do)

    k_smem = gl.allocate_shared_memory(dtype, [128, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [128, HEAD_DIM], v_desc.layout)
    q_ring = gl.allocate_shared_memory(dtype, [NUM_SLOTS, 64, HEAD_DIM], q_desc.layout)
    do_ring = gl.allocate_shared_memory(dtype, [NUM_SLOTS, 64, HEAD_DIM], do_desc.layout)
    ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([128, 64], dtype)
    ds_smem = gl.allocate_shared_memory(dtype, [2, 128, 64], ds_layout)
    dq_smem = gl.allocate_shared_memory(gl.float32, [2 * STAGING, 64, HEAD_DIM // 2], dq_desc.layout)
    lse_ring = gl.allocate_shared_memory(gl.float32, [NUM_SLOTS, 64], ROW_SMEM)
    delta_ring = gl.allocate_shared_memory(gl.float32, [NUM_SLOTS, 64], ROW_SMEM)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [NUM_SLOTS, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_SLOTS, 1], mbarrier.MBarrierLayout())
    ds_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    ds_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for j in gl.static_range(NUM_SLOTS):
        mbarrier.init(ready.index(j), count=2)  # the producer's expect (TMA bytes) and its arrive (lse, delta)
        mbarrier.init(empty.index(j), count=2)  # both consumers release a slot
    for j in gl.static_range(2):
        mbarrier.init(ds_ready.index(j), count=2)
        mbarrier.init(ds_free.index(j), count=2)

    lse2_ptr = LSE2 + off_hz.to(gl.int64) * N_Q
    delta_ptr = Delta + off_hz.to(gl.int64) * N_Q
    dk_base = off_z.to(gl.int64) * stride_dkz + off_h.to(gl.int64) * stride_dkh
    dv_base = off_z.to(gl.int64) * stride_dvz + off_h.to(gl.int64) * stride_dvh
    tile = (n_kept, start_n, q_row0, q_col0, k_row0, k_col0, v_row0, v_col0, do_row0, do_col0,
            off_hz * N_Q, N_Q, N_K, dk_base, dv_base, stride_dkn, stride_dkd, stride_dvn, stride_dvd)
    smem = (k_smem, v_smem, q_ring, do_ring, ds_smem, dq_smem, lse_ring, delta_ring)
    bars = (kv_bar, ready, empty, ds_ready, ds_free)
    descs = (q_desc, k_desc, v_desc, do_desc, dq_desc)
    ptrs = (q_list, lse2_ptr, delta_ptr, DK, DV)
    gl.warp_specialize([
        (_consumer, (smem, bars, descs, ptrs, tile, qk_scale, sm_scale, 0, HEAD_DIM)),
        (_consumer, (smem, bars, descs, ptrs, tile, qk_scale, sm_scale, 64, HEAD_DIM)),
        (_producer, (smem, bars, descs, ptrs, tile, qk_scale, sm_scale, 64, HEAD_DIM)),
    ], [4, 1], [CONSUMER_REGS, 24])


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor,
                       key_padding: torch.Tensor | None, capability: tuple[int, int]) -> str | None:
    """Why this backward cannot take these inputs on a GPU of ``capability`` (None if it can)."""
    reason = hopper_reason(capability)
    if reason is not None:
        return reason
    if q.dtype not in DTYPES or any(t.dtype != q.dtype for t in (k, v, grad_out)):
        return f"dtype {q.dtype}: needs q, k, v, grad_out all bfloat16 or all float16"
    if q.shape[-1] not in HEAD_DIMS or v.shape[-1] != q.shape[-1]:
        return f"head dim {q.shape[-1]} (v {v.shape[-1]}): needs {' or '.join(map(str, HEAD_DIMS))} for both"
    if key_padding is not None:
        return "key padding"
    for name, t in (("q", q), ("k", k), ("v", v), ("grad_out", grad_out)):
        if tma_view(t) is None:
            return f"{name}'s layout {tuple(t.stride())} has no TMA view"
    return None


def _dq_descriptor(dq_acc: torch.Tensor) -> TensorDescriptor:
    """The float32 dq buffer as a 2-D ``(B * H * Sq, D)`` view, reduced into in ``(64, D / 4)`` boxes: a
    warpgroup's ``(64, D / 2)`` staging tile is two of them, swizzled (D bytes wide), so that storing the
    accumulator is free of the 8-way bank conflicts an unswizzled tile has (measured: 3% faster than
    one unswizzled box per tile at the Wan2.1-1.3B shape; NOTES session 16)."""
    head_dim = dq_acc.shape[-1]
    flat = dq_acc.view(-1, head_dim)
    layout = gl.NVMMASharedLayout(swizzle_byte_width=head_dim, element_bitwidth=32, rank=2)
    return TensorDescriptor(flat, list(flat.shape), list(flat.stride()), [64, head_dim // 4], layout)


def block_sparse_attention_backward(
    q: torch.Tensor,  # (B, H, Sq, D)
    k: torch.Tensor,  # (B, H, Sk, D)
    v: torch.Tensor,  # (B, H, Sk, D)
    out: torch.Tensor,  # (B, H, Sq, D): the forward's output
    lse: torch.Tensor,  # float32 (B, H, Sq): the forward's natural-log lse (-inf on empty rows)
    grad_out: torch.Tensor,  # (B, H, Sq, D)
    mask_words: torch.Tensor,  # int32 (H, Nq, W) or (B, H, Nq, W)
    scale: float | None = None,
    grad_lse: torch.Tensor | None = None,  # float32 (B, H, Sq)
    *,
    column_lists: BlockLists | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of block-sparse attention in the dtypes and layouts of q, k, v (``torch.empty_like``),
    for inputs ``unsupported_reason`` accepts (the caller checks). ``column_lists``:
    ``prepare_column_lists(mask_words, Sk)`` when the caller has them."""
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    nq, nk = num_blocks(Sq), num_blocks(Sk)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    delta, lse2 = preprocess(out, grad_out, lse, grad_lse)
    if column_lists is None:
        column_lists = prepare_column_lists(mask_words, Sk)
    views = [tma_view(t) for t in (q, k, v, grad_out)]
    descs = [descriptor(view, [rows, D]) for (view, _), rows in zip(views, (HALF, BLOCK_SIZE, BLOCK_SIZE, HALF))]
    strides = [s for _, triple in views for s in triple]
    dq_acc = torch.zeros((B, H, Sq, D), dtype=torch.float32, device=q.device)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    groups = B * H if mask_words.dim() == 4 else H
    _attn_bwd[(B * H * nk, )](*descs, _dq_descriptor(dq_acc), dk, dv, lse2, delta, *column_lists, scale * LOG2E, scale,
                              *strides, *dk.stride(), *dv.stride(), H, groups, Sq, Sk, nq, nk,
                              HEAD_DIM=D, NUM_SLOTS=NUM_BUF, STAGING=DQ_BUFS, CONSUMER_REGS=CONSUMER_REGS,
                              num_warps=4, maxnreg=168)  # 12 warps x 32 x 168 <= 64 K registers
    return torch.empty_like(q).copy_(dq_acc), dk, dv
