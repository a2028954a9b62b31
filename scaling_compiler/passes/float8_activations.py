"""Inductor post-grad pass: torchao's rowwise float8 quantisation of a tanh-GELU becomes one op.

A model whose linears torchao quantised with ``Float8DynamicActivationFloat8WeightConfig(PerRow())``
quantises each linear's input at run time; AOTAutograd decomposes that into aten operations, and in
a feed-forward block they follow the GELU of the first linear. Inductor fuses them into a looped row
reduction that reads the hidden state twice and computes the GELU twice (1.02 ms per layer at the
Wan2.1-1.3B shape on an H200). This pass, which the backend hands to inductor as its
``post_grad_custom_post_pass``, replaces the subgraph ``h -> gelu(h) -> (e4m3 values, row scales)``
with ``scaling_compiler::gelu_tanh_float8_rows`` (one read of each row: 0.36 ms; benchmarks/NOTES.md,
session 11). The pattern is traced from ``gelu_tanh_float8_rows_reference``, the same torch
operations as torchao's eager code, so it matches what AOTAutograd produced from them; a GELU that
has other users keeps inductor's code (the pattern matcher refuses matches whose inner nodes are used
outside them). Graphs without a cast to e4m3 are left alone before any pattern is traced.
"""
from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._inductor.pattern_matcher import PatternMatcherPass, fwd_only, register_replacement

from ..kernels import activation_quant
from ..kernels.activation_quant import INPUT_DTYPES, gelu_tanh_float8_rows_reference
from ..kernels.reference import FP8_DTYPE

log = logging.getLogger(__name__)
PATTERN_RANKS = (2, 3)  # (tokens, features) and (batch, tokens, features) hidden states


def _fused(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.scaling_compiler.gelu_tanh_float8_rows(h)


@functools.cache
def _patterns() -> PatternMatcherPass:
    """The patterns, traced once per process (their dtype and reduced dim are part of the graph)."""
    from .. import ops  # noqa: F401  (registers the op the replacement calls)

    patterns = PatternMatcherPass(pass_name="scalingattn_float8_activations")
    for dtype in INPUT_DTYPES:
        for rank in PATTERN_RANKS:
            example = torch.empty((2,) * (rank - 1) + (16,), dtype=dtype)
            register_replacement(gelu_tanh_float8_rows_reference, _fused, [example], fwd_only, patterns)
    return patterns


def _casts_to_float8(graph: torch.fx.Graph) -> bool:
    return any(node.target is torch.ops.prims.convert_element_type.default and node.args[1] == FP8_DTYPE
               for node in graph.nodes)


class Float8ActivationFusion(CustomGraphPass):
    """The pass over one inner compile; ``then``: the ``post_grad_custom_post_pass`` configured before
    (a pass, a callable, a list of them, or None), run after this one."""

    def __init__(self, then: Any = None):
        self.then = list(then) if isinstance(then, (list, tuple)) else [then] if then else []

    def __call__(self, graph: torch.fx.Graph) -> None:
        if _casts_to_float8(graph):
            fused = _patterns().apply(graph)
            if fused:
                log.info("fused %d GELU + float8 rowwise quantisations into scaling_compiler::gelu_tanh_float8_rows",
                         fused)
        for configured in self.then:
            configured(graph)

    def uuid(self) -> bytes | None:
        """Inductor's cache key: this pass's and the pattern's sources, then the configured passes' keys.
        None (inductor then bypasses its cache, as it does for the configured pass alone) when one of
        those has no key: a plain callable, or a pass whose ``uuid()`` is None."""
        keys = [configured.uuid() if isinstance(configured, CustomGraphPass) else None for configured in self.then]
        if any(key is None for key in keys):
            return None
        return get_hash_for_files((__file__, activation_quant.__file__)) + repr(keys).encode()
