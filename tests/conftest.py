"""Test setup: without a GPU, Triton kernels run in the interpreter.

TRITON_INTERPRET must be set before any @triton.jit decorator runs, so it is set here,
before the package's kernel modules are imported by any test.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# WEST topologies are cached on disk: tests calibrate into their own folder, never reusing a
# cache that an older version of the code (or the user) wrote.
if "SCALINGATTN_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["SCALINGATTN_CACHE_DIR"] = tempfile.mkdtemp(prefix="scalingattn-test-cache-")


@pytest.fixture
def float8_hardware_check_bypassed(monkeypatch):
    """torchao's Float8DynamicActivationFloat8WeightConfig usable on the CPU. torchao refuses float8
    quantisation without an sm89 GPU by a hardware check before it quantises; torch's `_scaled_mm` runs the float8 weights and activations
    on the CPU all the same, so CPU tests bypass the check and run torchao's real code."""
    quant_api = pytest.importorskip("torchao.quantization.quant_api")
    if not hasattr(quant_api, "_check_hardware_support"):
        pytest.skip("this torchao has no _check_hardware_support to bypass: float8 only on its GPUs")
    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
