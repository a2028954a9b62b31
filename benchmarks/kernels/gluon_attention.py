"""Experiment (not used by the package): the block-sparse forward in Gluon, FA3-style, on Hopper.

Issues #16 and #18 need kernels faster than Triton's ``tl`` language allows: in the ``tl``
forward every tensor-core group is waited for right after it is issued, so a warpgroup's
exponentials and its matrix products run in series (``benchmarks/NOTES.md``, session 11). This
file is the Gluon (``triton.experimental.gluon``, Triton 3.6 on the device) version of the same
forward with the three FA3 levers, so the next step starts from measured code:

- **intra-warpgroup overlap**: each loop step issues QK of tile i+1 and P.V of tile i as
  asynchronous wgmma groups, waits for QK only, and runs tile i+1's softmax while P.V is in flight;
- **warp specialisation**: a 1-warp partition issues the TMA loads of K and V (one whole 128-key
  mask block per tile) into a ``NUM_BUF``-deep shared-memory ring; two consumer partitions of one
  warpgroup each (64 query rows) release a slot with an mbarrier arrive, so no CTA-wide barrier
  sits in the loop (without this split the TMA issue's barriers kept both warpgroups in lockstep);
- **ping-pong** (optional): the consumers take turns issuing their products (mbarriers).

Same semantics as ``scaling_compiler/kernels/triton/block_sparse_attention.py`` (lists from
``prepare_block_lists``, heaviest rows first, ``out`` in q's layout, natural-log ``lse``, empty rows
give 0 and -inf, keys >= Sk masked in the partial last block) for 16-bit inputs whose layout has
TMA-describable 2-D views (contiguous or transposed ``(B, S, H, D)``), D 64 or 128, no key padding.
With ``fp8`` (the ``tl`` FP8 kernel's quantised, padded operands from its ``quantize``) it is that
kernel's FP8 forward (e4m3 q, k, v^T; P scaled by 448; two-level accumulation by default).

Measured by ``benchmarks/kernels/gluon_forward.py`` (NOTES, session 14; Wan2.1-1.3B shape, H200): outputs
equal the ``tl`` kernel's; even with it at density 0.1 (0.94-1.05x over two runs), 1.07-1.10x at 0.25 and
1.0; the FP8 version no faster than the ``tl`` FP8 kernel at 0.1. Not enough for either issue's target,
so the package does not use it.
"""
from __future__ import annotations

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

from scaling_compiler.kernels.bitmask import BLOCK_SIZE, num_blocks
from scaling_compiler.kernels.reference import FP8_MAX, LOG2E, Fp8Inputs
from scaling_compiler.kernels.gluon.tma import descriptor, head_origin, tma_view
from scaling_compiler.kernels.triton.mask_decode import BlockLists

HALF = BLOCK_SIZE // 2  # query rows per consumer warpgroup
assert FP8_MAX == 448.0  # the kernels' P scaling and epilogue hard-code e4m3's largest value


@gluon.constexpr_function
def _v_ring_shape(num_buf, head_dim, is_fp8):
    """The V ring: v^T tiles ``(D, keys)`` for FP8 (its wgmma needs K-major operands), else ``(keys, D)``."""
    return [num_buf, head_dim, 128] if is_fp8 else [num_buf, 128, head_dim]


@gluon.jit
def _softmax(s, m_i, l_i, scale, kb, N_K, cols):
    """Online softmax step in the exp2 domain (``scale`` folds sm_scale * log2(e) and FP8's scales)."""
    if (kb + 1) * 128 > N_K:  # the partial last key block: keys >= N_K drop out
        s = gl.where((kb * 128 + cols)[None, :] < N_K, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * scale)
    p = gl.exp2(s * scale - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)


