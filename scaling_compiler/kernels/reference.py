"""Pure-torch references for block-sparse attention.

The functions compute the same thing as the Triton kernel in ``triton/block_sparse_attention.py``:

    out[b, h, i] = sum_j p_ij v[b, h, j],  p_ij = exp(scale * q_i.k_j - lse_i)  over kept keys j
    lse[b, h, i] = log sum_j exp(scale * q_i.k_j)                               over kept keys j

where key j is kept for query i when the 128x128 mask block holding (i, j) is set and j < Sk.
A query row whose mask row is all zero gets ``out = 0`` and ``lse = -inf``.

- :func:`masked_attention_reference`: dense, float64, for tests on small shapes.
- :func:`blockwise_attention` and :func:`blockwise_attention_backward`: the CPU execution path of the custom op
  (``Implementation.TORCH_BLOCKWISE``), forward and backward. They loop over query blocks and
  gather only the kept key blocks, so they never materialise an Sq x Sk matrix.
- :func:`quantize_fp8` and :func:`blockwise_attention_fp8`: the FP8 kernel's arithmetic
  (``triton/block_sparse_attention_fp8.py``) in torch: the spec of its quantisation (the Triton
  prep kernel writes the same bytes) and the CPU path of its op, so CPU runs measure FP8's error.
"""
from typing import NamedTuple

import torch

from .bitmask import BLOCK_SIZE, num_blocks, num_words, unpack_block_mask


