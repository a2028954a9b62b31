"""The run's clock and the timing primitives: START and the progress log, synchronised timed calls,
peak memory, and releasing compiled code between variants."""
from __future__ import annotations

import gc
import statistics
import sys
import time
from typing import Any, Callable

import torch

START = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - START:6.0f} s] {message}", file=sys.stderr, flush=True)


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


def allocated_gib(cuda: bool) -> float:
    """GiB the caching allocator holds for tensors now (0 on the CPU)."""
    return torch.cuda.memory_allocated() / 2**30 if cuda else 0.0


def peak_gib(cuda: bool) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if cuda else None


def reset_peak(cuda: bool) -> None:
    if cuda:
        torch.cuda.reset_peak_memory_stats()
