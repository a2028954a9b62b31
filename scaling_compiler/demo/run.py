"""`scalingattn demo`: compile the trained tiny video DiT, print the report, compare with dense.

On a GPU it also times one self-attention call at the Wan2.1-1.3B 480p shape, the block-sparse
op at the demo's density against dense SDPA: the tiny DiT's 9,216 tokens are too few for sparse
attention to pay (per-call costs such as mask decoding and launches are fixed), so the demo
shows both where it pays and which of the tiny model's sites the backend kept dense and why.
"""
from __future__ import annotations

import collections
import logging
import re
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from .. import ops  # noqa: F401  (registers torch.ops.scaling_compiler.block_sparse_attention)
from ..backend import ScalingAttnBackend
from ..kernels.bitmask import num_blocks, pack_block_mask

log = logging.getLogger(__name__)

# Demo video (frames, height, width) and sampling steps: the trained model's own size on a
# GPU; a smaller video and fewer steps on a CPU so that the demo ends in a few minutes there.
DEMO_SETTINGS = {"cuda": ((9, 64, 64), 30, torch.bfloat16), "cpu": ((5, 32, 32), 8, torch.float32)}
DEMO_PROMPT = "red circle bounce"
# one self-attention call of Wan2.1-1.3B at 480p x 81 frames: (B, H, S, D), token grid 21 x 30 x 52
WAN_1_3B_ATTENTION = (1, 12, 32760, 128)