def _check_qkv(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, S, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape[:3] + (k.shape[3],) or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")


def _broadcast_mask(mask: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """(H, Nq, X) or (B, H, Nq, X) -> (B, H, Nq, X) (a view where possible)."""
    if mask.dim() == 3:
        mask = mask[None]
    if mask.dim() != 4 or mask.shape[1] != heads or mask.shape[0] not in (1, batch):
        raise ValueError(f"mask {tuple(mask.shape)} is neither (H={heads}, Nq, .) nor (B={batch}, H={heads}, Nq, .)")
    return mask.expand(batch, *mask.shape[1:])


def _key_blocks(k: torch.Tensor, v: torch.Tensor, key_padding: torch.Tensor | None, dtype: torch.dtype):
    """k, v zero-padded to whole 128-key blocks, ``(B*H, Nk, 128, D)`` in ``dtype``, and which keys
    are real and not padded, bool ``(B*H, Nk, 128)``."""
    B, H, Sk, D = k.shape
    nk = num_blocks(Sk)
    pad = nk * BLOCK_SIZE - Sk
    kb = torch.nn.functional.pad(k.to(dtype), (0, 0, 0, pad)).reshape(B * H, nk, BLOCK_SIZE, D)
    vb = torch.nn.functional.pad(v.to(dtype), (0, 0, 0, pad)).reshape(B * H, nk, BLOCK_SIZE, v.shape[3])
    return kb, vb, _key_valid(B, H, Sk, key_padding, k.device)


def _key_valid(B: int, H: int, Sk: int, key_padding: torch.Tensor | None, device) -> torch.Tensor:
    """Which keys of the 128-key blocks are real (< Sk) and not padded, bool ``(B*H, Nk, 128)``."""
    nk = num_blocks(Sk)
    pad = nk * BLOCK_SIZE - Sk
    key_valid = (torch.arange(nk * BLOCK_SIZE, device=device) < Sk).expand(B, nk * BLOCK_SIZE)
    if key_padding is not None:
        key_valid = key_valid & torch.nn.functional.pad(key_padding.to(torch.bool), (0, pad)).expand(B, -1)
    return key_valid[:, None].expand(B, H, -1).reshape(B * H, nk, BLOCK_SIZE)


def _kept_blocks(mask_words: torch.Tensor, B: int, H: int, nq: int, nk: int) -> torch.Tensor:
    """The packed mask (checked) as bool ``(B*H, Nq, Nk)``."""
    if mask_words.dtype != torch.int32 or mask_words.shape[-2:] != (nq, num_words(nk)):
        raise ValueError(f"mask_words must be int32 (..., {nq}, {num_words(nk)}), got "
                         f"{mask_words.dtype} {tuple(mask_words.shape)}")
    return unpack_block_mask(_broadcast_mask(mask_words, B, H), nk).reshape(B * H, nq, nk)


def _gather_kept(kept: torch.Tensor, n_max: int, kb: torch.Tensor, vb: torch.Tensor, key_valid: torch.Tensor):
    """The kept key blocks of one query block: ``kept`` bool (B*H, Nk) -> their indices ``(B*H, n_max)``
    (kept first, ascending, padded with dropped ones), k and v tiles ``(B*H, n_max * 128, D)`` and
    the valid keys ``(B*H, 1, n_max * 128)`` (False on padding entries and padded keys)."""
    BH, _, _, D = kb.shape
    rows = torch.arange(BH, device=kb.device)[:, None]
    idx = torch.sort((~kept).to(torch.int8), dim=-1, stable=True).indices[:, :n_max]
    sel = torch.gather(kept, 1, idx)
    k_t = kb[rows, idx].reshape(BH, n_max * BLOCK_SIZE, D)
    v_t = vb[rows, idx].reshape(BH, n_max * BLOCK_SIZE, vb.shape[-1])
    valid = (sel[..., None] & key_valid[rows, idx]).reshape(BH, 1, n_max * BLOCK_SIZE)
    return idx, k_t, v_t, valid


def masked_attention_reference(
    q: torch.Tensor,  # (B, H, Sq, D)
    k: torch.Tensor,  # (B, H, Sk, D)
    v: torch.Tensor,  # (B, H, Sk, Dv)
    block_mask: torch.Tensor,  # bool (H, Nq, Nk) or (B, H, Nq, Nk)
    scale: float,
    key_padding: torch.Tensor | None = None,  # bool (B or 1, Sk): False drops that key
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense float64 block-masked attention. Returns float64 ``out (B, H, Sq, Dv)`` and ``lse (B, H, Sq)``.

    A row left with no key (by the blocks or the padding) gets ``out = 0``, ``lse = -inf``."""
    B, H, Sq, _ = q.shape
    Sk = k.shape[2]
    nq, nk = num_blocks(Sq), num_blocks(Sk)
    block_mask = _broadcast_mask(block_mask, B, H)
    if block_mask.shape[-2:] != (nq, nk) or block_mask.dtype != torch.bool:
        raise ValueError(f"block_mask must be bool (..., {nq}, {nk}), got {block_mask.dtype} {tuple(block_mask.shape)}")
    token_mask = block_mask.repeat_interleave(BLOCK_SIZE, -2).repeat_interleave(BLOCK_SIZE, -1)[..., :Sq, :Sk]
    if key_padding is not None:
        token_mask = token_mask & key_padding.to(torch.bool).reshape(-1, 1, 1, Sk)
    s = scale * (q.double() @ k.double().transpose(-1, -2))
    s = s.masked_fill(~token_mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # -inf on empty rows
    p = torch.exp(s - lse[..., None].masked_fill(torch.isinf(lse)[..., None], 0.0))
    return p @ v.double(), lse


def blockwise_attention(
    q: torch.Tensor,  # (B, H, Sq, D)
    k: torch.Tensor,  # (B, H, Sk, D)
    v: torch.Tensor,  # (B, H, Sk, Dv)
    mask_words: torch.Tensor,  # int32 (H, Nq, W) or (B, H, Nq, W)
    scale: float,
    key_padding: torch.Tensor | None = None,  # bool (B or 1, Sk): False drops that key
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention in plain torch, one 128-row query block at a time.

    Computes in float32 (float64 for float64 inputs). For each query block, the kept key blocks
    of every (batch, head) are gathered into a padded ``(B*H, max_kept * 128, D)`` tile, so memory
    stays O(B * H * 128 * Sk) at most. Returns ``out`` (q's dtype, contiguous (B, H, Sq, Dv)) and
    float32 ``lse (B, H, Sq)``; empty mask rows give ``out = 0``, ``lse = -inf``.
    """
    _check_qkv(q, k, v)
    B, H, Sq, D = q.shape
    Sk, Dv = k.shape[2], v.shape[3]
    nq, nk = num_blocks(Sq), num_blocks(Sk)
    keep = _kept_blocks(mask_words, B, H, nq, nk)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32

    kb, vb, key_valid = _key_blocks(k, v, key_padding, cdt)
    qf = q.reshape(B * H, Sq, D)

    out = torch.empty(B * H, Sq, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B * H, Sq, dtype=torch.float32, device=q.device)
    for m in range(nq):
        r0, r1 = m * BLOCK_SIZE, min((m + 1) * BLOCK_SIZE, Sq)
        kept = keep[:, m]  # (BH, Nk)
        n_max = int(kept.sum(-1).max())
        if n_max == 0:
            out[:, r0:r1] = 0
            lse[:, r0:r1] = float("-inf")
            continue
        idx, k_t, v_t, valid = _gather_kept(kept, n_max, kb, vb, key_valid)
        s = scale * (qf[:, r0:r1].to(cdt) @ k_t.transpose(-1, -2))  # (BH, rows, n_max * 128)
        s = s.masked_fill(~valid, float("-inf"))
        l_blk = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - l_blk[..., None].masked_fill(torch.isinf(l_blk)[..., None], 0.0))
        out[:, r0:r1] = (p @ v_t).to(q.dtype)
        lse[:, r0:r1] = l_blk.float()
    return out.reshape(B, H, Sq, Dv), lse.reshape(B, H, Sq)


def blockwise_attention_backward(
    q: torch.Tensor,  # (B, H, Sq, D)
    k: torch.Tensor,  # (B, H, Sk, D)
    v: torch.Tensor,  # (B, H, Sk, Dv)
    out: torch.Tensor,  # (B, H, Sq, Dv): the forward's output
    lse: torch.Tensor,  # float32 (B, H, Sq): the forward's log-sum-exp (-inf on empty rows)
    grad_out: torch.Tensor,  # (B, H, Sq, Dv)
    mask_words: torch.Tensor,  # int32 (H, Nq, W) or (B, H, Nq, W)
    scale: float,
    key_padding: torch.Tensor | None = None,  # bool (B or 1, Sk): False drops that key
    grad_lse: torch.Tensor | None = None,  # float32 (B, H, Sq) or None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`blockwise_attention` for q, k, v, one 128-row query block at a time.

    With ``p_ij = exp(scale * q_i.k_j - lse_i)`` over kept keys and ``delta_i = do_i.o_i - dlse_i``:
    ``ds_ij = p_ij (do_i.v_j - delta_i)``, ``dq_i = scale sum_j ds_ij k_j``,
    ``dk_j = scale sum_i ds_ij q_i``, ``dv_j = sum_i p_ij do_i``. Empty rows (lse = -inf) have
    p = 0, so they contribute nothing and get dq = 0. Memory as in the forward: the kept key
    blocks of one query block are gathered at a time, and their dk, dv scattered back.
    Returns dq, dk, dv in the inputs' dtypes and layouts (``torch.empty_like``).
    """
    _check_qkv(q, k, v)
    B, H, Sq, D = q.shape
    Sk, Dv = k.shape[2], v.shape[3]
    nq, nk = num_blocks(Sq), num_blocks(Sk)
    keep = unpack_block_mask(_broadcast_mask(mask_words, B, H), nk).reshape(B * H, nq, nk)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32

    kb, vb, key_valid = _key_blocks(k, v, key_padding, cdt)
    qf = q.reshape(B * H, Sq, D)
    dof = grad_out.reshape(B * H, Sq, Dv)
    delta = (dof.to(cdt) * out.reshape(B * H, Sq, Dv).to(cdt)).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse.reshape(B * H, Sq).to(cdt)
    # p = exp(s - lse) with lse = +inf on empty rows: p = 0 there (lse = -inf would give inf)
    lse_safe = lse.reshape(B * H, Sq).to(cdt).nan_to_num(neginf=float("inf"))
    rows = torch.arange(B * H, device=q.device)[:, None]

    dq = torch.zeros(B * H, Sq, D, dtype=cdt, device=q.device)
    dkb = torch.zeros_like(kb)
    dvb = torch.zeros_like(vb)
    for m in range(nq):
        r0, r1 = m * BLOCK_SIZE, min((m + 1) * BLOCK_SIZE, Sq)
        kept = keep[:, m]
        n_max = int(kept.sum(-1).max())
        if n_max == 0:
            continue
        idx, k_t, v_t, valid = _gather_kept(kept, n_max, kb, vb, key_valid)
        q_blk, do_blk = qf[:, r0:r1].to(cdt), dof[:, r0:r1].to(cdt)
        s = scale * (q_blk @ k_t.transpose(-1, -2))
        p = torch.exp(s.masked_fill(~valid, float("-inf")) - lse_safe[:, r0:r1, None])
        ds = p * (do_blk @ v_t.transpose(-1, -2) - delta[:, r0:r1, None])
        dq[:, r0:r1] = scale * (ds @ k_t)
        # scatter this block's dk, dv into their key blocks (dropped entries carry zeros)
        dk_t = (scale * (ds.transpose(-1, -2) @ q_blk)).reshape(B * H, n_max, BLOCK_SIZE, D)
        dv_t = (p.transpose(-1, -2) @ do_blk).reshape(B * H, n_max, BLOCK_SIZE, Dv)
        dkb.index_put_((rows.expand_as(idx), idx), dk_t, accumulate=True)
        dvb.index_put_((rows.expand_as(idx), idx), dv_t, accumulate=True)
    dk = dkb.reshape(B * H, nk * BLOCK_SIZE, D)[:, :Sk]
    dv = dvb.reshape(B * H, nk * BLOCK_SIZE, Dv)[:, :Sk]
    # in the inputs' layouts, as the Triton backward writes them
    return (torch.empty_like(q).copy_(dq.reshape(B, H, Sq, D)), torch.empty_like(k).copy_(dk.reshape(B, H, Sk, D)),
            torch.empty_like(v).copy_(dv.reshape(B, H, Sk, Dv)))


# ----------------------------------------------------------------------------------------------
# FP8 (e4m3): the quantisation of the FP8 kernel, and its attention block by block
# ----------------------------------------------------------------------------------------------
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3 value: scales map each block's absmax onto it
# absmax floor: an all-zero block gets a tiny positive scale, so scores stay finite (never 0 * -inf)
FP8_SCALE_FLOOR = 1e-12
LOG2E = 1.4426950408889634


class Fp8Inputs(NamedTuple):
    """q, k, v quantised for the FP8 kernel (padded to whole 128-token blocks with zeros)."""
    q: torch.Tensor  # float8 (B, H, Nq * 128, D)
    q_scale: torch.Tensor  # float32 (B, H, Nq): q ~ q8 * q_scale, per 128-query block
    k: torch.Tensor  # float8 (B, H, Nk * 128, D): k minus its mean over tokens (softmax ignores it)
    k_scale: torch.Tensor  # float32 (B, H, Nk)
    v_t: torch.Tensor  # float8 (B, H, D, Nk * 128): v transposed (K-major for the P.V dot)
    v_scale: torch.Tensor  # float32 (B, H, D): per channel
    keys_permuted: bool = False  # v_t's keys in the Gluon FP8 forward's order (`permute_value_keys`)


def permute_value_keys(x: Fp8Inputs) -> Fp8Inputs:
    """``x`` with v^T's keys reordered as the Gluon FP8 forward reads them: within each group of 16
    keys, key bits (b3, b2, b1, b0) move to (b2, b1, b3, b0) (as the Triton prep's ``permute_value_keys``)."""
    assert not x.keys_permuted
    B, H, D, n = x.v_t.shape
    v_t = x.v_t.view(B, H, D, n // 16, 2, 2, 2, 2).permute(0, 1, 2, 3, 5, 6, 4, 7).reshape(B, H, D, n)
    return x._replace(v_t=v_t, keys_permuted=True)


def key_means(k: torch.Tensor) -> torch.Tensor:
    """float32 ``(B, H, D)``: k's mean over tokens, subtracted before quantising (SageAttention's
    smoothing: each score of a row moves by the same q.mean, so the softmax does not change, while
    a channel's common offset no longer eats the block's e4m3 range). Summed in float64 (as the Triton
    prep does, in another order: a sum of 16-bit values within 2^30 of each other in magnitude is
    exact there, and any other order differs by ~1e-16 relative, far below the float32 rounding after
    the division), divided by the length, then rounded to float32."""
    return (k.double().sum(dim=2) / k.shape[2]).float()


def value_scales(v: torch.Tensor) -> torch.Tensor:
    """float32 ``(B, H, D)``: v's per-channel scale, absmax over tokens / 448 (one reduction pass)."""
    vmin, vmax = torch.aminmax(v, dim=2)
    return torch.maximum(vmax.float(), -vmin.float()).clamp_min(FP8_SCALE_FLOOR) * (1.0 / FP8_MAX)


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    """float32 -> e4m3, round to nearest even, saturating at +-448 (the GPU's ``cvt.rn.satfinite``)."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _padded_blocks(x: torch.Tensor) -> torch.Tensor:
    """float32 ``(B, H, S, D)`` zero-padded to ``(B, H, N, 128, D)``, N = ceil(S / 128)."""
    B, H, S, D = x.shape
    n = num_blocks(S)
    return torch.nn.functional.pad(x, (0, 0, 0, n * BLOCK_SIZE - S)).reshape(B, H, n, BLOCK_SIZE, D)


def _quantize_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``(B, H, N, 128, D)`` -> e4m3 ``(B, H, N * 128, D)`` and one scale per block ``(B, H, N)``."""
    B, H, n, _, D = x.shape
    scale = x.abs().amax(dim=(-1, -2)).clamp_min(FP8_SCALE_FLOOR) * (1.0 / FP8_MAX)
    return to_fp8(x * (1.0 / scale)[..., None, None]).reshape(B, H, n * BLOCK_SIZE, D), scale


def quantize_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Fp8Inputs:
    """The FP8 kernel's operands, in torch: q per (batch, head, 128-token block); k smoothed by its
    mean over tokens, then per block; v per (batch, head, channel), stored transposed. Scales are
    absmax / 448 in float32; values are multiplied by their IEEE reciprocals (not divided: on a GPU a
    division per element is a branchy subroutine, and the product is within an ulp of the quotient)
    and rounded to nearest even. The Triton prep (``block_sparse_attention_fp8.quantize``) writes the
    same bytes."""
    q8, q_scale = _quantize_blocks(_padded_blocks(q.float()))
    k8, k_scale = _quantize_blocks(_padded_blocks(k.float() - key_means(k)[:, :, None]))
    v_scale = value_scales(v)
    vb = _padded_blocks(v.float()).flatten(2, 3)
    v_t = to_fp8(vb * (1.0 / v_scale)[:, :, None]).transpose(-1, -2).contiguous()
    return Fp8Inputs(q8, q_scale, k8, k_scale, v_t, v_scale)


def blockwise_attention_fp8(
    q: torch.Tensor,  # (B, H, Sq, D)
    k: torch.Tensor,  # (B, H, Sk, D)
    v: torch.Tensor,  # (B, H, Sk, D)
    mask_words: torch.Tensor,  # int32 (H, Nq, W) or (B, H, Nq, W)
    scale: float,
    key_padding: torch.Tensor | None = None,  # bool (B or 1, Sk): False drops that key
) -> torch.Tensor:
    """The FP8 kernel's attention in torch, one 128-row query block at a time: returns ``out``
    (q's dtype, contiguous ``(B, H, Sq, D)``); empty rows give 0.

    Operands from :func:`quantize_fp8`; scores are fp32 products of e4m3 values times
    ``q_scale * k_scale * scale * log2(e)``; the softmax is the kernel's online one over 128-key
    tiles, its running max taken as a cumulative max over the kept blocks in ascending order
    (the kernel's order), so each ``p`` is rounded to e4m3 (as ``p * 448``) exactly where the
    kernel rounds it when it walks 128-key tiles; ``P.V`` per tile in fp32, rescaled and summed;
    ``out = acc / (448 l) * v_scale``. Matches the Triton kernel up to fp32 summation order.
    """
    _check_qkv(q, k, v)
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    nq, nk = num_blocks(Sq), num_blocks(Sk)
    keep = _kept_blocks(mask_words, B, H, nq, nk)
    x = quantize_fp8(q, k, v)
    BH = B * H
    q8 = x.q.float().reshape(BH, nq, BLOCK_SIZE, D)
    kb = x.k.float().reshape(BH, nk, BLOCK_SIZE, D)
    vb = x.v_t.float().transpose(-1, -2).reshape(BH, nk, BLOCK_SIZE, D)
    key_valid = _key_valid(B, H, Sk, key_padding, q.device)
    q_scale = x.q_scale.reshape(BH, nq) * (float(scale) * LOG2E)
    k_scale = x.k_scale.reshape(BH, nk)
    out = torch.zeros(BH, nq * BLOCK_SIZE, D, dtype=torch.float32, device=q.device)
    for m in range(nq):
        kept = keep[:, m]
        n_max = int(kept.sum(-1).max())
        if n_max == 0:
            continue
        idx, k_t, v_t, valid = _gather_kept(kept, n_max, kb, vb, key_valid)
        tile_scale = q_scale[:, m, None] * torch.gather(k_scale, 1, idx)  # (BH, n_max)
        s = (q8[:, m] @ k_t.transpose(-1, -2)).reshape(BH, BLOCK_SIZE, n_max, BLOCK_SIZE)
        s = (s * tile_scale[:, None, :, None]).masked_fill(~valid.reshape(BH, 1, n_max, BLOCK_SIZE), float("-inf"))
        acc, l_sum = _online_softmax_fp8(s, v_t.reshape(BH, n_max, BLOCK_SIZE, D))
        l_safe = torch.where(l_sum == 0, 1.0, l_sum)
        out[:, m * BLOCK_SIZE:(m + 1) * BLOCK_SIZE] = acc / (l_safe * FP8_MAX)[..., None] \
            * x.v_scale.reshape(BH, 1, D)
    return out[:, :Sq].reshape(B, H, Sq, D).to(q.dtype)


def _online_softmax_fp8(s: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores ``s`` (exp2 domain, -inf where dropped) ``(BH, rows, n, 128)`` of n key tiles and their
    e4m3 values ``v`` (as float32, unscaled) ``(BH, n, 128, D)`` -> the kernel's ``acc (BH, rows, D)``
    (the tiles' ``e4m3(p * 448) @ v``, each rescaled to the final max, summed) and ``l (BH, rows)``."""
    m_run = torch.cummax(s.amax(-1), dim=-1).values  # the kernel's running max after each tile
    m_sub = torch.where(m_run == float("-inf"), 0.0, m_run)  # rows with nothing kept yet: p = 0
    p = torch.exp2(s - m_sub[..., None])
    p8 = to_fp8(p * FP8_MAX).float()
    pv = (p8.transpose(1, 2) @ v).transpose(1, 2)  # (BH, rows, n, D)
    m_last = m_sub[..., -1:]
    weight = torch.exp2(m_run - m_last)  # each tile's product of the later rescales; 0 before any key
    return (pv * weight[..., None]).sum(2), (p.sum(-1) * weight).sum(-1)
