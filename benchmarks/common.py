"""Helpers shared by the benchmarks (run from the repository root as `python -m benchmarks.<module>`)."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"  # where every benchmark writes by default


def result_name(benchmark: str, info: dict, dry_run: bool) -> str:
    """`<benchmark>_<gpu slug>_<date>[_dry].json`: a benchmark's result file for `env_info()`'s device and date."""
    from scaling_compiler.cost_model import slug

    return f"{benchmark}_{slug(info['gpu'])}_{info['date'][:10]}{'_dry' if dry_run else ''}.json"


def write_result(out_dir: str | Path | None, name: str, payload: dict) -> Path:
    """Write a benchmark's JSON result as `out_dir/name` (default `RESULTS_DIR`) and say where."""
    out = RESULTS_DIR if out_dir is None else Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {path}")
    return path


@contextlib.contextmanager
def one_thread(enabled: bool) -> Iterator[None]:
    """--quick runs on one CPU thread: on a busy 2-core machine two threads stall each other
    (measured 40-80x slower)."""
    threads = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def cudnn_first(device: str) -> Iterator[None]:
    """Dense SDPA with cuDNN attention first in the priority order (the fastest dense kernel on an
    H100), then flash, efficient, math: torch falls back where cuDNN cannot run. No-op off CUDA."""
    if device != "cuda":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(order, set_priority=True):
        yield


FLOAT8_CAPABILITY = (8, 9)  # torchao's float8 matmuls and our FP8 attention kernel: sm89 (Ada) or later
TORCHAO_LINEARS = {"float8": "Float8DynamicActivationFloat8WeightConfig", "int8": "Int8WeightOnlyConfig"}


def quantize_linears(blocks: torch.nn.Module, kind: str) -> None:
    """torchao quantisation of the linears under `blocks`, in place: "float8", dynamic activation + weight
    with per-row scales (issue #18's stack), or "int8", weight-only (any device). torchao is optional:
    imported here.

    `set_inductor_config=False`: by default torchao's configs switch on inductor's coordinate-descent
    tuning for the whole process, so every later compile (of any variant) autotunes each Triton kernel
    on its first run: the float8 Wan2.1-1.3B took 428 s to compile instead of ~80 on an H200 (session 9),
    and variants compiled after it ran other kernels than those compiled before. Inductor's settings
    stay the run's own (`--inductor` sets them for every variant)."""
    from torchao import quantization

    config = getattr(quantization, TORCHAO_LINEARS[kind])
    options = {"granularity": quantization.PerRow()} if kind == "float8" else {}
    quantization.quantize_(blocks, config(**options, set_inductor_config=False))


def quantized_linears(model: torch.nn.Module) -> int:
    """How many nn.Linear weights of `model` are torchao tensor subclasses (0 for a plain model)."""
    return sum(type(m.weight) not in (torch.Tensor, torch.nn.Parameter)
               for m in model.modules() if isinstance(m, torch.nn.Linear))
