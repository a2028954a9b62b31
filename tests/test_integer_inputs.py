"""Models whose forward takes integer index tensors (position ids) compile and run with calibration.

Calibration keeps integer tensors as they are: randomised, position ids index out of their
tables (Kandinsky 5 crashed the compile with `IndexError: index 804 is out of bounds`).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scaling_compiler import ScalingAttnBackend

from tests.attention_reference import masked_sites


class PositionIdAttention(nn.Module):
    """Adds a learned position embedding indexed by an int64 (S,) `position_ids` input (table of 300)."""

    def __init__(self, dim=32, heads=2, table=300):
        super().__init__()
        self.heads = heads
        self.positions = nn.Embedding(table, dim)
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))

    def forward(self, hidden_states, position_ids, timestep):
        x = hidden_states + self.positions(position_ids) + timestep[:, None, None] / 1000
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, self.heads, -1).transpose(1, 2) for p in (self.to_q, self.to_k, self.to_v))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, -1)


def test_embedding_indexed_by_an_integer_input():
    torch.manual_seed(0)
    model = PositionIdAttention().eval()
    inputs = dict(hidden_states=torch.randn(1, 300, 32), position_ids=torch.arange(300),
                  timestep=torch.tensor([500.0]))
    backend = ScalingAttnBackend(density=0.5, calibration_samples=2, compiler="eager", cache=False)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(**inputs)
        with masked_sites(backend.report, 500.0):
            expected = model(**inputs)
    assert "calibrated" in backend.report.topology_origin
    assert [s.status for s in backend.report.sites] == ["sparse"]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def _kandinsky5(grid=(2, 32, 32), text_tokens=8):
    transformer = pytest.importorskip("diffusers.models.transformers.transformer_kandinsky")
    torch.manual_seed(0)
    model = transformer.Kandinsky5Transformer3DModel(
        in_visual_dim=4, in_text_dim=32, in_text_dim2=16, time_dim=32, out_visual_dim=4, patch_size=(1, 2, 2),
        model_dim=48, ff_dim=96, num_text_blocks=1, num_visual_blocks=1, axes_dims=(8, 8, 8),
    ).eval()
    with torch.no_grad():  # its modulations start at zero, which would hide the attention from the output
        for name, parameter in model.named_parameters():
            if "modulation" in name:
                parameter.normal_(std=0.2)
    frames, height, width = grid
    inputs = dict(
        hidden_states=torch.randn(1, frames, height, width, 4), encoder_hidden_states=torch.randn(1, text_tokens, 32),
        timestep=torch.tensor([999.0]), pooled_projections=torch.randn(1, 16),
        # as the pipeline passes them: int64 positions into RoPE tables of 128 (visual) and 1024 (text) rows
        visual_rope_pos=[torch.arange(frames), torch.arange(height // 2), torch.arange(width // 2)],
        text_rope_pos=torch.arange(text_tokens), return_dict=False,
    )
    return model, inputs


def test_kandinsky5_compiles_with_calibration():
    """Kandinsky 5's video transformer (tiny config, random weights): its integer RoPE positions
    are kept, calibration runs, and the compiled model equals eager with the report's masks."""
    model, inputs = _kandinsky5()
    backend = ScalingAttnBackend(density=0.5, calibration_samples=1, compiler="eager", cache=False)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(**inputs)[0]
        with masked_sites(backend.report, 999.0):
            expected = model(**inputs)[0]
        dense = model(**inputs)[0]
    assert "calibrated" in backend.report.topology_origin
    assert (out - dense).abs().max() > 1e-3  # the masks change the output: the comparison below is no tautology
    visual = [s for s in backend.report.sites if s.name.startswith("visual_transformer_blocks.0.self")]
    assert [s.status for s in visual] == ["sparse"]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