def run_demo(density: float = 0.25, steps: int | None = None, repeats: int = 3,
             out: str | Path = "scalingattn-demo") -> int:
    """The body of `scalingattn demo`; prints as it goes and writes the two video strips to `out`."""
    from . import sampling, synthetic_videos, video_dit
    from .metrics import psnr, ssim

    device = "cuda" if torch.cuda.is_available() else "cpu"
    (frames, height, width), default_steps, dtype = DEMO_SETTINGS[device]
    steps = steps or default_steps
    model = video_dit.load_pretrained(device=device, dtype=dtype)
    tokens = synthetic_videos.parse_prompt(DEMO_PROMPT)[None].to(device)
    null = synthetic_videos.null_tokens(1, device)
    shape = (model.config.in_channels, frames, height, width)
    num_tokens = model.config.num_tokens(frames, height, width)
    print(f"demo: the trained tiny video DiT (diffusers WanTransformer3DModel, {model.config.num_layers} layers, "
          f"{model.config.num_attention_heads} heads) on {device}, {dtype}, video {frames}x{height}x{width} = "
          f"{num_tokens} tokens, prompt {DEMO_PROMPT!r}, {steps} steps")

    # the sampler's own timesteps: FAST fits its per-step densities to the steps that run
    backend = ScalingAttnBackend(density=density, timesteps=sampling.sampler_timesteps(steps))
    sparse = torch.compile(model, backend=backend, fullgraph=True)
    dense = torch.compile(model, fullgraph=True)  # inductor with dense SDPA: the fair baseline
    with torch.no_grad():
        start = time.perf_counter()
        sparse_video = sampling.sample(sparse, tokens, null, shape, seed=0, steps=steps,
                                       label="scalingattn sampling (step 1 compiles)")
        print(f"compiled with scalingattn and sampled in {time.perf_counter() - start:.1f} s\n")
        print(backend.report, "\n")
        start = time.perf_counter()
        dense_video = sampling.sample(model, tokens, null, shape, seed=0, steps=steps, label="dense sampling")
        print(f"sampled with dense eager attention in {time.perf_counter() - start:.1f} s")
        x, t, c = video_dit.example_inputs(model.config, batch=2, frames=frames, height=height, width=width,
                                           device=device, dtype=dtype)
        start = time.perf_counter()
        times = {}
        for name, fn in [("dense eager", model), ("dense inductor", dense), ("scalingattn", sparse)]:
            log.info("timing one CFG forward: %s%s", name, " (compiles first)" if name == "dense inductor" else "")
            times[name] = time_ms(lambda fn=fn: fn(x, t, c), repeats, device)
        print(f"compiled dense inductor and timed forwards in {time.perf_counter() - start:.1f} s")
        pays = None
        if device == "cuda":
            start = time.perf_counter()
            pays = attention_times(WAN_1_3B_ATTENTION, density, device, torch.bfloat16)
            print(f"timed one attention call at the Wan2.1-1.3B shape in {time.perf_counter() - start:.1f} s")

    print(f"\nsampled video vs dense, same noise: PSNR {float(psnr(sparse_video, dense_video)[0]):.2f} dB, "
          f"SSIM {float(ssim(sparse_video, dense_video)[0]):.4f}")
    if pays is not None:
        b, h, s, d = WAN_1_3B_ATTENTION
        print(f"where it pays: one self-attention call at the Wan2.1-1.3B 480p shape (B={b}, H={h}, S={s:,}, "
              f"D={d}, bf16), block-sparse at density {density:g} {pays['sparse_ms']:.2f} ms vs dense SDPA "
              f"{pays['dense_ms']:.2f} ms: {pays['dense_ms'] / pays['sparse_ms']:.2f}x")
    print(f"this tiny DiT ({num_tokens:,} tokens): {sites_summary(backend.reports)}")
    print(f"one CFG forward (batch 2), median of {repeats}: "
          + ", ".join(f"{k} {v:.1f} ms" for k, v in times.items())
          + f"; scalingattn at density {density:g} vs dense inductor "
          f"{times['dense inductor'] / times['scalingattn']:.2f}x"
          + (f" (at {num_tokens:,} tokens the per-call costs of sparse attention weigh more than at the "
             f"Wan shape above)" if pays is not None and times["scalingattn"] > times["dense inductor"] else ""))
    if device == "cpu":
        print("(on a CPU the sparse op is a block-wise PyTorch loop; the speedup target is the GPU kernel)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, video in [("dense", dense_video), ("scalingattn", sparse_video)]:
        print(f"wrote {sampling.save_video_strip(video[0], out / f'{name}.gif')}")
    return 0


def sites_summary(reports: Iterable[Any]) -> str:
    """One sentence from the reports' sites: how many are sparse, and which stayed dense and why."""
    # each site once (a later graph of the same model, e.g. after a recompile, replaces its decision)
    sites = list({site.name: site for report in reports for site in report.sites}.values())
    sparse = [s for s in sites if s.status == "sparse"]
    dense: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    for site in sites:
        if site.status != "sparse":  # reasons that differ only in their figures count as one
            dense[(site.kind, re.sub(r"\d+(\.\d+)?", "#", site.reason))].append(site.reason)
    text = f"scalingattn made {len(sparse)} of {len(sites)} attention sites sparse"
    if not dense:
        return text + " and kept none dense"
    kept = "; ".join(f"{len(reasons)} {kind}-attention site{'s' if len(reasons) > 1 else ''}, why: {reasons[0]}"
                     for (kind, _), reasons in sorted(dense.items(), key=lambda item: -len(item[1])))
    return f"{text} and kept {len(sites) - len(sparse)} dense: {kept}"


def attention_times(shape: tuple[int, int, int, int], density: float, device: str, dtype: torch.dtype,
                    repeats: int = 20, seed: int = 0) -> dict[str, float]:
    """Median ms of one `torch.ops.scaling_compiler.block_sparse_attention` call at `shape` (B, H, S, D)
    with random per-head 128x128 block masks at `density` (the diagonal block always kept), and of
    dense SDPA on the same q, k, v; also the density the masks really keep."""
    batch, heads, seq, dim = shape
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, seq, dim, generator=g).to(device, dtype) for _ in range(3))
    blocks = num_blocks(seq)
    block_mask = torch.rand(heads, blocks, blocks, generator=g) < density
    block_mask |= torch.eye(blocks, dtype=torch.bool)  # no empty query row
    words = pack_block_mask(block_mask).to(device)
    scale = dim**-0.5
    with torch.no_grad():
        sparse_ms = time_ms(lambda: torch.ops.scaling_compiler.block_sparse_attention(q, k, v, words, scale),
                            repeats, device)
        dense_ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale), repeats, device)
    return {"sparse_ms": sparse_ms, "dense_ms": dense_ms, "density": float(block_mask.float().mean())}


def time_ms(fn: Callable[[], Any], repeats: int, device: str) -> float:
    """Median wall time of `fn` in ms over `repeats` calls after one warm-up call."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
