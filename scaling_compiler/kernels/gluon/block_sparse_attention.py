"""Block-sparse attention forward in Gluon on Hopper, FA3-style: the package's FP8 kernel on sm_90.

Triton's ``tl`` language waits for every tensor-core group right after issuing it, so in the ``tl``
forwards a warpgroup's exponentials and its matrix products run in series (``benchmarks/NOTES.md``,
session 11). This kernel has FlashAttention-3's levers:

- **asynchronous products**: each loop step issues QK of tile i+1 and P.V of tile i as asynchronous
  wgmma groups and waits for QK first. (The softmax of tile i+1 is written before the wait for P.V,
  but ptxas puts that wait at the join of the partial-block mask's branch, above the softmax. A
  version with the branch out of the loop kept the overlap in the SASS and was slower, 0.96 against
  0.92 ms at density 0.1: NOTES, session 17. One warpgroup's exponentials run under the other's
  products.)
- **warp specialisation**: a 1-warp partition issues the TMA loads of K and V (one whole 128-key
  mask block per tile) into a ``num_buf``-deep shared-memory ring; two consumer partitions of one
  warpgroup each (64 query rows) release a slot with an mbarrier arrive, so no CTA-wide barrier
  sits in the loop;
- **persistent programs**: one program per SM takes work items (128-row query blocks, heaviest first
  within a head) round-robin; the producer loads the next item's q (into a second q buffer for FP8)
  and first K/V tiles while the consumers finish the last one. The outputs are bit-identical to one
  program per item, and the FP8 kernel is ~2% faster at density 0.1 (the 16-bit one, with a single q
  buffer, 1-5% slower; NOTES, session 18). Session 14's ping-pong option (the consumers taking turns
  to issue their products) is gone: it never beat noise.

For FP8 (e4m3 q, k and v^T from the ``tl`` FP8 kernel's ``quantize``, padded to whole blocks) three more
things matter, each read in the SASS (NOTES, session 17):

- P feeds P.V from registers, and e4m3's operand layout wants 4 consecutive keys per register where
  the QK accumulator holds pairs 8 keys apart. Instead of shuffling P across threads (~300
  instructions per tile and thread), the keys of each group of 16 are renumbered: P is reshaped so that
  its layout *is* the operand's (``assert_trivial``) and ``quantize(..., permute_value_keys=True)``
  stores v^T's keys in the same order, so the product is unchanged (FA3's V permutation).
- P is converted 4 keys per instruction pair by inline PTX (the plain cast unpacks and repacks bytes)
  and crosses loop iterations in float32 (an e4m3 tensor carried by the loop lives in 64 byte registers).
- P's scaling into e4m3's range (x 448) is folded into the exponent, and P.V accumulates into the
  running accumulator (the ``tl`` FP8 kernel's two-level accumulation would spill here).
- The output tile goes through shared memory into a row-major layout and out 16 bytes at a time (the
  accumulator's layout stores 4; the worker partition, whose arguments lose the launch's divisibility,
  stored 2). That took ~3 µs off each 128-row block's fixed cost (NOTES, session 19).

Semantics as the ``tl`` forwards (lists from ``prepare_block_lists``, heaviest rows first, per-head or
per-batch masks, ``out`` in q's layout, natural-log ``lse`` for 16-bit inputs, empty rows give 0 and
-inf, keys >= Sk masked in the partial last block); no key padding. The 16-bit path needs q, k, v with
TMA-describable 2-D views (contiguous or transposed ``(B, S, H, D)``); the package runs the ``tl`` 16-bit
forward (as fast at density 0.1, and it takes every layout), and this kernel for FP8
(``block_sparse_attention_fp8``; ``kernels/dispatch.py``). Timed by ``benchmarks/kernels/gluon_forward.py``
(H200, Wan2.1-1.3B shape, random masks; NOTES, session 19): the FP8 kernel 0.825 ms at density 0.1
(796 TFLOP/s on the kept blocks; 852 at density 1.0), the FP8 op with its prep 1.02 ms against the
``tl`` 16-bit kernel's 1.24 in the same run (1.22x; 1.30x at 0.25, 1.46x at 1.0).
"""
from __future__ import annotations

