"""End-to-end step latency of Wan2.1 at real scale: dense inductor against `scalingattn`, side by side.

    python -m benchmarks.end_to_end                                                   # Wan2.1-1.3B, 480p 81 frames, batch 1, all variants
    python -m benchmarks.end_to_end --sections 14b                                    # Wan2.1-14B, 720p 81 frames, first --layers (2) layers
    python -m benchmarks.end_to_end --batch 2 --variants dense,uniform-0.1,fast-0.25  # CFG batch
    python -m benchmarks.end_to_end --cuda-graphs                                     # also dense and density 0.1 under CUDA graphs
    python -m benchmarks.end_to_end --quick --out-dir /tmp/e2e                        # tiny Wan on the CPU, fp32, 1 thread: checks the flow
    python -m benchmarks.end_to_end --variants dense,uniform-0.1+fp8+f8lin,uniform-0.1,uniform-0.1+fp8,dense+f8lin \
        --no-dense-recompile                                                          # issue #18's stack, layer by layer

Model: diffusers `WanTransformer3DModel` at the Wan2.1 configurations (random seeded weights, bf16
with the modules diffusers keeps in float32 left in float32, eval, no grad), one denoising step =
one forward. 1.3B at 480p: latent 16x21x60x104 -> 32,760 tokens; 14B at 720p: 16x21x90x160 ->
75,600 tokens; 512 text tokens of width 4096. Dense SDPA runs with cuDNN attention first in the
priority order (the fastest dense kernel on an H100; `--sdpa default` keeps torch's order), for
every variant (our cross-attention stays dense SDPA).

Variants (one process, same weights and inputs, in this order by default):
- `dense`: `torch.compile(model)` (inductor, dense SDPA). Every ratio is against it.
- `uniform-<d>`: `torch.compile(model, backend=ScalingAttnBackend(density=d, schedule="uniform",
  num_steps=1))`, WEST masks (the string form `backend="scalingattn", options=...` is the same
  backend; the object keeps the PassReports). `num_steps=1`: a uniform density is the same at
  every step, so the masks are one static set and every uniform density compiles to the same
  inductor graph (masks are graph inputs), which inductor's FX graph cache then reuses.
- `salad-<d>`: `uniform-<d>` plus SALAD's linear branch at every sparse site (`linear_branch=True`),
  its gates and projections set to seeded random values after the first call (the compile creates
  them; a tuned file is not needed for timing). `branch_overhead` is its step time over
  `uniform-<d>`'s of the same run, minus 1 (the issue's target: at most 10% at density 0.1).
- `fast-<d>`: the FAST schedule at mean density d over the 50 steps of the sampler
  (`timesteps=` the 50 flow-matching timesteps, shift 3 at 480p, 5 at 720p). The masks of each
  step are picked in the graph from the timestep input; `--fast-steps` (10) evenly spaced steps of
  the 50 are timed and their latencies averaged.
- a `+cg` suffix runs the variant under CUDA graphs: `torch.compile(..., mode="reduce-overhead")`
  for dense and ours alike (torch hands `mode` to our backend, which passes that mode's settings to
  its inner inductor). `cudagraph_skips` counts graphs inductor refused to capture.
- stack layers, more `+<modifier>` suffixes in any order, each at most once (issue #18):
  - `+fp8`: our backend with option `attention_dtype="fp8"` (sparse sites call
    `block_sparse_attention_fp8`; not on `dense`). It needs bf16/fp16 inputs: `fp8_sites` of
    `sparse_sites` ran FP8, `fp8_refused` says why the others did not (--quick's fp32: all refused,
    which the output notes under the table).
  - `+f8lin`: torchao float8 dynamic activation + weight linears, `quantize_(model.blocks,
    Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))`, on a copy of the model built
    from the same seed (quantize_ works in place; from then on both models count in every peak
    memory); `dense+f8lin` isolates the linears' gain.
    `float8_linears` counts the Float8Tensor weights of every row (0 without +f8lin).
  - `+fbc`: diffusers' FirstBlockCache (`model.enable_cache(FirstBlockCacheConfig(threshold=
    --fbc-threshold))`, default 0.2, the example of diffusers' docs: a step whose first-block residual
    moved less than that, relative to the previous step's, skips the other blocks). A cache skips
    nothing in a single step, so these variants run a mode of their own: sequences of `--cache-steps`
    (10; --quick 3) consecutive sampler steps from the middle of the 50, realistic timesteps, the
    latents moved by Euler updates with the model's output, the cache reset before each sequence;
    latency is the mean step time, `cache_skip_rate` the share of steps the cache skipped (read from
    the hook's state), `cache_computed` per step. Random weights: the skip rate is not a trained
    model's, and the quality cost is not measured here (that is the quality harness's). Not with +cg.
  A layer that cannot run here skips the variant with the reason in the table and the JSON (never runs
  it without that layer): +f8lin without torchao, on the CPU or below compute capability 8.9; +fp8
  below 8.9 on a GPU; +cg on the CPU. A `stack` line per variant that no other stacks on gives each
  layer's contribution: the step-time ratios of consecutive measured variants of its chain (dense,
  uniform-0.1, uniform-0.1+fp8, uniform-0.1+fp8+f8lin), in the JSON's `stacks`.

Measured per variant:
- latency: median of `--reps` synchronised calls after `--warmup` calls (wall clock, host overhead
  included), per timed timestep; the variant's latency is the mean over its timed timesteps.
- attention share: one profiled call per timed timestep (torch.profiler, CUDA kernels): time in
  attention kernels (SDPA's cuDNN/flash/memory-efficient kernels, our `_attn_fwd` and
  `_decode_mask_rows`; inductor's own `triton_*` kernels never count) over all kernel time.
  `kernel_ms` is the summed kernel time of one call; far below the latency means host overhead.
  On the CPU (--quick): time in the outermost attention ops over the whole call.
- compile: wall time of the first call (dynamo, our passes incl. WEST calibration, inductor, the
  first run with Triton autotuning). Caches start empty: SCALINGATTN_CACHE_DIR, TORCHINDUCTOR_CACHE_DIR
  and TRITON_CACHE_DIR point at fresh temporary folders (--compile-cache-dir keeps inductor's), so
  the first WEST variant calibrates ("cold"), later ones load the topology; `compile_state` says
  which caches hit. `dense` is compiled a second time after `torch._dynamo.reset()` (its warm
  compile); the second uniform variant is ours (topology and FX graph cached); FAST has the topology
  cached but a graph of its own (compared with dense's cold compile). Triton kernels compiled for an
  earlier variant are reused by later ones, in memory and on disk. Calibration runs on
  `--calibration-samples` (2) samples, not the backend's default 8, to fit the time limit;
  `calibration_s` is reported so the cold compile at 8 samples can be extrapolated.
- memory: `torch.cuda.max_memory_allocated` over the timed calls (after a reset), and over the
  first call (`compile_peak_gib`: includes calibration).
- graphs: graphs compiled on the first call, recompiles (graphs compiled after it: must be 0,
  FAST included), graph breaks, FX graph cache hits/misses.
- from the PassReport: FLOP-weighted self-attention density (mean over steps; for FAST also at the
  timed steps), predicted attention speedup (cost model), and `amdahl_speedup`, the step speedup
  those predict with the dense variant's attention share: 1 / ((1 - a) + a / s).

Results: a table on stdout, progress on stderr, and benchmarks/results/e2e_<device>_<date>_<tag>.json
rewritten after every variant (a timeout keeps what was measured). No variant starts after
--deadline-s seconds; the rest are recorded as skipped.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import gc
import importlib
import itertools
import json
import logging
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from tabulate import tabulate

from benchmarks.common import RESULTS_DIR, cudnn_first, one_thread
from scaling_compiler import PassReport, ScalingAttnBackend
from scaling_compiler.cache import CACHE_DIR_ENV_VAR
from scaling_compiler.cost_model import slug
from scaling_compiler.demo.sampling import diffusers_cache_context, sigma_schedule
from scaling_compiler.demo.zoo import ZOO

START = time.monotonic()
SAMPLER_STEPS = 50
DEFAULT_VARIANTS = {  # acceptance-critical first: a deadline skips from the end
    "1.3b": ["dense", "uniform-0.1", "salad-0.1", "fast-0.25", "uniform-0.25", "uniform-1.0"],
    "14b": ["dense", "uniform-0.1", "uniform-0.25"],
    "tiny": ["dense", "uniform-0.1", "fast-0.25", "uniform-0.25", "uniform-1.0"],
}
CUDA_GRAPH_VARIANTS = ["dense+cg", "uniform-0.1+cg"]
# attention kernels by name; inductor's generated kernels (triton_*) may carry SDPA in their names
ATTENTION_KERNEL = re.compile(r"flash|fmha|sdpa|attention|_attn_fwd|_decode_mask_rows", re.IGNORECASE)
ATTENTION_OP = re.compile(r"scaled_dot_product|block_sparse_attention")
FBC_LEADER_HOOK = "fbc_leader_block_hook"  # diffusers' name of FirstBlockCache's hook on the first block
WARMUP_SEQUENCES = 4  # +fbc: at most this many untimed sequences
FBC_THRESHOLD = 0.2  # FirstBlockCache's relative first-block residual change below which a step is skipped
# the acceptance targets (H100, Wan2.1-1.3B 480p)
TARGETS = {"uniform-0.1": 2.3, "fast-0.25": 1.9, "uniform-0.1+fp8+f8lin": 3.0, "warm_compile_ratio": 1.2,
           "peak_memory_ratio": 1.05, "branch_overhead": 0.10}

WAN_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
WAN_14B = WAN_1_3B | dict(num_attention_heads=40, ffn_dim=13824, num_layers=40)


@dataclasses.dataclass(frozen=True)
class Section:
    name: str
    config: dict[str, Any]  # WanTransformer3DModel kwargs
    latent: tuple[int, int, int]  # (frames, height, width) of the 16-channel latent
    text_len: int
    flow_shift: float  # the sampler's time shift (Wan: 3 at 480p, 5 at 720p)

    @property
    def tokens(self) -> int:
        _, ph, pw = self.config["patch_size"]
        return self.latent[0] * (self.latent[1] // ph) * (self.latent[2] // pw)


SECTIONS = {
    "1.3b": Section("wan2.1-1.3b-480p", WAN_1_3B, (21, 60, 104), 512, 3.0),
    "14b": Section("wan2.1-14b-720p", WAN_14B, (21, 90, 160), 512, 5.0),
    "tiny": Section("tiny-wan-cpu", ZOO["WanTransformer3DModel"].config, (4, 32, 32), 16, 3.0),  # --quick
}


MODIFIERS = ("cg", "fp8", "f8lin", "fbc")  # the `+<modifier>` suffixes of a variant spec, any order, each once
VARIANT_GRAMMAR = ("dense, uniform-<d>, fast-<d> or salad-<d> with d in (0, 1], then any of +cg, +fp8 (not on dense), "
                   "+f8lin, +fbc, each at most once")


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    schedule: str | None  # None: dense inductor; "uniform" | "fast": scalingattn
    density: float
    modifiers: tuple[str, ...] = ()  # of MODIFIERS, as written
    linear_branch: bool = False  # salad-<d>: uniform-<d> plus SALAD's linear branches

    @property
    def cuda_graphs(self) -> bool:
        return "cg" in self.modifiers

    @property
    def fp8(self) -> bool:
        return "fp8" in self.modifiers

    @property
    def f8lin(self) -> bool:
        return "f8lin" in self.modifiers

    @property
    def fbc(self) -> bool:
        return "fbc" in self.modifiers

    @classmethod
    def parse(cls, spec: str) -> "Variant":
        base, *modifiers = spec.split("+")
        if set(modifiers) - set(MODIFIERS) or len(set(modifiers)) != len(modifiers):
            raise ValueError(f"bad variant {spec!r}: {VARIANT_GRAMMAR}")
        if {"fbc", "cg"} <= set(modifiers):
            raise ValueError(f"bad variant {spec!r}: +fbc keeps tensors across calls, which CUDA graph replays "
                             "overwrite: not with +cg")
        if base == "dense":
            if "fp8" in modifiers:
                raise ValueError(f"bad variant {spec!r}: +fp8 is an option of our backend (dense runs SDPA)")
            return cls(spec, None, 1.0, tuple(modifiers))
        match = re.fullmatch(r"(uniform|fast|salad)-([0-9.]+)", base)
        if match is None or not 0.0 < float(match[2]) <= 1.0:
            raise ValueError(f"bad variant {spec!r}: {VARIANT_GRAMMAR}")
        if match[1] == "salad":
            return cls(spec, "uniform", float(match[2]), tuple(modifiers), linear_branch=True)
        return cls(spec, match[1], float(match[2]), tuple(modifiers))


@dataclasses.dataclass(frozen=True)
class Settings:
    device: str
    dtype: torch.dtype
    dense_backend: str  # "inductor" on the GPU; "aot_eager" for --quick on the CPU
    reps: int
    warmup: int
    fast_steps: int
    calibration_samples: int
    recompile_dense: bool
    seed: int
    cache_steps: int  # +fbc: consecutive sampler steps per timed sequence
    fbc_threshold: float  # +fbc: FirstBlockCacheConfig(threshold=...)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


@dataclasses.dataclass
class VariantResult:
    section: str
    batch: int
    variant: str
    backend: str
    options: dict[str, Any]
    cuda_graphs: str | None = None  # how CUDA graphs were switched on
    status: str = "ok"  # "ok" | "failed: ..." | "skipped: ..."
    timed_timesteps: list[float] = dataclasses.field(default_factory=list)
    step_latency_ms: list[float] = dataclasses.field(default_factory=list)  # median per timed timestep
    latency_ms: float | None = None  # mean of step_latency_ms
    speedup: float | None = None  # dense latency / latency, same section and batch
    branch_overhead: float | None = None  # salad-<d>: latency / uniform-<d>'s latency - 1
    attention_share: float | None = None
    kernel_ms: float | None = None  # summed kernel time of one call (CUDA)
    attention_kernels: dict[str, float] = dataclasses.field(default_factory=dict)  # name -> ms per call
    top_kernels: dict[str, float] = dataclasses.field(default_factory=dict)
    compile_s: float | None = None  # first call
    compile_state: str = ""
    recompile_s: float | None = None  # dense only: a fresh compile after torch._dynamo.reset()
    calibration_s: float | None = None
    peak_gib: float | None = None
    peak_vs_dense: float | None = None
    compile_peak_gib: float | None = None
    graphs: int | None = None
    recompiles: int | None = None
    graph_breaks: int | None = None
    fx_cache: dict[str, int] = dataclasses.field(default_factory=dict)
    cudagraph_skips: int | None = None
    self_density: float | None = None  # FLOP-weighted over self-attention sites, mean over steps
    timed_density: float | None = None  # the same at the timed timesteps
    predicted_attention_speedup: float | None = None
    amdahl_speedup: float | None = None
    mask_mib: float | None = None
    topology_origin: str | None = None
    sparse_sites: int | None = None  # our backend: sites that ran a sparse op
    fp8_sites: int | None = None  # +fp8: sparse sites that ran the FP8 op
    fp8_refused: dict[str, int] = dataclasses.field(default_factory=dict)  # +fp8: why the others did not -> sites
    float8_linears: int | None = None  # nn.Linear weights that are torchao Float8Tensors (+f8lin; else 0)
    cache_threshold: float | None = None  # +fbc
    cache_computed: list[bool] = dataclasses.field(default_factory=list)  # +fbc: per timed step, blocks 1.. ran
    cache_skip_rate: float | None = None  # +fbc: skipped steps (the first block alone ran) / timed steps
    reports: list[dict[str, Any]] = dataclasses.field(default_factory=list, repr=False)
    error: str | None = None


# ----------------------------------------------------------------------------------------------
# Model and inputs
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# Stack layers: torchao float8 linears (+f8lin), FirstBlockCache (+fbc), and when they cannot run
# ----------------------------------------------------------------------------------------------
FLOAT8_CAPABILITY = (8, 9)  # torchao's float8 matmuls and our FP8 attention kernel: sm89 (Ada) or later


def cuda_capability() -> tuple[int, int]:
    return torch.cuda.get_device_capability()


def sm() -> str:
    return "sm_" + "".join(map(str, cuda_capability()))


def skip_reason(variant: Variant, settings: Settings) -> str | None:
    """Why a layer of the variant cannot run here (it is then skipped, never run without that layer)."""
    if variant.cuda_graphs and not settings.cuda:
        return "CUDA graphs need a GPU"
    if variant.f8lin:
        reason = float8_linears_unavailable(settings)
        if reason:
            return reason
    if variant.fp8 and settings.cuda and cuda_capability() < FLOAT8_CAPABILITY:
        return f"FP8 attention needs compute capability >= 8.9, this GPU is {sm()}"
    if variant.fbc and not hasattr(importlib.import_module("diffusers.hooks"), "FirstBlockCacheConfig"):
        return "this diffusers has no FirstBlockCache"
    return None


def float8_linears_unavailable(settings: Settings) -> str | None:
    try:
        importlib.import_module("torchao.quantization")
    except ImportError:
        return "torchao float8 linears need torchao (pip install torchao)"
    if not settings.cuda:
        return ("torchao float8 linears need a GPU of compute capability >= 8.9 (torchao refuses the CPU, and "
                "inductor cannot compile them there)")
    if cuda_capability() < FLOAT8_CAPABILITY:
        return f"torchao float8 linears need compute capability >= 8.9, this GPU is {sm()}"
    return None


def quantize_linears(model: torch.nn.Module) -> int:
    """torchao float8 dynamic activation + weight with per-row scales on the transformer blocks, as issue
    #18 quotes; returns how many linear weights became float8."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    quantize_(model.blocks, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    return float8_linears(model)


