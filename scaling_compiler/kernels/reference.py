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


def _key_blocks(k: torch.Tensor, v: torch.Tensor, key_padding: torch.Tensor | None, dtype: torch.dtype):
    """k, v zero-padded to whole 128-key blocks, ``(B*H, Nk, 128, D)`` in ``dtype``, and which keys
    are real and not padded, bool ``(B*H, Nk, 128)``."""
    B, H, Sk, D = k.shape
    nk = num_blocks(Sk)
    pad = nk * BLOCK_SIZE - Sk
    kb = torch.nn.functional.pad(k.to(dtype), (0, 0, 0, pad)).reshape(B * H, nk, BLOCK_SIZE, D)
    vb = torch.nn.functional.pad(v.to(dtype), (0, 0, 0, pad)).reshape(B * H, nk, BLOCK_SIZE, v.shape[3])
    key_valid = (torch.arange(nk * BLOCK_SIZE, device=k.device) < Sk).expand(B, nk * BLOCK_SIZE)
    if key_padding is not None:
        key_valid = key_valid & torch.nn.functional.pad(key_padding.to(torch.bool), (0, pad)).expand(B, -1)
    return kb, vb, key_valid[:, None].expand(B, H, -1).reshape(B * H, nk, BLOCK_SIZE)


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
    if mask_words.dtype != torch.int32 or mask_words.shape[-2:] != (nq, num_words(nk)):
        raise ValueError(f"mask_words must be int32 (..., {nq}, {num_words(nk)}), got "
                         f"{mask_words.dtype} {tuple(mask_words.shape)}")
    keep = unpack_block_mask(_broadcast_mask(mask_words, B, H), nk).reshape(B * H, nq, nk)
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
