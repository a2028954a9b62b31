"""Detection on dynamo graphs: self / joint / cross, the token grid, text spans, the timestep input,
and the dense reasons it records."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scaling_compiler.sites import Pattern, SiteKind

from .graphs import VideoAttention, dynamo_graph, video_inputs


def test_self_and_cross_attention_grid_and_timestep():
    graph = dynamo_graph(VideoAttention(), *video_inputs(frames=3, height=16, width=24))
    self_site, cross = graph.sites
    assert (self_site.name, cross.name) == ("blocks.0.attn1", "blocks.0.attn2")
    assert self_site.kind is SiteKind.SELF and self_site.pattern is Pattern.SDPA
    assert (self_site.batch, self_site.heads, self_site.q_len, self_site.kv_len, self_site.head_dim) == (1, 2, 288, 288, 32)
    assert self_site.token_grid == (3, 8, 12) and "conv3d" in self_site.grid_source
    assert self_site.scale == pytest.approx(32 ** -0.5) and self_site.rewritable
    assert cross.kind is SiteKind.CROSS and cross.kv_len == 7 and "cross-attention" in cross.dense_reason
    assert graph.timestep is not None and graph.timestep.timestep_max == 1000.0
    placeholders = [n for n in graph.gm.graph.nodes if n.op == "placeholder"]
    assert placeholders[graph.timestep.position].name == "l_timestep_"


def test_joint_attention_text_span_and_grid():
    graph = dynamo_graph(VideoAttention(joint=True), *video_inputs(frames=2, height=16, width=16, text_len=7))
    joint = graph.sites[0]
    assert joint.kind is SiteKind.JOINT and joint.q_len == 7 + 2 * 8 * 8
    assert joint.text_spans == ((0, 7),) and joint.token_grid == (2, 8, 8)


def test_timestep_max_from_the_example_and_the_option():
    hidden, text, _ = video_inputs()
    graph = dynamo_graph(VideoAttention(), hidden, text, torch.tensor([0.5]))
    assert graph.timestep.timestep_max == 1.0  # a flow-matching sigma in [0, 1]
    graph = dynamo_graph(VideoAttention(), hidden, text, torch.tensor([0.5]), timestep_max=7.0)
    assert graph.timestep.timestep_max == 7.0


class Plain(nn.Module):
    """Attention with no timestep input and no patch embedding; repeated module names."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 64)

    def forward(self, x):
        q = self.proj(x).unflatten(-1, (2, 32)).transpose(1, 2)
        first = F.scaled_dot_product_attention(q, q, q)
        second = torch.softmax(q @ q.transpose(-2, -1) * 0.125, dim=-1) @ q
        return first + second


def test_no_timestep_no_grid_and_a_handwritten_softmax():
    graph = dynamo_graph(Plain(), torch.randn(2, 200, 16))
    assert graph.timestep is None
    sdpa, softmax = graph.sites
    assert sdpa.pattern is Pattern.SDPA and softmax.pattern is Pattern.SOFTMAX
    assert softmax.scale == pytest.approx(0.125) and softmax.q_len == 200
    assert sdpa.token_grid is None and "unknown" in sdpa.grid_source
    assert len({sdpa.name, softmax.name}) == 2  # names made unique


def test_token_grid_option_overrides_the_patch_embedding():
    graph = dynamo_graph(Plain(), torch.randn(1, 200, 16), token_grid=(2, 10, 10))
    assert all(site.token_grid == (2, 10, 10) and site.grid_source == "option" for site in graph.sites)
