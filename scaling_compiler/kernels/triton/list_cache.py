"""Decoded block lists kept per mask tensor, so a static mask is decoded once, not on every call.

The masks of a rewritten graph are constants: the same int32 tensor reaches the op on every
call. Decoding it (``mask_decode``: one launch per view plus a sort for the launch order) costs
little GPU time but a dozen small launches of host time per call, which shows as idle GPU
between the forward and the backward (about 0.4 ms per forward + backward at the Wan2.1-1.3B
shape, density 0.1, on an H200). Entries are keyed by the tensor's identity and checked against
its version counter (an in-place change decodes again); an entry dies with its tensor. At most
``BUDGET_BYTES`` of lists are kept, least recently used dropped first.

Not cached: inference tensors (no version counter), and CUDA masks on a stream other than the
device's default stream. The second rule keeps lists out of CUDA graph memory pools: inductor's
CUDA graphs (``mode="reduce-overhead"``) warm up and capture a graph on a side stream with every
allocation going to the graph's private pool, and refuse to go on when a tensor allocated there
outlives the run ("live storage data ptrs are in the cudagraph pool but not accounted for": every
sparse variant of the end-to-end benchmark failed so under ``+cg`` on an H200). A compiled graph's
constant masks are decoded at compile time instead (``dispatch.decode_constant_mask``), so those
calls find them here without allocating.
"""
import weakref
from collections import OrderedDict
from typing import Callable, NamedTuple

import torch

BUDGET_BYTES = 1 << 30


class _Entry(NamedTuple):
    words: weakref.ref
    version: int
    value: tuple[torch.Tensor, ...]
    nbytes: int


_entries: "OrderedDict[tuple, _Entry]" = OrderedDict()
_held_bytes = 0


def _cacheable(words: torch.Tensor) -> bool:
    if words.is_inference():
        return False
    return not words.is_cuda or torch.cuda.current_stream(words.device) == torch.cuda.default_stream(words.device)


def _drop(key: tuple) -> None:
    global _held_bytes
    entry = _entries.pop(key, None)
    if entry is not None:
        _held_bytes -= entry.nbytes


def cached(kind: str, words: torch.Tensor, build: Callable[[], tuple[torch.Tensor, ...]], *key_args) -> tuple:
    """``build()`` (a tuple of tensors decoded from ``words``), reused while ``words`` is the same,
    unmodified tensor. ``kind`` and ``key_args`` name the decoding (row or column view, lengths)."""
    global _held_bytes
    if not _cacheable(words):
        return build()
    key = (id(words), kind, *key_args)
    entry = _entries.get(key)
    if entry is not None and entry.words() is words and entry.version == words._version:
        _entries.move_to_end(key)
        return entry.value
    _drop(key)
    value = build()
    nbytes = sum(t.numel() * t.element_size() for t in value)
    if nbytes > BUDGET_BYTES:
        return value
    _entries[key] = _Entry(weakref.ref(words, lambda _ref, key=key: _drop(key)), words._version, value, nbytes)
    _held_bytes += nbytes
    while _held_bytes > BUDGET_BYTES:
        _drop(next(iter(_entries)))
    return value


def clear() -> None:
    """Forget every decoded list (tests; freeing memory by hand)."""
    global _held_bytes
    _entries.clear()
    _held_bytes = 0


def held_bytes() -> int:
    """Bytes of decoded lists held now."""
    return _held_bytes
