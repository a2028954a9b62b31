"""Block-sparse attention backward in Triton: dq, dk, dv from the forward's output and lse.

FlashAttention-2's backward over the kept 128x128 blocks only, in three launches:

1. ``_bwd_preprocess``: per query row ``delta = do . o - dlse`` and the lse moved into the exp2
   domain (``lse * log2(e)``; ``+inf`` on empty rows, so their p is 0 instead of inf).
2. ``_bwd_dkdv``: one program per (batch, head, key tile); dk, dv stay in registers while the
   program walks the query blocks that keep its key block. That is the *column* view of the mask,
   decoded from the same words as the rows (``mask_decode.prepare_column_lists``). Launch order:
   columns that many query blocks keep (global blocks, sinks) first across all heads, then head
   by head, heaviest first (a sink column per head launched with its head finished last: 3.6 vs
   2.8 ms at the Wan2.1-1.3B shape, density 0.1, on an H200).
3. ``_bwd_dq``: one program per (batch, head, query tile) walking the row lists of the forward
   (``prepare_block_lists``), dq in registers.

No atomics and no (Sq x Sk) temporary: every output element is written once by one program, so
autotuning may rerun a launch. (dq accumulated by atomics inside the dk/dv pass saves the
recomputation of q.k and do.v, 3.5x -> 2.5x the forward's FLOPs, but measured slower on an H200 in
``tl``, with pointer atomics and with TMA reductions alike: each warpgroup waits for its own. The
Gluon backward in ``kernels/gluon/`` does it with asynchronous TMA reductions; it replaces this one on
Hopper where it applies.)
With ``p = exp2(qk_scale * q.k - lse2)``,
``ds = p * (do.v - delta)``, ``dq = scale * ds k``, ``dk = scale * ds^T q``, ``dv = p^T do``.

Tails as in the forward: the ascending lists put a partial last block (Sq or Sk not a multiple
of 128) at the end, so the main loops run without masks and one short loop handles the tail.
Key padding (``HAS_PADDING``) zeroes p for padded keys. The streamed tiles (q, do for dk/dv; k,
v for dq) come through TMA descriptors where the forward's rules allow (Hopper, layouts of
``tma_descriptors``), else pointer loads with any strides; the resident tiles through pointer
loads. dq, dk, dv are written in the layouts of q, k, v (``torch.empty_like``): a model's
``.transpose(1, 2)`` of (B, S, H, D) projections then needs no copy on the way back.
"""
import math

import torch
import triton
import triton.language as tl

from ..bitmask import BLOCK_SIZE, num_blocks, num_words
from . import interpreting
from .block_sparse_attention import (LOG2E, MIN_HEAD_DIM, _head_offset, _load_kv_tile, _load_rows, _locate_program,
                                     _padding_argument, _split_tail, _tile_start, _tma_origin, check_launch,
                                     gpu_has_tma, tail_tiles, tma_descriptors, unsupported_reason)
from .configs import SMEM_FALLBACK, _max_shared_mem
from .mask_decode import BlockLists, prepare_block_lists, prepare_column_lists

MASK_BLOCK: tl.constexpr = tl.constexpr(BLOCK_SIZE)
_LOG2E: tl.constexpr = tl.constexpr(LOG2E)


@triton.jit
def _bwd_preprocess(Out, DO, LSE, DLSE, Delta, LSE2,  #
                    stride_oz, stride_oh, stride_om, stride_ok,  #
                    stride_dz, stride_dh, stride_dm, stride_dk,  #
                    H, N_Q,  #
                    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HAS_DLSE: tl.constexpr,  #
                    BLOCK_M: tl.constexpr):
    off_hz = tl.program_id(1)
    off_z = off_hz // H
    off_h = off_hz % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    row_ok = offs_m < N_Q
    mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(Out + off_z.to(tl.int64) * stride_oz + off_h.to(tl.int64) * stride_oh
                + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :] * stride_ok, mask=mask, other=0.0)
    do = tl.load(DO + off_z.to(tl.int64) * stride_dz + off_h.to(tl.int64) * stride_dh
                 + offs_m[:, None].to(tl.int64) * stride_dm + offs_d[None, :] * stride_dk, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    rows = off_hz.to(tl.int64) * N_Q + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLSE + rows, mask=row_ok, other=0.0)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    tl.store(Delta + rows, delta, mask=row_ok)
    tl.store(LSE2 + rows, tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E), mask=row_ok)


