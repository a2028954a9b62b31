"""DFSAttn's block scores and top-k selection.

1. Score: mean-pool q and k over 16-token tiles, take the tile-level attention
   ``softmax(q_t k_t^T * scale)`` over all key tiles, and sum the 8x8 tile masses inside
   each 128x128 block (:func:`block_scores`). Cost: ``(S/16)^2`` logits instead of ``S^2``.
2. Select: per head and query block keep the top ``max(1, floor(keep * Nk))`` key blocks;
   in joint text+video attention text key blocks are always kept and text query blocks are
   dense (:func:`topk_block_mask`).

The tokens are expected in the site's token order (``token_order.sequence_order``), so
blocks are spatially compact; nothing here depends on the order.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ...kernels.bitmask import BLOCK_SIZE, num_blocks

DEFAULT_TILE = 16  # tokens per scoring tile: 8 x 8 tiles per 128 x 128 block
DEFAULT_CHUNK_BYTES = 1 << 28  # tile probabilities held at once (fp32)


# ---------------------------------------------------------------------------------------
def block_scores(
    q: torch.Tensor,  # (B, H, Sq, D)
    k: torch.Tensor,  # (B, H, Sk, D)
    scale: float,
    tile: int = DEFAULT_TILE,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:  # float32 (B, H, Nq, Nk)
    """Sum of tile-level attention mass in each 128x128 block.

    A tail tile is the mean of its existing tokens; a tail block sums only its existing tiles,
    so a full query block's scores sum to 8 (one per query tile) and a tail block's to its
    number of tiles. Computed in fp32 on q's device, in chunks of whole query blocks.
    """
    if BLOCK_SIZE % tile:
        raise ValueError(f"tile={tile} must divide the block size {BLOCK_SIZE}")
    batch, heads = q.shape[:2]
    per_block = BLOCK_SIZE // tile
    nk = num_blocks(k.shape[2])
    q_tiles, k_tiles = _tile_means(q, tile), _tile_means(k, tile)  # (B, H, Tq, D), (B, H, Tk, D)
    k_pad = nk * per_block - k_tiles.shape[2]
    rows = max(per_block, max_chunk_bytes // (4 * batch * heads * k_tiles.shape[2]) // per_block * per_block)
    out = []
    for start in range(0, q_tiles.shape[2], rows):
        logits = torch.matmul(q_tiles[:, :, start : start + rows], k_tiles.transpose(-1, -2)) * scale
        probs = torch.nn.functional.pad(logits.softmax(dim=-1), (0, k_pad, 0, (-logits.shape[2]) % per_block))
        out.append(probs.reshape(batch, heads, -1, per_block, nk, per_block).sum(dim=(3, 5)))
    return torch.cat(out, dim=2)


def block_scores_reference(q: torch.Tensor, k: torch.Tensor, scale: float, tile: int = DEFAULT_TILE) -> torch.Tensor:
    """:func:`block_scores` in float64 with explicit loops over tiles (for tests)."""
    batch, heads, q_len, _ = q.shape
    k_len = k.shape[2]
    out = torch.zeros(batch, heads, num_blocks(q_len), num_blocks(k_len), dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            qt = torch.stack([q[b, h, i : i + tile].double().mean(0) for i in range(0, q_len, tile)])
            kt = torch.stack([k[b, h, j : j + tile].double().mean(0) for j in range(0, k_len, tile)])
            probs = torch.softmax(qt @ kt.T * scale, dim=-1)
            for i in range(qt.shape[0]):
                for j in range(kt.shape[0]):
                    out[b, h, i * tile // BLOCK_SIZE, j * tile // BLOCK_SIZE] += probs[i, j]
    return out


def text_block_indices(text_spans: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Indices of the 128-token blocks that hold a text token (``masks.with_text_dense``'s rule)."""
    blocks = {b for start, end in text_spans for b in range(start // BLOCK_SIZE, (end - 1) // BLOCK_SIZE + 1)}
    return torch.tensor(sorted(blocks), dtype=torch.long)


def topk_block_mask(
    scores: torch.Tensor,  # (..., Nq, Nk)
    keep_ratio: float,
    text_blocks: torch.Tensor | None = None,  # long (T,): block indices holding text tokens
) -> torch.Tensor:  # bool (..., Nq, Nk)
    """Per query block, the top ``max(1, floor(keep_ratio * Nk))`` key blocks by score.

    Text key blocks are always kept and count toward that budget (as in the authors' joint
    text+video code), but every row keeps at least one non-text block; text query blocks
    (self-attention: the same indices) are dense. Ties go to the lower index (torch.topk).
    """
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    nk = scores.shape[-1]
    keep = max(1, int(keep_ratio * nk + 1e-9))  # floor, robust to float noise: 0.29 * 100 keeps 29
    if text_blocks is not None and text_blocks.numel():
        text_blocks = text_blocks.to(scores.device)
        scores = scores.index_fill(-1, text_blocks, float("inf"))
        keep = min(nk, max(keep, text_blocks.numel() + 1))
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    mask.scatter_(-1, scores.topk(keep, dim=-1).indices, True)
    if text_blocks is not None and text_blocks.numel():
        mask.index_fill_(-2, text_blocks, True)
    return mask


def _tile_means(x: torch.Tensor, tile: int) -> torch.Tensor:  # (B, H, S, D) -> fp32 (B, H, ceil(S / tile), D)
    batch, heads, length, dim = x.shape
    n = -(-length // tile)
    sums = torch.nn.functional.pad(x.float(), (0, 0, 0, n * tile - length)).reshape(batch, heads, n, tile, dim).sum(3)
    counts = torch.full((n, 1), float(tile), device=x.device)
    counts[-1] = length - tile * (n - 1)
    return sums / counts


