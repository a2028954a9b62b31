"""Test setup: without a GPU, Triton kernels run in the interpreter.

TRITON_INTERPRET must be set before any @triton.jit decorator runs, so it is set here,
before the package's kernel modules are imported by any test.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# WEST topologies are cached on disk: tests calibrate into their own folder, never reusing a
# cache that an older version of the code (or the user) wrote.
if "SCALINGATTN_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["SCALINGATTN_CACHE_DIR"] = tempfile.mkdtemp(prefix="scalingattn-test-cache-")
