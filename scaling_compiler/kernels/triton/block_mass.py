"""Exact attention mass per 128x128 block in Triton (`kernels/block_mass.py` is the public entry).

One program per (batch, head, query block) walks the key blocks twice, first for the rows'
log-sum-exp (online max and sum, as in flash attention), then for each tile's sum of
`exp(s - lse)`. It costs two QK^T products and no PV: about one dense attention call per site.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..bitmask import BLOCK_SIZE, num_blocks
from . import interpreting
from .block_sparse_attention import LOG2E


@triton.jit
def _tile_scores(q, K, off_k, stride_ks, stride_kd, Keep, off_keep, kb, N_K,  #
                 offs_n, offs_d, qk_scale,  #
                 HEAD_DIM: tl.constexpr, HAS_PADDING: tl.constexpr, UPCAST: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """log2-domain scores `scale * log2(e) * q.k` of one key block; -inf where a key is absent."""
    keys = kb * q.shape[0] + offs_n
    valid = keys < N_K
    k = tl.load(K + off_k + keys[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                mask=valid[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    if HAS_PADDING:
        valid &= tl.load(Keep + off_keep + keys, mask=keys < N_K, other=0) != 0
    s = tl.dot(q, k.T, input_precision=DOT_PRECISION) * qk_scale
    return tl.where(valid[None, :], s, float("-inf"))


@triton.jit
def _block_mass_kernel(Q, K, Keep, Mass,  #
                       stride_qb, stride_qh, stride_qs, stride_qd,  #
                       stride_kb, stride_kh, stride_ks, stride_kd, stride_keep_b,  #
                       H, N_Q, N_K, NUM_QB, NUM_KB, qk_scale,  #
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr,
                       HAS_PADDING: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    qb = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b, off_h = off_bh // H, off_bh % H
    offs_m = qb * BLOCK + tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N_Q
    q = tl.load(Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
                + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    off_k = off_b.to(tl.int64) * stride_kb + off_h.to(tl.int64) * stride_kh
    off_keep = off_b.to(tl.int64) * stride_keep_b

    # pass 1: each row's log2-sum-exp2 over every key
    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    for kb in range(0, NUM_KB):
        s = _tile_scores(q, K, off_k, stride_ks, stride_kd, Keep, off_keep, kb, N_K, offs_n, offs_d, qk_scale,
                         HEAD_DIM, HAS_PADDING, UPCAST, DOT_PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: avoid -inf - -inf
        l_i = l_i * tl.math.exp2(m_i - m_safe) + tl.sum(tl.math.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    # a row with no key at all gets +inf, so its probabilities are exp2(-inf) = 0
    lse = tl.where(l_i > 0, m_i + tl.math.log2(l_i), float("inf"))
    lse = tl.where(row_ok, lse, float("inf"))

    # pass 2: each tile's total probability, divided by its real (rows x keys) size
    rows = tl.minimum(N_Q - qb * BLOCK, BLOCK).to(tl.float32)
    out = Mass + (off_bh.to(tl.int64) * NUM_QB + qb) * NUM_KB
    for kb in range(0, NUM_KB):
        s = _tile_scores(q, K, off_k, stride_ks, stride_kd, Keep, off_keep, kb, N_K, offs_n, offs_d, qk_scale,
                         HEAD_DIM, HAS_PADDING, UPCAST, DOT_PRECISION)
        total = tl.sum(tl.sum(tl.math.exp2(s - lse[:, None]), 1), 0)
        keys = tl.minimum(N_K - kb * BLOCK, BLOCK).to(tl.float32)
        tl.store(out + kb, total / (rows * keys))


def block_mass_triton(
    q: torch.Tensor,  # (B, H, Sq, D), any strides
    k: torch.Tensor,  # (B, H, Sk, D)
    scale: float,
    key_padding: torch.Tensor | None = None,  # bool (B or 1, Sk)
) -> torch.Tensor:  # float32 (B, H, Nq, Nk)
    """`block_mass` by the Triton kernel (CUDA; also CPU tensors under TRITON_INTERPRET=1)."""
    batch, heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    nq, nk = num_blocks(q_len), num_blocks(kv_len)
    mass = torch.empty(batch, heads, nq, nk, dtype=torch.float32, device=q.device)
    if key_padding is not None:
        keep = key_padding.reshape(-1, kv_len).to(torch.int8)
        keep_arg, keep_stride = keep, (keep.stride(0) if keep.shape[0] > 1 else 0)
    else:
        keep_arg, keep_stride = mass, 0  # never read
    _block_mass_kernel[(nq, batch * heads)](
        q, k, keep_arg, mass, *q.stride(), *k.stride(), keep_stride,
        heads, q_len, kv_len, nq, nk, scale * LOG2E,
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK=BLOCK_SIZE,
        HAS_PADDING=key_padding is not None, UPCAST=interpreting() and q.dtype != torch.float32,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=8, num_stages=3,
    )
    return mass