def float8_linears(model: torch.nn.Module) -> int:
    return sum(type(m.weight).__name__ == "Float8Tensor" for m in model.modules() if isinstance(m, torch.nn.Linear))


@dataclasses.dataclass
class Models:
    """A section's model, and its float8-linear copy (same seed, same weights) built on first use:
    `quantize_` changes a model in place, so the unquantised variants keep their own."""

    section: Section
    settings: Settings
    plain: torch.nn.Module
    float8: torch.nn.Module | None = None

    def for_variant(self, variant: Variant) -> torch.nn.Module:
        if not variant.f8lin:
            return self.plain
        if self.float8 is None:
            model = build_model(self.section, self.settings)
            if quantize_linears(model) == 0:
                raise RuntimeError("quantize_ left every linear of the blocks unquantised")
            self.float8 = model
        return self.float8


@contextlib.contextmanager
def first_block_cache(model: torch.nn.Module, variant: Variant, threshold: float) -> Iterator[None]:
    """diffusers' FirstBlockCache on the model while the variant runs (+fbc); the model is shared, so off after."""
    if not variant.fbc:
        yield
        return
    from diffusers.hooks import FirstBlockCacheConfig

    model.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    try:
        yield
    finally:
        model.disable_cache()


@dataclasses.dataclass
class CachedSequence:
    """Consecutive sampler steps under a step cache, from the inputs' latents with Euler updates (the
    cache compares each step's first-block residual with the previous step's, so the latents and
    timesteps must move as a sampler moves them). Each run starts from a reset cache."""

    model: torch.nn.Module  # the uncompiled transformer: its hooks keep the cache state
    compiled: Callable[..., Any]
    inputs: Inputs
    timesteps: list[float]  # the sampler's
    steps: list[int]  # indices into timesteps, consecutive

    def run(self, cuda: bool, limit: int | None = None) -> tuple[list[float], list[bool]]:
        """Milliseconds of each step and whether it ran the blocks after the first (not a cache hit)."""
        self.model._reset_stateful_cache()
        context = diffusers_cache_context(self.model)
        latents, times, computed = self.inputs.hidden_states, [], []
        for i in self.steps[:limit]:
            t, sigma = self.timesteps[i], self.timesteps[i] / 1000.0
            sigma_next = self.timesteps[i + 1] / 1000.0 if i + 1 < len(self.timesteps) else 0.0
            out: list[torch.Tensor] = []
            with context(i, t, sigma, len(self.timesteps)):
                kwargs = self.inputs.at(t) | {"hidden_states": latents}
                times.append(timed_call(lambda: out.append(self.compiled(**kwargs)[0]), cuda))
                computed.append(bool(self._state().should_compute))
            latents = latents + (sigma_next - sigma) * out[0].to(latents.dtype)
        return times, computed

    def _state(self) -> Any:
        from diffusers.hooks import HookRegistry

        registry = HookRegistry.check_if_exists_or_initialize(self.model.blocks[0])
        return registry.get_hook(FBC_LEADER_HOOK).state_manager.get_state()