@triton.jit
def _store_rows(base, value, offs_s, offs_d, stride_s, stride_d, N, HEAD_DIM: tl.constexpr):
    """Write a gradient tile: rows ``offs_s`` (< N) of a head starting at ``base``, any strides."""
    mask = (offs_s[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
    tl.store(base + offs_s[:, None].to(tl.int64) * stride_s + offs_d[None, :] * stride_d, value, mask=mask)


# ----------------------------------------------------------------------------------------------
# dk, dv: a key tile stays in registers; the loop walks the query tiles of its column list
# ----------------------------------------------------------------------------------------------
@triton.jit
def _locate_column(pid, H, N_GROUPS, N_K_BLOCKS, SPLIT: tl.constexpr, TILE: tl.constexpr,  #
                   Order, QCnt, QIdx, IDX_STRIDE):
    """Program ``pid`` -> (batch * H + head, batch, head, first key of its tile, its column list,
    that list's length). ``Order`` is one permutation of all (mask group, key block) columns (a
    group is a head, or a (batch, head) with per-batch masks), repeated for each batch entry
    when the masks are shared."""
    n_tiles = N_GROUPS * N_K_BLOCKS * SPLIT
    rep = pid // n_tiles
    slot = pid % n_tiles
    column = tl.load(Order + slot // SPLIT)
    off_hz = rep * H + column // N_K_BLOCKS
    start = (column % N_K_BLOCKS) * MASK_BLOCK + (slot % SPLIT) * TILE
    return off_hz, off_hz // H, off_hz % H, start, QIdx + column.to(tl.int64) * IDX_STRIDE, tl.load(QCnt + column)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, key_ok,  #
                    q_ptrs, do_ptrs, desc_q, desc_do, q_row0, q_col0, do_row0, do_col0,  #
                    lse_ptr, delta_ptr, stride_qm, stride_dm,  #
                    q_idx_ptr, lo, hi, N_Q, qk_scale, offs_m, offs_d,  #
                    dtype: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,  #
                    BLOCK_M: tl.constexpr, SPLIT: tl.constexpr, USE_TMA: tl.constexpr, MASK_M: tl.constexpr,  #
                    NUM_STAGES: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_PADDING: tl.constexpr):
    for i in tl.range(lo, hi, num_stages=NUM_STAGES):
        start_m = _tile_start(q_idx_ptr, i, BLOCK_M, SPLIT)
        q = _load_kv_tile(q_ptrs, desc_q, q_row0, q_col0, stride_qm, start_m, offs_m, offs_d, N_Q,  #
                          HEAD_DIM, HEAD_DIM_PAD, USE_TMA, MASK_M)
        do = _load_kv_tile(do_ptrs, desc_do, do_row0, do_col0, stride_dm, start_m, offs_m, offs_d, N_Q,  #
                           HEAD_DIM, HEAD_DIM_PAD, USE_TMA, MASK_M)
        rows = start_m + offs_m
        if MASK_M:  # rows past Sq: p = exp2(-inf) = 0
            m = tl.load(lse_ptr + rows, mask=rows < N_Q, other=float("inf"))
            delta = tl.load(delta_ptr + rows, mask=rows < N_Q, other=0.0)
        else:
            m = tl.load(lse_ptr + rows)
            delta = tl.load(delta_ptr + rows)
        # both products before the exponentials: the second dot overlaps them (1-3% on an H200)
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        p_t = tl.math.exp2(qk_t * qk_scale - m[None, :])
        if HAS_PADDING:
            p_t = tl.where(key_ok[:, None], p_t, 0.0)
        dv = tl.dot(p_t.to(dtype), do, dv, input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv(Q, K, V, DO, desc_q, desc_do, DK, DV, LSE2, Delta,  #
              QIdx, QCnt, Order, KeyPad, sm_scale,  #
              stride_qz, stride_qh, stride_qm, stride_qk,  #
              stride_kz, stride_kh, stride_kn, stride_kk,  #
              stride_vz, stride_vh, stride_vn, stride_vk,  #
              stride_dz, stride_dh, stride_dm, stride_dk,  #
              stride_dkz, stride_dkh, stride_dkn, stride_dkd,  #
              stride_dvz, stride_dvh, stride_dvn, stride_dvd,  #
              stride_pz,  #
              H, N_GROUPS, N_Q, N_K, N_K_BLOCKS, IDX_STRIDE, q_ld, do_ld,  #
              HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,  #
              Q_TAIL_TILES: tl.constexpr,  # query tiles of the last query block holding rows < Sq; 0 if Sq % 128 == 0
              USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_PADDING: tl.constexpr,  #
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr):
    tl.static_assert(MASK_BLOCK % BLOCK_M == 0)
    tl.static_assert(MASK_BLOCK % BLOCK_N == 0)
    SPLIT_M: tl.constexpr = MASK_BLOCK // BLOCK_M  # query tiles per kept query block
    SPLIT_N: tl.constexpr = MASK_BLOCK // BLOCK_N  # key tiles per key block
    dtype = Q.dtype.element_ty

    off_hz, off_z, off_h, start_n, q_idx_ptr, n_kept = _locate_column(
        tl.program_id(0), H, N_GROUPS, N_K_BLOCKS, SPLIT_N, BLOCK_N, Order, QCnt, QIdx, IDX_STRIDE)

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    key_ok = offs_n < N_K
    k = _load_rows(K + _head_offset(off_z, off_h, stride_kz, stride_kh), offs_n, offs_d, stride_kn, stride_kk, N_K,
                   HEAD_DIM)
    v = _load_rows(V + _head_offset(off_z, off_h, stride_vz, stride_vh), offs_n, offs_d, stride_vn, stride_vk, N_K,
                   HEAD_DIM)
    if HAS_PADDING:
        key_ok = key_ok & (tl.load(KeyPad + off_z.to(tl.int64) * stride_pz + offs_n, mask=key_ok, other=0) != 0)

    q_off = _head_offset(off_z, off_h, stride_qz, stride_qh)
    do_off = _head_offset(off_z, off_h, stride_dz, stride_dh)
    q_row0, q_col0 = _tma_origin(q_off, q_ld)
    do_row0, do_col0 = _tma_origin(do_off, do_ld)
    q_ptrs = Q + q_off + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :] * stride_qk
    do_ptrs = DO + do_off + offs_m[:, None].to(tl.int64) * stride_dm + offs_d[None, :] * stride_dk
    lse_ptr = LSE2 + off_hz.to(tl.int64) * N_Q
    delta_ptr = Delta + off_hz.to(tl.int64) * N_Q
    qk_scale = sm_scale * _LOG2E

    dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)
    n_tiles, n_main = _split_tail(q_idx_ptr, n_kept, SPLIT_M, N_Q, Q_TAIL_TILES)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, key_ok, q_ptrs, do_ptrs, desc_q, desc_do,  #
                             q_row0, q_col0, do_row0, do_col0, lse_ptr, delta_ptr, stride_qm, stride_dm, q_idx_ptr, 0, n_main, N_Q, qk_scale,  #
                             offs_m, offs_d, dtype, HEAD_DIM, HEAD_DIM_PAD, BLOCK_M, SPLIT_M, USE_TMA, False,  #
                             NUM_STAGES, DOT_PRECISION, HAS_PADDING)
    if Q_TAIL_TILES > 0:
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, key_ok, q_ptrs, do_ptrs, desc_q, desc_do,  #
                                 q_row0, q_col0, do_row0, do_col0, lse_ptr, delta_ptr, stride_qm, stride_dm,  #
                                 q_idx_ptr, n_main, tl.minimum(n_tiles, n_main + Q_TAIL_TILES), N_Q, qk_scale,  #
                                 offs_m, offs_d, dtype, HEAD_DIM, HEAD_DIM_PAD, BLOCK_M, SPLIT_M, USE_TMA, True,  #
                                 1, DOT_PRECISION, HAS_PADDING)

    _store_rows(DK + _head_offset(off_z, off_h, stride_dkz, stride_dkh), (dk * sm_scale).to(dtype), offs_n, offs_d,
                stride_dkn, stride_dkd, N_K, HEAD_DIM)
    _store_rows(DV + _head_offset(off_z, off_h, stride_dvz, stride_dvh), dv.to(dtype), offs_n, offs_d,
                stride_dvn, stride_dvd, N_K, HEAD_DIM)


