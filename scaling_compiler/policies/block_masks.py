"""Block-mask helpers shared by the mask rules: text rows and columns kept, nearest blocks per row."""
from __future__ import annotations

import math

import torch

from ..kernels.bitmask import BLOCK_SIZE


def with_text_dense(block_mask: torch.Tensor, text_spans: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """Keep every block row and column that holds a text token (joint text+video attention)."""
    block_mask = block_mask.clone()
    for start, end in text_spans:
        first, last = start // BLOCK_SIZE, (end - 1) // BLOCK_SIZE
        block_mask[..., first : last + 1, :] = True
        block_mask[..., :, first : last + 1] = True
    return block_mask


def nearest_blocks(distance: torch.Tensor, density: float) -> torch.Tensor:
    """bool (Nq, Nk): each row keeps its nearest key blocks, `floor(density * Nq * Nk)` in all.

    Rows keep floor(density * Nk) or one more, so the total meets the density exactly
    (at least one block per row).
    """
    nq, nk = distance.shape
    total = max(nq, math.floor(density * nq * nk + 1e-9))
    per_row = torch.full((nq,), total // nq, dtype=torch.long)
    per_row[: total % nq] += 1  # spread the remainder over the first rows
    ranks = distance.argsort(dim=1, stable=True).argsort(dim=1)
    return ranks < per_row.clamp_max(nk)[:, None]
