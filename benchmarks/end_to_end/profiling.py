"""Where a variant's time and sparsity go: the profiled attention share and heaviest kernels, the
PassReports' densities and predicted speedups, and the compile caches' state.

- attention share: one profiled call per timed timestep (torch.profiler, CUDA kernels): time in
  attention kernels (SDPA's cuDNN/flash/memory-efficient kernels, our `_attn_fwd` and
  `_decode_mask_rows`; inductor's own `triton_*` kernels never count) over all kernel time.
  `kernel_ms` is the summed kernel time of one call; far below the latency means host overhead.
  On the CPU (--quick): time in the outermost attention ops over the whole call.
- from the PassReport: FLOP-weighted self-attention density (mean over steps; for FAST also at the
  timed steps) and predicted attention speedup (cost model); `results.add_ratios` turns the latter
  into `amdahl_speedup` with the dense variant's attention share.
"""
from __future__ import annotations

import collections
import re
from typing import Any, Callable, Iterator

import torch

from benchmarks.end_to_end.timing import log, synchronize
from benchmarks.end_to_end.variants import VariantResult
from scaling_compiler import PassReport

# attention kernels by name; inductor's generated kernels (triton_*) may carry SDPA in their names
ATTENTION_KERNEL = re.compile(r"flash|fmha|sdpa|attention|_attn_fwd|_decode_mask_rows", re.IGNORECASE)
ATTENTION_OP = re.compile(r"scaled_dot_product|block_sparse_attention")


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
