"""Real diffusers DiT architectures at small sizes, with example inputs for any token grid.

Used by the CLI (`scalingattn inspect WanTransformer3DModel`), the demo and the tests.
Weights are random: nothing is downloaded. `build(name, config_overrides)` returns the
model and `example_inputs(name, model, grid)` the keyword arguments of one forward call at
a latent grid of (frames, height, width) before patchify.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

Grid = tuple[int, int, int]  # (frames, height, width) of the latent video, before patchify


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    config: dict[str, Any]  # small constructor kwargs
    inputs: Callable[[torch.nn.Module, Grid, int], dict[str, Any]]  # (model, grid, batch) -> forward kwargs


def _wan_inputs(model, grid, batch):
    c = model.config
    return dict(
        hidden_states=torch.randn(batch, c.in_channels, *grid),
        timestep=torch.full((batch,), 500),
        encoder_hidden_states=torch.randn(batch, 7, c.text_dim),
        return_dict=False,
    )


def _cogvideox_inputs(model, grid, batch):
    c = model.config
    frames, height, width = grid
    return dict(
        hidden_states=torch.randn(batch, frames, c.in_channels, height, width),
        encoder_hidden_states=torch.randn(batch, c.max_text_seq_length, c.text_embed_dim),
        timestep=torch.full((batch,), 500),
        return_dict=False,
    )


def _hunyuan_inputs(model, grid, batch):
    c = model.config
    text_len = 9
    valid = torch.ones(batch, text_len, dtype=torch.int64)
    valid[:, 6:] = 0  # padded prompt tokens: HunyuanVideo masks them out of every attention
    return dict(
        hidden_states=torch.randn(batch, c.in_channels, *grid),
        timestep=torch.full((batch,), 500),
        encoder_hidden_states=torch.randn(batch, text_len, c.text_embed_dim),
        encoder_attention_mask=valid,
        pooled_projections=torch.randn(batch, c.pooled_projection_dim),
        guidance=torch.full((batch,), 3500.0),
        return_dict=False,
    )


def _hunyuan15_inputs(model, grid, batch):
    c = model.config
    valid = torch.ones(batch, 9, dtype=torch.int64)
    valid[:, 6:] = 0  # padded prompt tokens: the model builds a (B, 1, S, S) valid x valid mask from these
    valid_2 = torch.ones(batch, 5, dtype=torch.int64)
    valid_2[:, 3:] = 0
    return dict(
        hidden_states=torch.randn(batch, c.in_channels, *grid),
        timestep=torch.full((batch,), 500.0),  # float: the model casts its embedding to the timestep's dtype
        encoder_hidden_states=torch.randn(batch, 9, c.text_embed_dim),
        encoder_attention_mask=valid,
        encoder_hidden_states_2=torch.randn(batch, 5, c.text_embed_2_dim),
        encoder_attention_mask_2=valid_2,
        image_embeds=torch.zeros(batch, 3, c.image_embed_dim),  # text-to-video: image tokens all padding
        return_dict=False,
    )


def _ltx_inputs(model, grid, batch):
    c = model.config
    frames, height, width = grid
    return dict(
        hidden_states=torch.randn(batch, frames * height * width, c.in_channels),
        encoder_hidden_states=torch.randn(batch, 7, c.caption_channels),
        timestep=torch.full((batch,), 500),
        encoder_attention_mask=torch.ones(batch, 7),
        num_frames=frames, height=height, width=width,
        return_dict=False,
    )


def _flux_inputs(model, grid, batch):
    c = model.config
    frames, height, width = grid
    # Flux packs 2x2 latent patches into one token before the transformer
    tokens, text_len = frames * (height // 2) * (width // 2), 7
    return dict(
        hidden_states=torch.randn(batch, tokens, c.in_channels),
        encoder_hidden_states=torch.randn(batch, text_len, c.joint_attention_dim),
        pooled_projections=torch.randn(batch, c.pooled_projection_dim),
        timestep=torch.full((batch,), 0.5),
        img_ids=torch.zeros(tokens, 3),
        txt_ids=torch.zeros(text_len, 3),
        return_dict=False,
    )


ZOO: dict[str, ZooEntry] = {
    "WanTransformer3DModel": ZooEntry(
        dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4,
             text_dim=32, freq_dim=32, ffn_dim=128, num_layers=2, rope_max_seq_len=64),
        _wan_inputs,
    ),
    "CogVideoXTransformer3DModel": ZooEntry(
        dict(num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4, time_embed_dim=32,
             text_embed_dim=32, num_layers=2, sample_width=24, sample_height=24, sample_frames=9, patch_size=2,
             max_text_seq_length=8),
        _cogvideox_inputs,
    ),
    "HunyuanVideoTransformer3DModel": ZooEntry(
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=64, num_layers=1,
             num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32,
             pooled_projection_dim=16, rope_axes_dim=(16, 24, 24)),
        _hunyuan_inputs,
    ),
    # dynamo breaks its graph around the data-dependent text reordering (boolean indexing): not fullgraph
    "HunyuanVideo15Transformer3DModel": ZooEntry(
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=64, num_layers=1,
             num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32, text_embed_2_dim=16,
             image_embed_dim=16, rope_axes_dim=(16, 24, 24), target_size=64),
        _hunyuan15_inputs,
    ),
    "LTXVideoTransformer3DModel": ZooEntry(
        dict(in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2,
             attention_head_dim=64, cross_attention_dim=128, num_layers=2, caption_channels=32),
        _ltx_inputs,
    ),
    "FluxTransformer2DModel": ZooEntry(
        dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=64,
             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(16, 24, 24)),
        _flux_inputs,
    ),
}


def build(name: str, config_overrides: dict[str, Any] | None = None) -> torch.nn.Module:
    """A diffusers model of class `name` from its small zoo config (plus overrides), random weights."""
    import diffusers

    if name not in ZOO:
        raise ValueError(f"no zoo entry for {name!r}; known: {sorted(ZOO)} (or pass a 'module:factory' path)")
    model = getattr(diffusers, name)(**(ZOO[name].config | (config_overrides or {})))
    return model.eval()


def example_inputs(name: str, model: torch.nn.Module, grid: Grid, batch: int = 1) -> dict[str, Any]:
    """Forward kwargs for `model` at the latent `grid` (frames, height, width)."""
    return ZOO[name].inputs(model, grid, batch)
