"""Test setup: without a GPU, Triton kernels run in the interpreter.

TRITON_INTERPRET must be set before any @triton.jit decorator runs, so it is set here,
before the package's kernel modules are imported by any test.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
