"""Block-sparse attention forward with FP8 (e4m3) tensor-core dots, SageAttention / FA3 style.
Inference only: no lse is returned and there is no backward.

Same mask format, block lists (``prepare_block_lists``), program layout, key tails and empty-row
rule as the 16-bit forward (``block_sparse_attention.py``), whose ``@triton.jit`` helpers it
calls. Two steps per call, no host sync:

1. Quantisation prep (``quantize``: three small Triton launches: k's and v's per-block column
   statistics, their reduction per head, then q, k, v quantised in one launch): k is smoothed by subtracting its mean over tokens per (batch, head, channel)
   (every score of a row moves by the same ``q.mean``, so the softmax is unchanged, while a
   channel's common offset no longer eats the block's e4m3 range); q and k are quantised with one
   float32 scale per (batch, head, 128-token block) (absmax / 448); v per (batch, head, channel),
   stored transposed as ``(B, H, D, Sk_padded)`` so that the P.V dot's second operand is K-major,
   as Hopper's FP8 wgmma needs (Triton's fused-attention tutorial does the same for fp8). All
   three are padded with zeros to whole 128-token blocks, so the kernel loads tiles unmasked.
   ``reference.quantize_fp8`` is the same quantisation in torch (same bytes).
2. The kernel: ``qk = dot(q8, k8^T)`` in fp32, times ``q_scale * k_scale * sm_scale * log2(e)``
   (one scalar per tile: tiles never straddle a 128-token block); the online softmax of the
   16-bit kernel; ``P`` scaled by 448 to use e4m3's range and cast; each tile's ``dot(p8, v8)``
   is accumulated in a fresh fp32 accumulator and then added (two-level accumulation as in
   SageAttention2: Hopper's FP8 MMA accumulates with reduced precision, so the running sum over
   all kept tiles is kept out of it); at the end ``out = acc / (448 l) * v_scale[channel]``.

K/V tiles come through host-side TMA descriptors on GPUs that have TMA (capability >= 9; the
quantised buffers are contiguous and padded, so they always qualify), through pointer loads on
Ada (sm_89). On an H200 at the Wan2.1-1.3B shape it ran 1.14x our 16-bit kernel at density 1.0,
1.09x at 0.25, 0.96x at 0.1, the prep 0.23 ms of it (``benchmarks/NOTES.md``, session 12). On Hopper
the FP8 op now runs the Gluon kernel (``kernels/gluon/block_sparse_attention.py``) on this module's
prep, with ``permute_value_keys``; this kernel serves other GPUs, key padding and the interpreter.

Supported: q, k, v fp16 or bf16 ``(B, H, S, D)`` with any strides, D 64 or 128, Sq != Sk, any
lengths, per-head ``(H, Nq, W)`` or per-batch ``(B, H, Nq, W)`` masks, key padding (bool
``(B or 1, Sk)``), compute capability >= (8, 9) (``fp8_unsupported_reason`` says why not).
Output ``(B, H, Sq, D)`` in q's dtype and layout (``torch.empty_like(q)``); rows with no kept key
are 0. Padded keys still enter k's mean and the scales (finite values are fine; NaN there would spread).

Accuracy (``tests/kernels/test_block_sparse_fp8.py`` states and derives the tolerance): e4m3
keeps 3 mantissa bits, so each of the three roundings (q and k, P, v) has a relative error up to
2^-4; with random normal inputs the output's relative Frobenius error against float64 is 3.4-5.4%
(the fp16 kernel's ~0.03%, plain bf16 attention's 0.3-0.6%).
"""
import functools
import math

import torch
import triton
import triton.language as tl

from .. import dispatch  # device_capability; dispatch imports this module too (used at call time only)
from ..bitmask import num_blocks
from ..reference import FP8_DTYPE, FP8_MAX, FP8_SCALE_FLOOR, LOG2E, Fp8Inputs
from . import interpreting
from .block_sparse_attention import (MASK_BLOCK, TensorDescriptor, _head_offset, _load_kv_tile, _load_rows,
                                     _locate_program, _mask_scores, _padding_argument, _softmax_step, _split_tail,
                                     _tile_start, check_launch, gpu_has_tma, mask_batch_stride, tail_tiles,
                                     unsupported_reason)