# ----------------------------------------------------------------------------------------------
# dq: a query tile stays in registers; the loop walks the key tiles of its row list
# ----------------------------------------------------------------------------------------------
@triton.jit
def _bwd_dq_inner(dq, q, do, m, delta,  #
                  k_ptrs, v_ptrs, desc_k, desc_v, k_row0, k_col0, v_row0, v_col0, stride_kn, stride_vn, pad_ptr,  #
                  kv_idx_ptr, lo, hi, N_K, qk_scale, offs_n, offs_d,  #
                  dtype: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,  #
                  BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, USE_TMA: tl.constexpr, MASK_K: tl.constexpr,  #
                  NUM_STAGES: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_PADDING: tl.constexpr):
    for i in tl.range(lo, hi, num_stages=NUM_STAGES):
        start_n = _tile_start(kv_idx_ptr, i, BLOCK_N, SPLIT)
        k = _load_kv_tile(k_ptrs, desc_k, k_row0, k_col0, stride_kn, start_n, offs_n, offs_d, N_K,  #
                          HEAD_DIM, HEAD_DIM_PAD, USE_TMA, MASK_K)
        v = _load_kv_tile(v_ptrs, desc_v, v_row0, v_col0, stride_vn, start_n, offs_n, offs_d, N_K,  #
                          HEAD_DIM, HEAD_DIM_PAD, USE_TMA, MASK_K)
        cols = start_n + offs_n
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(qk * qk_scale - m[:, None])
        if MASK_K:
            p = tl.where(cols[None, :] < N_K, p, 0.0)
        if HAS_PADDING:
            if MASK_K:
                valid = tl.load(pad_ptr + cols, mask=cols < N_K, other=0)
            else:
                valid = tl.load(pad_ptr + cols)
            p = tl.where(valid[None, :] != 0, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _bwd_dq(Q, K, V, DO, desc_k, desc_v, DQ, LSE2, Delta,  #
            KvIdx, KvCnt, Order, KeyPad, sm_scale,  #
            stride_qz, stride_qh, stride_qm, stride_qk,  #
            stride_kz, stride_kh, stride_kn, stride_kk,  #
            stride_vz, stride_vh, stride_vn, stride_vk,  #
            stride_dz, stride_dh, stride_dm, stride_dk,  #
            stride_dqz, stride_dqh, stride_dqm, stride_dqd,  #
            stride_rz, stride_rh, stride_pz,  #
            H, N_Q, N_K, N_Q_BLOCKS, IDX_STRIDE, k_ld, v_ld,  #
            HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,  #
            K_TAIL_TILES: tl.constexpr,  # key tiles of the last key block holding keys < Sk; 0 if Sk % 128 == 0
            USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_PADDING: tl.constexpr,  #
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr):
    tl.static_assert(MASK_BLOCK % BLOCK_M == 0)
    tl.static_assert(MASK_BLOCK % BLOCK_N == 0)
    SPLIT_M: tl.constexpr = MASK_BLOCK // BLOCK_M
    SPLIT_N: tl.constexpr = MASK_BLOCK // BLOCK_N
    dtype = Q.dtype.element_ty

    off_hz, off_z, off_h, start_m, kv_idx_ptr, n_kept = _locate_program(
        tl.program_id(0), H, N_Q_BLOCKS, SPLIT_M, BLOCK_M, Order, KvCnt, KvIdx, IDX_STRIDE, stride_rz, stride_rh)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    row_ok = offs_m < N_Q
    q = _load_rows(Q + _head_offset(off_z, off_h, stride_qz, stride_qh), offs_m, offs_d, stride_qm, stride_qk, N_Q,
                   HEAD_DIM)
    do = _load_rows(DO + _head_offset(off_z, off_h, stride_dz, stride_dh), offs_m, offs_d, stride_dm, stride_dk, N_Q,
                    HEAD_DIM)
    m = tl.load(LSE2 + off_hz.to(tl.int64) * N_Q + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + off_hz.to(tl.int64) * N_Q + offs_m, mask=row_ok, other=0.0)

    k_off = _head_offset(off_z, off_h, stride_kz, stride_kh)
    v_off = _head_offset(off_z, off_h, stride_vz, stride_vh)
    k_row0, k_col0 = _tma_origin(k_off, k_ld)
    v_row0, v_col0 = _tma_origin(v_off, v_ld)
    k_ptrs = K + k_off + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :] * stride_kk
    v_ptrs = V + v_off + offs_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :] * stride_vk
    pad_ptr = KeyPad + off_z.to(tl.int64) * stride_pz
    qk_scale = sm_scale * _LOG2E

    dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    n_tiles, n_main = _split_tail(kv_idx_ptr, n_kept, SPLIT_N, N_K, K_TAIL_TILES)
    dq = _bwd_dq_inner(dq, q, do, m, delta, k_ptrs, v_ptrs, desc_k, desc_v, k_row0, k_col0, v_row0, v_col0,  #
                       stride_kn, stride_vn, pad_ptr,  #
                       kv_idx_ptr, 0, n_main, N_K, qk_scale, offs_n, offs_d,  #
                       dtype, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, SPLIT_N, USE_TMA, False,  #
                       NUM_STAGES, DOT_PRECISION, HAS_PADDING)
    if K_TAIL_TILES > 0:
        dq = _bwd_dq_inner(dq, q, do, m, delta, k_ptrs, v_ptrs, desc_k, desc_v, k_row0, k_col0, v_row0, v_col0,  #
                           stride_kn, stride_vn, pad_ptr,  #
                           kv_idx_ptr, n_main, tl.minimum(n_tiles, n_main + K_TAIL_TILES), N_K, qk_scale,  #
                           offs_n, offs_d, dtype, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, SPLIT_N, USE_TMA, True,  #
                           1, DOT_PRECISION, HAS_PADDING)

    _store_rows(DQ + _head_offset(off_z, off_h, stride_dqz, stride_dqh), (dq * sm_scale).to(dtype), offs_m, offs_d,
                stride_dqm, stride_dqd, N_Q, HEAD_DIM)


