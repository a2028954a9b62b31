"""The local band (option masks="local_band"): the same diagonal band for every head.

For each query block i of Nq, keep the floor(density * Nk) or one more (so the total is exactly
`floor(density * Nq * Nk)`, at least one per row) key blocks whose index is nearest to the query
block's diagonal position `(i + 0.5) * Nk / Nq - 0.5` (ties go to the lower index). In joint
text+video attention every block that touches a text token, as a query or as a key, is kept as
well. `density == 1.0` keeps every block.
"""
from __future__ import annotations

import torch

from ...kernels.bitmask import num_blocks
from ...sites import Site
from ..block_masks import nearest_blocks, with_text_dense
from . import StaticRule


def local_band_mask(site: Site, density: float) -> torch.Tensor:
    """Boolean block mask (H, Nq, Nk) for `site` at `density`."""
    nq, nk = num_blocks(site.q_len), num_blocks(site.kv_len)
    centre = (torch.arange(nq, dtype=torch.float64) + 0.5) * nk / nq - 0.5
    key = torch.arange(nk, dtype=torch.float64)
    # distance to the diagonal; + key * eps breaks ties toward the lower index
    distance = (key[None, :] - centre[:, None]).abs() + key[None, :] * 1e-9
    mask = nearest_blocks(distance, density)
    return with_text_dense(mask.expand(site.heads, nq, nk).contiguous(), site.text_spans)


RULE = StaticRule("local_band", local_band_mask, describe=lambda site: "local band")
