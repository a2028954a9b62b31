"""What is measured: the Wan2.1 sections, the variant grammar, and the settings and result records.

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
- stack layers, more `+<modifier>` suffixes in any order, each at most once (issue #18): `+fp8`,
  `+f8lin`, `+fbc`; `stack` says what each does and when it cannot run.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch

from scaling_compiler.demo.zoo import ZOO

SAMPLER_STEPS = 50
DEFAULT_VARIANTS = {  # acceptance-critical first: a deadline skips from the end
    "1.3b": ["dense", "uniform-0.1", "salad-0.1", "fast-0.25", "uniform-0.25", "uniform-1.0"],
    "14b": ["dense", "uniform-0.1", "uniform-0.25"],
    "tiny": ["dense", "uniform-0.1", "fast-0.25", "uniform-0.25", "uniform-1.0"],
}
CUDA_GRAPH_VARIANTS = ["dense+cg", "uniform-0.1+cg"]

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
    compile_phases_s: dict[str, float] = dataclasses.field(default_factory=dict)  # measure.COMPILE_TIMERS' phases
    compile_state: str = ""
    recompile_s: float | None = None  # dense only: a fresh compile after torch._dynamo.reset()
    calibration_s: float | None = None
    peak_gib: float | None = None  # while timing; less the weights of the model the variant does not run
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
