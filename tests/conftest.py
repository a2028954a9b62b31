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
    if not _cpu_scaled_mm_has_rowwise_scales():
        pytest.skip("this torch's CPU _scaled_mm takes per-tensor scales only (torch 2.11): no rowwise float8")
    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)


@pytest.fixture
def float8_device(request) -> str:
    """Where torchao's float8 linears run for a test: a GPU with float8 tensor cores (sm89+), else the
    CPU with the hardware check bypassed (`float8_hardware_check_bypassed`)."""
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        return "cuda"
    request.getfixturevalue("float8_hardware_check_bypassed")
    return "cpu"


def _cpu_scaled_mm_has_rowwise_scales() -> bool:
    a = torch.zeros(16, 16, dtype=torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True
