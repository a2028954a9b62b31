"""From measured variants to the output: ratios against dense, each stack's per-layer contributions,
the compile summary, the acceptance checks, the table on stdout and the JSON file.

- `speedup` and `peak_vs_dense` are against the dense variant of the same section and batch;
  `amdahl_speedup` is the step speedup the predicted attention speedup s gives with the dense
  variant's attention share a: 1 / ((1 - a) + a / s).
- A `stack` line per variant that no other stacks on gives each layer's contribution: the step-time
  ratios of consecutive measured variants of its chain (dense, uniform-0.1, uniform-0.1+fp8,
  uniform-0.1+fp8+f8lin), in the JSON's `stacks`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tabulate import tabulate

from benchmarks.end_to_end.variants import SAMPLER_STEPS, VariantResult

# the acceptance targets (H100, Wan2.1-1.3B 480p)
TARGETS = {"uniform-0.1": 2.3, "fast-0.25": 1.9, "uniform-0.1+fp8+f8lin": 3.0, "warm_compile_ratio": 1.2,
           "peak_memory_ratio": 1.05, "branch_overhead": 0.10}


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


def _dense_of(results: list[VariantResult], r: VariantResult, name: str = "dense") -> VariantResult | None:
    """The measured dense variant `name` of r's section and batch."""
    return next((d for d in results if (d.section, d.batch, d.variant) == (r.section, r.batch, name)
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


def without_cuda_graphs(name: str) -> str:
    """The variant's name without its +cg layer (uniform-0.1+cg+f8lin -> uniform-0.1+f8lin)."""
    return "+".join(part for part in name.split("+") if part != "cg")


def checks(results: list[VariantResult]) -> list[dict[str, Any]]:
    """The issue's acceptance targets, for every section and batch measured (set for 1.3B at 480p). A
    variant under CUDA graphs is held to its plain variant's speedup target twice: against dense, and
    against dense under CUDA graphs where that was measured (graphs remove host time from both)."""
    rows = []
    for r in results:
        target = TARGETS.get(without_cuda_graphs(r.variant))
        if target is not None and r.speedup is not None:
            rows.append({"section": r.section, "batch": r.batch, "check": f"{r.variant} speedup",
                         "value": r.speedup, "target": f">= {target}", "met": r.speedup >= target})
        dense_cg = (_dense_of(results, r, "dense+cg") if target is not None and r.latency_ms is not None
                    and "cg" in r.variant.split("+") else None)
        if dense_cg is not None:
            value = dense_cg.latency_ms / r.latency_ms
            rows.append({"section": r.section, "batch": r.batch, "check": f"{r.variant} speedup over dense+cg",
                         "value": value, "target": f">= {target}", "met": value >= target})
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
