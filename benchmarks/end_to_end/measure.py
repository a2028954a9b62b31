"""Measuring one variant: compile it, time its first call (the compile), warm up, time its steps (or
+fbc's sequences), profile, and read the counters.

- latency: median of `--reps` synchronised calls after `--warmup` calls (wall clock, host overhead
  included), per timed timestep; the variant's latency is the mean over its timed timesteps.
- compile: wall time of the first call (dynamo, our passes incl. WEST calibration, inductor, the
  first run with Triton autotuning). Caches start empty (see `cli.fresh_caches`), so the first WEST
  variant calibrates ("cold"), later ones load the topology; `compile_state` says which caches hit.
  `dense` is compiled a second time after `torch._dynamo.reset()` (its warm compile); the second
  uniform variant is ours (topology and FX graph cached); FAST has the topology cached but a graph
  of its own (compared with dense's cold compile). Triton kernels compiled for an earlier variant
  are reused by later ones, in memory and on disk. Calibration runs on `--calibration-samples` (2)
  samples, not the backend's default 8, to fit the time limit; `calibration_s` is reported so the
  cold compile at 8 samples can be extrapolated.
- compile phases (`compile_phases_s`): where the first call's seconds went, from torch._dynamo's
  compilation timers (`compilation_time_metrics`; phases whose timer this torch lacks are left out):
  `dynamo_trace` (bytecode tracing), `backend` (the backend's call: for dense, AOTAutograd and
  inductor; for ours, our passes with WEST calibration, then the inner compiler), `aot_and_inductor`
  (AOTAutograd with inductor inside it), `inductor` (inductor's code generation and compile) and, for
  ours, `ours` = backend - aot_and_inductor. What the first call spends outside the phases is
  mostly the first run (Triton JIT and autotuning).
- memory: `torch.cuda.max_memory_allocated` over the timed calls (after a reset), and over the
  first call (`compile_peak_gib`: includes calibration).
- graphs: graphs compiled on the first call, recompiles (graphs compiled after it: must be 0,
  FAST included), graph breaks, FX graph cache hits/misses.
"""
from __future__ import annotations

import dataclasses
import statistics
from typing import Any, Callable

import torch

from benchmarks.end_to_end.model import Inputs, timed_steps, timed_timesteps
from benchmarks.end_to_end.profiling import compile_state, profile, summarise_reports
from benchmarks.common import quantized_linears
from benchmarks.end_to_end.stack import CachedSequence, Models, first_block_cache
from benchmarks.end_to_end.timing import log, peak_gib, release, reset_peak, time_steps, timed_call
from benchmarks.end_to_end.variants import Settings, Variant, VariantResult
from scaling_compiler import ScalingAttnBackend
from scaling_compiler.cost_model import CostModel

WARMUP_SEQUENCES = 4  # +fbc: at most this many untimed sequences
COMPILE_TIMERS = {  # phase of the first call -> the torch._dynamo compilation timer that measures it
    "dynamo_trace": "bytecode_tracing",
    "backend": "OutputGraph.call_user_compiler",
    "aot_and_inductor": "create_aot_dispatcher_function",
    "inductor": "compile_fx_inner",
}


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
        # the layer's own time: FP8 at every site the op can run, also where the device's FP8 cost rows
        # predict no gain (the backend would keep such sites 16-bit); the same model otherwise
        device_model = CostModel.for_device(torch.device(settings.device))
        options["cost_model"] = dataclasses.replace(device_model, fp8_prep_ms_per_byte=None, fp8_kernel_ratio=None)
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


def compile_clock() -> dict[str, float]:
    """Seconds on each of torch._dynamo's compilation timers of `COMPILE_TIMERS` so far (those it has)."""
    metrics = torch._dynamo.utils.compilation_time_metrics
    return {phase: sum(metrics[timer]) for phase, timer in COMPILE_TIMERS.items() if timer in metrics}


def compile_phases(before: dict[str, float], after: dict[str, float], ours: bool) -> dict[str, float]:
    """The phases' seconds between two `compile_clock()` readings; `ours` adds our passes' share."""
    phases = {phase: round(after[phase] - before.get(phase, 0.0), 2) for phase in after}
    if ours and "backend" in phases and "aot_and_inductor" in phases:
        phases["ours"] = round(phases["backend"] - phases["aot_and_inductor"], 2)
    return phases


def measure_variant(models: Models, inputs: Inputs, section_key: str, batch: int, variant: Variant,
                    settings: Settings, timesteps: list[float]) -> VariantResult:
    options = backend_options(variant, settings, timesteps) if variant.schedule else {}
    backend_name = "scalingattn" if variant.schedule else settings.dense_backend
    result = VariantResult(section_key, batch, variant.name, backend_name, _jsonable(options))
    if variant.cuda_graphs:
        result.cuda_graphs = "torch.compile(mode='reduce-overhead')"
    result.timed_timesteps = timed_timesteps(variant, timesteps, settings)
    model = models.for_variant(variant)
    result.float8_linears = quantized_linears(model)
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
    if settings.cuda:  # as if the variant ran alone: without the other model's weights
        idle = models.idle_gib(variant)
        result.peak_gib -= idle
        result.compile_peak_gib -= idle
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
    phases = ", ".join(f"{phase} {seconds:.1f}" for phase, seconds in result.compile_phases_s.items())
    log(f"  compiled in {result.compile_s:.1f} s" + (f" (s: {phases})" if phases else ""))
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
    clock = compile_clock()
    result.compile_s = timed_call(lambda: call(first), cuda) / 1e3
    result.compile_phases_s = compile_phases(clock, compile_clock(), backend is not None)
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
    clock = compile_clock()
    result.compile_s = sequence.run(cuda, limit=1)[0][0] / 1e3
    result.compile_phases_s = compile_phases(clock, compile_clock(), backend is not None)
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


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v.source if isinstance(v, CostModel) else v
            for k, v in options.items()}
