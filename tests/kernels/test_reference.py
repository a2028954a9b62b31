"""The pure-torch references agree with each other and with SDPA."""
import pytest
import torch

from scaling_compiler.kernels.bitmask import num_blocks, pack_block_mask
from scaling_compiler.kernels.reference import blockwise_attention, masked_attention_reference


def _inputs(B, H, Sq, Sk, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, s, D, generator=g).to(dtype) for s in (Sq, Sk, Sk)]


def test_reference_full_mask_is_sdpa():
    q, k, v = _inputs(2, 3, 200, 300, 32, torch.float64, 0)
    mask = torch.ones(3, num_blocks(200), num_blocks(300), dtype=torch.bool)
    out, lse = masked_attention_reference(q, k, v, mask, 0.2)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.2)
    torch.testing.assert_close(out, sdpa, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, torch.logsumexp(0.2 * q @ k.transpose(-1, -2), -1), atol=1e-12, rtol=1e-12)


def test_reference_empty_rows():
    q, k, v = _inputs(1, 2, 256, 256, 16, torch.float64, 1)
    mask = torch.ones(2, 2, 2, dtype=torch.bool)
    mask[1, 0] = False
    out, lse = masked_attention_reference(q, k, v, mask, 0.25)
    assert torch.all(out[0, 1, :128] == 0) and torch.all(torch.isneginf(lse[0, 1, :128]))
    assert torch.isfinite(lse[0, 0]).all() and torch.isfinite(lse[0, 1, 128:]).all()


@pytest.mark.parametrize("B,H,Sq,Sk,D", [(1, 2, 256, 256, 64), (2, 2, 200, 300, 80), (1, 3, 130, 40, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("per_batch", [False, True])
def test_blockwise_matches_reference(B, H, Sq, Sk, D, dtype, per_batch):
    q, k, v = _inputs(B, H, Sq, Sk, D, dtype, Sq + D)
    shape = (B, H) if per_batch else (H, )
    g = torch.Generator().manual_seed(7)
    mask = torch.rand(*shape, num_blocks(Sq), num_blocks(Sk), generator=g) < 0.5
    mask[..., 0, :] = False  # an empty row
    mask[..., -1, -1] = True  # the partial key block
    out, lse = blockwise_attention(q, k, v, pack_block_mask(mask), 0.125)
    ref, ref_lse = masked_attention_reference(q, k, v, mask, 0.125)
    assert out.dtype == dtype and lse.dtype == torch.float32
    # inputs are exact in every dtype; only the computation (fp32, fp64) and out's rounding differ
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    assert torch.all(out[..., :128, :] == 0)
    assert torch.all(torch.isneginf(lse[..., :128]))


def test_blockwise_accepts_transposed_views():
    g = torch.Generator().manual_seed(3)
    x = [torch.randn(2, 300, 4, 32, generator=g) for _ in range(3)]
    q, k, v = (t.transpose(1, 2) for t in x)
    mask = torch.rand(4, 3, 3, generator=g) < 0.7
    out, lse = blockwise_attention(q, k, v, pack_block_mask(mask), 0.17)
    ref, ref_lse = masked_attention_reference(q, k, v, mask, 0.17)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
