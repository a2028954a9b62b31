"""GELU (tanh) and rowwise float8 quantisation in one pass: one program per row, the row in registers.

The semantics are ``kernels.activation_quant.gelu_tanh_float8_rows_reference`` (torchao's), step
by step: the GELU in float32 as ``x * sigmoid(2 u)`` (equal to ``0.5 x (1 + tanh(u))``; after rounding
to the input dtype it gives the same value except for ~0.03% of elements, one unit of the last place
apart); the row's absolute maximum in the input dtype; ``scale = amax / 448`` rounded to the input
dtype, then float32; ``g / scale`` as ``g`` times the row's IEEE reciprocal (within an ulp of
eager's division, which decides an e4m3 rounding only next to a boundary), clamped to +-448 (NaN kept:
an all-zero row gives NaN, as torchao's 0 / 0; a NaN in a row makes its amax and so the whole row NaN,
as torch's amax does; infinities follow IEEE arithmetic as in eager), cast to e4m3. Rows up to
``MAX_ROW`` elements (the row lives in registers: 16 warps hold 32,768 values at 64 registers per
thread).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..activation_quant import INPUT_DTYPES
from ..reference import FP8_DTYPE, FP8_MAX

MAX_ROW = 32768
_FLOAT8_MAX: tl.constexpr = tl.constexpr(FP8_MAX)
_TINY_SCALE: tl.constexpr = tl.constexpr(2.0 ** -64)  # below it a row is lifted by 2^64 before the reciprocal


@triton.jit
def _gelu_tanh(h):
    """(float32 GELU, GELU rounded to h's dtype) of a tile."""
    x = h.to(tl.float32)
    inner = (x + x * x * x * 0.044715) * 0.7978845608028654
    # 0.5 x (1 + tanh(inner)) = x sigmoid(2 inner): no cancellation where tanh is near -1; the fast
    # division's few-ulp float32 error is far below the rounding to h's dtype that follows
    g32 = x / (1.0 + tl.exp(-2.0 * inner))
    return g32, g32.to(h.dtype)


@triton.jit
def _quantize(g, lift, inv_scale):
    return tl.clamp(g.to(tl.float32) * lift * inv_scale, -_FLOAT8_MAX, _FLOAT8_MAX,
                    propagate_nan=tl.PropagateNan.ALL).to(tl.float8e4nv)


@triton.jit
def _gelu_tanh_float8_rows(H, Q, Scale, N, stride_h, stride_q, HEAD: tl.constexpr, TAIL: tl.constexpr):
    """One row: its first HEAD elements (a power of two <= N, unmasked) and the rest in a TAIL tile
    (a power of two >= N - HEAD; 0 when N == HEAD). Two tiles instead of one of next_pow2(N): at
    Wan2.1-1.3B's width 8,960 they compute 9,216 lanes instead of 16,384."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, HEAD)
    h = tl.load(H + row * stride_h + offs)
    g32, g = _gelu_tanh(h)
    amax = tl.max(tl.abs(g), 0)
    nans = tl.max((g32 != g32).to(tl.int32), 0)
    if TAIL > 0:
        offs_tail = HEAD + tl.arange(0, TAIL)
        in_row = offs_tail < N
        h_tail = tl.load(H + row * stride_h + offs_tail, mask=in_row, other=0.0)
        g32_tail, g_tail = _gelu_tanh(h_tail)  # padding lanes hold gelu(0) = 0
        amax = tl.maximum(amax, tl.max(tl.abs(g_tail), 0))
        nans = tl.maximum(nans, tl.max((g32_tail != g32_tail).to(tl.int32), 0))
    amax = tl.where(nans > 0, float("nan"), amax)  # torch's amax keeps a NaN
    scale = tl.math.div_rn(amax.to(tl.float32), _FLOAT8_MAX).to(h.dtype).to(tl.float32)
    # times the row's IEEE reciprocal, not an IEEE division per element: each div_rn is a branchy
    # subroutine that serialises the row (1.15 vs 0.53 ms on an H200); the product is within an ulp
    # of the quotient, which changes an e4m3 rounding only next to a rounding boundary. A row of tiny
    # values is scaled by 2^64 first (exact), so that 1 / scale stays finite for a subnormal scale.
    lift = tl.where(scale < _TINY_SCALE, 18446744073709551616.0, 1.0)
    inv_scale = tl.math.div_rn(1.0, scale * lift)
    tl.store(Q + row * stride_q + offs, _quantize(g, lift, inv_scale))
    if TAIL > 0:
        tl.store(Q + row * stride_q + offs_tail, _quantize(g_tail, lift, inv_scale), mask=in_row)
    tl.store(Scale + row, scale)


def _tiles(n: int) -> tuple[int, int]:
    """(HEAD, TAIL) of a row of n elements: the largest power of two <= n, and the rest rounded up."""
    head = 1 << (n.bit_length() - 1)
    return head, (triton.next_power_of_2(n - head) if n > head else 0)


def unsupported_reason(h: torch.Tensor) -> str | None:
    """Why :func:`gelu_tanh_float8_rows` cannot take ``h`` (None if it can)."""
    if h.dtype not in INPUT_DTYPES:
        return f"dtype {h.dtype} not in {[str(d) for d in INPUT_DTYPES]}"
    if h.dim() == 0 or h.shape[-1] == 0:
        return "no rows"
    if h.shape[-1] > MAX_ROW:
        return f"rows of {h.shape[-1]} elements > {MAX_ROW}"
    return None


def gelu_tanh_float8_rows(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values shaped like ``h``, float32 scales ``h.shape[:-1] + (1,)``); see the module docstring."""
    reason = unsupported_reason(h)
    if reason is not None:
        raise ValueError(f"gelu_tanh_float8_rows cannot take this input: {reason}")
    n = h.shape[-1]
    rows = h.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    q = torch.empty(rows.shape, device=h.device, dtype=FP8_DTYPE)
    scale = torch.empty((rows.shape[0], 1), device=h.device, dtype=torch.float32)
    if rows.shape[0]:
        head, tail = _tiles(n)
        _gelu_tanh_float8_rows[(rows.shape[0],)](rows, q, scale, n, rows.stride(0), q.stride(0), HEAD=head, TAIL=tail,
                                                 num_warps=max(1, min(16, triton.next_power_of_2(n) // 2048)))
    return q.view(h.shape), scale.view(*h.shape[:-1], 1)
