"""A DiT-like model whose attention is local in 3-D by construction.

q and k are fixed positional features of each token's (frame, row, column): their dot product
is a sum of low-frequency cosines of the coordinate differences, largest at distance 0 and
falling with distance. Head 0 is sharp (large scale), head 1 broader. v depends on the input,
so the block topology is fixed by the weights (here: buffers) and independent of the input.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


def positional_features(grid: tuple[int, int, int], per_axis: int = 4) -> torch.Tensor:
    """(S, 6 * per_axis): cos/sin of low frequencies of each coordinate."""
    coords = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in grid), indexing="ij"), -1)
    coords = coords.reshape(-1, 3)
    features = []
    for axis, size in enumerate(grid):
        for m in range(1, per_axis + 1):
            omega = math.pi * m / (2 * max(size, 2))
            features += [torch.cos(omega * coords[:, axis]), torch.sin(omega * coords[:, axis])]
    return torch.stack(features, dim=1)


class LocalDiT(nn.Module):
    def __init__(self, grid: tuple[int, int, int], heads_scale=(6.0, 2.0), in_channels=4, dim=64):
        super().__init__()
        self.patch = nn.Conv3d(in_channels, dim, kernel_size=1)
        self.to_v = nn.Linear(dim, dim * len(heads_scale))
        self.heads = len(heads_scale)
        feats = positional_features(grid)  # (S, 24)
        feats = F.pad(feats, (0, dim - feats.shape[1]))  # head_dim = dim
        scales = torch.tensor(heads_scale).sqrt()[:, None, None] * dim**0.25  # undo 1/sqrt(d)
        self.register_buffer("qk", feats[None] * scales)  # (H, S, D)
        self.out = nn.Linear(dim * len(heads_scale), in_channels)

    def forward(self, hidden_states):
        x = self.patch(hidden_states).flatten(2).transpose(1, 2)  # (B, S, dim)
        b, s, _ = x.shape
        v = self.to_v(x).view(b, s, self.heads, -1).transpose(1, 2)
        qk = self.qk.expand(b, -1, -1, -1)
        out = F.scaled_dot_product_attention(qk, qk, v)
        return self.out(out.transpose(1, 2).reshape(b, s, -1))


def small_model_and_inputs():
    """`module:factory` for the CLI: the local model at a 4 x 8 x 8 grid (256 tokens)."""
    torch.manual_seed(0)
    return LocalDiT((4, 8, 8)).eval(), dict(hidden_states=torch.randn(1, 4, 4, 8, 8))
