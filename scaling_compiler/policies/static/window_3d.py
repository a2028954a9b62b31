"""The 3-D window (option masks="window_3d"): one 3-D local window shared by every head (Radial/STA-like).

Each 128-token block sits at the mean (frame, row, column) of its video tokens; a query block
keeps its nearest key blocks, `floor(density * Nq * Nk)` blocks in all (Euclidean distance in
token units, ties to the lower index). Text blocks of joint attention stay dense. Needs the
site's token grid, in raster order: without a grid this is the 1-D local band.
"""
from __future__ import annotations

import torch

from ...kernels.bitmask import BLOCK_SIZE, num_blocks
from ...sites import Site
from ..block_masks import nearest_blocks, with_text_dense
from . import StaticRule
from .local_band import local_band_mask


def window_3d_mask(site: Site, density: float) -> torch.Tensor:
    """Boolean block mask (H, Nq, Nk) for `site` at `density`."""
    if site.token_grid is None:
        return local_band_mask(site, density)
    centres = _block_centres(site.q_len, site.token_grid, site.text_spans)  # (N, 3)
    nk = centres.shape[0]
    key = torch.arange(nk, dtype=torch.float64)
    mask = nearest_blocks(torch.cdist(centres, centres) + key[None, :] * 1e-9, density)
    return with_text_dense(mask.expand(site.heads, nk, nk).contiguous(), site.text_spans)


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


RULE = StaticRule("window_3d", window_3d_mask, raster_only=True,
                  describe=lambda site: "3-D window" if site.token_grid else "3-D window (no grid: 1-D band)")
