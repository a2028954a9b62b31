"""Key padding in the Triton block-sparse kernel, against the float64 reference.

Runs on a CUDA GPU (compiled kernels, bf16 too) or, without one, in Triton's interpreter (conftest
sets TRITON_INTERPRET=1; bf16 is left out there: the interpreter's bf16 dots are wrong). Both K/V
load paths: TMA descriptors and pointer loads. Padded keys inside kept blocks must not count; a
query row left with no valid key (a fully padded key block list, an all-padded batch entry) gets
out = 0 and lse = -inf, as the CPU block-wise path and an empty mask row do, never NaN.

Tolerances as in test_block_sparse_kernel.py (FlashAttention's rule): fp16/bf16 outputs within 2x
the error of attention computed in that dtype by plain torch, plus 1e-5; fp32 within 1e-5 relative;
lse within 1e-4 (fp32) / 2e-3 (fp16, bf16) absolute.
"""
import os

import pytest
import torch

from scaling_compiler.kernels import dispatch
from scaling_compiler.kernels.bitmask import BLOCK_SIZE, num_blocks, pack_block_mask
from scaling_compiler.kernels.dispatch import Implementation
from scaling_compiler.kernels.reference import blockwise_attention, masked_attention_reference
from scaling_compiler.kernels.triton import block_sparse_attention as triton_forward
from scaling_compiler.kernels.triton.block_sparse_attention import TMA_MIN_CAPABILITY, block_sparse_attention

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
CONFIG = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# (B, H, Sq, Sk, D): odd lengths, Sq != Sk, a padded head dim (80: pointer loads even with TMA asked), tiny
SHAPES = [(2, 2, 200, 300, 64), (2, 1, 130, 257, 80), (3, 2, 70, 40, 16)]


def _config(dtype):
    if dtype == torch.float32 and DEVICE == "cuda":  # fp32 tiles must fit shared memory
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    return dict(CONFIG)


def _skip_tma_without_hardware(use_tma):
    if use_tma and DEVICE == "cuda" and torch.cuda.get_device_capability()[0] < TMA_MIN_CAPABILITY:
        pytest.skip("TMA descriptors need capability >= 9")


