"""The Triton backward (dq, dk, dv) against autograd through the float64 masked reference.

Runs in the interpreter without a GPU (fp32 and fp16; bf16 only on a GPU, as for the forward).
Tolerance, FlashAttention's rule: each gradient's relative error against float64 stays within
2x the error of PyTorch's own SDPA backward in the input dtype (on the CPU, same mask as a
boolean token mask), plus a floor at rounding level. Gradients the reference says are zero
(empty rows, key blocks nobody keeps, padded keys) must be exactly zero.
"""
import pytest
import torch
import torch.nn.functional as F

from scaling_compiler.kernels.bitmask import BLOCK_SIZE, num_blocks, pack_block_mask
from scaling_compiler.kernels.reference import masked_attention_reference
from scaling_compiler.kernels.triton.block_sparse_attention import block_sparse_attention
from scaling_compiler.kernels.triton.block_sparse_attention_bwd import block_sparse_attention_backward, default_configs

from .test_block_sparse_kernel import DEVICE, LOW_DTYPES, SHAPES, _qkv, _random_mask, _rel_err, gpu_only

# explicit (dkdv, dq) configs (None: `default_configs`): the default tiles, and 32-row / 32-key tiles
# (several tiles per mask block). Only `test_gpu_large` autotunes (each shape compiles every config).
CONFIGS = {
    "default": None,
    "small": ({"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
              {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}),
}
FLOOR = {torch.float32: 2e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def _token_mask(block_mask, Sq, Sk, key_padding):
    tok = block_mask.repeat_interleave(BLOCK_SIZE, -2).repeat_interleave(BLOCK_SIZE, -1)[..., :Sq, :Sk]
    if key_padding is not None:
        tok = tok & key_padding.cpu().reshape(-1, 1, 1, Sk)
    return tok


def _sdpa_grads(q, k, v, grad_out, token_mask, scale):
    """SDPA's gradients in the input dtype on the CPU (fully masked rows give zeros)."""
    q, k, v = (t.detach().cpu().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=token_mask, scale=scale)
    return torch.autograd.grad((out * grad_out.cpu()).nan_to_num(0.0).sum(), (q, k, v))


def check_backward(q, k, v, block_mask, scale, *, key_padding=None, grad_lse=False, configs=None, autotune=False,
                   seed=0, backward=None):
    """Run our forward + backward; compare dq, dk, dv (and their zeros) with the float64 reference.
    ``backward``: called like the Triton backward without its keywords (default: the Triton backward)."""
    if configs is None and not autotune:
        configs = default_configs(q.dtype)
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    words = pack_block_mask(block_mask).to(q.device)
    out, lse = block_sparse_attention(q, k, v, words, scale, None if autotune else {}, key_padding=key_padding)
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(q.shape, generator=g).to(q.dtype).to(q.device)
    grad_lse_t = torch.randn(lse.shape, generator=g).to(q.device) if grad_lse else None
    if backward is None:
        grads = block_sparse_attention_backward(q, k, v, out, lse, grad_out, words, scale, key_padding,
                                                grad_lse_t, configs=configs)
    else:
        grads = backward(q, k, v, out, lse, grad_out, words, scale, key_padding, grad_lse_t)

    qd, kd, vd = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = masked_attention_reference(qd, kd, vd, block_mask.cpu(), scale,
                                                  None if key_padding is None else key_padding.cpu())
    loss = (ref_out * grad_out.cpu().double()).sum()
    if grad_lse:
        loss = loss + (ref_lse.nan_to_num(neginf=0.0) * grad_lse_t.cpu().double()).sum()
    expected = torch.autograd.grad(loss, (qd, kd, vd), allow_unused=True)
    baseline = _sdpa_grads(q, k, v, grad_out, _token_mask(block_mask.cpu(), Sq, Sk, key_padding), scale)
    for name, got, ref, base, inp in zip("qkv", grads, expected, baseline, (q, k, v)):
        assert got.shape == inp.shape and got.dtype == q.dtype
        assert got.stride() == torch.empty_like(inp).stride(), f"d{name} is not in {name}'s layout"
        assert not got.isnan().any(), f"d{name} has NaN"
        ref = torch.zeros_like(got, dtype=torch.float64, device="cpu") if ref is None else ref
        zero_rows = (ref == 0).all(-1)  # empty query rows, key rows nobody sees
        assert torch.all(got.cpu()[zero_rows] == 0), f"d{name} must be exactly 0 where no attention flows"
        if zero_rows.all():
            continue
        err = _rel_err(got.cpu(), ref)
        bound = 2 * _rel_err(base, ref) + FLOOR[q.dtype]  # (SDPA has no lse output: with grad_lse, fp32 only)
        assert err <= bound, f"d{name} rel. error {err:.3g} > {bound:.3g}"
    return grads


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32] + LOW_DTYPES, ids=str)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_random_masks(shape, dtype, config):
    B, H, Sq, Sk, D = shape
    q, k, v = _qkv(B, H, Sq, Sk, D, dtype, seed=sum(shape))
    block_mask = _random_mask((H,), num_blocks(Sq), num_blocks(Sk), 0.6, seed=1)
    configs = CONFIGS[config] if dtype != torch.float32 else None  # fp32 has one config of its own
    check_backward(q, k, v, block_mask, D ** -0.5, configs=configs)