from .configs import fp8_configs, fp8_default_config, keep, prune_fp8_configs
from .mask_decode import prepare_block_lists

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
HEAD_DIMS = (64, 128)
MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (sm_89), Hopper (sm_90) and later
_FP8_MAX: tl.constexpr = tl.constexpr(FP8_MAX)
_SCALE_FLOOR: tl.constexpr = tl.constexpr(FP8_SCALE_FLOOR)


# ----------------------------------------------------------------------------------------------
# Quantisation prep: one program per (128-token block, batch * head)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _block_program(H, HEAD_DIM: tl.constexpr):
    """A program of a (128-token blocks, batch * heads) grid: its block, batch * head, batch, head,
    token offsets and channel offsets."""
    blk = tl.program_id(0)
    off_hz = tl.program_id(1)
    offs_s = blk * MASK_BLOCK + tl.arange(0, MASK_BLOCK)
    return blk, off_hz, off_hz // H, off_hz % H, offs_s, tl.arange(0, HEAD_DIM)


@triton.jit
def _quantize_tile(X, Mean, Scale, Out,  #
                   stride_xz, stride_xh, stride_xs, stride_xd,  #
                   stride_oz, stride_oh, stride_os, stride_od,  #
                   blk, off_hz, off_z, off_h, offs_s, offs_d, N, N_BLOCKS,  #
                   HEAD_DIM: tl.constexpr, SMOOTH: tl.constexpr, PER_CHANNEL: tl.constexpr,
                   PERMUTE: tl.constexpr = False):
    """Block ``blk`` (128 tokens) of x ``(B, H, N, D)`` (any strides) -> e4m3 in Out (any strides,
    whole blocks: zeros past N). ``SMOOTH``: subtract Mean's ``(batch, head)`` row (float32 ``(B*H, D)``)
    first. ``PER_CHANNEL``: scale by Scale's per-channel row (``(B*H, D)``); else by the block's
    absmax / 448, stored in Scale ``(B*H, N_BLOCKS)``. Times the scale's IEEE reciprocal, as
    ``reference.quantize_fp8`` (an IEEE division per element is a branchy subroutine on the GPU)."""
    x = _load_rows(X + _head_offset(off_z, off_h, stride_xz, stride_xh), offs_s, offs_d, stride_xs, stride_xd,
                   N, HEAD_DIM).to(tl.float32)
    if SMOOTH:
        mean = tl.load(Mean + off_hz * HEAD_DIM + offs_d)
        x = tl.where(offs_s[:, None] < N, x - mean[None, :], 0.0)
    if PER_CHANNEL:
        scale = tl.load(Scale + off_hz * HEAD_DIM + offs_d)[None, :]
    else:
        scale = tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0), _SCALE_FLOOR) * (1.0 / _FP8_MAX)
        tl.store(Scale + off_hz * N_BLOCKS + blk, scale)
    x8 = tl.clamp(x * tl.math.div_rn(1.0, scale), -_FP8_MAX, _FP8_MAX).to(tl.float8e4nv)
    if PERMUTE:  # token bits (b3, b2, b1, b0) to (b2, b1, b3, b0) in each 16, in registers: contiguous stores
        x8 = tl.reshape(tl.permute(tl.reshape(x8, (MASK_BLOCK // 16, 2, 2, 2, 2, HEAD_DIM)), (0, 2, 3, 1, 4, 5)),
                        (MASK_BLOCK, HEAD_DIM))
    o_ptrs = Out + _head_offset(off_z, off_h, stride_oz, stride_oh) + offs_s[:, None].to(tl.int64) * stride_os \
        + offs_d[None, :] * stride_od
    tl.store(o_ptrs, x8)


@triton.jit
def _quantize_qkv(Q, K, V, KMean, VScale, QScale, KScale, Q8, K8, Vt8,  #
                  stride_qz, stride_qh, stride_qs, stride_qd,  #
                  stride_kz, stride_kh, stride_ks, stride_kd,  #
                  stride_vz, stride_vh, stride_vs, stride_vd,  #
                  stride_q8z, stride_q8h, stride_q8s, stride_q8d,  #
                  stride_k8z, stride_k8h, stride_k8s, stride_k8d,  #
                  stride_v8z, stride_v8h, stride_v8s, stride_v8d,  # v8^T seen as (B, H, Sk_padded, D)
                  H, N_Q, N_K, N_Q_BLOCKS, N_K_BLOCKS, HEAD_DIM: tl.constexpr, PERMUTE_V: tl.constexpr):
    """q, k and v in one launch: grid axis 2 picks the tensor (0 q, 1 k smoothed, 2 v per channel;
    ``PERMUTE_V``: v's keys in the Gluon FP8 forward's order)."""
    blk, off_hz, off_z, off_h, offs_s, offs_d = _block_program(H, HEAD_DIM)
    which = tl.program_id(2)
    if which == 0:
        if blk < N_Q_BLOCKS:
            _quantize_tile(Q, QScale, QScale, Q8, stride_qz, stride_qh, stride_qs, stride_qd,  #
                           stride_q8z, stride_q8h, stride_q8s, stride_q8d,  #
                           blk, off_hz, off_z, off_h, offs_s, offs_d, N_Q, N_Q_BLOCKS, HEAD_DIM, False, False)
    elif blk < N_K_BLOCKS:
        if which == 1:
            _quantize_tile(K, KMean, KScale, K8, stride_kz, stride_kh, stride_ks, stride_kd,  #
                           stride_k8z, stride_k8h, stride_k8s, stride_k8d,  #
                           blk, off_hz, off_z, off_h, offs_s, offs_d, N_K, N_K_BLOCKS, HEAD_DIM, True, False)
        else:
            _quantize_tile(V, VScale, VScale, Vt8, stride_vz, stride_vh, stride_vs, stride_vd,  #
                           stride_v8z, stride_v8h, stride_v8s, stride_v8d,  #
                           blk, off_hz, off_z, off_h, offs_s, offs_d, N_K, N_K_BLOCKS, HEAD_DIM, False, True,
                           PERMUTE_V)


@triton.jit
def _key_value_part_stats(K, V, KSum, VMax,  #
                           stride_kz, stride_kh, stride_ks, stride_kd,  #
                           stride_vz, stride_vh, stride_vs, stride_vd,  #
                           H, N, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, CHUNK: tl.constexpr):
    """Tokens ``program * ROWS ..+ROWS`` of k and v: k's column sums in float64 (``reference.key_means``
    says why any order gives the same sum) and v's column absmax, into row ``(batch * head, program)``
    of KSum / VMax ``(B*H, programs, D)``. ``CHUNK`` rows at a time into elementwise accumulators,
    reduced across rows once at the end."""
    part = tl.program_id(0)
    off_hz = tl.program_id(1)
    off_z, off_h = off_hz // H, off_hz % H
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, HEAD_DIM)
    k_base = K + _head_offset(off_z, off_h, stride_kz, stride_kh)
    v_base = V + _head_offset(off_z, off_h, stride_vz, stride_vh)
    k_sum = tl.zeros([CHUNK, HEAD_DIM], dtype=tl.float64)
    v_max = tl.zeros([CHUNK, HEAD_DIM], dtype=tl.float32)
    for start in range(part * ROWS, tl.minimum(part * ROWS + ROWS, N), CHUNK):  # to N: the interpreter pays per step
        k_sum += _load_rows(k_base, start + offs_c, offs_d, stride_ks, stride_kd, N, HEAD_DIM).to(tl.float64)
        v = _load_rows(v_base, start + offs_c, offs_d, stride_vs, stride_vd, N, HEAD_DIM)
        v_max = tl.maximum(v_max, tl.abs(v.to(tl.float32)))
    row = (off_hz * tl.num_programs(0) + part) * HEAD_DIM
    tl.store(KSum + row + offs_d, tl.sum(k_sum, 0))
    tl.store(VMax + row + offs_d, tl.max(v_max, 0))


@triton.jit
def _key_value_stats(KSum, VMax, Mean, VScale, N, N_PARTS, HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr):
    """Per (batch, head): k's mean over its N tokens (float64 sum / N, rounded to float32) and v's
    per-channel scale (absmax / 448), from the partial rows of ``_key_value_part_stats``."""
    off_hz = tl.program_id(0)
    offs_b = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, HEAD_DIM)
    total = tl.zeros([HEAD_DIM], dtype=tl.float64)
    vmax = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for start in range(0, N_PARTS, CHUNK):
        rows = start + offs_b
        ptrs = (off_hz * N_PARTS + rows)[:, None] * HEAD_DIM + offs_d[None, :]
        total += tl.sum(tl.load(KSum + ptrs, mask=(rows < N_PARTS)[:, None], other=0.0), 0)
        vmax = tl.maximum(vmax, tl.max(tl.load(VMax + ptrs, mask=(rows < N_PARTS)[:, None], other=0.0), 0))
    tl.store(Mean + off_hz * HEAD_DIM + offs_d, (total / N).to(tl.float32))
    tl.store(VScale + off_hz * HEAD_DIM + offs_d, tl.maximum(vmax, _SCALE_FLOOR) * (1.0 / _FP8_MAX))


STATS_ROWS = 1024  # tokens per program of the first statistics pass


def _key_value_statistics(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``(B, H, D)`` each: ``reference.key_means(k)`` and ``reference.value_scales(v)``, the
    same values, in two launches (in place of torch reductions over the token axis and their small
    elementwise follow-ups). The first pass takes ``STATS_ROWS`` tokens per program, so the second (one
    program per head) reduces a few rows, not one per 128-token block (NOTES, session 19)."""
    B, H, S, D = k.shape
    parts = triton.cdiv(S, STATS_ROWS)
    k_sums = torch.empty((B * H, parts, D), dtype=torch.float64, device=k.device)
    v_maxes = torch.empty((B * H, parts, D), dtype=torch.float32, device=k.device)
    _key_value_part_stats[(parts, B * H)](k, v, k_sums, v_maxes, *k.stride(), *v.stride(), H, S, HEAD_DIM=D,
                                           ROWS=STATS_ROWS, CHUNK=32, num_warps=8)
    mean = torch.empty((B, H, D), dtype=torch.float32, device=k.device)
    v_scale = torch.empty_like(mean)
    _key_value_stats[(B * H,)](k_sums, v_maxes, mean, v_scale, S, parts, HEAD_DIM=D, CHUNK=16, num_warps=4)
    return mean, v_scale


def quantize(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, permute_value_keys: bool = False) -> Fp8Inputs:
    """The kernel's operands (:class:`reference.Fp8Inputs`), the same bytes as ``reference.quantize_fp8``:
    three launches (k's and v's statistics in two, then q, k, v quantised in one). ``permute_value_keys``:
    v^T's keys in the Gluon FP8 forward's order (``reference.permute_value_keys``)."""
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    nq, nk = num_blocks(Sq), num_blocks(Sk)
    k_mean, v_scale = _key_value_statistics(k, v)
    empty = functools.partial(torch.empty, device=q.device)
    q8, k8 = empty((B, H, nq * MASK_BLOCK, D), dtype=FP8_DTYPE), empty((B, H, nk * MASK_BLOCK, D), dtype=FP8_DTYPE)
    v_t = empty((B, H, D, nk * MASK_BLOCK), dtype=FP8_DTYPE)
    q_scale, k_scale = empty((B, H, nq), dtype=torch.float32), empty((B, H, nk), dtype=torch.float32)
    _quantize_qkv[(max(nq, nk), B * H, 3)](q, k, v, k_mean, v_scale, q_scale, k_scale, q8, k8, v_t,  #
                                           *q.stride(), *k.stride(), *v.stride(), *q8.stride(), *k8.stride(),
                                           *v_t.transpose(2, 3).stride(), H, Sq, Sk, nq, nk, HEAD_DIM=D,
                                           PERMUTE_V=permute_value_keys, num_warps=4)
    return Fp8Inputs(q8, q_scale, k8, k_scale, v_t, v_scale, permute_value_keys)


# ----------------------------------------------------------------------------------------------
# Inner loop and kernel: one program per (batch, head, query tile), as the 16-bit forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_vt_tile(ptrs, desc, row0, start_n, USE_TMA: tl.constexpr):
    """The ``(HEAD_DIM, BLOCK_N)`` tile of keys ``start_n..`` of the transposed, padded e4m3 v."""
    if USE_TMA:
        t = desc.load([row0, start_n])
    else:
        t = tl.load(ptrs + start_n)
    return t


@triton.jit
def _attn_fwd_fp8_inner(acc, l_i, m_i, q, q_scale,  #
                        k_ptrs, vt_ptrs, desc_k, desc_v, k_row0, v_row0, k_scale_ptr, pad_ptr,  #
                        kv_idx_ptr, lo, hi, N_K, offs_n, offs_d,  #
                        HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,  #
                        USE_TMA: tl.constexpr, MASK_K: tl.constexpr, NUM_STAGES: tl.constexpr,  #
                        HAS_PADDING: tl.constexpr):
    for i in tl.range(lo, hi, num_stages=NUM_STAGES):
        start_n = _tile_start(kv_idx_ptr, i, BLOCK_N, SPLIT)
        # the buffers are padded to whole blocks with zeros: no load masks, only the scores' (MASK_K)
        k = _load_kv_tile(k_ptrs, desc_k, k_row0, 0, HEAD_DIM, start_n, offs_n, offs_d, N_K,  #
                          HEAD_DIM, HEAD_DIM, USE_TMA, False)
        vt = _load_vt_tile(vt_ptrs, desc_v, v_row0, start_n, USE_TMA)
        qk = tl.dot(q, k.T)
        qk = _mask_scores(qk, start_n, offs_n, N_K, pad_ptr, MASK_K, HAS_PADDING)
        tile_scale = q_scale * tl.load(k_scale_ptr + start_n // MASK_BLOCK)
        p, alpha, m_i, l_i = _softmax_step(qk, m_i, l_i, tile_scale, HAS_PADDING)
        # two-level accumulation: the tile's P.V in its own fp32 accumulator, then added
        pv = tl.dot((p * _FP8_MAX).to(tl.float8e4nv), vt.T)
        acc = acc * alpha[:, None] + pv
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_fp8(Q8, K8, Vt8, desc_k, desc_v, QScale, KScale, VScale, Out,  #
                  KvIdx, KvCnt, Order, KeyPad, qk_scale,  #
                  stride_oz, stride_oh, stride_om, stride_ok,  #
                  stride_rz, stride_rh,  # (batch, head) -> mask (batch, head) index: (H, 1) or (0, 1)
                  stride_pz,  # batch stride of KeyPad (uint8 (B or 1, Sk)): Sk, or 0 when shared
                  H, N_Q, N_K, N_Q_BLOCKS, N_K_BLOCKS,  #
                  HEAD_DIM: tl.constexpr,  #
                  K_TAIL_TILES: tl.constexpr,  # tiles of the last key block holding keys < Sk; 0 if Sk % 128 == 0
                  USE_TMA: tl.constexpr, HAS_PADDING: tl.constexpr,  #
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr):
    tl.static_assert(MASK_BLOCK % BLOCK_M == 0)
    tl.static_assert(MASK_BLOCK % BLOCK_N == 0)
    SPLIT: tl.constexpr = MASK_BLOCK // BLOCK_N
    ROWS_PER_MASK: tl.constexpr = MASK_BLOCK // BLOCK_M
    off_hz, off_z, off_h, start_m, kv_idx_ptr, n_kept = _locate_program(
        tl.program_id(0), H, N_Q_BLOCKS, ROWS_PER_MASK, BLOCK_M, Order, KvCnt, KvIdx, N_K_BLOCKS, stride_rz, stride_rh)
    q_len = N_Q_BLOCKS * MASK_BLOCK  # rows of the padded buffers
    k_len = N_K_BLOCKS * MASK_BLOCK
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    q = _load_rows(Q8 + off_hz.to(tl.int64) * q_len * HEAD_DIM, offs_m, offs_d, HEAD_DIM, 1, q_len, HEAD_DIM)
    q_scale = tl.load(QScale + off_hz * N_Q_BLOCKS + start_m // MASK_BLOCK) * qk_scale

    # TMA views k8 as (B*H*k_len, D) and v8^T as (B*H*D, k_len): this head's rows start at k_row0 / v_row0
    k_row0 = off_hz * k_len
    v_row0 = off_hz * HEAD_DIM
    k_ptrs = K8 + off_hz.to(tl.int64) * k_len * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    vt_ptrs = Vt8 + off_hz.to(tl.int64) * HEAD_DIM * k_len + offs_d[:, None] * k_len + offs_n[None, :]
    k_scale_ptr = KScale + off_hz * N_K_BLOCKS
    pad_ptr = KeyPad + off_z.to(tl.int64) * stride_pz

    n_tiles, n_main = _split_tail(kv_idx_ptr, n_kept, SPLIT, N_K, K_TAIL_TILES)
    acc, l_i, m_i = _attn_fwd_fp8_inner(acc, l_i, m_i, q, q_scale, k_ptrs, vt_ptrs, desc_k, desc_v, k_row0, v_row0,  #
                                        k_scale_ptr, pad_ptr, kv_idx_ptr, 0, n_main, N_K, offs_n, offs_d,  #
                                        HEAD_DIM, BLOCK_N, SPLIT, USE_TMA, False, NUM_STAGES, HAS_PADDING)
    if K_TAIL_TILES > 0:
        acc, l_i, m_i = _attn_fwd_fp8_inner(acc, l_i, m_i, q, q_scale, k_ptrs, vt_ptrs, desc_k, desc_v, k_row0,
                                            v_row0, k_scale_ptr, pad_ptr, kv_idx_ptr, n_main,
                                            tl.minimum(n_tiles, n_main + K_TAIL_TILES), N_K, offs_n, offs_d,  #
                                            HEAD_DIM, BLOCK_N, SPLIT, USE_TMA, True, 1, HAS_PADDING)

    # epilogue: undo P's 448 and v's scales; an empty row (l_i == 0) has acc = 0 and gives out = 0
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    v_scale = tl.load(VScale + off_hz * HEAD_DIM + offs_d)
    out = acc / (l_safe * _FP8_MAX)[:, None] * v_scale[None, :]
    o_ptrs = Out + off_z.to(tl.int64) * stride_oz + off_h.to(tl.int64) * stride_oh \
        + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :] * stride_ok
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_m[:, None] < N_Q)


_attn_fwd_fp8_tuned = triton.autotune(configs=list(filter(keep, fp8_configs)),
                                      key=["N_Q", "N_K", "HEAD_DIM", "USE_TMA", "K_TAIL_TILES", "HAS_PADDING"],
                                      prune_configs_by={"early_config_prune": prune_fp8_configs})(_attn_fwd_fp8)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------
def fp8_unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           key_padding: torch.Tensor | None = None) -> str | None:
    """Why the FP8 path cannot take these inputs (None if it can); the tensors may be fake.

    The 16-bit kernel's input rules, plus: fp16/bf16 only, head dim 64 or 128, key padding bool
    ``(B or 1, Sk)``, and on CUDA a GPU with FP8 tensor cores (capability >= (8, 9)). Other devices
    get None: the op runs ``reference.blockwise_attention_fp8`` there, the same quantisation in torch.
    """
    reason = unsupported_reason(q, k, v)
    if reason is not None:
        return reason
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype}: the FP8 path quantises float16 or bfloat16 inputs"
    if q.shape[3] not in HEAD_DIMS:
        return f"head_dim {q.shape[3]} not in {HEAD_DIMS} (FP8 path)"
    if key_padding is not None and (key_padding.dtype != torch.bool or key_padding.dim() != 2
                                    or key_padding.shape[0] not in (1, q.shape[0]) or key_padding.shape[1] != k.shape[2]):
        return f"key_padding {key_padding.dtype} {tuple(key_padding.shape)} is not bool (B or 1, Sk)"
    if q.device.type == "cuda":
        capability = tuple(dispatch.device_capability(q.device))
        if capability < MIN_CAPABILITY:
            return f"compute capability {capability} < {MIN_CAPABILITY}: no FP8 tensor cores"
    return None


def _descriptors(x: Fp8Inputs) -> tuple:
    """TMA descriptors of k8 as ``(B*H*Sk_padded, D)`` and v8^T as ``(B*H*D, Sk_padded)`` (contiguous,
    so always describable); block shapes are set per launch config."""
    D = x.k.shape[3]
    k2, v2 = x.k.flatten(0, 2), x.v_t.flatten(0, 2)
    return (TensorDescriptor(k2, list(k2.shape), list(k2.stride()), [64, D]),
            TensorDescriptor(v2, list(v2.shape), list(v2.stride()), [D, 64]))


def block_sparse_attention_fp8(
    q: torch.Tensor,  # (B, H, Sq, D), fp16 or bf16, any strides
    k: torch.Tensor,  # (B, H, Sk, D)
    v: torch.Tensor,  # (B, H, Sk, D)
    mask_words: torch.Tensor,  # int32 (H, Nq, W) or (B, H, Nq, W)
    scale: float | None = None,
    key_padding: torch.Tensor | None = None,  # bool (B or 1, Sk): False marks keys no query sees
    *,
    config: dict | None = None,
    use_tma: bool | None = None,
) -> torch.Tensor:
    """Block-sparse attention forward with e4m3 operands: ``out (B, H, Sq, D)`` in q's dtype and
    layout (``torch.empty_like(q)``); rows with no kept (unpadded) key are 0. Inference only (no
    lse, no backward).

    ``scale``: None means ``1 / sqrt(D)``. ``config``: ``{"BLOCK_M", "BLOCK_N", "num_warps",
    "num_stages"}`` to launch one fixed config; None autotunes on a GPU (``fp8_default_config`` in
    the interpreter). ``use_tma``: None reads K/V tiles through TMA where the GPU has it; False
    forces pointer loads.
    """
    check_launch("block_sparse_attention_fp8", fp8_unsupported_reason(q, k, v, key_padding), q.device,
                 "reference.blockwise_attention_fp8")
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    nq, nk = num_blocks(Sq), num_blocks(Sk)
    stride_rz = mask_batch_stride(mask_words, q, Sk)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    kv_idx, kv_cnt, order = prepare_block_lists(mask_words, Sk)
    pad, stride_pz = _padding_argument(key_padding, B, Sk, q.device, kv_cnt)
    x = quantize(q, k, v)
    out = torch.empty_like(q)
    use_tma = TensorDescriptor is not None and (gpu_has_tma(q.device) if use_tma is None else use_tma)
    desc_k, desc_v = _descriptors(x) if use_tma else (None, None)

    grid = lambda META: (B * H * nq * (MASK_BLOCK // META["BLOCK_M"]), )
    args = (x.q, x.k, x.v_t, desc_k, desc_v, x.q_scale, x.k_scale, x.v_scale, out, kv_idx, kv_cnt, order, pad,
            scale * LOG2E, *out.stride(), stride_rz, 1, stride_pz, H, Sq, Sk, nq, nk)
    const = dict(HEAD_DIM=D, USE_TMA=use_tma, HAS_PADDING=key_padding is not None)
    if config is None and not interpreting():
        # the tail-tile bound only caps a loop: the smallest BLOCK_N of the configs (64) bounds them all
        _attn_fwd_fp8_tuned[grid](*args, K_TAIL_TILES=tail_tiles(Sk, 64), **const)
        return out
    config = {**fp8_default_config(D, q.device), **(config or {})}
    BM, BN = config["BLOCK_M"], config["BLOCK_N"]
    if use_tma:
        desc_k.block_shape = [BN, D]
        desc_v.block_shape = [D, BN]
    _attn_fwd_fp8[grid](*args, K_TAIL_TILES=tail_tiles(Sk, BN), BLOCK_M=BM, BLOCK_N=BN,
                        NUM_STAGES=config["num_stages"], num_warps=config["num_warps"],
                        num_stages=config["num_stages"], **const)
    return out
