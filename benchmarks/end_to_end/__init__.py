"""End-to-end step latency of Wan2.1 at real scale: dense inductor against `scalingattn`, side by side.

    python -m benchmarks.end_to_end                                                   # Wan2.1-1.3B, 480p 81 frames, batch 1, all variants
    python -m benchmarks.end_to_end --sections 14b                                    # Wan2.1-14B, 720p 81 frames, first --layers (2) layers
    python -m benchmarks.end_to_end --batch 2 --variants dense,uniform-0.1,fast-0.25  # CFG batch
    python -m benchmarks.end_to_end --cuda-graphs                                     # also dense and density 0.1 under CUDA graphs
    python -m benchmarks.end_to_end --quick --out-dir /tmp/e2e                        # tiny Wan on the CPU, fp32, 1 thread: checks the flow
    python -m benchmarks.end_to_end --variants dense,uniform-0.1+fp8+f8lin,uniform-0.1,uniform-0.1+fp8,dense+f8lin \\
        --no-dense-recompile                                                          # issue #18's stack, layer by layer

Model: diffusers `WanTransformer3DModel` at the Wan2.1 configurations (random seeded weights, bf16
with the modules diffusers keeps in float32 left in float32, eval, no grad), one denoising step =
one forward. 1.3B at 480p: latent 16x21x60x104 -> 32,760 tokens; 14B at 720p: 16x21x90x160 ->
75,600 tokens; 512 text tokens of width 4096. Dense SDPA runs with cuDNN attention first in the
priority order (the fastest dense kernel on an H100; `--sdpa default` keeps torch's order), for
every variant (our cross-attention stays dense SDPA).

Variants (one process, same weights and inputs): `dense` (torch.compile, inductor; every ratio is
against it), `uniform-<d>`, `salad-<d>` and `fast-<d>` (our backend), each with optional suffixes
`+cg` (CUDA graphs) and the stack layers `+fp8`, `+f8lin`, `+fbc` (issue #18). Measured per variant:
latency, attention share, compile time (with its phases: dynamo, our passes, inductor) and cache state,
peak memory, graphs and recompiles, and the PassReport's densities and predicted speedups.

The modules, from the bottom up (each imports only those above it):
- `variants`: the sections, the variant grammar and what each variant is; settings and result records.
- `model`: the seeded model and inputs, the sampler's timesteps and which of them are timed.
- `timing`: the run's clock and progress log, synchronised timed calls, peak memory, releasing compiled code.
- `stack`: the stack layers: when each can run (skip reasons), float8 linears, FirstBlockCache's sequences.
- `profiling`: attention share and kernels from the profiler, PassReport summaries, compile cache state.
- `measure`: one variant: compile, first call, warm-up, timed steps or +fbc sequences, counters.
- `results`: ratios, stacks, compile summary, acceptance checks, the table and the JSON.
- `cli`: arguments, settings, fresh caches, the run over sections, batches and variants, `main`.

Results: a table on stdout, progress on stderr, and benchmarks/results/e2e_<device>_<date>_<tag>.json
rewritten after every variant (a timeout keeps what was measured). No variant starts after
--deadline-s seconds; the rest are recorded as skipped.
"""
from benchmarks.end_to_end.cli import main, make_settings, parse_args
from benchmarks.end_to_end.measure import backend_options, randomize_branches
from benchmarks.end_to_end.model import sampler_timesteps, timed_steps, timed_timesteps
from benchmarks.end_to_end.results import add_ratios, checks, stack_line, stacks
from benchmarks.end_to_end.stack import skip_reason
from benchmarks.end_to_end.variants import SECTIONS, Section, Settings, Variant, VariantResult

__all__ = [
    "SECTIONS", "Section", "Settings", "Variant", "VariantResult", "add_ratios", "backend_options", "checks", "main",
    "make_settings", "parse_args", "randomize_branches", "sampler_timesteps", "skip_reason", "stack_line", "stacks",
    "timed_steps", "timed_timesteps",
]
