"""The FP8 block-sparse kernel, its torch emulation and its op, against the float64 reference.

Without a GPU these run in Triton's interpreter (conftest sets TRITON_INTERPRET=1) with fp16
inputs (the interpreter's bf16 arithmetic is wrong; its fp8 casts are patched to round like the
GPU, see ``kernels/triton/__init__.py``); on a GPU bf16 too.

Tolerance, from e4m3's precision. e4m3 keeps 3 mantissa bits: rounding to nearest has relative
error <= 2^-4 = 6.25%, about 2.5% RMS over values spread across a binade. The kernel rounds three
times: q and k (each score q.k picks up ~sqrt(2) x 2.5% of the spread of its products, ~4% of a
score's scale), P (2.5%) and v (2.5%). For random normal inputs, whose near-uniform attention
averages random values, these errors carry straight into the output: measured relative Frobenius
errors against float64 are 3-5.5% (qk ~4%, P ~2.5%, v ~2.6%, summing as root of squares to ~5.3%).
Measured here (interpreter, fp16 inputs; the torch emulation with bf16 inputs gives the same):
3.4-5.4%, worst row 7-10%. We require ``FP8_REL_TOL = 0.08`` (1.5x the largest expected) and
per row ``FP8_ROW_TOL = 0.25`` (a row averages fewer roundings). For comparison, on the same
inputs: the fp16 kernel 0.022-0.027%; plain bf16 attention 0.3-0.56% (the bf16 kernel stays
within 2x of it: FlashAttention's rule, test_block_sparse_kernel.py). So FP8 costs ~10-20x the
error of bf16 and ~200x that of fp16 on random data; real models' peaked attention and
correlated values fare better (SageAttention's measurements). k's smoothing is tested with a
large per-channel offset (without it the offset would set the e4m3 scale of every key block).
Rows with no kept key are exactly 0. The torch emulation (the op's CPU path) writes the same
quantised bytes as the Triton prep and matches the kernel to fp32 rounding (1e-4) when the
kernel walks 128-key tiles (the emulation's granularity; 64-key tiles round P after other
running maxima, within the FP8 tolerance of each other). That holds in the interpreter, whose fp8
dots are fp32 dots of the rounded values; on an H200 the kernel differs from the emulation by
0.29-0.46% (measured, Triton 3.6): Hopper's FP8 tensor cores accumulate with fewer mantissa bits
than fp32, and a P element near an e4m3 rounding boundary can round the other way after the
kernel's exp2 differs from torch's in the last bit. ``EMULATION_TOL`` is 0.01 on a GPU (about 2x that;
still 5x below the FP8 error against float64).
"""
import math

import pytest
import torch

from scaling_compiler import ops  # noqa: F401  (registers the ops)
from scaling_compiler.kernels import dispatch
from scaling_compiler.kernels.bitmask import num_blocks, pack_block_mask
from scaling_compiler.kernels.reference import (FP8_DTYPE, blockwise_attention_fp8, key_means,
                                                masked_attention_reference, permute_value_keys, quantize_fp8,
                                                value_scales)
from scaling_compiler.kernels.triton.block_sparse_attention import block_sparse_attention
from scaling_compiler.kernels.triton.block_sparse_attention_fp8 import (STATS_ROWS, _key_value_statistics,
                                                                         block_sparse_attention_fp8,
                                                                         fp8_unsupported_reason, quantize)
from tests.kernels.test_block_sparse_kernel import (DEVICE, _qkv, _random_mask, _rel_err, _structured_mask,
                                                   per_batch_case)