# ----------------------------------------------------------------------------------------------
# Launch configs: (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel
# ----------------------------------------------------------------------------------------------
def _descriptor_pre_hook(resident: str):
    """Set the TMA block shapes of the streamed tiles (q, do for dk/dv; k, v for dq) per config."""
    names, tile = (("desc_q", "desc_do"), "BLOCK_M") if resident == "n" else (("desc_k", "desc_v"), "BLOCK_N")

    def hook(nargs):
        if nargs["USE_TMA"]:
            for name in names:
                nargs[name].block_shape = [nargs[tile], nargs["HEAD_DIM_PAD"]]
    return hook


def _config(block_m, block_n, num_warps, num_stages, resident):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "NUM_STAGES": num_stages},
                         num_warps=num_warps, num_stages=num_stages, pre_hook=_descriptor_pre_hook(resident))


# dk, dv: a key tile resident (k, v, dk, dv), query tiles streamed; dq the other way round.
# Measured on an H200 at the Wan2.1-1.3B shape, densities 1.0 and 0.1 (benchmarks/NOTES.md): the
# first of each list was fastest with TMA (64x64 dk/dv tiles beat 128-key tiles by 10-20%, and
# 128-query or 32-row tiles by 20-100%).
DKDV_CONFIGS = [_config(64, 64, 4, 2, "n"), _config(64, 64, 4, 3, "n"), _config(64, 128, 8, 4, "n")]
DQ_CONFIGS = [_config(128, 128, 8, 2, "m"), _config(64, 64, 4, 3, "m"), _config(64, 64, 4, 4, "m")]
FP32_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}  # IEEE fp32 dots: small tiles