# ----------------------------------------------------------------------------------------------
# Measuring one variant
# ----------------------------------------------------------------------------------------------
def backend_options(variant: Variant, settings: Settings, timesteps: list[float]) -> dict[str, Any]:
    inner = "inductor" if settings.dense_backend == "inductor" else "aot_eager"
    options = dict(density=variant.density, schedule=variant.schedule, compiler=inner,
                   calibration_samples=settings.calibration_samples)
    if variant.schedule == "uniform":
        options["num_steps"] = 1
    else:
        options["timesteps"] = tuple(timesteps)
    if variant.linear_branch:
        options["linear_branch"] = True
    if variant.fp8:
        options["attention_dtype"] = "fp8"
    return options


def randomize_branches(backend: ScalingAttnBackend, seed: int) -> int:
    """Seeded random gates and projections for the SALAD branches the compile created (a fresh branch's
    projection is zero); returns how many branches. The compiled graph reads the parameters at run time."""
    generator = torch.Generator().manual_seed(seed)
    branches = list(backend.linear_branches.sites.values())
    with torch.no_grad():
        for param in backend.linear_branches.parameters():
            values = torch.randn(param.shape, generator=generator) * param.shape[-1] ** -0.5
            param.copy_(values.to(param.device, param.dtype))
    return len(branches)


