"""Block-sparse attention forward in Triton, driven by a compressed row mask.

Callers go through ``kernels/dispatch.py``, which picks this kernel for CUDA tensors and its
K/V load path per GPU: TMA descriptors on Hopper and later (capability >= 9), pointer loads on
GPUs without TMA (Ampere, Ada). The backward is beside this file, in
``block_sparse_attention_bwd.py``; it shares the program-locating, tail-splitting and tile-loading
helpers below.

Laid out like Triton's fused-attention tutorial: the inner loop, the kernel, then the launcher;
the mask decoder is in ``mask_decode.py`` and the autotune configs with their pruning filter in
``configs.py``.

Mask format (see ``kernels/bitmask.py``): for each (head, query block of 128 tokens) a bitmask over key
blocks of 128 tokens, packed in int32 words. A tiny decode kernel turns each mask row into a
compact ascending list of kept key-block indices plus a count (one program per row, a prefix sum
over the row's bits). The attention kernel's key loop then walks that list with a
``tl.range(..., num_stages=...)`` loop: no data-dependent branch per candidate block, so Triton
software-pipelines the K/V loads (walking the bits with a scalar ``if`` per block defeats that).
K/V tiles come through host-side TMA descriptors when the layout allows (last dim contiguous,
16-byte aligned strides: contiguous (B, H, S, D) and transposed (B, S, H, D) views both do), else
through pointer loads. Because the K/V addresses depend on a load, Triton's pipeliner prefetches
only (num_stages - 1) // 2 tiles ahead: num_stages=5 buys a 3-buffer pipeline (see configs).
Measured on an H100 (benchmarks/NOTES.md): Wan2.1-1.3B shape, density 0.10: 1.16-1.29 ms
(~510-570 TFLOP/s on kept blocks); density 1.0: 11.4 ms, on par with cuDNN.

Semantics (the contract the rest of the project codes against):

- q ``(B, H, Sq, D)``, k and v ``(B, H, Sk, D)``, any strides (e.g. transposed views of
  ``(B, S, H, D)``, taken without a copy); Sq != Sk allowed; any lengths.
- mask_words int32 ``(H, Nq, W)`` shared over the batch or ``(B, H, Nq, W)``;
  ``Nq = ceil(Sq / 128)``, ``W = ceil(ceil(Sk / 128) / 32)``.
- Returns ``out`` (q's dtype, ``(B, H, Sq, D)`` in q's layout: ``torch.empty_like(q)``, so that a
  model's transpose back to ``(B, S, H, D)`` stays a view, as after SDPA) and ``lse`` (float32
  ``(B, H, Sq)``, natural-log log-sum-exp of ``scale * q.k`` over the kept keys). Key tokens ``>= Sk`` never
  contribute. A query row whose mask row is all zero gets ``out = 0`` and ``lse = -inf``.
- An optional key-padding mask (bool ``(B or 1, Sk)``, False = padded) drops keys inside kept
  blocks; a row left with no key is an empty row (out 0, lse -inf), as on the CPU path. It is a
  constexpr switch (``HAS_PADDING``): without it the kernel is the one measured above.
- Softmax statistics are kept in float32; exponentials use exp2 with ``scale * log2(e)`` folded
  into the scores, as in the tutorial. fp32 inputs use IEEE fp32 dots (no tf32).
"""
import math

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake

from ..bitmask import BLOCK_SIZE, num_blocks, num_words
from . import interpreting
from .configs import MIN_HEAD_DIM, configs, default_config, keep, prune_invalid_configs
from .mask_decode import BlockLists, decode_mask, prepare_block_lists

try:  # host-side TMA descriptors (Triton >= 3.3)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
TMA_MIN_CAPABILITY = 9  # host-side TMA descriptors need Hopper (sm_90) or later
MAX_HEAD_DIM = 128
MASK_BLOCK: tl.constexpr = tl.constexpr(BLOCK_SIZE)
LOG2E = 1.4426950408889634  # 1 / ln(2): scores are scaled into the exp2 domain
LN2 = 0.6931471805599453  # ln(2): log2 -> ln for the returned lse
_LOG2E: tl.constexpr = tl.constexpr(LOG2E)
_LN2: tl.constexpr = tl.constexpr(LN2)


