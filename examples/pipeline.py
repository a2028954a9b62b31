"""scalingattn in a diffusers pipeline: a tiny `WanPipeline` with CFG, compiled and compared with dense.

    python examples/pipeline.py                      # density 0.25, 4 steps, guidance 5.0
    python examples/pipeline.py --density 1.0        # the compiled pipeline equals the dense one

The recipe is three lines (`compile_transformer` below): set the scheduler's timesteps, compile
the pipeline's transformer with `backend="scalingattn"` and those timesteps, call the pipeline as
usual. Passing the scheduler's own timesteps matters because FAST fits a density per (layer, step,
head) and the rewritten graph picks each step's masks from the timestep the pipeline feeds the
transformer: with the scheduler's values every call lands on the step it was fitted for (without
them the backend assumes even bins from 1000 to 0, which a shifted flow-matching schedule does
not follow).

Everything here is built from small configs with random weights (nothing is downloaded): the
transformer is the zoo's small Wan config (`scaling_compiler/demo/zoo.py`) with the VAE's 16
latent channels, the VAE a 3-channel `AutoencoderKLWan`, the text encoder a one-layer UMT5. A
tokenizer needs a vocabulary file, so prompts are made-up token ids encoded by that UMT5 and
handed to the pipeline as `prompt_embeds` / `negative_prompt_embeds`; a real pipeline takes
the prompt strings instead, nothing else changes. Wan runs CFG as two batch-1 calls per step
(conditional, then unconditional): one graph for both, with the same step's masks.
"""
from __future__ import annotations

import argparse
import math
import time
from typing import Any

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from scaling_compiler import ScalingAttnBackend
from scaling_compiler.demo import zoo

# (frames, height, width) of the video: 9 frames at 256x256 are 3x32x32 latents, 3x16x16 = 768
# tokens after the 2x2 patches, i.e. 6 blocks of 128 tokens per row: enough for a sparse mask.
VIDEO = (9, 256, 256)
PROMPT_TOKENS = 8


def build_pipeline(seed: int = 0) -> WanPipeline:
    """A tiny WanPipeline with random weights, seeded (the same pipeline on every call)."""
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    transformer = WanTransformer3DModel(**(zoo.ZOO["WanTransformer3DModel"].config
                                           | dict(in_channels=16, out_channels=16)))
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=64, d_model=transformer.config.text_dim, d_kv=8,
                                               d_ff=64, num_layers=1, num_heads=4))
    pipe = WanPipeline(tokenizer=None, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))  # Wan's flow shift at 480p
    for module in (vae, transformer, text_encoder):
        module.eval()  # UMT5's dropout off: two calls give the same embeddings
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def prompt_embeddings(pipe: WanPipeline, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt, negative prompt) embeddings, each (1, PROMPT_TOKENS, text_dim), from made-up token ids."""
    ids = torch.randint(1, pipe.text_encoder.config.vocab_size, (2, PROMPT_TOKENS),
                        generator=torch.Generator().manual_seed(seed))
    embeddings = pipe.text_encoder(ids).last_hidden_state
    return embeddings[:1], embeddings[1:]


def compile_transformer(pipe: WanPipeline, steps: int, **options: Any) -> ScalingAttnBackend:
    """The recipe: the scheduler's own timesteps, then the transformer compiled with them.

    With `torch.compile(..., backend="scalingattn", options={...})` the same lines work without
    the import; the backend object is used here to print its report afterwards.
    """
    pipe.scheduler.set_timesteps(steps)
    backend = ScalingAttnBackend(timesteps=pipe.scheduler.timesteps.tolist(), **options)
    pipe.transformer = torch.compile(pipe.transformer, backend=backend)
    return backend


def generate(pipe: WanPipeline, embeddings: tuple[torch.Tensor, torch.Tensor], steps: int, guidance: float,
             seed: int = 0, output_type: str = "pt") -> torch.Tensor:
    """One pipeline call; `output_type="pt"`: (1, frames, 3, height, width) in [0, 1]."""
    frames, height, width = VIDEO
    prompt, negative = embeddings
    with torch.no_grad():
        return pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, num_frames=frames, height=height,
                    width=width, num_inference_steps=steps, guidance_scale=guidance,
                    generator=torch.Generator().manual_seed(seed), output_type=output_type).frames


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 1.0) -> float:
    """PSNR in dB of videos in [0, peak] (inf when equal)."""
    mse = float((a.double() - b.double()).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the dense pipeline, then the compiled one from the same seed; print the report and the difference."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--density", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=5.0, help="CFG scale (> 1: CFG on)")
    parser.add_argument("--compiler", default="inductor", help="inner compiler: inductor, aot_eager or eager")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-type", default="pt", help="'pt' (decoded video) or 'latent'")
    args = parser.parse_args(argv)

    pipe = build_pipeline(args.seed)
    embeddings = prompt_embeddings(pipe, args.seed)
    start = time.perf_counter()
    dense = generate(pipe, embeddings, args.steps, args.guidance, args.seed, args.output_type)
    print(f"dense pipeline: {time.perf_counter() - start:.1f} s")

    backend = compile_transformer(pipe, args.steps, density=args.density, compiler=args.compiler)
    start = time.perf_counter()
    sparse = generate(pipe, embeddings, args.steps, args.guidance, args.seed, args.output_type)
    print(f"compiled pipeline (scalingattn, density {args.density:g}): {time.perf_counter() - start:.1f} s, "
          f"compile and calibration included\n")
    print(backend.report)
    print(backend.summary())
    max_diff = float((sparse - dense).abs().max())
    quality = f", PSNR {psnr(sparse, dense):.2f} dB" if args.output_type == "pt" else ""  # frames in [0, 1]
    print(f"\nscalingattn vs dense pipeline, same seed: max |difference| {max_diff:.3g}{quality}")
    return dict(dense=dense, sparse=sparse, backend=backend, max_diff=max_diff, timesteps=backend.config.timesteps)


if __name__ == "__main__":
    main()