@gluon.jit
def _p_operand(p, p_layout: gl.constexpr, dtype: gl.constexpr, IS_FP8: gl.constexpr):
    """P as the register A operand of P.V (FP8: scaled by 448 into e4m3's range)."""
    if IS_FP8:
        p = p * 448.0
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
def _producer(rings, bars, descs, ptrs, tile, epilogue, qk_scale, ROW_OFF: gl.constexpr, HEAD_DIM: gl.constexpr,
              IS_FP8: gl.constexpr, WRITE_LSE: gl.constexpr, TWO_LEVEL: gl.constexpr, PINGPONG: gl.constexpr):
    """The TMA partition: both halves of the q tile, then the list's K/V tiles as slots free up.
    (Every partition takes the same arguments: Gluon's worker partitions must.)"""
    q_smem, k_ring, v_ring = rings
    q_bar, ready, empty = bars[2], bars[0], bars[1]
    q_desc, k_desc, v_desc = descs
    kv_list = ptrs[5]
    n_kept, start_m, q_row0, q_col0, k_row0, k_col0, v_row0, v_col0 = tile
    NUM_BUF: gl.constexpr = k_ring.type.shape[0]
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row0 + start_m, q_col0], q_bar, q_smem.index(0))
    tma.async_copy_global_to_shared(q_desc, [q_row0 + start_m + 64, q_col0], q_bar, q_smem.index(1))
    for j in range(n_kept):
        slot = j % NUM_BUF
        mbarrier.wait(empty.index(slot), ((j // NUM_BUF) & 1) ^ 1)  # a fresh barrier passes phase 1
        kb = gl.load(kv_list + j)
        bar = ready.index(slot)
        mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [k_row0 + kb * 128, k_col0], bar, k_ring.index(slot))
        if IS_FP8:
            tma.async_copy_global_to_shared(v_desc, [v_row0, v_col0 + kb * 128], bar, v_ring.index(slot))
        else:
            tma.async_copy_global_to_shared(v_desc, [v_row0 + kb * 128, v_col0], bar, v_ring.index(slot))


@gluon.jit
def _consumer(rings, bars, descs, ptrs, tile, epilogue, qk_scale, ROW_OFF: gl.constexpr, HEAD_DIM: gl.constexpr,
              IS_FP8: gl.constexpr, WRITE_LSE: gl.constexpr, TWO_LEVEL: gl.constexpr, PINGPONG: gl.constexpr):
    """One warpgroup: query rows ``start_m + ROW_OFF ..+64`` against the list's tiles, then its epilogue."""
    q_smem, k_ring, v_ring = rings
    ready, empty, q_bar, turn = bars
    q_desc = descs[0]
    QScale, KScale, VScale, Out, Lse, kv_list = ptrs
    n_kept, start_m = tile[0], tile[1]
    N_Q, N_K, o_base, lse_base, stride_om, stride_ok, q_scale_idx, k_scale_base, v_scale_base = epilogue
    NUM_BUF: gl.constexpr = k_ring.type.shape[0]
    ME: gl.constexpr = ROW_OFF // 64
    OTHER: gl.constexpr = 1 - ROW_OFF // 64
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

    if IS_FP8:
        q_scale = gl.load(QScale + q_scale_idx) * qk_scale
    else:
        q_scale = qk_scale
    k_scales = KScale + k_scale_base
    m_i = gl.full([64], float("-inf"), gl.float32, row_s)
    l_i = gl.full([64], 0.0, gl.float32, row_s)
    acc = gl.zeros([64, HEAD_DIM], gl.float32, o_layout)
    s_zero = gl.zeros([64, 128], gl.float32, s_layout)
    cols = gl.arange(0, 128, gl.SliceLayout(0, s_layout))
    q_half = q_smem.index(ME)
    if PINGPONG and ME == 0:  # warpgroup 0 issues first
        mbarrier.arrive(turn.index(0), count=1)
    mbarrier.wait(q_bar, 0)
    if n_kept > 0:
        mbarrier.wait(ready.index(0), 0)
        s = warpgroup_mma(q_half, k_ring.index(0).permute((1, 0)), s_zero, use_acc=False)
        kb = gl.load(kv_list)
        p, alpha, m_i, l_i = _softmax(s, m_i, l_i, _tile_scale(k_scales, kb, q_scale, IS_FP8), kb, N_K, cols)
        p_op = _p_operand(p, p_layout, dtype, IS_FP8)
        for i in range(n_kept - 1):
            slot = i % NUM_BUF
            nxt = (i + 1) % NUM_BUF
            mbarrier.wait(ready.index(nxt), ((i + 1) // NUM_BUF) & 1)
            alpha_o = gl.convert_layout(alpha, row_o)
            if not TWO_LEVEL:
                acc = acc * alpha_o[:, None]
            if PINGPONG:
                mbarrier.wait(turn.index(ME), i & 1)
            s_tok = warpgroup_mma(q_half, k_ring.index(nxt).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            # two-level accumulation (FP8's default): the tile's P.V into a fresh accumulator, then added
            pv_tok = warpgroup_mma(p_op, _v_operand(v_ring, slot, IS_FP8), acc, use_acc=not TWO_LEVEL,
                                   is_async=True)
            if PINGPONG:
                mbarrier.arrive(turn.index(OTHER), count=1)
            s = warpgroup_mma_wait(1, deps=(s_tok, ))  # QK(i+1) done, P.V(i) still in flight
            kb = gl.load(kv_list + i + 1)
            p, alpha_next, m_i, l_i = _softmax(s, m_i, l_i, _tile_scale(k_scales, kb, q_scale, IS_FP8), kb, N_K,
                                               cols)
            pv = warpgroup_mma_wait(0, deps=(pv_tok, ))
            mbarrier.arrive(empty.index(slot), count=1)
            if TWO_LEVEL:
                acc = acc * alpha_o[:, None] + pv
            else:
                acc = pv
            p_op = _p_operand(p, p_layout, dtype, IS_FP8)
            alpha = alpha_next
        last = (n_kept - 1) % NUM_BUF
        alpha_o = gl.convert_layout(alpha, row_o)
        if TWO_LEVEL:
            acc = acc * alpha_o[:, None] + warpgroup_mma(p_op, _v_operand(v_ring, last, IS_FP8), acc, use_acc=False)
        else:
            acc = warpgroup_mma(p_op, _v_operand(v_ring, last, IS_FP8), acc * alpha_o[:, None])
        mbarrier.arrive(empty.index(last), count=1)

    empty_row = l_i == 0.0
    l_safe = gl.where(empty_row, 1.0, l_i)
    offs_d = gl.arange(0, HEAD_DIM, col_o)
    offs_m = start_m + ROW_OFF + gl.arange(0, 64, row_o)
    if IS_FP8:
        v_scale = gl.load(VScale + v_scale_base + offs_d)
        out = acc / gl.convert_layout(l_safe * 448.0, row_o)[:, None] * v_scale[None, :]
    else:
        out = acc / gl.convert_layout(l_safe, row_o)[:, None]
    o_ptrs = Out + o_base + offs_m[:, None].to(gl.int64) * stride_om + offs_d[None, :] * stride_ok
    gl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_m[:, None] < N_Q)
    if WRITE_LSE:
        lse = gl.where(empty_row, float("-inf"), (m_i + gl.log2(l_safe)) * 0.6931471805599453)
        offs_ms = start_m + ROW_OFF + gl.arange(0, 64, row_s)
        gl.store(Lse + lse_base + offs_ms, lse, mask=offs_ms < N_Q)


@gluon.jit
def _attn_fwd(q_desc, k_desc, v_desc, QScale, KScale, VScale, Out, Lse,  #
              KvIdx, KvCnt, Order, qk_scale,  #
              stride_qz, stride_qh, ld_q, stride_kz, stride_kh, ld_k, stride_vz, stride_vh, ld_v,  #
              stride_oz, stride_oh, stride_om, stride_ok,  #
              stride_rz, stride_rh,  #
              H, N_Q, N_K, N_Q_BLOCKS, N_K_BLOCKS,  #
              HEAD_DIM: gl.constexpr, IS_FP8: gl.constexpr, WRITE_LSE: gl.constexpr,  #
              NUM_BUF: gl.constexpr, TWO_LEVEL: gl.constexpr, CONSUMER_REGS: gl.constexpr,  #
              PINGPONG: gl.constexpr, num_warps: gl.constexpr):
    gl.static_assert(num_warps == 4)  # the default partition is consumer 0; the workers add 4 + 1 warps
    dtype: gl.constexpr = q_desc.dtype
    pid = gl.program_id(0)
    off_hz = pid // N_Q_BLOCKS
    off_z = off_hz // H
    off_h = off_hz % H
    mask_hz = off_z * stride_rz + off_h * stride_rh
    row = mask_hz * N_Q_BLOCKS + gl.load(Order + mask_hz * N_Q_BLOCKS + pid % N_Q_BLOCKS)
    start_m = (row - mask_hz * N_Q_BLOCKS) * 128
    kv_list = KvIdx + row.to(gl.int64) * N_K_BLOCKS
    n_kept = gl.load(KvCnt + row)
    q_row0, q_col0 = head_origin(off_z, off_h, stride_qz, stride_qh, ld_q)
    k_row0, k_col0 = head_origin(off_z, off_h, stride_kz, stride_kh, ld_k)
    v_row0, v_col0 = head_origin(off_z, off_h, stride_vz, stride_vh, ld_v)

    q_smem = gl.allocate_shared_memory(dtype, [2, 64, HEAD_DIM], q_desc.layout)
    k_ring = gl.allocate_shared_memory(dtype, [NUM_BUF, 128, HEAD_DIM], k_desc.layout)
    v_ring = gl.allocate_shared_memory(dtype, _v_ring_shape(NUM_BUF, HEAD_DIM, IS_FP8), v_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for j in gl.static_range(NUM_BUF):
        mbarrier.init(ready.index(j), count=1)
        mbarrier.init(empty.index(j), count=2)  # both consumers release a slot
    mbarrier.init(q_bar, count=1)
    mbarrier.init(turn.index(0), count=1)
    mbarrier.init(turn.index(1), count=1)

    tile = (n_kept, start_m, q_row0, q_col0, k_row0, k_col0, v_row0, v_col0)
    epilogue = (N_Q, N_K, off_z.to(gl.int64) * stride_oz + off_h.to(gl.int64) * stride_oh, off_hz.to(gl.int64) * N_Q,
                stride_om, stride_ok, off_hz * N_Q_BLOCKS + start_m // 128, off_hz * N_K_BLOCKS, off_hz * HEAD_DIM)
    rings = (q_smem, k_ring, v_ring)
    bars = (ready, empty, q_bar, turn)
    descs = (q_desc, k_desc, v_desc)
    ptrs = (QScale, KScale, VScale, Out, Lse, kv_list)
    gl.warp_specialize([
        (_consumer, (rings, bars, descs, ptrs, tile, epilogue, qk_scale, 0,
                     HEAD_DIM, IS_FP8, WRITE_LSE, TWO_LEVEL, PINGPONG)),
        (_consumer, (rings, bars, descs, ptrs, tile, epilogue, qk_scale, 64,
                     HEAD_DIM, IS_FP8, WRITE_LSE, TWO_LEVEL, PINGPONG)),
        (_producer, (rings, bars, descs, ptrs, tile, epilogue, qk_scale, 64,
                     HEAD_DIM, IS_FP8, WRITE_LSE, TWO_LEVEL, PINGPONG)),
    ], [4, 1], [CONSUMER_REGS, 24])


def _tma_view(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    view = tma_view(t)
    if view is None:
        raise ValueError(f"layout {tuple(t.stride())} has no TMA view (last dim contiguous, 16-byte rows)")
    return view


def block_sparse_attention_gluon(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lists: BlockLists,
                                 scale: float | None = None, *, fp8: Fp8Inputs | None = None,
                                 lse: torch.Tensor | None = None, num_buf: int = 3, consumer_regs: int = 232,
                                 two_level: bool | None = None, pingpong: bool = False) -> torch.Tensor:
    """``out`` like q; ``lse`` (float32 ``(B, H, Sq)``, optional) filled in place. ``lists``:
    ``prepare_block_lists(mask_words, Sk)`` of a per-head mask. ``fp8``: ``quantize(q, k, v)`` of the
    ``tl`` FP8 kernel, to run the FP8 forward. ``consumer_regs``: registers per thread of the two
    consumer warpgroups (the producer gets 24; 168 per thread are launched: 12 warps, 64 K registers)."""
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    nq, nk = num_blocks(Sq), num_blocks(Sk)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out = torch.empty_like(q)
    if fp8 is not None:
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
    _attn_fwd[(B * H * nq, )](
        *descs, *scales, out, out if lse is None else lse, lists.kv_idx, lists.kv_cnt, lists.order, scale * LOG2E,
        *strides, *out.stride(), 0, 1, H, Sq, Sk, nq, nk,
        HEAD_DIM=D, IS_FP8=fp8 is not None, WRITE_LSE=lse is not None, NUM_BUF=num_buf,
        TWO_LEVEL=(fp8 is not None) if two_level is None else two_level, CONSUMER_REGS=consumer_regs,
        PINGPONG=pingpong, num_warps=4, maxnreg=168)
    return out

