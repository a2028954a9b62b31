"""The one-pass GELU + rowwise float8 quantisation kernel against its PyTorch reference (torchao's
operations, `kernels/activation_quant.py`), in the interpreter on the CPU and compiled on a GPU.

Tolerances. The kernel computes the GELU as x sigmoid(2u) instead of PyTorch's 0.5 x (1 + tanh(u)):
the same value in float32 up to a few units of the last place, so after rounding to the input dtype
a small fraction of elements (~0.03% in fp16 on random inputs) lands one unit of that dtype's last
place away. Such an element's e4m3 value then differs by at most one e4m3 step (2^-3 relative), and
a row scale, when its maximum is such an element, by one unit of the input dtype's last place.
"""
from __future__ import annotations

import pytest
import torch

from scaling_compiler.kernels import dispatch
from scaling_compiler.kernels.activation_quant import gelu_tanh_float8_rows_reference
from scaling_compiler.kernels.reference import FP8_MAX
from scaling_compiler.kernels.triton import activation_quant as kernel

from .test_block_sparse_kernel import DEVICE, gpu_only

INPUT_EPS = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}  # one unit of the last place, relative
E4M3_STEP = 2.0 ** -3
SHAPES = [(1, 64), (3, 300), (2, 5, 1000), (2, 8960), (1, 13824)]  # odd widths; Wan2.1 1.3B's and 14B's FFN widths


def check_against_reference(h: torch.Tensor, min_equal: float) -> None:
    q, scale = kernel.gelu_tanh_float8_rows(h)
    ref_q, ref_scale = gelu_tanh_float8_rows_reference(h)
    assert q.dtype == ref_q.dtype and q.shape == h.shape and scale.shape == ref_scale.shape == (*h.shape[:-1], 1)
    torch.testing.assert_close(scale, ref_scale, rtol=INPUT_EPS[h.dtype], atol=0)
    values, ref_values = q.float() * scale, ref_q.float() * ref_scale
    both_nan = values.isnan() & ref_values.isnan()
    assert torch.equal(values.isnan(), ref_values.isnan())
    equal = (q.float() == ref_q.float()) | both_nan
    assert equal.float().mean() >= min_equal
    off = ~equal
    step = E4M3_STEP * ref_values.abs() + ref_scale.expand_as(ref_values) * 2.0 ** -9  # e4m3's smallest step
    assert torch.all((values - ref_values).abs()[off] <= step[off] * (1 + INPUT_EPS[h.dtype]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(dtype, shape):
    torch.manual_seed(sum(shape))
    h = (torch.randn(shape) * 2.5).to(dtype).to(DEVICE)
    check_against_reference(h, min_equal=0.999)


def test_zero_row_is_nan_as_torchao_and_large_values_saturate_nothing():
    """An all-zero row: scale 0 and NaN values (torchao's 0 / 0). The row maximum maps to exactly 448."""
    h = torch.randn(4, 200).to(torch.float16)
    h[1] = 0
    h[2, 7] = 60000.0  # near fp16's maximum: its GELU is itself
    q, scale = kernel.gelu_tanh_float8_rows(h.to(DEVICE))
    assert scale[1].item() == 0 and q[1].float().isnan().all()
    assert q[2, 7].float().item() == FP8_MAX
    check_against_reference(h.to(DEVICE), min_equal=0.99)


@pytest.mark.parametrize("magnitude", [1e-30, 1e-37, 1e-39], ids=str)
def test_tiny_rows_keep_their_values(magnitude):
    """Rows of tiny values, down to a subnormal scale (bf16 keeps float32's exponent range): the
    kernel multiplies by the row's reciprocal scale, which must stay finite there."""
    h = (torch.randn(3, 300, dtype=torch.float64) * magnitude).to(torch.bfloat16)
    check_against_reference(h.to(DEVICE), min_equal=0.99)


def test_special_values_as_eager():
    """inf, -inf and NaN in a row spread through the GELU, amax and division exactly as in torch."""
    h = torch.randn(5, 130).to(torch.bfloat16)
    h[0, 3] = float("inf")  # gelu = inf, amax inf: inf / inf = NaN there, 0 elsewhere
    h[1, 9] = float("-inf")  # gelu(-inf) = NaN in torch's formula: the row's amax is NaN
    h[2, 0] = float("nan")
    q, scale = kernel.gelu_tanh_float8_rows(h.to(DEVICE))
    ref_q, ref_scale = gelu_tanh_float8_rows_reference(h.to(DEVICE))
    torch.testing.assert_close(scale, ref_scale, equal_nan=True, rtol=INPUT_EPS[h.dtype], atol=0)
    torch.testing.assert_close(q.float(), ref_q.float(), equal_nan=True, rtol=0, atol=0)


def test_strided_input_equals_contiguous():
    h = torch.randn(300, 6).to(torch.bfloat16).to(DEVICE).t()  # (6, 300): rows with stride 1 between rows
    q, scale = kernel.gelu_tanh_float8_rows(h)
    q_c, scale_c = kernel.gelu_tanh_float8_rows(h.contiguous())
    assert torch.equal(q.float().nan_to_num(), q_c.float().nan_to_num()) and torch.equal(scale, scale_c)


def test_refuses_what_it_cannot_run():
    assert "dtype" in kernel.unsupported_reason(torch.randn(2, 8))
    assert "rows of" in kernel.unsupported_reason(torch.randn(1, kernel.MAX_ROW + 1, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="gelu_tanh_float8_rows cannot take"):
        kernel.gelu_tanh_float8_rows(torch.randn(2, 8))


def test_op_dispatches_and_passes_opcheck():
    """The op: the kernel on CUDA, the reference elsewhere (and for inputs the kernel refuses)."""
    h = torch.randn(3, 2, 96).to(torch.bfloat16).to(DEVICE)
    q, scale = torch.ops.scaling_compiler.gelu_tanh_float8_rows(h)
    expected = dispatch.gelu_tanh_float8_rows(h)
    assert torch.equal(q.float().nan_to_num(), expected[0].float().nan_to_num()) and torch.equal(scale, expected[1])
    torch.library.opcheck(torch.ops.scaling_compiler.gelu_tanh_float8_rows.default, (h,))


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_full_width(dtype):
    """A Wan2.1-1.3B-wide hidden state (4,095 of its 32,760 rows x 8,960) on the GPU."""
    torch.manual_seed(0)
    h = (torch.randn(4095, 8960, device="cuda") * 2.5).to(dtype)
    check_against_reference(h, min_equal=0.999)
