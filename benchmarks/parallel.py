"""Wan2.1 under diffusers' Ulysses context parallelism: dense inductor against `scalingattn`, on one
GPU and split over the GPUs of `torchrun`.

    torchrun --nproc-per-node 2 -m benchmarks.parallel                       # 1.3B 480p and 14B 720p (first 2 layers)
    torchrun --nproc-per-node 2 -m benchmarks.parallel --sections 14b --layers 4
    torchrun --nproc-per-node 2 -m benchmarks.parallel --dry-run --out-dir /tmp/par   # CPU, gloo, tiny Wan: checks the flow

Every rank builds the same seeded model and inputs (`benchmarks.end_to_end`'s Wan2.1 sections, bf16,
`native` attention backend: diffusers' context parallelism needs a CP-capable one). Variants, in order:
- `dense@1`: `torch.compile(model)` (inductor), each rank alone on its GPU;
- `dense@uN`: the same after `model.enable_parallelism(ContextParallelConfig(ulysses_degree=N))`;
- `uniform-0.1@1`, `fast-0.25@1`: ours on one GPU; `...@uN`: under Ulysses N, heads in the model's
  order; `...@uN+bal`: with option `balance_heads` (heads permuted so that every rank's predicted
  attention time is about equal).
A step is one forward at a sampler timestep (FAST: `--fast-steps` evenly spaced ones, averaged).
Per variant: the step time (median of `--reps` calls after `--warmup`, each call started on every rank
at once behind a barrier; the slowest rank's median), the first call (compile), peak memory per rank,
speedups against `dense@1` and `dense@uN`, and, under Ulysses, our report's predicted per-rank times.
Rank 0 writes benchmarks/results/parallel_<device>_<date>.json after every variant.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from benchmarks.common import RESULTS_DIR
from benchmarks.end_to_end import SECTIONS, Section, sampler_timesteps
from scaling_compiler import ScalingAttnBackend
from scaling_compiler.cache import CACHE_DIR_ENV_VAR
from scaling_compiler.context_parallel import enable_ulysses, ignore_warning_once
from scaling_compiler.cost_model import slug

log = logging.getLogger("benchmarks.parallel")

VARIANTS = ["dense@1", "dense@u", "uniform-0.1@1", "uniform-0.1@u", "uniform-0.1@u+bal",
            "fast-0.25@1", "fast-0.25@u", "fast-0.25@u+bal"]


def build(section: Section, layers: int | None, device: str, dtype: torch.dtype, seed: int = 0
          ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The section's Wan (its first `layers` blocks), seeded alike on every rank, and its inputs."""
    import diffusers

    config = section.config | ({"num_layers": layers} if layers else {})
    torch.manual_seed(seed)
    with torch.device(device):
        model = diffusers.WanTransformer3DModel(**config).to(dtype).eval().requires_grad_(False)
    model.set_attention_backend("native")
    g = torch.Generator(device).manual_seed(seed)
    inputs = dict(
        hidden_states=torch.randn(1, config["in_channels"], *section.latent, generator=g, device=device).to(dtype),
        encoder_hidden_states=torch.randn(1, section.text_len, config["text_dim"], generator=g, device=device).to(dtype),
        return_dict=False,
    )
    return model, inputs


def options_of(variant: str, timesteps: list[float], compiler: str, samples: int) -> dict[str, Any] | None:
    """The backend options of a variant (None: dense)."""
    spec, _, where = variant.partition("@")
    if spec == "dense":
        return None
    schedule, density = spec.split("-")
    options = dict(density=float(density), schedule=schedule, compiler=compiler, calibration_samples=samples,
                   balance_heads=where.endswith("+bal"))
    return options | ({"num_steps": 1} if schedule == "uniform" else {"timesteps": tuple(timesteps)})


def timed(call: Callable[[], Any], cuda: bool) -> float:
    dist.barrier()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def slowest(value: float) -> float:
    """The largest `value` over the ranks."""
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)  # gloo on the host: fine for NCCL jobs too (cpu:gloo)
    return float(tensor.item())


