"""Helpers shared by the benchmark scripts (each puts the repository root on sys.path first)."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


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
