"""Decoded block lists kept per mask tensor, so a static mask is decoded once, not on every call.

The masks of a rewritten graph are constants: the same int32 tensor reaches the op on every
call. Decoding it (``mask_decode``: one launch per view plus a sort for the launch order) costs
little GPU time but a dozen small launches of host time per call, which shows as idle GPU
between the forward and the backward (about 0.4 ms per forward + backward at the Wan2.1-1.3B
shape, density 0.1, on an H200). Entries are keyed by the tensor's identity and checked against
its version counter (an in-place change decodes again); an entry dies with its tensor. At most
``BUDGET_BYTES`` of lists are kept, least recently used dropped first. Inference tensors (no
version counter) are not cached.

CUDA graphs. Inductor's CUDA graphs (``mode="reduce-overhead"``) warm up and capture a graph on a
side stream, every allocation going to the graph's private pool, and refuse to go on when a tensor
allocated there outlives the run ("live storage data ptrs are in the cudagraph pool but not
accounted for": every sparse variant of the end-to-end benchmark failed so on an H200). And a
captured graph reads its lists at fixed addresses on every replay, so they must not be evicted
while it lives. Hence two kinds of entries:

- ordinary ones, made and served on the device's default stream only (elsewhere the lists are
  decoded for the call and not kept: under capture, the decoding becomes part of the graph);
- pinned ones (``pin=True``: a compiled graph's constant masks, decoded at compile time by
  ``dispatch.decode_constant_mask``), never evicted and served on any stream, so a captured graph
  reads lists that live as long as their mask, which the compiled graph holds. (A pinned mask changed
  in place is decoded again on the next call, but a graph captured before reads the old lists' memory:
  the rewrite's masks are never changed.)
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
    pinned: bool


_entries: "OrderedDict[tuple, _Entry]" = OrderedDict()
_held_bytes = 0


def _on_default_stream(words: torch.Tensor) -> bool:
    return not words.is_cuda or torch.cuda.current_stream(words.device) == torch.cuda.default_stream(words.device)


def _drop(key: tuple) -> None:
    global _held_bytes
    entry = _entries.pop(key, None)
    if entry is not None:
        _held_bytes -= entry.nbytes


def _evict() -> None:
    """Drop least recently used unpinned entries until the budget holds (or only pinned ones are left)."""
    for key in [k for k, e in _entries.items() if not e.pinned]:
        if _held_bytes <= BUDGET_BYTES:
            return
        _drop(key)


def cached(kind: str, words: torch.Tensor, build: Callable[[], tuple[torch.Tensor, ...]], *key_args,
           pin: bool = False) -> tuple:
    """``build()`` (a tuple of tensors decoded from ``words``), reused while ``words`` is the same,
    unmodified tensor. ``kind`` and ``key_args`` name the decoding (row or column view, lengths);
    ``pin``: keep the entry until ``words`` dies and serve it on any stream (see the module's doc)."""
    global _held_bytes
    if words.is_inference():
        return build()
    key = (id(words), kind, *key_args)
    entry = _entries.get(key)
    valid = entry is not None and entry.words() is words and entry.version == words._version
    if valid and entry.pinned:  # the compiled graphs' masks: no stream query on their hot path
        _entries.move_to_end(key)
        return entry.value
    default_stream = _on_default_stream(words)
    if valid and default_stream:
        if pin:
            _entries[key] = entry._replace(pinned=True)
        _entries.move_to_end(key)
        return entry.value
    if not default_stream:
        return build()
    pin = pin or (entry is not None and entry.pinned and entry.words() is words)  # changed in place: still pinned
    _drop(key)
    value = build()
    nbytes = sum(t.numel() * t.element_size() for t in value)
    if nbytes > BUDGET_BYTES and not pin:
        return value
    _entries[key] = _Entry(weakref.ref(words, lambda _ref, key=key: _drop(key)), words._version, value, nbytes, pin)
    _held_bytes += nbytes
    _evict()
    return value


def clear() -> None:
    """Forget every decoded list (tests; freeing memory by hand)."""
    global _held_bytes
    _entries.clear()
    _held_bytes = 0


def held_bytes() -> int:
    """Bytes of decoded lists held now."""
    return _held_bytes