def _smem_estimate(block_m, block_n, head_dim_pad, elem_bytes, num_stages, resident_rows):
    """Shared memory of one program: the streamed tiles (two of them, per pipeline stage) plus the
    resident tiles staged for the dots."""
    streamed = block_n if resident_rows == block_m else block_m
    return (2 * max(1, num_stages - 1) * streamed + 2 * resident_rows) * head_dim_pad * elem_bytes


def _prune(resident: str):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        q = args["Q"]
        if q.dtype == torch.float32:
            c = FP32_CONFIG
            return [_config(c["BLOCK_M"], c["BLOCK_N"], c["num_warps"], c["num_stages"], resident)]
        smem = _max_shared_mem(q.device) if q.device.type == "cuda" else SMEM_FALLBACK
        kept = [c for c in configs
                if _smem_estimate(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], args["HEAD_DIM_PAD"], q.element_size(),
                                  c.num_stages, c.kwargs["BLOCK_N" if resident == "n" else "BLOCK_M"]) <= smem]
        return kept or configs[-1:]
    return prune


_bwd_dkdv_tuned = triton.autotune(configs=DKDV_CONFIGS,
                                  key=["N_Q", "N_K", "HEAD_DIM_PAD", "Q_TAIL_TILES", "USE_TMA", "HAS_PADDING"],
                                  prune_configs_by={"early_config_prune": _prune("n")})(_bwd_dkdv)
