"""The Triton implementation of the kernels, behind `kernels.dispatch`.

- `block_sparse_attention.py`: the forward kernel (TMA or pointer loads of K/V) and its launcher;
  `mask_decode.py` turns packed masks into the kept-block lists it walks, `configs.py` holds its
  launch configs.
- `block_mass.py`: WEST's calibration reduction (exact attention mass per 128x128 block).

A backward kernel goes beside them in `block_sparse_attention_bwd.py` (dq, dk, dv from the
forward's `lse`, walking the same decoded block lists, plus the transposed lists for dk/dv);
`kernels/dispatch.py` gets a `block_sparse_attention_backward` that picks it per device, and
`ops.py` registers it with `torch.library.register_autograd` on the
`scaling_compiler::block_sparse_attention` op (the op then returns `lse` for the backward to
save). Its cost rows go into the same tables under direction "backward" (`cost_model.py`).
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
