"""Flow-matching Euler sampling with classifier-free guidance, and writing videos as images.

Convention (Wan / SD3 rectified flow): x_sigma = (1 - sigma) * x0 + sigma * noise, the model
predicts the velocity noise - x0 given timestep = 1000 * sigma, and sampling integrates
from sigma = 1 (noise) to 0 (data).
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ContextManager

import torch

logger = logging.getLogger(__name__)

DEFAULT_STEPS = 30
DEFAULT_GUIDANCE = 4.0
DEFAULT_SHIFT = 2.0
PROGRESS_LINES = 10  # at most this many progress records per sampling run (plus the last step)

# model(video, timestep, tokens) -> velocity: video (B, C, F, H, W), timestep (B,) in [0, 1000],
# tokens (B, T) condition token ids. TinyVideoDiT and torch.compile(TinyVideoDiT) both fit.
VelocityModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# (step index, timestep, sigma, steps) -> the context each step's model call runs in
StepContext = Callable[[int, float, float, int], ContextManager[None]]


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Time shift: spends more of the schedule at high noise when shift > 1."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sigma_schedule(steps: int, shift: float = DEFAULT_SHIFT) -> torch.Tensor:
    """(steps + 1,) sigmas from 1 down to 0."""
    return shift_sigmas(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


def sampler_timesteps(steps: int, shift: float = DEFAULT_SHIFT) -> tuple[float, ...]:
    """The model's timestep input at each of the `steps` sampling steps (1000 x sigma): the
    backend's `timesteps` option, so that a step-dependent schedule is fitted to the steps that run."""
    return tuple(1000.0 * float(sigma) for sigma in sigma_schedule(steps, shift)[:steps])