FP8_REL_TOL = 0.08
FP8_ROW_TOL = 0.25
EMULATION_TOL = 1e-4 if DEVICE != "cuda" else 0.01
OPS = torch.ops.scaling_compiler
gpu_only = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")
DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# (B, H, Sq, Sk, D): odd lengths, Sq != Sk, both head dims, Sk < 128
SHAPES = [(1, 2, 256, 256, 64), (2, 1, 200, 330, 128), (1, 2, 130, 70, 64), (1, 1, 300, 130, 128)]
# (config, use_tma): 128x128 tiles through TMA (the default), 128x64 and 64x64 tiles through pointers
CONFIGS = {
    "m128n128_tma": ({"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 5}, None),
    "m128n64_ptr": ({"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 5}, False),
    "m64n64_tma": ({"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 5}, None),
}
FP16_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}


def _check(q, k, v, block_mask, scale, config="m128n128_tma", key_padding=None, kernel_mask=None):
    """Run the kernel (with ``kernel_mask``, default ``block_mask``), check it against float64 over
    ``block_mask`` (FP8 tolerance, exact empty rows); returns (out, its relative error, the 16-bit
    kernel's relative error on the same inputs)."""
    conf, use_tma = CONFIGS[config]
    words = pack_block_mask(block_mask if kernel_mask is None else kernel_mask).to(q.device)
    pad = None if key_padding is None else key_padding.to(q.device)
    out = block_sparse_attention_fp8(q, k, v, words, scale, pad, config=conf, use_tma=use_tma)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride() == torch.empty_like(q).stride()
    assert not out.isnan().any()
    ref, ref_lse = masked_attention_reference(q.cpu(), k.cpu(), v.cpu(), block_mask, scale, key_padding)
    out16, _ = block_sparse_attention(q, k, v, words, scale, FP16_CONFIG, key_padding=pad)
    out, out16 = out.cpu(), out16.cpu()
    empty = torch.isneginf(ref_lse)
    assert torch.all(out[empty] == 0)
    if empty.all():
        return out, 0.0, 0.0
    err, err16 = _rel_err(out[~empty], ref[~empty]), _rel_err(out16[~empty], ref[~empty])
    assert err <= FP8_REL_TOL, f"FP8 rel. error {err:.3g} > {FP8_REL_TOL} (16-bit kernel: {err16:.3g})"
    rows = (out[~empty].double() - ref[~empty]).norm(dim=-1) / ref[~empty].norm(dim=-1).clamp_min(1e-30)
    assert rows.max() <= FP8_ROW_TOL, f"worst row's rel. error {rows.max():.3g} > {FP8_ROW_TOL}"
    assert err16 < err  # the comparison measures FP8's rounding, not another difference
    return out, err, err16


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_masks(shape, config, dtype):
    B, H, Sq, Sk, D = shape
    q, k, v = _qkv(B, H, Sq, Sk, D, dtype, seed=sum(shape))
    mask = _random_mask((H, ), num_blocks(Sq), num_blocks(Sk), 0.6, seed=D)
    mask[0, 0, :] = False  # an empty row
    mask[-1, -1, -1] = True  # the partial key block
    _check(q, k, v, mask, 1 / math.sqrt(D), config)


@pytest.mark.parametrize("kind", ["empty", "full", "diagonal"])
def test_structured_masks(kind):
    B, H, Sq, Sk, D = 1, 2, 300, 260, 64
    q, k, v = _qkv(B, H, Sq, Sk, D, torch.float16, seed=11)
    out, _, _ = _check(q, k, v, _structured_mask(kind, H, num_blocks(Sq), num_blocks(Sk)), 0.125)
    if kind == "empty":
        assert torch.all(out == 0)


@pytest.mark.parametrize("layout", ["bshd", "strided"])
@pytest.mark.parametrize("config", ["m128n128_tma", "m128n64_ptr"])
def test_strided_inputs(layout, config):
    B, H, Sq, Sk, D = 2, 2, 200, 330, 64
    q, k, v = _qkv(B, H, Sq, Sk, D, torch.float16, seed=5, layout=layout)
    assert not q.is_contiguous()
    mask = _random_mask((H, ), num_blocks(Sq), num_blocks(Sk), 0.6, seed=3)
    _check(q, k, v, mask, 0.1, config)


def test_per_batch_masks():
    q, k, v, mask = per_batch_case(128)
    _check(q, k, v, mask, 1 / math.sqrt(128))


@pytest.mark.parametrize("config", ["m128n128_tma", "m128n64_ptr"])
def test_key_padding(config):
    """Padded keys inside kept blocks do not count; rows left with no key (a fully padded first
    key block, an all-padded batch entry) are 0."""
    B, H, Sq, Sk, D = 3, 2, 200, 300, 64
    q, k, v = _qkv(B, H, Sq, Sk, D, torch.float16, seed=7)
    mask = _random_mask((H, ), num_blocks(Sq), num_blocks(Sk), 0.7, seed=2)
    mask[:, 0] = True
    mask[:, 1] = torch.tensor([True, False, False])  # query block 1 keeps key block 0 only
    padding = torch.rand(B, Sk, generator=torch.Generator().manual_seed(1)) < 0.6
    padding[0, :128] = False
    padding[-1] = False
    out, _, _ = _check(q, k, v, mask, 0.125, config, key_padding=padding)
    assert torch.all(out[-1] == 0) and torch.all(out[0, :, 128:256] == 0)


def test_smoothing_keeps_offset_keys_accurate():
    """k with a large per-channel offset common to all tokens (as in real models): smoothing
    subtracts it before quantising, so the error stays that of centred keys."""
    B, H, Sq, Sk, D = 1, 2, 256, 300, 64
    q, k, v = _qkv(B, H, Sq, Sk, D, torch.float16, seed=13)
    offset = 20 * torch.randn(1, H, 1, D, generator=torch.Generator().manual_seed(0))
    mask = _random_mask((H, ), num_blocks(Sq), num_blocks(Sk), 0.7, seed=5)
    _check(q, k + offset.to(k), v, mask, 1 / math.sqrt(D))


def test_check_is_sensitive():
    """The FP8 tolerance still catches a kernel that drops one of a row's blocks (the test can fail)."""
    q, k, v = _qkv(1, 1, 256, 256, 64, torch.float16, seed=2)
    mask = torch.ones(1, 2, 2, dtype=torch.bool)
    wrong = mask.clone()
    wrong[0, 1, 0] = False
    with pytest.raises(AssertionError, match="FP8 rel. error"):
        _check(q, k, v, mask, 0.125, kernel_mask=wrong)


@pytest.mark.parametrize("permute", [False, True], ids=["plain", "permuted"])
@pytest.mark.parametrize("layout", ["bhsd", "bshd", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sq, sk", [(200, 130), (300, 130), (100, 300)], ids=str)  # blocks: 2/2, 3/2, 1/3
def test_quantize_matches_reference(layout, dtype, sq, sk, permute):
    """The Triton prep writes the bytes and scales of ``reference.quantize_fp8`` (one launch quantises
    q, k and v: more query than key blocks, and fewer); ``permute_value_keys`` reorders v^T's keys in
    registers exactly as ``reference.permute_value_keys`` does in torch."""
    q, k, v = _qkv(2, 3, sq, sk, 64, dtype, seed=3, layout=layout)
    k = k + 4
    ours, spec = quantize(q, k, v, permute_value_keys=permute), quantize_fp8(q, k, v)
    if permute:
        spec = permute_value_keys(spec)
        assert not torch.equal(ours.v_t.view(torch.uint8), quantize_fp8(q, k, v).v_t.view(torch.uint8))
    assert ours.keys_permuted == spec.keys_permuted == permute
    for name, a, b in list(zip(ours._fields, ours, spec))[:-1]:
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if a.dtype == FP8_DTYPE:
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        assert torch.equal(a, b), name
    assert ours.v_t.is_contiguous() and ours.v_t.shape == (2, 3, 64, num_blocks(sk) * 128)


# one program of the first pass (STATS_ROWS tokens each), 3, and 18 (past the second pass's 16-row chunk)
@pytest.mark.parametrize("length", [130, 2 * STATS_ROWS + 52, 17 * STATS_ROWS + 92], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_key_value_statistics_equal_reference(length, dtype):
    """k's means and v's scales from the prep's two launches equal the torch reference's bit for bit,
    with offsets, and magnitudes 6 decades apart within a channel (float64 sums are exact in any order
    there; float32 partial sums are not)."""
    q, k, v = _qkv(1, 2, 64, length, 64, dtype, seed=5, layout="bshd")
    spread = torch.logspace(-2, 2, 64, device=k.device)  # across channels
    order = torch.randperm(length, generator=torch.Generator().manual_seed(0))
    tokens = torch.logspace(-4, 2, length, device=k.device)[order.to(k.device)]
    k = (k.float() * tokens[:, None] * spread + 7 * spread).to(dtype)  # within a channel: 6 decades apart
    v = (v.float() * spread.flip(0)).to(dtype)
    assert torch.isfinite(k).all() and torch.isfinite(v).all()
    mean, v_scale = _key_value_statistics(k, v)
    assert torch.equal(mean, key_means(k)) and torch.equal(v_scale, value_scales(v))


@pytest.mark.parametrize("per_batch", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_emulation_matches_kernel(per_batch, padded):
    """The op's CPU path computes what the kernel computes (128-key tiles)."""
    B, H, Sq, Sk, D = 2, 2, 200, 330, 128
    q, k, v = _qkv(B, H, Sq, Sk, D, torch.float16, seed=17)
    mask = _random_mask((B, H) if per_batch else (H, ), num_blocks(Sq), num_blocks(Sk), 0.6, seed=6)
    mask[..., 0, :] = False
    padding = (torch.rand(B, Sk, generator=torch.Generator().manual_seed(3)) < 0.7) if padded else None
    words = pack_block_mask(mask)
    conf, _ = CONFIGS["m128n128_tma"]
    out = block_sparse_attention_fp8(q, k, v, words.to(DEVICE), 0.1, None if padding is None else padding.to(DEVICE),
                                     config=conf)
    emu = blockwise_attention_fp8(q.cpu(), k.cpu(), v.cpu(), words, 0.1, padding)
    assert emu.dtype == q.dtype and emu.is_contiguous()
    # the rows of an empty mask row are zero in both (an element may round to 0 in one and not the other)
    assert torch.equal((emu == 0).all(-1), (out.cpu() == 0).all(-1))
    assert (emu[:, :, :128] == 0).all()
    assert _rel_err(out.cpu(), emu.double()) <= EMULATION_TOL


@pytest.mark.parametrize("padded", [False, True])
def test_op(padded):
    """The custom op: schema, fake tensor and AOT dispatch checks (no autograd: it has none);
    it runs the dispatched kernel on CUDA (Gluon on Hopper, unpadded) and the emulation elsewhere, and
    refuses a backward."""
    q, k, v = _qkv(2, 2, 200, 200, 64, torch.float16, seed=1)
    mask = _random_mask((2, ), 2, 2, 0.7, seed=1)
    padding = (torch.rand(2, 200, generator=torch.Generator().manual_seed(0)) < 0.8).to(DEVICE) if padded else None
    args = (q, k, v, pack_block_mask(mask).to(DEVICE), 0.125, padding)
    torch.library.opcheck(OPS.block_sparse_attention_fp8.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    out = OPS.block_sparse_attention_fp8(*args)
    expected = (dispatch.block_sparse_attention_fp8(*args) if DEVICE == "cuda" else blockwise_attention_fp8(*args))
    assert torch.equal(out, expected)
    out = OPS.block_sparse_attention_fp8(q.clone().requires_grad_(), *args[1:])
    with pytest.raises(RuntimeError, match="no autograd formula"):
        out.float().sum().backward()


def _fake(*shape, dtype=torch.float16, device="cuda"):
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        return torch.empty(*shape, dtype=dtype, device=device)


def test_unsupported_reason(monkeypatch):
    def qkv(D=64, dtype=torch.float16, device="cuda"):
        return [_fake(2, 3, s, D, dtype=dtype, device=device) for s in (100, 300, 300)]

    for capability, ok in (((8, 6), False), ((8, 9), True), ((9, 0), True)):
        monkeypatch.setattr(dispatch, "device_capability", lambda device, c=capability: c)
        reason = fp8_unsupported_reason(*qkv())
        assert (reason is None) == ok and (ok or "capability" in reason)
    assert fp8_unsupported_reason(*qkv(128, torch.bfloat16)) is None
    assert "dtype" in fp8_unsupported_reason(*qkv(dtype=torch.float32))
    assert "head_dim 80" in fp8_unsupported_reason(*qkv(80))
    assert "head_dim 32" in fp8_unsupported_reason(*qkv(32))
    assert "head_dim 256" in fp8_unsupported_reason(*qkv(256))
    assert "key_padding" in fp8_unsupported_reason(*qkv(), key_padding=_fake(2, 299, dtype=torch.bool))
    assert fp8_unsupported_reason(*qkv(), key_padding=_fake(1, 300, dtype=torch.bool)) is None
    assert fp8_unsupported_reason(*qkv(device="cpu")) is None  # the op's emulation runs there
    q, k, v = _qkv(1, 1, 100, 100, 80, torch.float16, seed=0)
    words = torch.zeros(1, 1, 1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim 80"):
        block_sparse_attention_fp8(q, k, v, words)
    with pytest.raises(ValueError, match="head_dim 80"):
        OPS.block_sparse_attention_fp8(q, k, v, words, 0.1)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autotuned_path_gpu(dtype):
    """config=None autotunes (short config list) and stays within the FP8 tolerance."""
    B, H, Sq, Sk, D = 1, 2, 1000, 1100, 128
    q, k, v = _qkv(B, H, Sq, Sk, D, dtype, seed=3, layout="bshd")
    mask = _random_mask((H, ), num_blocks(Sq), num_blocks(Sk), 0.4, seed=6)
    mask[0, 3] = False
    out = block_sparse_attention_fp8(q, k, v, pack_block_mask(mask).cuda())
    ref, lse = masked_attention_reference(q.cpu(), k.cpu(), v.cpu(), mask, 1 / math.sqrt(D))
    empty = torch.isneginf(lse)
    out = out.cpu()
    assert torch.all(out[empty] == 0)
    assert _rel_err(out[~empty], ref[~empty]) <= FP8_REL_TOL
