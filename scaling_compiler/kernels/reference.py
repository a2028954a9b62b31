"""Pure-torch references for block-sparse attention.

Both functions compute the same thing as the Triton kernel in ``triton/block_sparse_attention.py``:

    out[b, h, i] = sum_j p_ij v[b, h, j],  p_ij = exp(scale * q_i.k_j - lse_i)  over kept keys j
    lse[b, h, i] = log sum_j exp(scale * q_i.k_j)                               over kept keys j

where key j is kept for query i when the 128x128 mask block holding (i, j) is set and j < Sk.
A query row whose mask row is all zero gets ``out = 0`` and ``lse = -inf``.

- :func:`masked_attention_reference`: dense, float64, for tests on small shapes.
- :func:`blockwise_attention`: the CPU execution path of the custom op (``Implementation.TORCH_BLOCKWISE``). It loops over query
  blocks and gathers only the kept key blocks, so it never materialises an Sq x Sk matrix.
"""
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
    if mask_words.dtype != torch.int32 or mask_words.shape[-2:] != (nq, num_words(nk)):
        raise ValueError(f"mask_words must be int32 (..., {nq}, {num_words(nk)}), got "
                         f"{mask_words.dtype} {tuple(mask_words.shape)}")
    keep = unpack_block_mask(_broadcast_mask(mask_words, B, H), nk).reshape(B * H, nq, nk)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32

    pad = nk * BLOCK_SIZE - Sk  # zero-pad keys to whole blocks; padded keys are masked below
    kb = torch.nn.functional.pad(k.to(cdt), (0, 0, 0, pad)).reshape(B * H, nk, BLOCK_SIZE, D)
    vb = torch.nn.functional.pad(v.to(cdt), (0, 0, 0, pad)).reshape(B * H, nk, BLOCK_SIZE, Dv)
    key_valid = (torch.arange(nk * BLOCK_SIZE, device=q.device) < Sk).expand(B, nk * BLOCK_SIZE)
    if key_padding is not None:
        key_valid = key_valid & torch.nn.functional.pad(key_padding.to(torch.bool), (0, pad)).expand(B, -1)
    key_valid = key_valid[:, None].expand(B, H, -1).reshape(B * H, nk, BLOCK_SIZE)
    qf = q.reshape(B * H, Sq, D)
    rows = torch.arange(B * H, device=q.device)[:, None]

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
        # indices of kept blocks first (stable: ascending), padded with dropped ones
        idx = torch.sort((~kept).to(torch.int8), dim=-1, stable=True).indices[:, :n_max]  # (BH, n_max)
        sel = torch.gather(kept, 1, idx)  # False on padding entries
        k_t = kb[rows, idx].reshape(B * H, n_max * BLOCK_SIZE, D)
        v_t = vb[rows, idx].reshape(B * H, n_max * BLOCK_SIZE, Dv)
        valid = (sel[..., None] & key_valid[rows, idx]).reshape(B * H, 1, n_max * BLOCK_SIZE)
        s = scale * (qf[:, r0:r1].to(cdt) @ k_t.transpose(-1, -2))  # (BH, rows, n_max * 128)
        s = s.masked_fill(~valid, float("-inf"))
        l_blk = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - l_blk[..., None].masked_fill(torch.isinf(l_blk)[..., None], 0.0))
        out[:, r0:r1] = (p @ v_t).to(q.dtype)
        lse[:, r0:r1] = l_blk.float()
    return out.reshape(B, H, Sq, Dv), lse.reshape(B, H, Sq)