import functools
import math

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from ..bitmask import BLOCK_SIZE, num_blocks
from ..reference import FP8_MAX, LOG2E, Fp8Inputs
from ..triton.block_sparse_attention import mask_batch_stride
from ..triton.block_sparse_attention_fp8 import quantize
from ..triton.mask_decode import BlockLists, prepare_block_lists
from .tma import DTYPES, HEAD_DIMS, descriptor, head_origin, hopper_reason, tma_view

HALF = BLOCK_SIZE // 2  # query rows per consumer warpgroup
assert FP8_MAX == 448.0  # the kernels' P scaling and epilogue hard-code e4m3's largest value


@gluon.constexpr_function
def _v_ring_shape(num_buf, head_dim, is_fp8):
    """The V ring: v^T tiles ``(D, keys)`` for FP8 (its wgmma needs K-major operands), else ``(keys, D)``."""
    return [num_buf, head_dim, 128] if is_fp8 else [num_buf, 128, head_dim]


@gluon.jit
def _softmax(s, m_i, l_i, scale, kb, N_K, cols, P_LOG2: gl.constexpr):
    """Online softmax step in the exp2 domain (``scale`` folds sm_scale * log2(e) and FP8's scales);
    P comes out times ``2 ** P_LOG2`` (FP8: 448, e4m3's range, folded into the exponent)."""
    if (kb + 1) * 128 > N_K:  # the partial last key block: keys >= N_K drop out
        s = gl.where((kb * 128 + cols)[None, :] < N_K, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * scale)
    p = gl.exp2(s * scale - (m_new - P_LOG2)[:, None])
    alpha = gl.exp2(m_i - m_new)
    return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)


@gluon.jit
def _p_operand(p, p_layout: gl.constexpr, dtype: gl.constexpr, IS_FP8: gl.constexpr):
    """P as the register A operand of P.V. FP8: the keys of each group of 16 reordered so that every
    thread already holds its operand's bytes (v^T's keys are reordered the same way: ``permute_value_keys``):
    the accumulator holds key bits (b3, b2, b1, b0) where the e4m3 operand wants (b2, b1, b3, b0)."""
    if IS_FP8:
        p = gl.reshape(gl.permute(gl.reshape(p, [64, 8, 2, 2, 2, 2]), (0, 1, 3, 4, 2, 5)), [64, 128])
        p = gl.convert_layout(p, p_layout, assert_trivial=True)
        # each 4 consecutive registers are one operand register's 4 keys: two paired conversions and a
        # move (the plain cast unpacks and repacks the bytes: ~8 instructions per pair)
        return gl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi; cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1; cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3; "
            "mov.b32 $0, {lo, hi}; }", "=r,r,r,r,r", [p], dtype=gl.float8e4nv, is_pure=True, pack=4)
    return gl.convert_layout(p.to(dtype), p_layout)


@gluon.jit
def _v_operand(v_ring, slot, IS_FP8: gl.constexpr):
    if IS_FP8:
        return v_ring.index(slot).permute((1, 0))
    else:
        return v_ring.index(slot)


@gluon.jit
def _tile_scale(k_scales, kb, q_scale, IS_FP8: gl.constexpr):
    if IS_FP8:
        return q_scale * gl.load(k_scales + kb)
    else:
        return q_scale