# ----------------------------------------------------------------------------------------------
# Inner loop: tiles lo..hi of the kept-block list (each kept 128-key block = SPLIT tiles).
# ----------------------------------------------------------------------------------------------
@triton.jit
def _locate_program(pid, H, N_BLOCKS, SPLIT: tl.constexpr, TILE: tl.constexpr,  #
                    Order, Cnt, Idx, IDX_STRIDE, stride_rz, stride_rh):
    """Program ``pid`` -> (its (batch * H + head), batch, head, first token of its tile, the block
    list it walks, that list's length). Programs of one head are adjacent; within a head ``Order``
    lists the mask rows (columns, for the backward's dk/dv) heaviest first."""
    n_tiles = N_BLOCKS * SPLIT
    off_hz = pid // n_tiles
    off_z = off_hz // H
    off_h = off_hz % H
    slot = pid % n_tiles
    mask_hz = off_z * stride_rz + off_h * stride_rh
    row = mask_hz * N_BLOCKS + tl.load(Order + mask_hz * N_BLOCKS + slot // SPLIT)
    start = (row - mask_hz * N_BLOCKS) * MASK_BLOCK + (slot % SPLIT) * TILE
    return off_hz, off_z, off_h, start, Idx + row.to(tl.int64) * IDX_STRIDE, tl.load(Cnt + row)


@triton.jit
def _split_tail(idx_ptr, n_kept, SPLIT: tl.constexpr, N, TAIL_TILES: tl.constexpr):
    """(tiles of the list, tiles before its partial last block): the list is ascending, so only its
    last block can be the partial one (N % 128 != 0); it gets a separate masked loop."""
    n_tiles = n_kept * SPLIT
    n_main = n_tiles
    if TAIL_TILES > 0:
        last = tl.load(idx_ptr + tl.maximum(n_kept - 1, 0))
        has_tail = (n_kept > 0) & (last == N // MASK_BLOCK)
        n_main = n_tiles - has_tail.to(tl.int32) * SPLIT
    return n_tiles, n_main


@triton.jit
def _head_offset(off_z, off_h, stride_z, stride_h):
    """Element offset of (batch, head)'s first row."""
    return off_z.to(tl.int64) * stride_z + off_h.to(tl.int64) * stride_h


@triton.jit
def _load_rows(base, offs_s, offs_d, stride_s, stride_d, N, HEAD_DIM: tl.constexpr):
    """A tile that stays resident in a program (q in the forward; k, v or q, do in the backward):
    rows ``offs_s`` of a head starting at ``base``; rows past N and columns past HEAD_DIM are 0."""
    mask = (offs_s[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
    return tl.load(base + offs_s[:, None].to(tl.int64) * stride_s + offs_d[None, :] * stride_d, mask=mask, other=0.0)


@triton.jit
def _tma_origin(off, ld):
    """(row, column) of a head's first element in the 2-D ``(rows, ld)`` TMA view of its tensor."""
    return (off // ld).to(tl.int32), (off % ld).to(tl.int32)


@triton.jit
def _tile_start(kv_idx_ptr, i, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr):
    i = tl.cast(i, tl.int32)  # a no-op when compiled; a Python int in the interpreter
    kb = tl.load(kv_idx_ptr + i // SPLIT)
    return kb * MASK_BLOCK + (i % SPLIT) * BLOCK_N


@triton.jit
def _load_kv_tile(ptrs, desc, row0, col0, stride_n, start_n, offs_n, offs_d, N_K,  #
                  HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, USE_TMA: tl.constexpr,  #
                  MASK_K: tl.constexpr):
    if USE_TMA:
        t = desc.load([row0 + start_n, col0])
        if MASK_K:  # rows past Sk may hold another head's data (or NaN): zero them
            t = tl.where((start_n + offs_n)[:, None] < N_K, t, 0.0)
    else:
        ptrs = ptrs + start_n.to(tl.int64) * stride_n
        if HEAD_DIM == HEAD_DIM_PAD and not MASK_K:
            t = tl.load(ptrs)
        else:
            mask = offs_d[None, :] < HEAD_DIM
            if MASK_K:
                mask = mask & ((start_n + offs_n)[:, None] < N_K)
            t = tl.load(ptrs, mask=mask, other=0.0)
    return t


@triton.jit
def _mask_scores(qk, start_n, offs_n, N_K, pad_ptr, MASK_K: tl.constexpr, HAS_PADDING: tl.constexpr):
    """Scores of keys past N_K (``MASK_K``: the partial last block) and of padded keys
    (``HAS_PADDING``: uint8 key padding of this batch entry, 0 = padded) set to -inf."""
    if MASK_K:
        qk = tl.where((start_n + offs_n)[None, :] < N_K, qk, float("-inf"))
    if HAS_PADDING:
        if MASK_K:
            valid = tl.load(pad_ptr + start_n + offs_n, mask=(start_n + offs_n) < N_K, other=0)
        else:
            valid = tl.load(pad_ptr + start_n + offs_n)
        qk = tl.where(valid[None, :] != 0, qk, float("-inf"))
    return qk


@triton.jit
def _softmax_step(qk, m_i, l_i, qk_scale, GUARD: tl.constexpr):
    # online softmax in the exp2 domain: scores are scaled by sm_scale * log2(e)
    m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    m_sub = m_ij
    if GUARD:  # key padding can mask a row's whole tile while m is still -inf: -inf - -inf is NaN
        m_sub = tl.where(m_ij == float("-inf"), 0.0, m_ij)
    qk = qk * qk_scale - m_sub[:, None]
    p = tl.math.exp2(qk)
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_ij, l_i


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q,  #
                    k_ptrs, v_ptrs, desc_k, desc_v,  #
                    k_row0, k_col0, v_row0, v_col0,  #
                    stride_kn, stride_vn,  #
                    kv_idx_ptr, lo, hi, N_K, qk_scale,  #
                    offs_n, offs_d, pad_ptr,  #
                    dtype: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,  #
                    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, USE_TMA: tl.constexpr,  #
                    MASK_K: tl.constexpr, NUM_STAGES: tl.constexpr, DOT_PRECISION: tl.constexpr,  #
                    HAS_PADDING: tl.constexpr):
    for i in tl.range(lo, hi, num_stages=NUM_STAGES):
        start_n = _tile_start(kv_idx_ptr, i, BLOCK_N, SPLIT)
        k = _load_kv_tile(k_ptrs, desc_k, k_row0, k_col0, stride_kn, start_n, offs_n, offs_d, N_K,  #
                          HEAD_DIM, HEAD_DIM_PAD, USE_TMA, MASK_K)
        v = _load_kv_tile(v_ptrs, desc_v, v_row0, v_col0, stride_vn, start_n, offs_n, offs_d, N_K,  #
                          HEAD_DIM, HEAD_DIM_PAD, USE_TMA, MASK_K)
        # -- compute qk ----
        qk = tl.dot(q, k.T, input_precision=DOT_PRECISION)
        qk = _mask_scores(qk, start_n, offs_n, N_K, pad_ptr, MASK_K, HAS_PADDING)
        p, alpha, m_i, l_i = _softmax_step(qk, m_i, l_i, qk_scale, HAS_PADDING)
        # -- update output accumulator --
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_i


# ----------------------------------------------------------------------------------------------
# The kernel: one program per (batch, head, query tile). Programs of one head are adjacent in
# the grid so that the head's K/V stay in L2; within a head, ORDER lists the mask rows
# heaviest first (longest-processing-time order) to shorten the last wave.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd(Q, K, V, desc_k, desc_v, Out, LSE,  #
              KvIdx, KvCnt, Order, KeyPad, sm_scale,  #
              stride_qz, stride_qh, stride_qm, stride_qk,  #
              stride_kz, stride_kh, stride_kn, stride_kk,  #
              stride_vz, stride_vh, stride_vn, stride_vk,  #
              stride_oz, stride_oh, stride_om, stride_ok,  #
              stride_rz, stride_rh,  # (batch, head) -> mask (batch, head) index: (H, 1) or (0, 1)
              stride_pz,  # batch stride of KeyPad (uint8 (B or 1, Sk)): Sk, or 0 when shared
              H, N_Q, N_K, N_Q_BLOCKS, IDX_STRIDE, k_ld, v_ld,  #
              HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,  #
              K_TAIL_TILES: tl.constexpr,  # tiles of the last key block holding keys < Sk; 0 if Sk % 128 == 0
              USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,  #
              HAS_PADDING: tl.constexpr,  # KeyPad is given: padded keys are masked (and empty tiles guarded)
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr):
    tl.static_assert(MASK_BLOCK % BLOCK_M == 0)
    tl.static_assert(MASK_BLOCK % BLOCK_N == 0)
    SPLIT: tl.constexpr = MASK_BLOCK // BLOCK_N  # key tiles per kept mask block
    ROWS_PER_MASK: tl.constexpr = MASK_BLOCK // BLOCK_M  # query tiles per mask row
    dtype = Out.dtype.element_ty

    off_hz, off_z, off_h, start_m, kv_idx_ptr, n_kept = _locate_program(
        tl.program_id(0), H, N_Q_BLOCKS, ROWS_PER_MASK, BLOCK_M, Order, KvCnt, KvIdx, IDX_STRIDE, stride_rz, stride_rh)

    q_off = _head_offset(off_z, off_h, stride_qz, stride_qh)
    k_off = _head_offset(off_z, off_h, stride_kz, stride_kh)
    v_off = _head_offset(off_z, off_h, stride_vz, stride_vh)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)

    # initialize pointer to m and l
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    qk_scale = sm_scale * _LOG2E

    # load q: it will stay in SRAM throughout
    q = _load_rows(Q + q_off, offs_m, offs_d, stride_qm, stride_qk, N_Q, HEAD_DIM)

    # TMA views k and v as 2-D (rows, k_ld) matrices; this head's rows start at (row0, col0)
    k_row0, k_col0 = _tma_origin(k_off, k_ld)
    v_row0, v_col0 = _tma_origin(v_off, v_ld)
    k_ptrs = K + k_off + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :] * stride_kk
    v_ptrs = V + v_off + offs_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :] * stride_vk
    pad_ptr = KeyPad + off_z.to(tl.int64) * stride_pz

    # the main loop runs without masks; the partial last key block (if kept) gets a masked loop
    n_tiles, n_main = _split_tail(kv_idx_ptr, n_kept, SPLIT, N_K, K_TAIL_TILES)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, desc_k, desc_v,  #
                                    k_row0, k_col0, v_row0, v_col0, stride_kn, stride_vn,  #
                                    kv_idx_ptr, 0, n_main, N_K, qk_scale, offs_n, offs_d, pad_ptr,  #
                                    dtype, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, SPLIT, USE_TMA,  #
                                    False, NUM_STAGES, DOT_PRECISION, HAS_PADDING)
    if K_TAIL_TILES > 0:
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, desc_k, desc_v,  #
                                        k_row0, k_col0, v_row0, v_col0, stride_kn, stride_vn,  #
                                        kv_idx_ptr, n_main, tl.minimum(n_tiles, n_main + K_TAIL_TILES),  #
                                        N_K, qk_scale, offs_n, offs_d, pad_ptr,  #
                                        dtype, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, SPLIT, USE_TMA,  #
                                        True, 1, DOT_PRECISION, HAS_PADDING)

    # epilogue: an empty mask row (l_i == 0) gives out = 0 and lse = -inf
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * _LN2)
    row_ok = offs_m < N_Q
    tl.store(LSE + off_hz.to(tl.int64) * N_Q + offs_m, lse, mask=row_ok)
    o_ptrs = Out + off_z.to(tl.int64) * stride_oz + off_h.to(tl.int64) * stride_oh \
        + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :] * stride_ok
    tl.store(o_ptrs, acc.to(dtype), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


_attn_fwd_tuned = triton.autotune(configs=list(filter(keep, configs)),
                                  key=["N_Q", "N_K", "HEAD_DIM_PAD", "USE_TMA", "K_TAIL_TILES", "HAS_PADDING"],
                                  prune_configs_by={"early_config_prune": prune_invalid_configs})(_attn_fwd)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------
def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why :func:`block_sparse_attention` cannot take these inputs (None if it can).

    The compiler pass keeps a site dense when this returns a reason.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            return f"{name} is not a tensor"
        if t.dim() != 4:
            return f"{name} has {t.dim()} dims, expected 4 (B, H, S, D)"
        if t.dtype not in SUPPORTED_DTYPES:
            return f"{name} dtype {t.dtype} not in {[str(d) for d in SUPPORTED_DTYPES]}"
    if not (q.dtype == k.dtype == v.dtype):
        return f"mixed dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}"
    if not (q.device == k.device == v.device):
        return f"tensors on different devices {q.device}, {k.device}, {v.device}"
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3]:
        return f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match in (B, H) / Sk"
    D = q.shape[3]
    if k.shape[3] != D or v.shape[3] != D:
        return f"head dims differ: q {D}, k {k.shape[3]}, v {v.shape[3]}"
    if D > MAX_HEAD_DIM:
        return f"head_dim {D} > {MAX_HEAD_DIM}"
    if D < MIN_HEAD_DIM:
        return f"head_dim {D} < {MIN_HEAD_DIM}"
    if q.shape[2] == 0 or k.shape[2] == 0:
        return "empty sequence"
    return None