_bwd_dq_tuned = triton.autotune(configs=DQ_CONFIGS,
                                key=["N_Q", "N_K", "HEAD_DIM_PAD", "K_TAIL_TILES", "USE_TMA", "HAS_PADDING"],
                                prune_configs_by={"early_config_prune": _prune("m")})(_bwd_dq)


def default_configs(dtype: torch.dtype) -> tuple[dict, dict]:
    """The (dkdv, dq) configs used without autotuning (the interpreter, fixed-config benchmarks)."""
    if dtype == torch.float32:
        return dict(FP32_CONFIG), dict(FP32_CONFIG)

    def as_dict(c):
        return {"BLOCK_M": c.kwargs["BLOCK_M"], "BLOCK_N": c.kwargs["BLOCK_N"], "num_warps": c.num_warps,
                "num_stages": c.num_stages}
    return as_dict(DKDV_CONFIGS[0]), as_dict(DQ_CONFIGS[0])


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------
def preprocess(out: torch.Tensor, grad_out: torch.Tensor, lse: torch.Tensor,
               grad_lse: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch 1 of every backward (this one and ``kernels/gluon``'s): per query row ``delta = do . o -
    dlse`` and the lse in the exp2 domain, both float32 ``(B, H, Sq)``."""
    B, H, Sq, D = out.shape
    delta = torch.empty((B, H, Sq), dtype=torch.float32, device=out.device)
    lse2 = torch.empty_like(delta)
    dlse = grad_lse.float().contiguous() if grad_lse is not None else delta
    _bwd_preprocess[(triton.cdiv(Sq, 64), B * H)](out, grad_out, lse.float().contiguous(), dlse, delta, lse2,  #
                                                  *out.stride(), *grad_out.stride(), H, Sq,  #
                                                  HEAD_DIM=D, HEAD_DIM_PAD=max(MIN_HEAD_DIM, triton.next_power_of_2(D)),
                                                  HAS_DLSE=grad_lse is not None, BLOCK_M=64)
    return delta, lse2


def _smallest(tile: str) -> int:
    """The smallest ``tile`` ("BLOCK_M" or "BLOCK_N") any autotuned or fp32 config launches with."""
    return min([c.kwargs[tile] for c in DKDV_CONFIGS + DQ_CONFIGS] + [FP32_CONFIG[tile]])


def block_sparse_attention_backward(
    q: torch.Tensor,  # (B, H, Sq, D)
    k: torch.Tensor,  # (B, H, Sk, D)
    v: torch.Tensor,  # (B, H, Sk, D)
    out: torch.Tensor,  # (B, H, Sq, D): the forward's output
    lse: torch.Tensor,  # float32 (B, H, Sq): the forward's natural-log lse (-inf on empty rows)
    grad_out: torch.Tensor,  # (B, H, Sq, D)
    mask_words: torch.Tensor,  # int32 (H, Nq, W) or (B, H, Nq, W)
    scale: float | None = None,
    key_padding: torch.Tensor | None = None,  # bool (B or 1, Sk)
    grad_lse: torch.Tensor | None = None,  # float32 (B, H, Sq)
    *,
    configs: tuple[dict, dict] | None = None,
    use_tma: bool | None = None,
    row_lists: BlockLists | None = None,
    column_lists: BlockLists | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of block-sparse attention, each in its input's dtype and layout
    (``torch.empty_like``: a dense input's strides, the dense permutation of a strided one).

    The mask, scale and key padding must be the forward's. ``configs``: fixed (dkdv, dq) launch
    configs ``{"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}``; None autotunes on a GPU
    (``default_configs`` in the interpreter). ``use_tma``: stream tiles through TMA descriptors
    where the GPU and layouts allow (None: when the GPU has TMA); False forces pointer loads.
    ``row_lists`` / ``column_lists``: the decoded mask (``prepare_block_lists`` /
    ``prepare_column_lists``) when the caller has them.
    """
    check_launch("block_sparse_attention_backward", unsupported_reason(q, k, v), q.device)
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    nq, nk = num_blocks(Sq), num_blocks(Sk)
    if out.shape != q.shape or grad_out.shape != q.shape or lse.shape != q.shape[:3]:
        raise ValueError(f"out {tuple(out.shape)}, grad_out {tuple(grad_out.shape)} must be like q {tuple(q.shape)} "
                         f"and lse {tuple(lse.shape)} (B, H, Sq)")
    if mask_words.dtype != torch.int32 or mask_words.shape[-2:] != (nq, num_words(nk)) \
            or mask_words.shape[:-2] not in ((H,), (B, H)):
        raise ValueError(f"mask_words must be int32 (H, Nq, W) or (B, H, Nq, W) with (Nq, W) = {(nq, num_words(nk))}, "
                         f"got {mask_words.dtype} {tuple(mask_words.shape)}")
    per_batch = mask_words.dim() == 4
    head_dim_pad = max(MIN_HEAD_DIM, triton.next_power_of_2(D))
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)

    # 1. delta and the exp2-domain lse
    delta, lse2 = preprocess(out, grad_out, lse, grad_lse)

    if row_lists is None:
        row_lists = prepare_block_lists(mask_words, Sk)
    if column_lists is None:
        column_lists = prepare_column_lists(mask_words, Sk)
    pad, stride_pz = _padding_argument(key_padding, B, Sk, q.device, delta)
    if use_tma is None:
        use_tma = gpu_has_tma(q.device)
    tma_q, (desc_q, q_ld), (desc_do, do_ld) = tma_descriptors(q, grad_out, use_tma, head_dim_pad)
    tma_k, (desc_k, k_ld), (desc_v, v_ld) = tma_descriptors(k, v, use_tma, head_dim_pad)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)  # the inputs' layouts
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    const = dict(HEAD_DIM=D, HEAD_DIM_PAD=head_dim_pad, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                 HAS_PADDING=key_padding is not None)

    # 2. dk, dv over the column lists; 3. dq over the row lists
    groups = B * H if per_batch else H
    dkdv_args = (q, k, v, grad_out, desc_q, desc_do, dk, dv, lse2, delta, *column_lists, pad, scale, *strides,
                 *dk.stride(), *dv.stride(), stride_pz, H, groups, Sq, Sk, nk, nq, q_ld, do_ld)
    dq_args = (q, k, v, grad_out, desc_k, desc_v, dq, lse2, delta, *row_lists, pad, scale, *strides, *dq.stride(),
               H if per_batch else 0, 1, stride_pz, H, Sq, Sk, nq, nk, k_ld, v_ld)
    dkdv_grid = lambda META: (B * H * nk * (BLOCK_SIZE // META["BLOCK_N"]), )
    dq_grid = lambda META: (B * H * nq * (BLOCK_SIZE // META["BLOCK_M"]), )
    if configs is None and not interpreting():
        # the tail-tile bounds only cap a loop: the smallest tile of the configs bounds them all
        _bwd_dkdv_tuned[dkdv_grid](*dkdv_args, Q_TAIL_TILES=tail_tiles(Sq, _smallest("BLOCK_M")), USE_TMA=tma_q,
                                   **const)
        _bwd_dq_tuned[dq_grid](*dq_args, K_TAIL_TILES=tail_tiles(Sk, _smallest("BLOCK_N")), USE_TMA=tma_k, **const)
        return dq, dk, dv
    dkdv_config, dq_config = configs or default_configs(q.dtype)
    launches = ((_bwd_dkdv, dkdv_grid, dkdv_args, dkdv_config, "Q_TAIL_TILES", Sq, "BLOCK_M", tma_q, (desc_q, desc_do)),
                (_bwd_dq, dq_grid, dq_args, dq_config, "K_TAIL_TILES", Sk, "BLOCK_N", tma_k, (desc_k, desc_v)))
    for kernel, grid, args, conf, tail_name, length, tile, tma, descriptors in launches:
        for desc in descriptors if tma else ():
            desc.block_shape = [conf[tile], head_dim_pad]
        kernel[grid](*args, **{tail_name: tail_tiles(length, conf[tile])}, USE_TMA=tma, BLOCK_M=conf["BLOCK_M"],
                     BLOCK_N=conf["BLOCK_N"], NUM_STAGES=conf["num_stages"], num_warps=conf["num_warps"],
                     num_stages=conf["num_stages"], **const)
    return dq, dk, dv