def compile_model(model: torch.nn.Module, variant: Variant, settings: Settings,
                  options: dict[str, Any]) -> tuple[Callable[..., Any], ScalingAttnBackend | None]:
    mode = "reduce-overhead" if variant.cuda_graphs else None
    if variant.schedule is None:
        return torch.compile(model, backend=settings.dense_backend, mode=mode, dynamic=False), None
    backend = ScalingAttnBackend(**options)
    return torch.compile(model, backend=backend, mode=mode, dynamic=False), backend


def counters() -> dict[str, int]:
    c = torch._dynamo.utils.counters
    return {
        "graphs": c["stats"]["unique_graphs"], "graph_breaks": sum(c["graph_break"].values()),
        "fx_hit": c["inductor"]["fxgraph_cache_hit"], "fx_miss": c["inductor"]["fxgraph_cache_miss"],
        "fx_bypass": c["inductor"]["fxgraph_cache_bypass"], "cudagraph_skips": c["inductor"]["cudagraph_skips"],
    }


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


def synchronize(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def timed_call(call: Callable[[], Any], cuda: bool) -> float:
    """Milliseconds of one synchronised call."""
    synchronize(cuda)
    start = time.perf_counter()
    call()
    synchronize(cuda)
    return (time.perf_counter() - start) * 1e3


def time_steps(call: Callable[[float], Any], timesteps: list[float], reps: int, cuda: bool) -> list[float]:
    """Median milliseconds of `reps` calls at each timestep."""
    return [statistics.median(timed_call(lambda: call(t), cuda) for _ in range(reps)) for t in timesteps]


def release() -> None:
    """Drop compiled code (and CUDA graph pools) so the next variant starts fresh."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        from torch._inductor.cudagraph_trees import reset_cudagraph_trees

        reset_cudagraph_trees()
        torch.cuda.empty_cache()


def peak_gib(cuda: bool) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if cuda else None


def reset_peak(cuda: bool) -> None:
    if cuda:
        torch.cuda.reset_peak_memory_stats()


def measure_variant(models: Models, inputs: Inputs, section_key: str, batch: int, variant: Variant,
                    settings: Settings, timesteps: list[float]) -> VariantResult:
    options = backend_options(variant, settings, timesteps) if variant.schedule else {}
    backend_name = "scalingattn" if variant.schedule else settings.dense_backend
    result = VariantResult(section_key, batch, variant.name, backend_name, _jsonable(options))
    if variant.cuda_graphs:
        result.cuda_graphs = "torch.compile(mode='reduce-overhead')"
    result.timed_timesteps = timed_timesteps(variant, timesteps, settings)
    model = models.for_variant(variant)
    result.float8_linears = float8_linears(model)
    release()
    with first_block_cache(model, variant, settings.fbc_threshold):
        compiled, backend = compile_model(model, variant, settings, options)
        with torch.no_grad():
            before = counters()
            if variant.fbc:
                steps = timed_steps(variant, timesteps, settings)
                sequence = CachedSequence(model, compiled, inputs, timesteps, steps)
                compiled_first = time_sequences(sequence, variant, settings, result, backend, before)
            else:
                compiled_first = time_per_step(compiled, inputs, variant, settings, result, backend, before)
            later = delta(before, counters())
    result.graphs, result.graph_breaks = compiled_first["graphs"], compiled_first["graph_breaks"]
    result.recompiles = later["graphs"] - compiled_first["graphs"]
    result.fx_cache = {k: compiled_first[f"fx_{k}"] for k in ("hit", "miss", "bypass")}
    result.cudagraph_skips = later["cudagraph_skips"] if variant.cuda_graphs else None
    if backend is not None:
        summarise_reports(backend.reports, result)
    result.compile_state = compile_state(result)
    if variant.schedule is None and variant.modifiers == () and settings.recompile_dense:
        del compiled
        result.recompile_s = warm_recompile(model, inputs.at(result.timed_timesteps[0]), settings)
    return result


def after_first_call(result: VariantResult, variant: Variant, backend: ScalingAttnBackend | None,
                     settings: Settings) -> None:
    log(f"  compiled in {result.compile_s:.1f} s")
    if variant.linear_branch:
        log(f"  {randomize_branches(backend, settings.seed)} linear branches set to random weights")
    for report in backend.reports if backend else []:
        log("  " + "\n  ".join(str(report).split("\n")[:2]))


def time_per_step(compiled: Callable[..., Any], inputs: Inputs, variant: Variant, settings: Settings,
                  result: VariantResult, backend: ScalingAttnBackend | None,
                  before: dict[str, int]) -> dict[str, int]:
    """First call (compile), warm-up, `reps` calls per timed timestep, one profiled call per timed timestep;
    returns the counters' change over the first call."""
    def call(t: float) -> Any:
        if variant.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(**inputs.at(t))

    first, cuda = result.timed_timesteps[0], settings.cuda
    reset_peak(cuda)
    result.compile_s = timed_call(lambda: call(first), cuda) / 1e3
    result.compile_peak_gib = peak_gib(cuda)
    compiled_first = delta(before, counters())
    after_first_call(result, variant, backend, settings)
    for _ in range(settings.warmup):
        call(first)
    reset_peak(cuda)
    result.step_latency_ms = time_steps(call, result.timed_timesteps, settings.reps, cuda)
    result.peak_gib = peak_gib(cuda)
    result.latency_ms = statistics.fmean(result.step_latency_ms)
    log(f"  latency {result.latency_ms:.2f} ms (steps: {', '.join(f'{x:.1f}' for x in result.step_latency_ms)})")
    if not variant.cuda_graphs:  # kernels inside graph replays are not attributed
        def run_timed_steps() -> None:
            for t in result.timed_timesteps:
                call(t)

        profile(run_timed_steps, len(result.timed_timesteps), cuda, result)
    return compiled_first


def time_sequences(sequence: CachedSequence, variant: Variant, settings: Settings, result: VariantResult,
                   backend: ScalingAttnBackend | None, before: dict[str, int]) -> dict[str, int]:
    """+fbc: the first step (compile); untimed sequences until one compiles nothing (a cache hit runs graphs
    of its own, and the second sequence, from a reset cache, one more), at least `warmup`; then `reps`
    sequences: per step the median, the latency their mean; the skip rate from the last sequence; one
    profiled sequence. Returns the counters' change over the first call."""
    cuda = settings.cuda
    reset_peak(cuda)
    result.compile_s = sequence.run(cuda, limit=1)[0][0] / 1e3
    result.compile_peak_gib = peak_gib(cuda)
    compiled_first = delta(before, counters())
    after_first_call(result, variant, backend, settings)
    for done in range(1, WARMUP_SEQUENCES + 1):
        graphs = counters()["graphs"]
        sequence.run(cuda)
        if done >= settings.warmup and counters()["graphs"] == graphs:
            break
    reset_peak(cuda)
    runs = [sequence.run(cuda) for _ in range(settings.reps)]
    result.peak_gib = peak_gib(cuda)
    result.step_latency_ms = [statistics.median(step) for step in zip(*(times for times, _ in runs))]
    result.latency_ms = statistics.fmean(result.step_latency_ms)
    result.cache_threshold, result.cache_computed = settings.fbc_threshold, runs[-1][1]
    result.cache_skip_rate = result.cache_computed.count(False) / len(result.cache_computed)
    log(f"  latency {result.latency_ms:.2f} ms per step over {len(result.cache_computed)} consecutive steps, "
        f"{result.cache_skip_rate:.0%} skipped by the cache")
    if not variant.cuda_graphs:
        profile(lambda: sequence.run(cuda), len(sequence.steps), cuda, result)
    return compiled_first


def warm_recompile(model: torch.nn.Module, inputs: dict[str, Any], settings: Settings) -> float | None:
    """Seconds of the first call of a fresh dense compile after torch._dynamo.reset() (caches warm)."""
    release()
    try:
        recompiled = torch.compile(model, backend=settings.dense_backend, dynamic=False)
        with torch.no_grad():
            seconds = timed_call(lambda: recompiled(**inputs), settings.cuda) / 1e3
    except Exception as error:  # noqa: BLE001 - the dense measurements stand without it
        log(f"  warm recompile FAILED: {error!r}")
        return None
    log(f"  warm recompile in {seconds:.1f} s")
    return seconds


def profile(run: Callable[[], Any], calls: int, cuda: bool, result: VariantResult) -> None:
    """Attention share, kernel time per call and the heaviest kernels of `calls` profiled calls."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, record_function

    # CPU activity too on the GPU: without it kernels have been seen to go missing from traces
    with torch.profiler.profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        with record_function("e2e_calls"):
            run()
        synchronize(cuda)
    events = prof.events()
    by_name: dict[str, float] = {}
    if cuda:
        for e in events:
            # the record_function range also shows on the GPU timeline: it is no kernel
            if e.device_type == DeviceType.CUDA and e.name != "e2e_calls":
                by_name[e.name] = by_name.get(e.name, 0.0) + e.time_range.elapsed_us() / 1e3 / calls
        total = sum(by_name.values())
        attention = {n: ms for n, ms in by_name.items() if ATTENTION_KERNEL.search(n) and not n.startswith("triton_")}
        result.kernel_ms = total
    else:
        total = sum(e.cpu_time_total for e in events if e.name == "e2e_calls") / 1e3 / calls
        attention = {}
        for e in events:
            if ATTENTION_OP.search(e.name) and not _has_ancestor(e, ATTENTION_OP):
                attention[e.name] = attention.get(e.name, 0.0) + e.cpu_time_total / 1e3 / calls
            by_name[e.name] = by_name.get(e.name, 0.0) + e.self_cpu_time_total / 1e3 / calls
    result.attention_share = sum(attention.values()) / total if total else None
    result.attention_kernels = _top(attention, 6)
    result.top_kernels = _top({n: ms for n, ms in by_name.items() if n != "e2e_calls"}, 8)
    share = "-" if result.attention_share is None else f"{result.attention_share:.1%}"
    log(f"  attention share {share}" + (f", kernels {total:.1f} ms per call" if cuda else ""))


def _has_ancestor(event: Any, pattern: re.Pattern) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if pattern.search(parent.name):
            return True
        parent = parent.cpu_parent
    return False


def _top(times: dict[str, float], n: int) -> dict[str, float]:
    return {name[:120]: round(ms, 4) for name, ms in sorted(times.items(), key=lambda kv: -kv[1])[:n]}


def summarise_reports(reports: list[PassReport], result: VariantResult) -> None:
    """Density, predicted attention speedup, mask memory and calibration time from the PassReports."""
    result.reports = [r.to_dict() for r in reports]
    result.calibration_s = sum(r.calibration_seconds for r in reports)
    result.mask_mib = sum(r.mask_bytes for r in reports) / 2**20
    result.topology_origin = "; ".join(r.topology_origin for r in reports)
    sites = [s for r in reports for s in r.sites if s.kind != "cross"]
    flops = sum(s.dense_flops for s in sites)
    if flops:
        result.self_density = sum(s.dense_flops * s.density for s in sites) / flops
        result.timed_density = sum(s.dense_flops * d for s, d in _timed_site_densities(reports, result)) / flops
    sparse = [s for s in sites if s.predicted_ms is not None]
    if sparse:
        result.predicted_attention_speedup = sum(s.dense_ms for s in sparse) / sum(s.predicted_ms for s in sparse)
    ran_sparse = [s for r in reports for s in r.sparse_sites]
    result.sparse_sites = len(ran_sparse)
    if result.options.get("attention_dtype") == "fp8":
        result.fp8_sites = sum(s.attention_dtype == "fp8" for s in ran_sparse)
        result.fp8_refused = dict(collections.Counter(s.fp8_reason for s in ran_sparse if s.fp8_reason))


def _timed_site_densities(reports: list[PassReport], result: VariantResult) -> Iterator[tuple[Any, float]]:
    """Each self-attention site with its kept fraction averaged over the timed timesteps."""
    for report in reports:
        for site in report.sites:
            plan = report.plans.get(site.name)
            if site.kind == "cross":
                continue
            if plan is None:
                yield site, site.density
                continue
            per_step = plan.step_head_densities(site.shape[2], site.kv_len)  # (steps, H); a static plan has 1
            steps = report.step_timesteps
            if per_step.shape[0] == len(steps):
                picks = [int((steps - t).abs().argmin()) for t in result.timed_timesteps]
            else:
                picks = [0]
            yield site, float(per_step[picks].mean())


def compile_state(result: VariantResult) -> str:
    fx = result.fx_cache
    state = f"FX cache {fx['hit']} hit / {fx['miss']} miss" + (f" / {fx['bypass']} bypass" if fx["bypass"] else "")
    if result.topology_origin is None:
        return state
    origin = result.topology_origin
    topology = ("calibrated" if "calibrated" in origin else "from cache" if "from cache" in origin
                else "none needed" if "no masks" in origin else origin)
    return f"topology {topology}; {state}"


# ----------------------------------------------------------------------------------------------
# Running sections, ratios, output
# ----------------------------------------------------------------------------------------------
def run_all(args: argparse.Namespace, settings: Settings, payload: dict[str, Any], out_path: Path) -> None:
    results: list[VariantResult] = []
    for key in args.sections:
        section = section_with_layers(key, args)
        log(f"[{key}] {section.name}: {section.config['num_layers']} layers, {section.tokens} tokens; building")
        models = Models(section, settings, build_model(section, settings))
        timesteps = sampler_timesteps(section)
        variants = [Variant.parse(v) for v in args.variants or default_variants(key, args.cuda_graphs)]
        needed = sorted({t for v in variants for t in timed_timesteps(v, timesteps, settings)})
        for batch in args.batch:
            inputs = make_inputs(models.plain, section, batch, needed, settings)
            for variant in variants:
                results.append(run_one(models, inputs, key, batch, variant, settings, timesteps, args.deadline_s))
                add_ratios(results)
                payload["results"] = [dataclasses.asdict(r) for r in results]
                payload["stacks"] = stacks(results)
                payload["compile_summary"], payload["checks"] = compile_summary(results), checks(results)
                payload["elapsed_s"] = round(time.monotonic() - START, 1)
                write_json(payload, out_path)
            del inputs
        del models
        release()
    print_table(results, payload)


def run_one(models: Models, inputs: Inputs, key: str, batch: int, variant: Variant, settings: Settings,
            timesteps: list[float], deadline_s: float) -> VariantResult:
    elapsed = time.monotonic() - START
    backend = "scalingattn" if variant.schedule else settings.dense_backend
    if elapsed > deadline_s:
        log(f"[{key} b{batch}] {variant.name}: skipped ({elapsed:.0f} s > --deadline-s {deadline_s:g})")
        return VariantResult(key, batch, variant.name, backend, {}, status=f"skipped: deadline after {elapsed:.0f} s")
    reason = skip_reason(variant, settings)
    if reason:
        log(f"[{key} b{batch}] {variant.name}: skipped ({reason})")
        return VariantResult(key, batch, variant.name, backend, {}, status=f"skipped: {reason}")
    log(f"[{key} b{batch}] {variant.name}")
    try:
        return measure_variant(models, inputs, key, batch, variant, settings, timesteps)
    except Exception as error:  # noqa: BLE001 - record it, release memory, go on with the next variant
        log(f"  FAILED: {error!r}")
        return VariantResult(key, batch, variant.name, backend, {}, status=f"failed: {type(error).__name__}",
                             error=traceback.format_exc()[-4000:])
    finally:
        release()


def section_with_layers(key: str, args: argparse.Namespace) -> Section:
    section = SECTIONS[key]
    layers = {"1.3b": args.layers_1_3b, "14b": args.layers}.get(key)
    if layers is None:
        return section
    return dataclasses.replace(section, config=section.config | {"num_layers": layers})


def default_variants(key: str, cuda_graphs: bool) -> list[str]:
    return DEFAULT_VARIANTS[key] + (CUDA_GRAPH_VARIANTS if cuda_graphs else [])


def add_ratios(results: list[VariantResult]) -> None:
    """Speedup and memory against the dense variant of the same section and batch; Amdahl prediction;
    salad-<d>'s step time against uniform-<d>'s."""
    for r in results:
        sparse_only = _sparse_only_of(results, r)
        if sparse_only is not None and r.latency_ms is not None:
            r.branch_overhead = r.latency_ms / sparse_only.latency_ms - 1.0
        dense = _dense_of(results, r)
        if dense is None or r.latency_ms is None:
            continue
        r.speedup = dense.latency_ms / r.latency_ms
        if dense.peak_gib and r.peak_gib:
            r.peak_vs_dense = r.peak_gib / dense.peak_gib
        if r.predicted_attention_speedup and dense.attention_share is not None:
            a = dense.attention_share
            r.amdahl_speedup = 1.0 / ((1.0 - a) + a / r.predicted_attention_speedup)


def _sparse_only_of(results: list[VariantResult], r: VariantResult) -> VariantResult | None:
    """salad-<d>[+cg]'s uniform-<d>[+cg] of the same section and batch, if measured."""
    if not r.variant.startswith("salad-"):
        return None
    name = "uniform-" + r.variant.removeprefix("salad-")
    return next((u for u in results if (u.section, u.batch, u.variant) == (r.section, r.batch, name)
                 and u.latency_ms is not None), None)


def _dense_of(results: list[VariantResult], r: VariantResult) -> VariantResult | None:
    return next((d for d in results if (d.section, d.batch, d.variant) == (r.section, r.batch, "dense")
                 and d.latency_ms is not None), None)


def layer_chain(name: str) -> list[str]:
    """The variants a stack is built from, one layer at a time: uniform-0.1+fp8+f8lin ->
    dense, uniform-0.1, uniform-0.1+fp8, uniform-0.1+fp8+f8lin."""
    base, *modifiers = name.split("+")
    chain = ["dense"] + ([] if base == "dense" else [base])
    for modifier in modifiers:
        chain.append(f"{chain[-1]}+{modifier}")
    return chain


def stacks(results: list[VariantResult]) -> list[dict[str, Any]]:
    """Per variant with modifiers that no other measured variant stacks on: what each layer contributes, as
    the step-time ratio of consecutive measured variants of its chain (a layer whose variant was not
    measured is folded into the next measured one's label)."""
    rows = []
    for r in results:
        if "+" not in r.variant or any(r.variant in layer_chain(o.variant)[:-1] for o in results
                                       if (o.section, o.batch) == (r.section, r.batch) and o.latency_ms is not None):
            continue
        measured = {o.variant: o for o in results
                    if (o.section, o.batch) == (r.section, r.batch) and o.latency_ms is not None}
        layers, previous = [], None
        for name in layer_chain(r.variant):
            if name not in measured:
                continue
            if previous is not None:
                layers.append({"layer": name.removeprefix(previous.variant), "variant": name,
                               "ratio": previous.latency_ms / measured[name].latency_ms})
            previous = measured[name]
        rows.append({"section": r.section, "batch": r.batch, "variant": r.variant, "status": r.status,
                     "speedup": r.speedup, "layers": layers, "cache_skip_rate": r.cache_skip_rate})
    return rows


def compile_summary(results: list[VariantResult]) -> list[dict[str, Any]]:
    """Per section and batch: dense cold and warm; ours cold (calibrating), warm (topology and FX graph
    cached: against dense warm) and topology-warm (its inductor graph new, e.g. FAST: against dense cold)."""
    summary = []
    for section, batch in dict.fromkeys((r.section, r.batch) for r in results):
        group = [r for r in results if (r.section, r.batch) == (section, batch) and r.compile_s is not None]
        dense = next((r for r in group if r.variant == "dense"), None)
        ours = [r for r in group if r.backend == "scalingattn" and "+" not in r.variant]  # no stack layers
        cold = next((r for r in ours if "calibrated" in r.compile_state), None)
        warm = next((r for r in ours if cold and r.variant.split("-")[0] == cold.variant.split("-")[0]
                     and "from cache" in r.compile_state and r.fx_cache.get("miss") == 0), None)
        new_graph = next((r for r in ours if "from cache" in r.compile_state and r.fx_cache.get("miss")), None)
        row: dict[str, Any] = {"section": section, "batch": batch}
        if dense:
            row |= {"dense_cold_s": dense.compile_s, "dense_warm_s": dense.recompile_s}
        if cold:
            row |= {"ours_cold_variant": cold.variant, "ours_cold_s": cold.compile_s,
                    "calibration_s": cold.calibration_s}
        if warm:
            row |= {"ours_warm_variant": warm.variant, "ours_warm_s": warm.compile_s}
            if dense and dense.recompile_s:
                row["warm_ratio"] = warm.compile_s / dense.recompile_s
        if new_graph:
            row |= {"ours_topology_warm_variant": new_graph.variant, "ours_topology_warm_s": new_graph.compile_s}
            if dense:
                row["topology_warm_ratio"] = new_graph.compile_s / dense.compile_s
        summary.append(row)
    return summary


def checks(results: list[VariantResult]) -> list[dict[str, Any]]:
    """The issue's acceptance targets, for every section and batch measured (set for 1.3B at 480p)."""
    rows = []
    for r in results:
        if r.variant in TARGETS and r.speedup is not None:
            target = TARGETS[r.variant]
            rows.append({"section": r.section, "batch": r.batch, "check": f"{r.variant} speedup",
                         "value": r.speedup, "target": f">= {target}", "met": r.speedup >= target})
        if r.branch_overhead is not None:
            target = TARGETS["branch_overhead"]
            rows.append({"section": r.section, "batch": r.batch, "check": f"{r.variant} step time / sparse-only - 1",
                         "value": r.branch_overhead, "target": f"<= {target}", "met": r.branch_overhead <= target})
        if r.backend == "scalingattn" and r.peak_vs_dense is not None and "+" not in r.variant:
            rows.append({"section": r.section, "batch": r.batch, "check": f"{r.variant} peak memory / dense",
                         "value": r.peak_vs_dense, "target": f"<= {TARGETS['peak_memory_ratio']}",
                         "met": r.peak_vs_dense <= TARGETS["peak_memory_ratio"]})
    for row in compile_summary(results):
        if "warm_ratio" in row:
            rows.append({"section": row["section"], "batch": row["batch"], "check": "warm compile / dense warm compile",
                         "value": row["warm_ratio"], "target": f"<= {TARGETS['warm_compile_ratio']}",
                         "met": row["warm_ratio"] <= TARGETS["warm_compile_ratio"]})
    return rows


def print_table(results: list[VariantResult], payload: dict[str, Any]) -> None:
    def f(x: float | None, fmt: str = "{:.2f}") -> str:
        return "-" if x is None else fmt.format(x)

    rows = [[
        r.section, r.batch, r.variant, f(r.latency_ms, "{:.1f}"), f(r.speedup, "{:.2f}x")
        + ("" if r.branch_overhead is None else f" (branch {r.branch_overhead:+.1%})"),
        f(r.attention_share, "{:.1%}"), f(r.kernel_ms, "{:.1f}"),
        f(r.self_density, "{:.3f}") + timed_density(r),
        f(r.predicted_attention_speedup, "{:.2f}x"), f(r.amdahl_speedup, "{:.2f}x"),
        f(r.compile_s, "{:.1f}") + (f" / {r.recompile_s:.1f}" if r.recompile_s else ""), f(r.calibration_s, "{:.1f}"),
        f(r.peak_gib), f(r.peak_vs_dense, "{:.3f}"), f"{f(r.graphs, '{}')}/{f(r.recompiles, '{}')}",
        stack_note(r), r.compile_state if r.status == "ok" else r.status,
    ] for r in results]
    headers = ["section", "B", "variant", "step ms", "speedup", "attn share", "kernel ms", "self density",
               "pred attn x", "Amdahl x", "compile s", "calib s", "peak GiB", "peak/dense", "graphs/recomp", "stack",
               "caches"]
    print(f"\n{payload['device']}, torch {payload['torch']}, triton {payload['triton']}, diffusers "
          f"{payload['diffusers']}, {payload['settings']['dtype']}; latency = mean over timed steps of the median "
          f"of {payload['settings']['reps']} calls; FAST timed at {payload['settings']['fast_steps']} of "
          f"{SAMPLER_STEPS} steps; calibration on {payload['settings']['calibration_samples']} samples")
    print(tabulate(rows, headers=headers))
    for row in payload["compile_summary"]:
        print("compile " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    for row in payload["stacks"]:
        print(stack_line(row))
    for r in results:
        if r.fp8_sites == 0:
            print(f"note [{r.section} b{r.batch}] {r.variant}: no site ran FP8 ({fp8_refusals(r)}): it timed "
                  "attention in the sites' own dtype")
    for row in payload["checks"]:
        print(f"check [{row['section']} b{row['batch']}] {row['check']}: {row['value']:.3f} (target {row['target']}): "
              f"{'met' if row['met'] else 'NOT met'}")
    for r in results:
        if r.error:
            print(f"\n{r.section} b{r.batch} {r.variant} failed:\n{r.error}")


def timed_density(r: VariantResult) -> str:
    """The density at the timed timesteps, where there are several (FAST, +fbc)."""
    return f" ({r.timed_density:.3f} timed)" if r.timed_density is not None and len(r.timed_timesteps) > 1 else ""


def stack_note(r: VariantResult) -> str:
    """What the stack layers of a row ran: FP8 sites of the sparse ones, float8 linears, cache skips."""
    notes = []
    if r.fp8_sites is not None:
        notes.append(f"fp8 {r.fp8_sites}/{r.sparse_sites}")
    if r.float8_linears:
        notes.append(f"f8 linears {r.float8_linears}")
    if r.cache_skip_rate is not None:
        notes.append(f"fbc skip {r.cache_skip_rate:.0%} of {len(r.cache_computed)}")
    return ", ".join(notes) or "-"


def fp8_refusals(r: VariantResult) -> str:
    return "; ".join(f"{sites} site(s): {reason}" for reason, sites in r.fp8_refused.items()) or "no sparse site"


def stack_line(row: dict[str, Any]) -> str:
    head = f"stack [{row['section']} b{row['batch']}] {row['variant']}"
    if row["speedup"] is None:
        return f"{head}: {'no dense variant measured' if row['status'] == 'ok' else row['status']}"
    layers = " * ".join(f"{layer['layer']} {layer['ratio']:.2f}x" for layer in row["layers"])
    cache = "" if row["cache_skip_rate"] is None else f" (cache skipped {row['cache_skip_rate']:.0%} of the steps)"
    return f"{head}: {row['speedup']:.2f}x over dense = {layers}{cache}"


def write_json(payload: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    tmp.replace(path)


def environment(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    import diffusers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = torch.cuda.get_device_name() if settings.cuda else "cpu"
    sections = {k: dataclasses.asdict(section_with_layers(k, args)) for k in args.sections}
    return {
        "device": device, "torch": torch.__version__, "triton": triton_version, "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "args": vars(args), "settings": dataclasses.asdict(settings) | {"dtype": str(settings.dtype)},
        "sdpa": args.sdpa if settings.cuda else "n/a (CPU)", "sections": sections,
    }


def output_path(args: argparse.Namespace, info: dict[str, Any]) -> Path:
    """e2e_<device>_<date>_<tag>.json; the default tag names sections, batches and chosen variants."""
    parts = ["-".join(args.sections), "b" + "-".join(map(str, args.batch))]
    parts += [v.replace("+", "-") for v in args.variants or []] + (["cg"] if args.cuda_graphs else [])
    tag = args.tag or "_".join(parts)
    return Path(args.out_dir) / f"e2e_{slug(info['device'])}_{info['date'][:10]}_{tag}.json"


@contextlib.contextmanager
def fresh_caches(args: argparse.Namespace) -> Iterator[dict[str, str]]:
    """Empty topology, inductor and Triton caches for this run (unless --compile-cache-dir is given)."""
    with tempfile.TemporaryDirectory(prefix="e2e-caches-") as tmp:
        dirs = {CACHE_DIR_ENV_VAR: f"{tmp}/scalingattn"}
        if args.compile_cache_dir:
            dirs |= {"TORCHINDUCTOR_CACHE_DIR": f"{args.compile_cache_dir}/inductor",
                     "TRITON_CACHE_DIR": f"{args.compile_cache_dir}/triton"}
        else:
            dirs |= {"TORCHINDUCTOR_CACHE_DIR": f"{tmp}/inductor", "TRITON_CACHE_DIR": f"{tmp}/triton"}
        saved = {k: os.environ.get(k) for k in dirs}
        os.environ.update(dirs)
        try:
            yield dirs
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def log(message: str) -> None:
    print(f"[{time.monotonic() - START:6.0f} s] {message}", file=sys.stderr, flush=True)


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny Wan on the CPU, fp32, aot_eager, one timed call: checks the flow")
    p.add_argument("--sections", type=lambda s: s.split(","), default=None, help="1.3b, 14b or both (default 1.3b)")
    p.add_argument("--variants", type=lambda s: s.split(","), default=None,
                   help=f"{VARIANT_GRAMMAR}: +cg CUDA graphs, +fp8 FP8 attention, +f8lin torchao float8 linears, "
                        f"+fbc FirstBlockCache (default: {DEFAULT_VARIANTS['1.3b']} for 1.3b, "
                        f"{DEFAULT_VARIANTS['14b']} for 14b)")
    p.add_argument("--cuda-graphs", action="store_true", help=f"add {CUDA_GRAPH_VARIANTS} to the default variants")
    p.add_argument("--batch", type=lambda s: [int(b) for b in s.split(",")], default=[1], help="e.g. 1 or 1,2 (CFG)")
    p.add_argument("--layers", type=int, default=2, help="layers of the 14B section (the whole model has 40)")
    p.add_argument("--layers-1.3b", dest="layers_1_3b", type=int, default=None, help="layers of the 1.3B section (30)")
    p.add_argument("--reps", type=int, default=None, help="timed calls per timestep (default 5, --quick 1)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls after the first one (--quick: 0)")
    p.add_argument("--fast-steps", type=int, default=None,
                   help=f"FAST: timed steps of the {SAMPLER_STEPS} (default 10, --quick 2)")
    p.add_argument("--cache-steps", type=int, default=None,
                   help=f"+fbc: consecutive steps of the {SAMPLER_STEPS} timed per sequence (default 10, --quick 3)")
    p.add_argument("--fbc-threshold", type=float, default=FBC_THRESHOLD,
                   help="+fbc: FirstBlockCacheConfig threshold (default %(default)s, diffusers' documented example)")
    p.add_argument("--calibration-samples", type=int, default=None, help="WEST calibration runs (default 2, --quick 1)")
    p.add_argument("--no-dense-recompile", action="store_true", help="skip the dense warm recompile")
    p.add_argument("--sdpa", choices=["cudnn", "default"], default="cudnn",
                   help="dense SDPA: cuDNN first (fastest on H100), or torch's own order")
    p.add_argument("--deadline-s", type=float, default=520.0, help="no variant starts after this many seconds")
    p.add_argument("--compile-cache-dir", default=None, help="keep inductor/Triton caches here (default: fresh, empty)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument("--tag", default=None, help="file name suffix (default: sections and batches)")
    args = p.parse_args(argv)
    args.sections = ["tiny"] if args.quick else args.sections or ["1.3b"]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown or (not args.quick and "tiny" in args.sections):
        p.error(f"--sections takes 1.3b and/or 14b, got {args.sections}")
    try:
        for spec in args.variants or []:
            Variant.parse(spec)
    except ValueError as error:
        p.error(str(error))
    return args


def make_settings(args: argparse.Namespace) -> Settings:
    if args.quick:
        return Settings("cpu", torch.float32, "aot_eager", args.reps or 1, 0, args.fast_steps or 2,
                        args.calibration_samples or 1, not args.no_dense_recompile, args.seed, args.cache_steps or 3,
                        args.fbc_threshold)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.end_to_end needs a GPU (use --quick on a CPU)")
    return Settings("cuda", torch.bfloat16, "inductor", args.reps or 5, args.warmup, args.fast_steps or 10,
                    args.calibration_samples or 2, not args.no_dense_recompile, args.seed, args.cache_steps or 10,
                    args.fbc_threshold)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    settings = make_settings(args)
    payload = environment(args, settings)
    out_path = output_path(args, payload)
    dense_sdpa = cudnn_first(settings.device) if args.sdpa == "cudnn" else contextlib.nullcontext()
    with fresh_caches(args) as dirs, dense_sdpa, one_thread(args.quick):
        payload["cache_dirs"] = dirs
        log(f"{payload['device']}: sections {args.sections}, batch {args.batch}; results to {out_path}")
        run_all(args, settings, payload, out_path)
    log(f"wrote {out_path}")
    payload["path"] = str(out_path)
    return payload


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("scaling_compiler").setLevel(logging.INFO)  # calibration progress
    if "TORCH_LOGS" not in os.environ:
        torch._logging.set_logs(perf_hints=True)  # why inductor skips CUDA graphs, when it does
    main()