def _tma_strides_ok(t: torch.Tensor) -> bool:
    """The stride rules of :func:`_tma_2d_view` (no data pointer needed: works on fake tensors)."""
    B, H, S, D = t.shape
    sb, sh, ss, sd = t.stride()
    elem = t.element_size()
    if sd != 1 or ss < D or (ss * elem) % 16 or (D * elem) < 16:
        return False
    return all((b * sb + h * sh) % ss + D <= ss for b in range(B) for h in range(H))


def tma_layout_ok(k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the launcher can read these K/V through TMA descriptors (given a GPU that has TMA).

    Needs a power-of-two head dim and the layout of :func:`_tma_2d_view`; on fake tensors (no
    data pointer) only the strides are checked. Otherwise the launcher uses pointer loads.
    """
    D = k.shape[3]
    if TensorDescriptor is None or D != max(MIN_HEAD_DIM, triton.next_power_of_2(D)):
        return False
    if is_fake(k) or is_fake(v):
        return _tma_strides_ok(k) and _tma_strides_ok(v)
    return _tma_2d_view(k, D) is not None and _tma_2d_view(v, D) is not None


def _tma_2d_view(t: torch.Tensor, head_dim: int):
    """View k or v ``(B, H, S, D)`` as a 2-D ``(rows, ld)`` matrix for a TMA descriptor, or None.

    Works when the last dim is contiguous and every (b, h) slice starts at a column c of a row
    with ``c + D <= ld``, where ld is the sequence stride: true for contiguous (B, H, S, D) and
    for transposed views of (B, S, H, D) (ld = H * D, head h at column h * D). Key rows past
    Sk then read the next rows of the matrix (another head's data, or TMA's zero fill past the
    end); the kernel masks them.
    """
    B, H, S, D = t.shape
    sb, sh, ss, sd = t.stride()
    if not _tma_strides_ok(t) or t.data_ptr() % 16:
        return None
    offs = [b * sb + h * sh for b in range(B) for h in range(H)]
    rows = max(offs) // ss + S
    width = max(o % ss for o in offs) + D
    try:
        base = torch.as_strided(t, (rows, width), (ss, 1))
    except RuntimeError:  # the 2-D view would reach past the storage
        return None
    return base, ss


def gpu_has_tma(device: torch.device) -> bool:
    """Whether tiles can come through host-side TMA descriptors on ``device`` (the interpreter emulates them)."""
    return TensorDescriptor is not None and (
        interpreting() or torch.cuda.get_device_capability(device)[0] >= TMA_MIN_CAPABILITY)


def tma_descriptors(a: torch.Tensor, b: torch.Tensor, use_tma: bool, head_dim_pad: int):
    """TMA descriptors of two ``(B, H, S, D)`` tensors that a kernel streams tile by tile.

    Returns ``(True, (desc_a, ld_a), (desc_b, ld_b))`` when ``use_tma`` and both layouts allow
    (:func:`_tma_2d_view`; the head dim a power of two), else ``(False, (None, 1), (None, 1))``
    and the kernel uses pointer loads. The block shape is set per launch config (pre-hooks).
    """
    D = a.shape[3]
    views = (_tma_2d_view(a, D), _tma_2d_view(b, D)) if use_tma and D == head_dim_pad else (None, None)
    if views[0] is None or views[1] is None:
        return False, (None, 1), (None, 1)
    return True, *((TensorDescriptor(base, list(base.shape), [ld, 1], [64, head_dim_pad]), ld) for base, ld in views)


def check_launch(launcher: str, reason: str | None, device: torch.device, cpu_path: str | None = None) -> None:
    """Raise ValueError when ``launcher`` cannot run: its inputs have a ``reason``, or ``device`` is
    not CUDA outside the interpreter (``cpu_path``: what to call there instead)."""
    if reason is not None:
        raise ValueError(f"{launcher} cannot take these inputs: {reason}")
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"{launcher} runs on CUDA (or with TRITON_INTERPRET=1), got {device}"
                         + (f"; use {cpu_path} on the CPU" if cpu_path else ""))


def mask_batch_stride(mask_words: torch.Tensor, q: torch.Tensor, kv_len: int) -> int:
    """Check ``mask_words`` against q ``(B, H, Sq, D)`` and ``kv_len``; return the kernels' ``stride_rz``
    (mask rows per batch entry: 0 for an ``(H, Nq, W)`` mask shared over the batch, H for ``(B, H, Nq, W)``)."""
    B, H, Sq = q.shape[:3]
    nq, nw = num_blocks(Sq), num_words(num_blocks(kv_len))
    if mask_words.dtype != torch.int32 or mask_words.device != q.device:
        raise ValueError(f"mask_words must be int32 on {q.device}, got {mask_words.dtype} on {mask_words.device}")
    if mask_words.dim() == 3 and tuple(mask_words.shape) == (H, nq, nw):
        return 0
    if mask_words.dim() == 4 and tuple(mask_words.shape) == (B, H, nq, nw):
        return H
    raise ValueError(f"mask_words {tuple(mask_words.shape)} is neither (H, Nq, W) = {(H, nq, nw)} "
                     f"nor (B, H, Nq, W) = {(B, H, nq, nw)}")


def tail_tiles(length: int, tile: int) -> int:
    """Tiles of ``tile`` tokens covering the partial last 128-block of ``length`` tokens (0 if none)."""
    rem = length % BLOCK_SIZE
    return 0 if rem == 0 else triton.cdiv(rem, tile)


def _padding_argument(key_padding: torch.Tensor | None, batch: int, kv_len: int, device: torch.device,
                      placeholder: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The kernel's KeyPad pointer (uint8 (B or 1, Sk), a view of the bool mask) and its batch stride;
    without padding, any tensor on the device (never read: HAS_PADDING is off) and 0."""
    if key_padding is None:
        return placeholder, 0
    if key_padding.dtype != torch.bool or key_padding.dim() != 2 or key_padding.shape[1] != kv_len \
            or key_padding.shape[0] not in (1, batch) or key_padding.device != device:
        raise ValueError(f"key_padding must be bool (B={batch} or 1, Sk={kv_len}) on {device}, got "
                         f"{key_padding.dtype} {tuple(key_padding.shape)} on {key_padding.device}")
    pad = key_padding.contiguous().view(torch.uint8)
    return pad, (kv_len if pad.shape[0] == batch and batch > 1 else 0)


def block_sparse_attention(
    q: torch.Tensor,  # (B, H, Sq, D)
    k: torch.Tensor,  # (B, H, Sk, D)
    v: torch.Tensor,  # (B, H, Sk, D)
    mask_words: torch.Tensor,  # int32 (H, Nq, W) or (B, H, Nq, W)
    scale: float | None = None,
    config: dict | None = None,
    *,
    use_tma: bool | None = None,
    lpt_order: bool = True,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    block_lists: BlockLists | None = None,
    key_padding: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention forward. Returns ``out (B, H, Sq, D)`` (``torch.empty_like(q)``) and
    float32 ``lse (B, H, Sq)`` (natural log); empty mask rows give ``out = 0``, ``lse = -inf``.

    ``scale``: None means ``1 / sqrt(D)``, as in SDPA.
    ``config``: ``{"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"[, "maxnreg"]}`` to launch one fixed config
    (tests, the interpreter, benchmarks); None autotunes on a GPU (``default_config`` in the
    interpreter). ``use_tma``: None picks TMA descriptors for K/V when the layout and GPU allow
(``kernels.dispatch`` passes its choice; False forces pointer loads).
    ``lpt_order``: run each head's heaviest query blocks first. ``out``/``lse``: optional
    preallocated outputs (``out`` like q, any strides; ``lse`` contiguous float32).
    ``block_lists``: ``prepare_block_lists(mask_words, Sk)`` computed once for a static mask
    (saves the decode launch and a small sort, ~tens of microseconds per call).
    ``key_padding``: bool ``(B or 1, Sk)``, False marks keys no query sees (inside kept blocks too);
    a row left with no key gets ``out = 0``, ``lse = -inf`` as an empty mask row does. None compiles
    the kernel without the padding loads and the empty-tile guard (the performance path unchanged).
    """
    check_launch("block_sparse_attention", unsupported_reason(q, k, v), q.device, "reference.blockwise_attention")
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    nq, nk = num_blocks(Sq), num_blocks(Sk)
    stride_rz = mask_batch_stride(mask_words, q, Sk)
    head_dim_pad = max(MIN_HEAD_DIM, triton.next_power_of_2(D))
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)

    if out is None:
        out = torch.empty_like(q)
    if lse is None:
        lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    if out.shape != q.shape or out.dtype != q.dtype or lse.shape != q.shape[:3] or lse.dtype != torch.float32 \
            or not lse.is_contiguous():
        raise ValueError("out must be like q and lse a contiguous float32 (B, H, Sq) tensor")
    if block_lists is None:
        block_lists = prepare_block_lists(mask_words, Sk, lpt_order)
    kv_idx, kv_cnt, order = block_lists
    pad, stride_pz = _padding_argument(key_padding, B, Sk, q.device, kv_cnt)
    if kv_idx.shape != (*mask_words.shape[:-1], nk) or order.shape != mask_words.shape[:-1]:
        raise ValueError("block_lists do not match mask_words")

    if use_tma is None:
        use_tma = gpu_has_tma(q.device)
    use_tma, (desc_k, k_ld), (desc_v, v_ld) = tma_descriptors(k, v, use_tma, head_dim_pad)

    grid = lambda META: (B * H * nq * (BLOCK_SIZE // META["BLOCK_M"]), )
    args = (q, k, v, desc_k, desc_v, out, lse, kv_idx, kv_cnt, order, pad, scale,  #
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),  #
            stride_rz, 1, stride_pz, H, Sq, Sk, nq, nk, k_ld, v_ld)
    const = dict(HEAD_DIM=D, HEAD_DIM_PAD=head_dim_pad, USE_TMA=use_tma, HAS_PADDING=key_padding is not None,
                 DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    if config is None and not interpreting():
        # K_TAIL_TILES depends on BLOCK_N; the autotuned configs share one BLOCK_N-independent
        # bound (a tail of r keys needs at most ceil(r / 64) tiles), masked by the loop bound.
        _attn_fwd_tuned[grid](*args, K_TAIL_TILES=tail_tiles(Sk, 64), **const)
        return out, lse
    config = {**default_config(q.dtype, D, q.device), **(config or {})}
    BM, BN = config["BLOCK_M"], config["BLOCK_N"]
    if use_tma:
        desc_k.block_shape = [BN, head_dim_pad]
        desc_v.block_shape = [BN, head_dim_pad]
    _attn_fwd[grid](*args, K_TAIL_TILES=tail_tiles(Sk, BN), BLOCK_M=BM, BLOCK_N=BN, NUM_STAGES=config["num_stages"],
                    num_warps=config["num_warps"],
                    num_stages=config["num_stages"], **({"maxnreg": config["maxnreg"]} if config.get("maxnreg") else {}),
                    **const)
    return out, lse
