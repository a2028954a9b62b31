"""The command line: arguments and settings, fresh caches, the run over sections, batches and variants
(deadline and skips included), and `main`.

Caches start empty: SCALINGATTN_CACHE_DIR, TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR point at
fresh temporary folders (--compile-cache-dir keeps inductor's). `--inductor KEY=VALUE` sets an inductor
config (`torch._inductor.config`, dotted keys such as `triton.multi_kernel=1`) for the whole run, dense
and ours alike, so ratios stay like for like; the JSON records it under `inductor_config`. The JSON is rewritten after every
variant (a timeout keeps what was measured); no variant starts after --deadline-s seconds, the rest
are recorded as skipped.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import datetime
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Iterator

import torch

from benchmarks.common import RESULTS_DIR, cudnn_first, one_thread
from benchmarks.end_to_end.measure import measure_variant
from benchmarks.end_to_end.model import Inputs, make_inputs, sampler_timesteps, timed_timesteps
from benchmarks.end_to_end.results import add_ratios, checks, compile_summary, print_table, stacks, write_json
from benchmarks.end_to_end.stack import FBC_THRESHOLD, Models, skip_reason
from benchmarks.end_to_end.timing import START, log, release
from benchmarks.end_to_end.variants import (
    CUDA_GRAPH_VARIANTS, DEFAULT_VARIANTS, SAMPLER_STEPS, SECTIONS, VARIANT_GRAMMAR, Section, Settings, Variant,
    VariantResult,
)
from scaling_compiler.cache import CACHE_DIR_ENV_VAR
from scaling_compiler.cost_model import slug


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    summary = sys.modules[__package__].__doc__.split("\n")[0]  # the first line of the package's docstring
    p = argparse.ArgumentParser(prog="python -m benchmarks.end_to_end", description=summary,
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
    p.add_argument("--inductor", type=inductor_setting, action="append", default=[], metavar="KEY=VALUE",
                   help="an inductor config for every variant, e.g. triton.multi_kernel=1 (repeatable)")
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
    known = torch._inductor.config.get_config_copy()
    for key, _ in args.inductor:
        if key not in known:
            p.error(f"--inductor: torch._inductor.config has no {key!r}")
    args.inductor = dict(args.inductor)
    return args


def inductor_setting(text: str) -> tuple[str, Any]:
    """--inductor KEY=VALUE: the value as a Python literal (1, True, 'max-autotune'), else as the string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"takes KEY=VALUE, got {text!r}")
    try:
        return key.strip(), ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key.strip(), value


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
    with fresh_caches(args) as dirs, dense_sdpa, one_thread(args.quick), torch._inductor.config.patch(args.inductor):
        payload["cache_dirs"] = dirs
        payload["inductor_config"] = args.inductor
        log(f"{payload['device']}: sections {args.sections}, batch {args.batch}; results to {out_path}")
        run_all(args, settings, payload, out_path)
    log(f"wrote {out_path}")
    payload["path"] = str(out_path)
    return payload


def section_with_layers(key: str, args: argparse.Namespace) -> Section:
    section = SECTIONS[key]
    layers = {"1.3b": args.layers_1_3b, "14b": args.layers}.get(key)
    if layers is None:
        return section
    return dataclasses.replace(section, config=section.config | {"num_layers": layers})


def default_variants(key: str, cuda_graphs: bool) -> list[str]:
    return DEFAULT_VARIANTS[key] + (CUDA_GRAPH_VARIANTS if cuda_graphs else [])


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


def run_all(args: argparse.Namespace, settings: Settings, payload: dict[str, Any], out_path: Path) -> None:
    results: list[VariantResult] = []
    for key in args.sections:
        section = section_with_layers(key, args)
        log(f"[{key}] {section.name}: {section.config['num_layers']} layers, {section.tokens} tokens; building")
        models = Models.build(section, settings)
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