def seeded_noise(shape: Sequence[int], seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 Gaussian noise drawn on the CPU from `seed`, so it is the same on every device."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator).to(device)


def compile_call_inputs(tokens: torch.Tensor, null_tokens: torch.Tensor, video_shape: tuple[int, int, int, int],
                        seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The quality harness's first, compiling call: (video, timestep, tokens) for one prompt with CFG.

    Two rows of float32 noise from `seed` (the sampler's input dtype), timestep 1000 (the first step),
    the prompt's `tokens` (1, T) then `null_tokens`. WEST calibrates from the compiling call's inputs
    (noise at their scale, integer inputs as they are), so a process that compiles with these very
    inputs (examples/finetune_salad.py) calibrates the masks the harness runs.
    """
    device = tokens.device
    video = torch.randn(2, *video_shape, generator=torch.Generator().manual_seed(seed)).to(device)
    return video, torch.full((2,), 1000.0, device=device), torch.cat([tokens, null_tokens])


@torch.no_grad()
def sample(
    model: VelocityModel,
    tokens: torch.Tensor,  # (B, T) condition token ids
    null_tokens: torch.Tensor,  # (B, T) unconditional ids
    video_shape: tuple[int, int, int, int],  # (C, F, H, W)
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    shift: float = DEFAULT_SHIFT,
    noise: torch.Tensor | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    label: str = "sampling",
    step_context: StepContext | None = None,
) -> torch.Tensor:
    """Euler integration of the flow; returns (B, C, F, H, W) videos clamped to [-1, 1].

    With guidance_scale != 1 each step runs the model once on a batch of 2B (conditional
    rows first, unconditional after) and mixes u + s * (c - u). Deterministic: the noise
    comes from `seed` (or is given as `noise`), and nothing else is random. The state and
    timesteps stay float32 whatever the model's dtype (TinyVideoDiT casts its input).

    Progress goes to this module's logger at INFO (`<label>: step i/n (t=...) after s`): every
    step up to PROGRESS_LINES steps, beyond that every ceil(n / PROGRESS_LINES)-th step and the
    last, since a CPU run of the demo would otherwise say nothing for half a minute or more (the
    first step of a compiled model also compiles it). The CLI shows INFO records; a library
    caller sees them only where it configures logging to.

    `step_context`: each step's model call runs inside `step_context(i, timestep, sigma, steps)`;
    `diffusers_cache_context` makes one for a model under a diffusers cache hook.
    """
    device = tokens.device
    batch = tokens.shape[0]
    x = noise if noise is not None else seeded_noise((batch, *video_shape), seed, device)
    x = x.to(device=device, dtype=torch.float32)
    guided = guidance_scale != 1.0
    cond = torch.cat([tokens, null_tokens]) if guided else tokens
    sigmas = sigma_schedule(steps, shift)
    timesteps = sampler_timesteps(steps, shift)
    every = max(1, math.ceil(steps / PROGRESS_LINES))
    start = time.perf_counter()
    for i in range(steps):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x_in = torch.cat([x, x]) if guided else x
        timestep = torch.full((x_in.shape[0],), timesteps[i], device=device)
        with step_context(i, timesteps[i], sigma, steps) if step_context else contextlib.nullcontext():
            v = model(x_in, timestep, cond).float()
        if guided:
            v_cond, v_uncond = v.chunk(2)
            v = v_uncond + guidance_scale * (v_cond - v_uncond)
        x = x + (sigma_next - sigma) * v
        if on_step is not None:
            on_step(i, x)
        if (i + 1) % every == 0 or i == steps - 1:
            logger.info("%s: step %d/%d (t=%.0f) after %.1f s", label, i + 1, steps, timesteps[i],
                        time.perf_counter() - start)
    logger.debug("sampled %d videos of %s in %d steps", batch, tuple(video_shape), steps)
    return x.clamp(-1, 1)


def diffusers_cache_context(transformer: torch.nn.Module, name: str = "cond_uncond") -> StepContext:
    """`sample`'s `step_context` for a model whose diffusers transformer runs a cache hook
    (`transformer.enable_cache(FirstBlockCacheConfig(...))`, ...): the hooks keep their state in a
    named cache context, which must be set around each call, and SeaCache and MagCache read the
    step from it (diffusers before 0.42 takes the name only). `name` keys the state: the conditional
    and unconditional rows of a CFG batch run in one call here, so one context holds both."""
    takes_step = any(p.kind is inspect.Parameter.VAR_KEYWORD
                     for p in inspect.signature(transformer.cache_context).parameters.values())

    def context(step: int, timestep: float, sigma: float, steps: int) -> ContextManager[None]:
        if not takes_step:
            return transformer.cache_context(name)
        return transformer.cache_context(name, step_index=step, num_inference_steps=steps, timestep=timestep,
                                         sigma=sigma)
    return context


def _to_uint8(video: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> [0, 255] uint8, on the CPU."""
    return ((video.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def video_grid(videos: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """(B, C, F, H, W) or (C, F, H, W) -> (rows*H', cols*W', C) uint8: one row per video."""
    if videos.ndim == 4:
        videos = videos.unsqueeze(0)
    b, c, f, h, w = videos.shape
    frames = torch.nn.functional.pad(_to_uint8(videos), (0, pad, 0, pad), value=255)
    return frames.permute(0, 3, 2, 4, 1).reshape(b * (h + pad), f * (w + pad), c)


def save_video_strip(video: torch.Tensor, path: str | Path, scale: int = 2, fps: int = 6) -> Path:
    """Write (B, C, F, H, W) or (C, F, H, W) videos in [-1, 1].

    A `.gif` path gets an animated GIF (the batch side by side); anything else a PNG
    strip: one row per video, frames left to right.
    """
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    videos = video if video.ndim == 5 else video.unsqueeze(0)
    if path.suffix.lower() == ".gif":
        pixels = _to_uint8(videos).permute(2, 3, 0, 4, 1)                  # (F, H, B, W, C)
        f, h, b, w, c = pixels.shape
        images = [Image.fromarray(frame.reshape(h, b * w, c).numpy()) for frame in pixels]
        images = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in images]
        images[0].save(path, save_all=True, append_images=images[1:], duration=1000 // fps, loop=0)
    else:
        image = Image.fromarray(video_grid(videos).numpy())
        image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(path)
    return path


def save_contact_sheet(
    videos: torch.Tensor,  # (B, C, F, H, W) in [-1, 1]
    labels: Sequence[str],
    path: str | Path,
    scale: int = 2,
    label_width: int = 150,
) -> Path:
    """A PNG grid with one row per video (its frames left to right), its label on the left."""
    from PIL import Image, ImageDraw

    grid = Image.fromarray(video_grid(videos).numpy())
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    sheet = Image.new("RGB", (grid.width + label_width, grid.height), "white")
    sheet.paste(grid, (label_width, 0))
    draw = ImageDraw.Draw(sheet)
    row = grid.height // len(labels)
    for i, label in enumerate(labels):
        draw.text((4, i * row + row // 2 - 6), label, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
