"""Exact attention mass per 128x128 block, without materialising the Sq x Sk matrix.

WEST's block significance of one input is `S(u, v) = mean over tile (u, v) of
softmax(scale * q k^T)`. Rows are processed in chunks of whole query blocks: each chunk's
scores (rows x Sk) give the row log-sum-exp and, in the same pass, the per-key-block sums of
`exp(s - lse)`. Peak memory is one chunk of scores, set by `max_chunk_bytes`.

On CUDA the Triton kernel in `kernels/triton/block_mass.py` does the same without any score
matrix in memory (Wan2.1-1.3B 480p: tens of ms on an H100, where the chunked torch path spends
~0.2 s in fp32 scores and their passes).
"""
from __future__ import annotations

import torch

from .bitmask import BLOCK_SIZE, num_blocks
from .triton import interpreting
from .triton.block_mass import block_mass_triton

__all__ = ["block_mass", "block_mass_triton", "row_block_mass"]

DEFAULT_CHUNK_BYTES = 1 << 30  # scores held at once (fp32)


def block_mass(
    q: torch.Tensor,  # (B, H, Sq, D)
    k: torch.Tensor,  # (B, H, Sk, D)
    scale: float,
    key_padding: torch.Tensor | None = None,  # bool (B or 1, Sk): False drops that key
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:  # float32 (B, H, Nq, Nk)
    """Mean softmax probability of each 128x128 (query block, key block) tile.

    Tails count their real sizes: a tile's mean is over its existing (row, key) pairs, so
    `sum_v S(u, v) * keys_in(v)` is 1 for every block row u. Masked keys have zero mass.
    CUDA tensors go through the Triton kernel (`block_mass_triton`), others through chunked
    torch matmuls in float32.
    """
    if q.is_cuda and not interpreting():
        return block_mass_triton(q, k, scale, key_padding)
    batch, heads, q_len, _ = q.shape
    kv_len = k.shape[2]
    nq, nk = num_blocks(q_len), num_blocks(kv_len)
    pad = nk * BLOCK_SIZE - kv_len
    keys_per_block = torch.full((nk,), BLOCK_SIZE, dtype=torch.float32, device=q.device)
    keys_per_block[-1] = kv_len - BLOCK_SIZE * (nk - 1)
    kf = k.float()
    bias = None
    if key_padding is not None:
        bias = torch.zeros(key_padding.shape, dtype=torch.float32, device=q.device)
        bias = bias.masked_fill(~key_padding.bool(), float("-inf")).reshape(-1, 1, 1, kv_len)

    rows_per_chunk = max(BLOCK_SIZE, max_chunk_bytes // (4 * batch * heads * kv_len) // BLOCK_SIZE * BLOCK_SIZE)
    sums = []
    for start in range(0, q_len, rows_per_chunk):
        rows = q[:, :, start : start + rows_per_chunk].float()
        scores = torch.matmul(rows, kf.transpose(-1, -2)).mul_(scale)  # (B, H, rows, Sk)
        if bias is not None:
            scores += bias
        scores -= torch.logsumexp(scores, dim=-1, keepdim=True)
        probs = torch.nn.functional.pad(scores.exp_().nan_to_num_(0.0), (0, pad))  # rows with no key: 0
        per_key_block = probs.reshape(batch, heads, -1, nk, BLOCK_SIZE).sum(-1)  # (B, H, rows, Nk)
        row_pad = (-per_key_block.shape[2]) % BLOCK_SIZE
        per_key_block = torch.nn.functional.pad(per_key_block, (0, 0, 0, row_pad))
        sums.append(per_key_block.reshape(batch, heads, -1, BLOCK_SIZE, nk).sum(3))
    mass = torch.cat(sums, dim=2)  # (B, H, Nq, Nk): total probability in each tile
    rows_per_block = torch.full((nq,), BLOCK_SIZE, dtype=torch.float32, device=q.device)
    rows_per_block[-1] = q_len - BLOCK_SIZE * (nq - 1)
    return mass / (rows_per_block[:, None] * keys_per_block[None, :])


def row_block_mass(
    q: torch.Tensor,  # (B, H, Sq, D)
    k: torch.Tensor,  # (B, H, Sk, D)
    scale: float,
    rows: torch.Tensor,  # int64 (R,): query positions
    key_padding: torch.Tensor | None = None,  # bool (B or 1, Sk)
) -> torch.Tensor:  # float32 (B, H, R, Nk)
    """Exact softmax probability that each of the given query rows puts on each key block."""
    kv_len = k.shape[2]
    scores = torch.matmul(q[:, :, rows.to(q.device)].float(), k.float().transpose(-1, -2)) * scale
    if key_padding is not None:
        scores = scores.masked_fill(~key_padding.bool().reshape(-1, 1, 1, kv_len), float("-inf"))
    probs = scores.softmax(-1).nan_to_num_(0.0)
    pad = num_blocks(kv_len) * BLOCK_SIZE - kv_len
    probs = torch.nn.functional.pad(probs, (0, pad))
    return probs.reshape(*probs.shape[:3], -1, BLOCK_SIZE).sum(-1)