@gluon.jit
def _work_item(item, ptrs, sizes, strides):
    """Work item ``item`` (a 128-row query block of one (batch, head), heaviest rows first within a head):
    its (batch * head, batch, head), first query row, list of kept key blocks and their count."""
    Order, KvIdx, KvCnt = ptrs[5], ptrs[6], ptrs[7]
    H, N_Q, N_K, N_Q_BLOCKS, N_K_BLOCKS, N_ITEMS = sizes
    stride_rz, stride_rh = strides[0]
    off_hz = item // N_Q_BLOCKS
    off_z = off_hz // H
    off_h = off_hz % H
    mask_hz = off_z * stride_rz + off_h * stride_rh
    row = mask_hz * N_Q_BLOCKS + gl.load(Order + mask_hz * N_Q_BLOCKS + item % N_Q_BLOCKS)
    start_m = (row - mask_hz * N_Q_BLOCKS) * 128
    return off_hz, off_z, off_h, start_m, KvIdx + row.to(gl.int64) * N_K_BLOCKS, gl.load(KvCnt + row)


@gluon.jit
def _producer(rings, bars, descs, ptrs, sizes, strides, qk_scale, ROW_OFF: gl.constexpr, HEAD_DIM: gl.constexpr,
              IS_FP8: gl.constexpr, WRITE_LSE: gl.constexpr, OUT_ROWS_CONTIGUOUS: gl.constexpr):
    """The TMA partition: for each work item, both halves of its q tile into a free q buffer (two for FP8),
    then its list's K/V tiles as ring slots free up (so the next item's loads run under this one's last
    products and epilogue). (Every partition takes the same arguments: Gluon's worker partitions must.)"""
    q_smem, k_ring, v_ring = rings
    ready, empty, q_ready, q_empty = bars
    q_desc, k_desc, v_desc = descs
    N_ITEMS = sizes[5]
    stride_qz, stride_qh, ld_q = strides[1]
    stride_kz, stride_kh, ld_k = strides[2]
    stride_vz, stride_vh, ld_v = strides[3]
    NUM_BUF: gl.constexpr = k_ring.type.shape[0]
    Q_BUFS: gl.constexpr = q_smem.type.shape[0] // 2
    tiles_done = 0
    items_done = 0
    for item in range(gl.program_id(0), N_ITEMS, gl.num_programs(0)):
        off_hz, off_z, off_h, start_m, kv_list, n_kept = _work_item(item, ptrs, sizes, strides)
        q_row0, q_col0 = head_origin(off_z, off_h, stride_qz, stride_qh, ld_q)
        k_row0, k_col0 = head_origin(off_z, off_h, stride_kz, stride_kh, ld_k)
        v_row0, v_col0 = head_origin(off_z, off_h, stride_vz, stride_vh, ld_v)
        qb = items_done % Q_BUFS
        mbarrier.wait(q_empty.index(qb), ((items_done // Q_BUFS) & 1) ^ 1)  # a fresh barrier passes phase 1
        mbarrier.expect(q_ready.index(qb), 2 * q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [q_row0 + start_m, q_col0], q_ready.index(qb), q_smem.index(2 * qb))
        tma.async_copy_global_to_shared(q_desc, [q_row0 + start_m + 64, q_col0], q_ready.index(qb),
                                        q_smem.index(2 * qb + 1))
        for j in range(n_kept):
            t = tiles_done + j
            slot = t % NUM_BUF
            mbarrier.wait(empty.index(slot), ((t // NUM_BUF) & 1) ^ 1)
            kb = gl.load(kv_list + j)
            bar = ready.index(slot)
            mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [k_row0 + kb * 128, k_col0], bar, k_ring.index(slot))
            if IS_FP8:
                tma.async_copy_global_to_shared(v_desc, [v_row0, v_col0 + kb * 128], bar, v_ring.index(slot))
            else:
                tma.async_copy_global_to_shared(v_desc, [v_row0 + kb * 128, v_col0], bar, v_ring.index(slot))
        tiles_done += n_kept
        items_done += 1


@gluon.jit
def _consumer(rings, bars, descs, ptrs, sizes, strides, qk_scale, ROW_OFF: gl.constexpr, HEAD_DIM: gl.constexpr,
              IS_FP8: gl.constexpr, WRITE_LSE: gl.constexpr, OUT_ROWS_CONTIGUOUS: gl.constexpr):
    """One warpgroup: for each work item, query rows ``start_m + ROW_OFF ..+64`` against its list's tiles,
    then its epilogue."""
    q_smem, k_ring, v_ring = rings
    ready, empty, q_ready, q_empty = bars
    q_desc = descs[0]
    QScale, KScale, VScale, Out, Lse = ptrs[0], ptrs[1], ptrs[2], ptrs[3], ptrs[4]
    H, N_Q, N_K, N_Q_BLOCKS, N_K_BLOCKS, N_ITEMS = sizes
    stride_oz, stride_oh, stride_om, stride_ok = strides[4]
    NUM_BUF: gl.constexpr = k_ring.type.shape[0]
    Q_BUFS: gl.constexpr = q_smem.type.shape[0] // 2
    P_LOG2: gl.constexpr = 8.807354922057604 if IS_FP8 else 0.0  # log2(448)
    ME: gl.constexpr = ROW_OFF // 64
    dtype: gl.constexpr = q_desc.dtype
    K_WIDTH: gl.constexpr = 256 // dtype.primitive_bitwidth
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, 128, K_WIDTH])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, K_WIDTH])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout,
                                                 k_width=32 // dtype.primitive_bitwidth)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    col_o: gl.constexpr = gl.SliceLayout(0, o_layout)
    s_zero = gl.zeros([64, 128], gl.float32, s_layout)
    cols = gl.arange(0, 128, gl.SliceLayout(0, s_layout))
    offs_d = gl.arange(0, HEAD_DIM, col_o)
    out_layout: gl.constexpr = gl.BlockedLayout([1, 8], [256 // HEAD_DIM, HEAD_DIM // 8], [4, 1], [1, 0])
    offs_d_out = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, out_layout))
    rows_out = gl.arange(0, 64, gl.SliceLayout(1, out_layout))

    tiles_done = 0
    items_done = 0
    for item in range(gl.program_id(0), N_ITEMS, gl.num_programs(0)):
        off_hz, off_z, off_h, start_m, kv_list, n_kept = _work_item(item, ptrs, sizes, strides)
        if IS_FP8:
            q_scale = gl.load(QScale + off_hz * N_Q_BLOCKS + start_m // 128) * qk_scale
        else:
            q_scale = qk_scale
        k_scales = KScale + off_hz * N_K_BLOCKS
        m_i = gl.full([64], float("-inf"), gl.float32, row_s)
        l_i = gl.full([64], 0.0, gl.float32, row_s)
        acc = gl.zeros([64, HEAD_DIM], gl.float32, o_layout)
        qb = items_done % Q_BUFS
        q_half = q_smem.index(2 * qb + ME)
        mbarrier.wait(q_ready.index(qb), (items_done // Q_BUFS) & 1)
        if n_kept > 0:
            first = tiles_done % NUM_BUF
            mbarrier.wait(ready.index(first), (tiles_done // NUM_BUF) & 1)
            s = warpgroup_mma(q_half, k_ring.index(first).permute((1, 0)), s_zero, use_acc=False)
            kb = gl.load(kv_list)
            p, alpha, m_i, l_i = _softmax(s, m_i, l_i, _tile_scale(k_scales, kb, q_scale, IS_FP8), kb, N_K, cols,
                                          P_LOG2)
            if not IS_FP8:  # 16-bit: the operand (packed pairs) crosses iterations
                p_op = _p_operand(p, p_layout, dtype, IS_FP8)
            for i in range(n_kept - 1):
                t = tiles_done + i
                slot = t % NUM_BUF
                nxt = (t + 1) % NUM_BUF
                mbarrier.wait(ready.index(nxt), ((t + 1) // NUM_BUF) & 1)
                s_tok = warpgroup_mma(q_half, k_ring.index(nxt).permute((1, 0)), s_zero, use_acc=False,
                                      is_async=True)
                acc = acc * gl.convert_layout(alpha, row_o)[:, None]  # under QK(i+1)
                if IS_FP8:  # P crosses in float32: a loop-carried e4m3 operand is 64 byte registers, unpacked
                    p_op = _p_operand(p, p_layout, dtype, IS_FP8)  # and repacked at every step
                pv_tok = warpgroup_mma(p_op, _v_operand(v_ring, slot, IS_FP8), acc, is_async=True)
                s = warpgroup_mma_wait(1, deps=(s_tok, ))  # QK(i+1) done, P.V(i) still in flight
                kb = gl.load(kv_list + i + 1)
                p, alpha, m_i, l_i = _softmax(s, m_i, l_i, _tile_scale(k_scales, kb, q_scale, IS_FP8), kb, N_K,
                                              cols, P_LOG2)
                acc = warpgroup_mma_wait(0, deps=(pv_tok, ))
                mbarrier.arrive(empty.index(slot), count=1)
                if not IS_FP8:
                    p_op = _p_operand(p, p_layout, dtype, IS_FP8)
            last = (tiles_done + n_kept - 1) % NUM_BUF
            if IS_FP8:
                p_op = _p_operand(p, p_layout, dtype, IS_FP8)
            acc = warpgroup_mma(p_op, _v_operand(v_ring, last, IS_FP8),
                                acc * gl.convert_layout(alpha, row_o)[:, None])
            mbarrier.arrive(empty.index(last), count=1)
        mbarrier.arrive(q_empty.index(qb), count=1)  # every product that reads this q buffer has completed

        empty_row = l_i == 0.0
        l_safe = gl.where(empty_row, 1.0, l_i)
        inv_l = gl.convert_layout(1.0 / l_safe, row_o)
        if IS_FP8:  # 16-byte stores through shared memory (the 16-bit kernel has no room left for that)
            v_scale = gl.load(VScale + off_hz * HEAD_DIM + offs_d)
            out = gl.convert_layout((acc * inv_l[:, None] * v_scale[None, :]).to(Out.dtype.element_ty), out_layout)
            o_rows, o_cols = rows_out, offs_d_out
        else:  # 4 bytes at a time
            out = (acc * inv_l[:, None]).to(Out.dtype.element_ty)
            o_rows, o_cols = gl.arange(0, 64, row_o), offs_d
        o_tile = Out + (off_z.to(gl.int64) * stride_oz + off_h.to(gl.int64) * stride_oh
                        + (start_m + ROW_OFF).to(gl.int64) * stride_om)
        if OUT_ROWS_CONTIGUOUS:
            # out's other strides are multiples of D, so its rows start 16-byte aligned. Said here (and the unit
            # stride as a constexpr) because a worker partition's arguments lose what the launch knew of them:
            # without it, the second consumer stored 2 bytes at a time
            o_ptrs = gl.multiple_of(o_tile + o_rows[:, None] * stride_om + o_cols[None, :], [1, 16])
        else:
            o_ptrs = o_tile + o_rows[:, None] * stride_om + o_cols[None, :] * stride_ok
        gl.store(o_ptrs, out, mask=(start_m + ROW_OFF + o_rows)[:, None] < N_Q)
        if WRITE_LSE:
            lse = gl.where(empty_row, float("-inf"), (m_i + gl.log2(l_safe) - P_LOG2) * 0.6931471805599453)
            offs_ms = start_m + ROW_OFF + gl.arange(0, 64, row_s)
            gl.store(Lse + off_hz.to(gl.int64) * N_Q + offs_ms, lse, mask=offs_ms < N_Q)
        tiles_done += n_kept
        items_done += 1


@gluon.jit
def _attn_fwd(q_desc, k_desc, v_desc, QScale, KScale, VScale, Out, Lse,  #
              KvIdx, KvCnt, Order, qk_scale,  #
              stride_qz, stride_qh, ld_q, stride_kz, stride_kh, ld_k, stride_vz, stride_vh, ld_v,  #
              stride_oz, stride_oh, stride_om, stride_ok,  #
              stride_rz, stride_rh,  #
              H, N_Q, N_K, N_Q_BLOCKS, N_K_BLOCKS, N_ITEMS,  #
              HEAD_DIM: gl.constexpr, IS_FP8: gl.constexpr, WRITE_LSE: gl.constexpr,  #
              OUT_ROWS_CONTIGUOUS: gl.constexpr,  #
              NUM_BUF: gl.constexpr, CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr):
    """Persistent: program p takes work items p, p + programs, ... (one 128-row query block each)."""
    gl.static_assert(num_warps == 4)  # the default partition is consumer 0; the workers add 4 + 1 warps
    dtype: gl.constexpr = q_desc.dtype
    # q: two items' halves for FP8, so the next item's q loads under this one; one item's for 16 bits (two
    # would pass the 227 KB of shared memory with a ring of 3)
    Q_BUFS: gl.constexpr = 2 if IS_FP8 else 1
    q_smem = gl.allocate_shared_memory(dtype, [2 * Q_BUFS, 64, HEAD_DIM], q_desc.layout)
    k_ring = gl.allocate_shared_memory(dtype, [NUM_BUF, 128, HEAD_DIM], k_desc.layout)
    v_ring = gl.allocate_shared_memory(dtype, _v_ring_shape(NUM_BUF, HEAD_DIM, IS_FP8), v_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    q_ready = gl.allocate_shared_memory(gl.int64, [Q_BUFS, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [Q_BUFS, 1], mbarrier.MBarrierLayout())
    for j in gl.static_range(NUM_BUF):
        mbarrier.init(ready.index(j), count=1)
        mbarrier.init(empty.index(j), count=2)  # both consumers release a slot
    for j in gl.static_range(Q_BUFS):
        mbarrier.init(q_ready.index(j), count=1)
        mbarrier.init(q_empty.index(j), count=2)

    rings = (q_smem, k_ring, v_ring)
    bars = (ready, empty, q_ready, q_empty)
    descs = (q_desc, k_desc, v_desc)
    ptrs = (QScale, KScale, VScale, Out, Lse, Order, KvIdx, KvCnt)
    sizes = (H, N_Q, N_K, N_Q_BLOCKS, N_K_BLOCKS, N_ITEMS)
    strides = ((stride_rz, stride_rh), (stride_qz, stride_qh, ld_q), (stride_kz, stride_kh, ld_k),
               (stride_vz, stride_vh, ld_v), (stride_oz, stride_oh, stride_om, stride_ok))
    gl.warp_specialize([
        (_consumer, (rings, bars, descs, ptrs, sizes, strides, qk_scale, 0,  #
                     HEAD_DIM, IS_FP8, WRITE_LSE, OUT_ROWS_CONTIGUOUS)),
        (_consumer, (rings, bars, descs, ptrs, sizes, strides, qk_scale, 64,  #
                     HEAD_DIM, IS_FP8, WRITE_LSE, OUT_ROWS_CONTIGUOUS)),
        (_producer, (rings, bars, descs, ptrs, sizes, strides, qk_scale, 64,  #
                     HEAD_DIM, IS_FP8, WRITE_LSE, OUT_ROWS_CONTIGUOUS)),
    ], [4, 1], [CONSUMER_REGS, 24])


@functools.lru_cache
def _multiprocessors(device: torch.device) -> int:
    """The persistent grid: one program per SM (a program's 12 warps at 168 registers fill an SM's file)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def _tma_view(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    view = tma_view(t)
    if view is None:
        raise ValueError(f"layout {tuple(t.stride())} has no TMA view (last dim contiguous, 16-byte rows)")
    return view


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lists: BlockLists, scale: float | None = None, *,
            mask_batch_stride: int = 0, fp8: Fp8Inputs | None = None, lse: torch.Tensor | None = None,
            num_buf: int = 3, consumer_regs: int = 232, programs: int | None = None) -> torch.Tensor:
    """``out`` like q; ``lse`` (float32 ``(B, H, Sq)``, optional) filled in place. ``lists``:
    ``prepare_block_lists(mask_words, Sk)``; ``mask_batch_stride``: mask rows per batch entry (0 for a
    per-head ``(H, Nq, W)`` mask, H for ``(B, H, Nq, W)``). ``fp8``: ``quantize(q, k, v,
    permute_value_keys=True)``, to run the FP8 forward (q, k, v then only give shapes and out's layout).
    ``consumer_regs``: registers per thread of the two consumer warpgroups (the producer gets 24; 168 per
    thread are launched: 12 warps, 64 K registers). ``programs``: how many persistent programs (default one
    per SM; never more than work items); the tests take a few, so that each walks many items."""
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    nq, nk = num_blocks(Sq), num_blocks(Sk)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out = torch.empty_like(q)
    if fp8 is not None:
        if not fp8.keys_permuted:
            raise ValueError("fp8: v^T's keys must be in this kernel's order: quantize(..., permute_value_keys=True)")
        q2, k2, vt2 = fp8.q.flatten(0, 2), fp8.k.flatten(0, 2), fp8.v_t.flatten(0, 2)
        descs = (descriptor(q2, [HALF, D]), descriptor(k2, [BLOCK_SIZE, D]), descriptor(vt2, [D, BLOCK_SIZE]))
        q_len, k_len = nq * BLOCK_SIZE, nk * BLOCK_SIZE
        # padded, contiguous buffers; v^T's rows are channels: (batch, head) starts at row (z * H + h) * D
        strides = (H * q_len * D, q_len * D, D, H * k_len * D, k_len * D, D, H * D * k_len, D * k_len, k_len)
        scales = (fp8.q_scale, fp8.k_scale, fp8.v_scale)
    else:
        views = [_tma_view(t) for t in (q, k, v)]
        descs = tuple(descriptor(view, [rows, D]) for (view, _), rows in zip(views, (HALF, BLOCK_SIZE, BLOCK_SIZE)))
        strides = tuple(s for _, triple in views for s in triple)
        scales = (out, out, out)  # unused
    n_items = B * H * nq
    if programs is None:
        programs = _multiprocessors(q.device) if q.is_cuda else n_items  # (a dry run's compile: no GPU)
    programs = min(programs, n_items)
    _attn_fwd[(programs, )](
        *descs, *scales, out, out if lse is None else lse, lists.kv_idx, lists.kv_cnt, lists.order, scale * LOG2E,
        *strides, *out.stride(), mask_batch_stride, 1, H, Sq, Sk, nq, nk, n_items,
        HEAD_DIM=D, IS_FP8=fp8 is not None, WRITE_LSE=lse is not None, OUT_ROWS_CONTIGUOUS=out.stride(3) == 1,
        NUM_BUF=num_buf, CONSUMER_REGS=consumer_regs, num_warps=4, maxnreg=168)
    return out


def fp8_unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding: torch.Tensor | None,
                           capability: tuple[int, int]) -> str | None:
    """Why this kernel cannot run the FP8 forward of these inputs on a GPU of ``capability`` (None if
    it can; the ``tl`` FP8 kernel's own rules are checked before). Any input layout: the prep copies."""
    reason = hopper_reason(capability)
    if reason is not None:
        return reason
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype}: needs bfloat16 or float16"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head dim {q.shape[-1]}: needs {' or '.join(map(str, HEAD_DIMS))}"
    if key_padding is not None:
        return "key padding"
    return None


def block_sparse_attention_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_words: torch.Tensor,
                               scale: float | None = None) -> torch.Tensor:
    """The FP8 op on Hopper: ``quantize(q, k, v, permute_value_keys=True)`` (three Triton launches), then
    this kernel. ``out (B, H, Sq, D)`` in q's dtype and layout; rows with no kept key are 0."""
    stride_rz = mask_batch_stride(mask_words, q, k.shape[2])
    lists = prepare_block_lists(mask_words, k.shape[2])
    return forward(q, k, v, lists, scale, mask_batch_stride=stride_rz, fp8=quantize(q, k, v, permute_value_keys=True))
