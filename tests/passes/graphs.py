"""Small modules and the dynamo graph a backend receives for them (what the passes take)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scaling_compiler.config import Config
from scaling_compiler.passes.detect import detect
from scaling_compiler.sites import GraphRecord


def dynamo_graph(model: nn.Module, *args, passes=(detect,), **options) -> GraphRecord:
    """The graph dynamo hands a backend for `model(*args)`, as a record with `options`, after `passes`.

    The passes run inside the backend call: dynamo drops its per-placeholder records (`grapharg`)
    from the graph once the backend returns.
    """
    captured = []

    def capture(gm, example_inputs):
        graph = GraphRecord(gm, list(example_inputs), Config.from_options(options))
        for compile_pass in passes:
            compile_pass(graph)
        captured.append(graph)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture, fullgraph=True, dynamic=False)(*args)
    [graph] = captured
    return graph


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x, context=None):
        source = x if context is None else context
        q, k, v = (proj(t).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, H, S, D)
                   for proj, t in ((self.to_q, x), (self.to_k, source), (self.to_v, source)))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


class Block(nn.Module):
    """Self-attention over the video tokens (or joint: text tokens concatenated before them), then
    cross-attention to the text."""

    def __init__(self, dim: int, heads: int, joint: bool):
        super().__init__()
        self.joint = joint
        self.attn1, self.attn2 = Attention(dim, heads), Attention(dim, heads)

    def forward(self, x, text):
        tokens = torch.cat([text, x], dim=1) if self.joint else x
        x = x + self.attn1(tokens)[:, -x.shape[1]:]
        return x + self.attn2(x, text)


class VideoAttention(nn.Module):
    """Conv3d patch embedding, a timestep embedding, then `layers` blocks."""

    def __init__(self, heads=2, head_dim=32, channels=4, text_dim=16, joint=False, layers=1):
        super().__init__()
        dim = heads * head_dim
        self.patch = nn.Conv3d(channels, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.text = nn.Linear(text_dim, dim)
        self.time = nn.Linear(1, dim)
        self.blocks = nn.ModuleList([Block(dim, heads, joint) for _ in range(layers)])

    def forward(self, hidden_states, encoder_hidden_states, timestep):
        x = self.patch(hidden_states).flatten(2).transpose(1, 2)  # (B, S, dim)
        x = x + self.time(timestep[:, None].float() / 1000)[:, None]  # O(1) activations: fp32 checks stay tight
        text = self.text(encoder_hidden_states)
        for block in self.blocks:
            x = block(x, text)
        return x


def video_inputs(batch=1, frames=3, height=16, width=24, text_len=7, channels=4, text_dim=16):
    torch.manual_seed(0)
    return (torch.randn(batch, channels, frames, height, width), torch.randn(batch, text_len, text_dim),
            torch.full((batch,), 500.0))
