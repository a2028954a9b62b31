"""Block masks from the `density` option: the documented rule used until WEST calibration.

The rule ("local band"): for each query block i of Nq, keep the `max(1, ceil(density * Nk))`
key blocks whose index is nearest to the query block's diagonal position
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
    keep = min(nk, max(1, math.ceil(density * nk)))
    centre = (torch.arange(nq, dtype=torch.float64) + 0.5) * nk / nq - 0.5
    key = torch.arange(nk, dtype=torch.float64)
    # distance to the diagonal; + key * eps breaks ties toward the lower index
    distance = (key[None, :] - centre[:, None]).abs() + key[None, :] * 1e-9
    nearest = distance.argsort(dim=1, stable=True)[:, :keep]
    mask = torch.zeros(nq, nk, dtype=torch.bool)
    mask.scatter_(1, nearest, True)
    for start, end in site.text_spans:
        first, last = start // BLOCK_SIZE, (end - 1) // BLOCK_SIZE
        mask[first : last + 1, :] = True
        mask[:, first : last + 1] = True
    return mask.expand(site.heads, nq, nk).contiguous()