def per_rank(value: float) -> list[float]:
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def measure(model: torch.nn.Module, inputs: dict[str, Any], variant: str, steps: list[float],
            args: argparse.Namespace) -> dict[str, Any]:
    cuda = args.device == "cuda"
    options = options_of(variant, steps, args.compiler, args.calibration_samples)
    torch._dynamo.reset()
    backend = ScalingAttnBackend(**options) if options is not None else args.dense_backend
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    timestep = {t: torch.full((1,), t, device=args.device) for t in steps}
    call = lambda t: compiled(**inputs, timestep=timestep[t])  # noqa: E731
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        first_ms = timed(lambda: call(steps[0]), cuda)
        for t in steps:
            for _ in range(args.warmup):
                call(t)
        step_ms = statistics.mean(statistics.median(timed(lambda: call(t), cuda) for _ in range(args.reps))
                                  for t in steps)
    result = dict(variant=variant, step_ms=slowest(step_ms), compile_s=slowest(first_ms) / 1e3,
                  peak_gib_per_rank=per_rank(torch.cuda.max_memory_allocated() / 2**30 if cuda else None))
    if isinstance(backend, ScalingAttnBackend) and backend.report is not None:
        report = backend.report.to_dict()
        result |= dict(ulysses=report.get("ulysses"), topology_origin=report["topology_origin"],
                       sparse_sites=sum(s["status"] == "sparse" for s in report["sites"]))
    return result


def shared_cache_dir() -> str:
    """A fresh SCALINGATTN_CACHE_DIR for all ranks (rank 0 makes it): the first WEST variant calibrates,
    with every rank at once, and rank 0 writes the topology the later variants read."""
    path = [tempfile.mkdtemp(prefix="scalingattn-parallel-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path, src=0)
    return path[0]


def run_section(key: str, args: argparse.Namespace, payload: dict[str, Any], out: Path) -> None:
    section = SECTIONS[key]
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    timesteps = sampler_timesteps(section)
    single, inputs = build(section, args.layers, args.device, dtype)
    parallel, _ = build(section, args.layers, args.device, dtype)
    enable_ulysses(parallel, dist.get_world_size())
    with torch.no_grad():
        parallel(**inputs, timestep=torch.full((1,), timesteps[0], device=args.device))  # hooks' first call: eager
    results = payload["sections"].setdefault(section.name, [])
    for variant in args.variants:
        fast = variant.startswith("fast")
        steps = [timesteps[round(i)] for i in torch.linspace(0, len(timesteps) - 1, args.fast_steps).tolist()] \
            if fast else [timesteps[len(timesteps) // 2]]
        model = parallel if "@u" in variant else single
        results.append(measure(model, inputs, variant.replace("@u", f"@u{dist.get_world_size()}"), steps, args))
        add_speedups(results)
        if dist.get_rank() == 0:
            out.write_text(json.dumps(payload, indent=1, default=str))
            log.warning("%s %s: %.2f ms", section.name, results[-1]["variant"], results[-1]["step_ms"])


def add_speedups(results: list[dict[str, Any]]) -> None:
    dense = {r["variant"].split("@")[1]: r["step_ms"] for r in results if r["variant"].startswith("dense@")}
    for r in results:
        where = r["variant"].split("@")[1].removesuffix("+bal")
        r["speedup_vs_dense_1gpu"] = dense["1"] / r["step_ms"] if "1" in dense else None
        r["speedup_vs_dense_same_gpus"] = dense[where] / r["step_ms"] if where in dense else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", default="1.3b,14b", help="of benchmarks.end_to_end.SECTIONS")
    parser.add_argument("--layers", type=int, default=2, help="first N transformer blocks (0: all)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--fast-steps", type=int, default=5)
    parser.add_argument("--calibration-samples", type=int, default=2)
    parser.add_argument("--dry-run", action="store_true", help="CPU, gloo, the tiny Wan, fp32, aot_eager, 1 rep")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    args.variants = args.variants.split(",")
    args.layers = args.layers or None
    args.device = "cpu" if args.dry_run else "cuda"
    args.compiler = args.dense_backend = "aot_eager" if args.dry_run else "inductor"
    if args.dry_run:
        args.sections, args.reps, args.warmup, args.fast_steps, args.calibration_samples = "tiny", 1, 0, 2, 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dist.init_process_group("gloo" if args.dry_run else "cpu:gloo,cuda:nccl")
    if not args.dry_run:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    ignore_warning_once()
    cache_dir = os.environ[CACHE_DIR_ENV_VAR] = shared_cache_dir()  # one host: torchrun --nproc-per-node
    device = "cpu" if args.dry_run else slug(torch.cuda.get_device_name())
    date = datetime.date.today().isoformat()
    out = args.out_dir / f"parallel_{device}_{date}.json"
    payload: dict[str, Any] = dict(world_size=dist.get_world_size(), device=device, torch=torch.__version__,
                                   args={k: str(v) for k, v in vars(args).items()}, sections={})
    if dist.get_rank() == 0:
        args.out_dir.mkdir(parents=True, exist_ok=True)
    for key in args.sections.split(","):
        run_section(key, args, payload, out)
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(cache_dir, ignore_errors=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
