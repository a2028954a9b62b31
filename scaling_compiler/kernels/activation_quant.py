"""GELU (tanh) and torchao's rowwise float8 quantisation of its output, as one op.

torchao's ``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`` quantises the input of
each float8 linear at run time: per row, ``scale = amax(|x|) / 448`` (computed in x's dtype, then
float32) and ``x / scale`` clamped to +-448, rounded to e4m3. In a DiT's feed-forward block x is a
tanh-GELU of the first linear's output. Inductor fuses the GELU into the quantisation as a looped row
reduction that reads the hidden state twice and computes the GELU twice: at the Wan2.1-1.3B 480p
shape (32,760 x 8,960) 1.02 ms per layer on an H200, the float8 stack's largest kernel after the
GEMMs and attention. ``passes/float8_activations.py`` replaces that pattern with the op
``scaling_compiler::gelu_tanh_float8_rows``, whose Triton kernel
(``kernels/triton/activation_quant.py``) reads each row once (0.36 ms in the same setting,
benchmarks/NOTES.md, session 11).

:func:`gelu_tanh_float8_rows_reference` is both the op's PyTorch implementation and the pattern the
pass searches for: the same torch operations as torchao's eager code, so the traced pattern equals
what AOTAutograd makes of a quantised linear after ``gelu(approximate="tanh")``.
"""
from __future__ import annotations

import torch

from .reference import FP8_DTYPE, FP8_MAX

INPUT_DTYPES = (torch.bfloat16, torch.float16)


def gelu_tanh_float8_rows_reference(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 ``gelu(h)`` scaled per row, the float32 row scales ``(..., 1)``), as torchao computes them.

    A row whose GELU is all zero gets scale 0 and NaN values, as in torchao (0 / 0)."""
    g = torch.nn.functional.gelu(h, approximate="tanh")
    scale = (g.abs().amax(dim=g.dim() - 1, keepdim=True) / FP8_MAX).to(torch.float32)
    return (g.to(torch.float32) / scale).clamp(min=-FP8_MAX, max=FP8_MAX).to(FP8_DTYPE), scale
