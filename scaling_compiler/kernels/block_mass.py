"""Exact attention mass per 128x128 block, without materialising the Sq x Sk matrix.

WEST's block significance of one input is `S(u, v) = mean over tile (u, v) of
softmax(scale * q k^T)`. Rows are processed in chunks of whole query blocks: each chunk's
scores (rows x Sk) give the row log-sum-exp and, in the same pass, the per-key-block sums of
`exp(s - lse)`. Peak memory is one chunk of scores, set by `max_chunk_bytes`.
"""
from __future__ import annotations

import torch

from .bitmask import BLOCK_SIZE, num_blocks

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
    """
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
