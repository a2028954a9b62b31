"""The Triton implementation of the kernels, behind `kernels.dispatch`.

- `block_sparse_attention.py`: the forward kernel (TMA or pointer loads of K/V) and its launcher;
  `mask_decode.py` turns packed masks into the kept-block lists it walks (rows) and the backward's
  column lists, `configs.py` holds its launch configs.
- `block_sparse_attention_bwd.py`: the backward (dq, dk, dv from the forward's out and lse), with
  its own configs; `kernels/dispatch.py` picks it per device (on Hopper, `kernels/gluon/`'s one-pass
  backward where it applies) and `ops.py` registers it as the autograd formula of
  `scaling_compiler::block_sparse_attention_lse`.
- `block_sparse_attention_fp8.py`: the FP8 (e4m3) forward, inference only, with its quantisation
  prep; `kernels/dispatch.py` runs it on CUDA (its torch emulation elsewhere) for the op
  `scaling_compiler::block_sparse_attention_fp8`.
- `block_mass.py`: WEST's calibration reduction (exact attention mass per 128x128 block).
"""
from __future__ import annotations

import os


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _patch_interpreter_scalar_index():
    """Let Triton 3.6's interpreter use run-time scalars as loop bounds under NumPy >= 2.4.

    The interpreter holds scalars as 1-element arrays and converts loop bounds with
    ``int(array)``, which NumPy 2.4 rejects for arrays with ndim > 0 ("only 0-dimensional
    arrays can be converted to Python scalars"), so any ``range(0, n)`` over a loaded count
    fails. We re-register the tensor's ``__index__`` to read the single element instead.
    Only applied when TRITON_INTERPRET=1; compiled kernels are unaffected.
    """
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_scalar_index_fixed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._scalar_index_fixed = True
    interpreter._patch_lang_tensor = patched


def _patch_interpreter_float_rounding():
    """Make the interpreter convert floats to and from float8e4nv (e4m3) and bfloat16 as the GPU does.

    Triton 3.x's interpreter converts fp32/fp16/bf16 to fp8 by adding the first dropped mantissa
    bit and masking the carry away: a value that rounds up into the next power of two drops to
    the power below (126.1 -> 64 instead of 128), and ties round up. It converts fp32 to bf16 by
    dropping the low 16 bits (1.0039 -> 1.0, not 1.0078). The FP8 kernel
    (``block_sparse_attention_fp8.py``) casts every operand to e4m3, and the activation
    quantisation (``activation_quant.py``) rounds its GELU to bf16 as PyTorch does, so we convert
    through torch instead: round to nearest even, saturating fp8 at +-448 like the GPU's
    ``cvt.rn.satfinite``. bfloat16 -> float32 is a shift (the interpreter's formula turns subnormals
    into other numbers: 1.01e-39 -> 4.41e-39). Other conversions keep the interpreter's code.
    """
    import numpy as np
    import torch
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter._convert_float
    if getattr(original, "_rounding_fixed", False):
        return

    def to_float32(data, dtype):
        if dtype == tl.bfloat16:  # stored as uint16: the high half of a float32
            return (data.astype(np.uint32) << 16).view(np.float32)
        return data.astype(np.float32)

    def patched(data, input_dtype, output_dtype, rounding_mode):
        if input_dtype not in (tl.float32, tl.float16, tl.bfloat16):
            return original(data, input_dtype, output_dtype, rounding_mode)
        if output_dtype == tl.float8e4nv:
            x = torch.from_numpy(np.clip(to_float32(data, input_dtype), -448.0, 448.0))
            return x.to(torch.float8_e4m3fn).view(torch.uint8).numpy().reshape(data.shape)
        if output_dtype == tl.float32 and input_dtype == tl.bfloat16:  # exact: the interpreter's own breaks subnormals
            return to_float32(data, input_dtype)
        if output_dtype == tl.bfloat16 and input_dtype == tl.float32:
            x = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
            return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).reshape(data.shape)
        return original(data, input_dtype, output_dtype, rounding_mode)

    patched._rounding_fixed = True
    interpreter._convert_float = patched


if interpreting():
    _patch_interpreter_scalar_index()
    _patch_interpreter_float_rounding()
