"""A minimal video DiT whose attention is written out by hand: softmax(q @ k^T * scale) @ v.

It checks that the pass finds the explicit pattern, not only F.scaled_dot_product_attention.
"""
import torch
from torch import nn


class HandAttention(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(context_dim or dim, dim)
        self.to_v = nn.Linear(context_dim or dim, dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, s, _ = x.shape
        q = self.to_q(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)  # (B, H, S, D)
        k = self.to_k(context).view(b, -1, self.heads, self.head_dim).transpose(1, 2)
        v = self.to_v(context).view(b, -1, self.heads, self.head_dim).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) * self.head_dim**-0.5
        out = torch.softmax(scores, dim=-1) @ v
        return self.to_out(out.transpose(1, 2).reshape(b, s, -1))


class HandDiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = HandAttention(dim, heads)
        self.attn2 = HandAttention(dim, heads, context_dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class HandDiT(nn.Module):
    """Conv3d patch embedding (1x2x2), `depth` blocks of self + cross attention, linear head."""

    def __init__(self, in_channels=4, dim=128, heads=2, depth=2, context_dim=32):
        super().__init__()
        self.patch = nn.Conv3d(in_channels, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.blocks = nn.ModuleList(HandDiTBlock(dim, heads, context_dim) for _ in range(depth))
        self.head = nn.Linear(dim, in_channels * 4)

    def forward(self, hidden_states, encoder_hidden_states):
        x = self.patch(hidden_states).flatten(2).transpose(1, 2)  # (B, F*H*W, dim)
        for block in self.blocks:
            x = block(x, encoder_hidden_states)
        return self.head(x)


def build_hand_dit():
    return HandDiT().eval()


def hand_dit_inputs(model, grid, batch=1):
    return dict(hidden_states=torch.randn(batch, 4, *grid), encoder_hidden_states=torch.randn(batch, 7, 32))


def build_with_inputs():
    """`module:factory` for `scalingattn inspect`: the model and one forward's kwargs."""
    torch.manual_seed(0)
    model = build_hand_dit()
    return model, hand_dit_inputs(model, (3, 24, 24))