MASKS = {  # (H, Nq, Nk) -> bool
    "full": lambda h, nq, nk: torch.ones(h, nq, nk, dtype=torch.bool),
    "empty": lambda h, nq, nk: torch.zeros(h, nq, nk, dtype=torch.bool),
    "empty row and column": lambda h, nq, nk: torch.ones(h, nq, nk, dtype=torch.bool)
    .index_fill(1, torch.tensor([nq - 1]), False).index_fill(2, torch.tensor([0]), False),
    "one head empty": lambda h, nq, nk: torch.ones(h, nq, nk, dtype=torch.bool).index_fill(0, torch.tensor([0]), False),
}


@pytest.mark.parametrize("mask", list(MASKS))
def test_structured_masks(mask):
    """Empty rows get dq = 0, key blocks nobody keeps get dk = dv = 0 (exactly), the rest is exact."""
    q, k, v = _qkv(1, 2, 300, 270, 64, torch.float16, seed=5)
    check_backward(q, k, v, MASKS[mask](2, 3, 3), 0.125)


@pytest.mark.parametrize("layout", ["bshd", "strided"])
def test_layouts(layout):
    """Transposed (B, S, H, D) views and a non-contiguous last dim are read through their strides;
    the gradients come back in the inputs' layouts."""
    q, k, v = _qkv(2, 2, 200, 200, 64, torch.float16, seed=7, layout=layout)
    check_backward(q, k, v, _random_mask((2,), 2, 2, 0.7, seed=2), 0.125)


def test_key_padding_batch_masks_and_lse_gradient():
    """Per-batch masks, key padding (rows left with no key too) and a gradient flowing into lse."""
    B, H, S = 2, 2, 260
    q, k, v = _qkv(B, H, S, S, 64, torch.float32, seed=9)
    block_mask = _random_mask((B, H), 3, 3, 0.6, seed=3)
    key_padding = torch.rand(B, S, generator=torch.Generator().manual_seed(4)) > 0.3
    key_padding[1, :128] = False  # query block rows keeping only key block 0 of batch 1 see no key
    block_mask[1, :, :, 0] = True
    check_backward(q, k, v, block_mask, 0.125, key_padding=key_padding.to(q.device), grad_lse=True)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_large(dtype, D):
    """A few thousand tokens with a partial last block, on the GPU (autotuned configs)."""
    q, k, v = _qkv(1, 2, 4000, 4000, D, dtype, seed=D)
    check_backward(q, k, v, _random_mask((2,), 32, 32, 0.3, seed=D), D ** -0.5, autotune=True)


def test_matches_cpu_backward():
    """The CPU block-wise backward and the Triton backward agree (same inputs, fp32)."""
    from scaling_compiler.kernels.reference import blockwise_attention, blockwise_attention_backward

    q, k, v = _qkv(1, 2, 200, 330, 32, torch.float32, seed=11, layout="bshd")
    words = pack_block_mask(_random_mask((2,), 2, 3, 0.6, seed=4)).to(q.device)
    grad_out = torch.randn_like(q)
    out, lse = blockwise_attention(q, k, v, words, 0.2)
    cpu = blockwise_attention_backward(q, k, v, out, lse, grad_out, words, 0.2)
    triton_grads = block_sparse_attention_backward(q, k, v, out, lse, grad_out, words, 0.2)
    for a, b in zip(cpu, triton_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert a.stride() == b.stride()  # both in the inputs' (B, S, H, D) layout