def _case(B, H, Sq, Sk, D, dtype, seed, shared=False):
    """q, k, v, a block mask (with an empty row) and a key padding with a fully padded first key block
    in batch 0 and an all-padded last batch entry (unless `shared`: one (1, Sk) row)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, s, D, generator=g).to(dtype) for s in (Sq, Sk, Sk))
    mask = torch.rand(H, num_blocks(Sq), num_blocks(Sk), generator=g) < 0.7
    mask[:, :, 0] = True
    mask[:, 0] = True  # query block 0 keeps every key block: its rows see valid keys past block 0
    mask[0, -1] = False  # an empty mask row
    padding = torch.rand(1 if shared else B, Sk, generator=g) < 0.6
    padding[0, :min(Sk, BLOCK_SIZE)] = False  # rows that keep only block 0 see no valid key
    if not shared:
        padding[-1] = False  # an all-padded batch entry
    return q, k, v, mask, padding


def _to(device, *tensors):
    return [t.to(device) for t in tensors]


def _naive_lowp(q, k, v, mask, padding, scale):
    """Attention in the input dtype (the error baseline), fully masked rows zero."""
    Sq, Sk = q.shape[2], k.shape[2]
    tok = mask.repeat_interleave(BLOCK_SIZE, -2).repeat_interleave(BLOCK_SIZE, -1)[..., :Sq, :Sk]
    tok = tok & padding.reshape(-1, 1, 1, Sk)
    s = (q.float() @ k.float().transpose(-1, -2) * scale).to(q.dtype).float().masked_fill(~tok, float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0).to(q.dtype) @ v


def _check(out, lse, ref, ref_lse, bound, lse_bound):
    out, lse = out.cpu(), lse.cpu()
    empty = torch.isneginf(ref_lse)
    assert empty.any() and (~empty).any()  # the case has rows with and without a valid key
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.equal(torch.isneginf(lse), empty)
    assert torch.all(out[empty] == 0)
    err = ((out[~empty].double() - ref[~empty]).norm() / ref[~empty].norm()).item()
    assert err <= bound, f"out rel. error {err:.3g} > {bound:.3g}"
    assert (lse[~empty].double() - ref_lse[~empty]).abs().max().item() <= lse_bound


@pytest.mark.parametrize("use_tma", [False, True], ids=["pointer", "tma"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_key_padding_matches_reference(shape, dtype, use_tma):
    _skip_tma_without_hardware(use_tma)
    q, k, v, mask, padding = _case(*shape, dtype, seed=sum(shape))
    ref, ref_lse = masked_attention_reference(q, k, v, mask, 0.125, key_padding=padding)
    qd, kd, vd, words, pad = _to(DEVICE, q, k, v, pack_block_mask(mask), padding)
    out, lse = block_sparse_attention(qd, kd, vd, words, 0.125, _config(dtype), use_tma=use_tma, key_padding=pad)
    if dtype == torch.float32:
        bound, lse_bound = 1e-5, 1e-4
    else:
        naive = _naive_lowp(q, k, v, mask, padding, 0.125)
        rows = ~torch.isneginf(ref_lse)
        naive_err = ((naive[rows].double() - ref[rows]).norm() / ref[rows].norm()).item()
        bound, lse_bound = 2 * naive_err + 1e-5, 2e-3
    _check(out, lse, ref, ref_lse, bound, lse_bound)


@pytest.mark.parametrize("use_tma", [False, True], ids=["pointer", "tma"])
def test_key_padding_shared_over_batch_and_per_batch_masks(use_tma):
    """A (1, Sk) padding row shared by every batch entry, with per-batch (B, H, Nq, W) block masks."""
    _skip_tma_without_hardware(use_tma)
    B, H, Sq, Sk, D = 2, 2, 150, 260, 32
    q, k, v, _, padding = _case(B, H, Sq, Sk, D, torch.float32, seed=11, shared=True)
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(B, H, num_blocks(Sq), num_blocks(Sk), generator=g) < 0.6
    mask[..., 0] = True
    ref, ref_lse = masked_attention_reference(q, k, v, mask, 0.2, key_padding=padding)
    qd, kd, vd, words, pad = _to(DEVICE, q, k, v, pack_block_mask(mask), padding)
    out, lse = block_sparse_attention(qd, kd, vd, words, 0.2, _config(torch.float32), use_tma=use_tma, key_padding=pad)
    _check(out, lse, ref, ref_lse, 1e-5, 1e-4)


@pytest.mark.parametrize("use_tma", [False, True], ids=["pointer", "tma"])
def test_key_padding_all_valid_equals_no_padding(use_tma):
    """All keys valid: the padded kernel gives the unpadded kernel's answer (rounding level), and the
    padding really is read (dropping one key block changes the answer)."""
    _skip_tma_without_hardware(use_tma)
    B, H, Sq, Sk, D = 1, 2, 200, 300, 64
    q, k, v, mask, _ = _case(B, H, Sq, Sk, D, torch.float32, seed=3)
    qd, kd, vd, words = _to(DEVICE, q, k, v, pack_block_mask(mask))
    config = _config(torch.float32)
    plain, plain_lse = block_sparse_attention(qd, kd, vd, words, 0.125, config, use_tma=use_tma)
    padded, padded_lse = block_sparse_attention(qd, kd, vd, words, 0.125, config, use_tma=use_tma,
                                                key_padding=torch.ones(1, Sk, dtype=torch.bool, device=DEVICE))
    torch.testing.assert_close(padded, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(padded_lse, plain_lse, rtol=1e-6, atol=1e-6)
    some = torch.ones(1, Sk, dtype=torch.bool, device=DEVICE)
    some[:, 130:200] = False
    changed, _ = block_sparse_attention(qd, kd, vd, words, 0.125, config, use_tma=use_tma, key_padding=some)
    assert (changed - plain).abs().max().item() > 1e-3


def test_key_padding_kernel_equals_cpu_blockwise_path():
    """The Triton paths, as dispatch runs them, and the CPU block-wise path agree, empty rows included."""
    q, k, v, mask, padding = _case(2, 2, 200, 300, 64, torch.float32, seed=21)
    words = pack_block_mask(mask)
    cpu_out, cpu_lse = blockwise_attention(q, k, v, words, 0.125, key_padding=padding)
    implementations = [Implementation.TRITON_POINTER]
    if DEVICE != "cuda" or torch.cuda.get_device_capability()[0] >= TMA_MIN_CAPABILITY:
        implementations.append(Implementation.TRITON_TMA)
    if DEVICE == "cuda":
        implementations.append(None)  # what dispatch picks itself (autotuned)
    qd, kd, vd, wd, pad = _to(DEVICE, q, k, v, words, padding)
    for implementation in implementations:
        if implementation is not None and DEVICE != "cuda":  # one small config in the interpreter
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(triton_forward, "default_config", lambda dtype, head_dim, device=None: dict(CONFIG))
                out, lse = dispatch.block_sparse_attention(qd, kd, vd, wd, 0.125, pad, implementation=implementation)
        else:
            out, lse = dispatch.block_sparse_attention(qd, kd, vd, wd, 0.125, pad, implementation=implementation)
        torch.testing.assert_close(out.cpu(), cpu_out, rtol=1e-4, atol=1e-5)
        assert torch.equal(torch.isneginf(lse.cpu()), torch.isneginf(cpu_lse))


def test_key_padding_rejects_bad_shapes():
    q, k, v, mask, _ = _case(2, 1, 128, 128, 32, torch.float32, seed=0)
    qd, kd, vd, words = _to(DEVICE, q, k, v, pack_block_mask(mask))
    for bad in (torch.ones(3, 128, dtype=torch.bool), torch.ones(2, 127, dtype=torch.bool),
                torch.ones(2, 128, dtype=torch.int32)):
        with pytest.raises(ValueError, match="key_padding"):
            block_sparse_attention(qd, kd, vd, words, 0.1, dict(CONFIG), key_padding=bad.to(DEVICE))
