"""The Triton implementation of the kernels, behind `kernels.dispatch`.

- `block_sparse_attention.py`: the forward kernel (TMA or pointer loads of K/V) and its launcher;
  `mask_decode.py` turns packed masks into the kept-block lists it walks (rows) and the backward's
  column lists, `configs.py` holds its launch configs.
- `block_sparse_attention_bwd.py`: the backward (dq, dk, dv from the forward's out and lse), with
  its own configs; `kernels/dispatch.py` picks it per device and `ops.py` registers it as the
  autograd formula of `scaling_compiler::block_sparse_attention_lse`.
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


if interpreting():
    _patch_interpreter_scalar_index()
