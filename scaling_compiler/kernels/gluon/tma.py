"""TMA views and descriptors of ``(B, H, S, D)`` attention operands for Gluon kernels, and the inputs and
GPU those kernels take."""
from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ..triton.block_sparse_attention import _tma_2d_view

GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float8_e4m3fn: gl.float8e4nv}
HEAD_DIMS = (64, 128)  # of the Gluon kernels' q, k, v
DTYPES = (torch.bfloat16, torch.float16)


def hopper_reason(capability: tuple[int, int]) -> str | None:
    """Why a GPU of ``capability`` cannot run the Gluon kernels (None on Hopper: they use its wgmma)."""
    if capability != (9, 0):
        return f"needs Hopper's wgmma (capability 9.0), the GPU has {capability[0]}.{capability[1]}"
    return None


@gluon.jit
def head_origin(off_z, off_h, stride_z, stride_h, ld):
    """(row, column) of (batch, head)'s first element in a 2-D ``(rows, ld)`` TMA view."""
    off = off_z.to(gl.int64) * stride_z + off_h.to(gl.int64) * stride_h
    return (off // ld).to(gl.int32), (off % ld).to(gl.int32)


def tma_view(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]] | None:
    """The ``tl`` kernels' 2-D ``(rows, ld)`` TMA view of ``(B, H, S, D)`` t and (stride_z, stride_h, ld),
    or None where the layout has none. Rows past a head's S belong to the next head (or TMA's zero fill)."""
    view = _tma_2d_view(t, t.shape[3])
    if view is None:
        return None
    base, ld = view
    return base, (t.stride(0), t.stride(1), ld)


def descriptor(base: torch.Tensor, block: list[int]) -> TensorDescriptor:
    """A host TMA descriptor of 2-D ``base`` with ``block`` tiles in the default swizzled layout."""
    layout = gl.NVMMASharedLayout.get_default_for(block, GL_DTYPES[base.dtype])
    return TensorDescriptor(base, list(base.shape), list(base.stride()), block, layout)
