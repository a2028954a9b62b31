"""Block masks from the `density` option without calibration (option masks="local_band").

The rule ("local band"): for each query block i of Nq, keep the floor(density * Nk) or one
more (so the total is exactly `floor(density * Nq * Nk)`, at least one per row) key blocks
whose index is nearest to the query block's diagonal position
`(i + 0.5) * Nk / Nq - 0.5` (ties go to the lower index), the same for every head. In joint
text+video attention every block that touches a text token, as a query or as a key, is
kept as well. `density == 1.0` keeps every block.
"""
from __future__ import annotations

import math

import torch

from .kernels.bitmask import BLOCK_SIZE, num_blocks
from .sites import AttentionSite


def local_band_mask(site: AttentionSite, density: float) -> torch.Tensor:
    """Boolean block mask (H, Nq, Nk) for `site` at `density`."""
    nq, nk = num_blocks(site.q_len), num_blocks(site.kv_len)
    centre = (torch.arange(nq, dtype=torch.float64) + 0.5) * nk / nq - 0.5
    key = torch.arange(nk, dtype=torch.float64)
    # distance to the diagonal; + key * eps breaks ties toward the lower index
    distance = (key[None, :] - centre[:, None]).abs() + key[None, :] * 1e-9
    mask = _nearest(distance, density)
    return with_text_dense(mask.expand(site.heads, nq, nk).contiguous(), site.text_spans)


def with_text_dense(block_mask: torch.Tensor, text_spans: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """Keep every block row and column that holds a text token (joint text+video attention)."""
    block_mask = block_mask.clone()
    for start, end in text_spans:
        first, last = start // BLOCK_SIZE, (end - 1) // BLOCK_SIZE
        block_mask[..., first : last + 1, :] = True
        block_mask[..., :, first : last + 1] = True
    return block_mask


def window_3d_mask(site: AttentionSite, density: float) -> torch.Tensor:
    """Boolean block mask (H, Nq, Nk): a 3-D local window shared by every head (Radial/STA-like).

    Each 128-token block sits at the mean (frame, row, column) of its video tokens; a query
    block keeps its nearest key blocks, `floor(density * Nq * Nk)` blocks in all, (Euclidean distance
    in token units, ties to the lower index). Text blocks of joint attention stay dense. Needs
    the site's token grid: without one this is the 1-D local band.
    """
    if site.token_grid is None:
        return local_band_mask(site, density)
    centres = _block_centres(site.q_len, site.token_grid, site.text_spans)  # (N, 3)
    nk = centres.shape[0]
    key = torch.arange(nk, dtype=torch.float64)
    mask = _nearest(torch.cdist(centres, centres) + key[None, :] * 1e-9, density)
    return with_text_dense(mask.expand(site.heads, nk, nk).contiguous(), site.text_spans)


def _nearest(distance: torch.Tensor, density: float) -> torch.Tensor:
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


def _block_centres(seq_len: int, grid: tuple[int, int, int], text_spans) -> torch.Tensor:
    """(N, 3) mean (frame, row, column) of the video tokens in each block (text-only blocks: origin)."""
    is_text = torch.zeros(seq_len, dtype=torch.bool)
    for start, end in text_spans:
        is_text[start:end] = True
    coords = torch.zeros(seq_len, 3, dtype=torch.float64)
    video = (~is_text).nonzero().squeeze(1)
    coords[video] = torch.stack(torch.unravel_index(torch.arange(len(video)), grid), dim=1).double()
    weights = (~is_text).double()
    pad = num_blocks(seq_len) * BLOCK_SIZE - seq_len
    sums = torch.nn.functional.pad(coords * weights[:, None], (0, 0, 0, pad)).reshape(-1, BLOCK_SIZE, 3).sum(1)
    counts = torch.nn.functional.pad(weights, (0, pad)).reshape(-1, BLOCK_SIZE).sum(1).clamp_min(1)
    return sums / counts[:, None]
