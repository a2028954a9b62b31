"""The model and its inputs: Wan2.1 with seeded random weights, seeded inputs, the sampler's timesteps
and which of them a variant times.

Model: diffusers `WanTransformer3DModel` at the Wan2.1 configurations (random seeded weights, bf16
with the modules diffusers keeps in float32 left in float32, eval, no grad), one denoising step =
one forward.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import torch

from benchmarks.end_to_end.variants import SAMPLER_STEPS, Section, Settings, Variant
from scaling_compiler.demo.sampling import sigma_schedule


def build_model(section: Section, settings: Settings) -> torch.nn.Module:
    """The Wan transformer with seeded random weights, built on the device, eval, no grad.

    Cast as `from_pretrained(torch_dtype=...)` casts: the model's `_keep_in_fp32_modules` (time
    embedder, norms, modulation tables, rope) stay float32, everything else takes the dtype.
    """
    import diffusers

    torch.manual_seed(settings.seed)
    with torch.device(settings.device):
        model = diffusers.WanTransformer3DModel(**section.config)
    keep = set(model._keep_in_fp32_modules or ())
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(torch.float32 if keep & set(name.split(".")) else settings.dtype)
    return model.eval().requires_grad_(False)


@dataclasses.dataclass
class Inputs:
    hidden_states: torch.Tensor  # (B, 16, F, H, W)
    encoder_hidden_states: torch.Tensor  # (B, text_len, text_dim)
    timesteps: dict[float, torch.Tensor]  # value -> (B,) float32, made once (no copy while timing)

    def at(self, t: float) -> dict[str, Any]:
        return dict(hidden_states=self.hidden_states, timestep=self.timesteps[t],
                    encoder_hidden_states=self.encoder_hidden_states, return_dict=False)


def make_inputs(model: torch.nn.Module, section: Section, batch: int, values: list[float],
                settings: Settings) -> Inputs:
    c = model.config
    g = torch.Generator(settings.device).manual_seed(settings.seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, device=settings.device).to(settings.dtype)  # noqa: E731
    return Inputs(
        randn(batch, c.in_channels, *section.latent), randn(batch, section.text_len, c.text_dim),
        {t: torch.full((batch,), t, dtype=torch.float32, device=settings.device) for t in values},
    )


def sampler_timesteps(section: Section) -> list[float]:
    """The 50 timesteps of a flow-matching sampler with the section's shift, noisiest first."""
    return [round(1000.0 * float(s), 4) for s in sigma_schedule(SAMPLER_STEPS, section.flow_shift)[:SAMPLER_STEPS]]


def timed_steps(variant: Variant, timesteps: list[float], settings: Settings) -> list[int]:
    """Indices of the timed sampler steps. +fbc: the middle `cache_steps` consecutive steps (a cache
    skips a step by comparing it with the one before); FAST: `fast_steps` evenly spaced steps;
    otherwise the middle step (masks do not vary)."""
    n = len(timesteps)
    if variant.fbc:
        count = min(settings.cache_steps, n)
        return list(range((n - count) // 2, (n - count) // 2 + count))
    if variant.schedule != "fast":
        return [n // 2]
    return torch.linspace(0, n - 1, min(settings.fast_steps, n)).round().long().tolist()


def timed_timesteps(variant: Variant, timesteps: list[float], settings: Settings) -> list[float]:
    return [timesteps[i] for i in timed_steps(variant, timesteps, settings)]
