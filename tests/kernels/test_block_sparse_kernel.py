"""The Triton block-sparse kernel against the float64 reference.

On a machine without a GPU these run in Triton's interpreter (conftest sets TRITON_INTERPRET=1)
with one explicit config per call and tiny shapes. bf16 runs only on a GPU: the interpreter's
bf16 arithmetic is wrong.

Tolerances follow FlashAttention's rule: our error against the float64 reference must stay
within 2x the error of plain attention computed in the input dtype (scores, softmax and P@V
rounded to that dtype, as torch does without a fused kernel), plus a small floor for fp32 where
both errors are at rounding level. lse is computed from fp32 dot products of the same inputs,
so it is checked against an absolute bound (1e-4 for fp32; 2e-3 for fp16/bf16, whose products
are exact in fp32 but summed in a different order by the tensor cores).
"""
import math
import os

import pytest
import torch

from scaling_compiler.kernels.bitmask import BLOCK_SIZE, num_blocks, pack_block_mask, unpack_block_mask
from scaling_compiler.kernels.triton.block_sparse_attention import (SUPPORTED_DTYPES, block_sparse_attention,
                                                                     decode_mask, prepare_block_lists,
                                                                     unsupported_reason)
from scaling_compiler.kernels.reference import masked_attention_reference

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
gpu_only = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")

# (B, H, Sq, Sk, D): odd lengths, Sq != Sk, a padded head dim (80 -> 128), Sq < 128
SHAPES = [
    (1, 2, 256, 256, 64),
    (2, 1, 200, 200, 64),
    (1, 2, 130, 300, 128),
    (1, 1, 300, 130, 80),
    (1, 2, 70, 40, 16),
]
# explicit configs (the interpreter cannot autotune): a 128-row tile walking each kept key block
# in two 64-key halves, two 64-row tiles per mask row, and the tuned default (128x128)
CONFIGS = {
    "m128n64": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
    "m64n128": {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2},
    "m128n128": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 5},
}
LOW_DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _fp32_config(config, dtype):
    if dtype == torch.float32 and DEVICE == "cuda":  # fp32 tiles must fit shared memory
        return {**config, "BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    return config


def _qkv(B, H, Sq, Sk, D, dtype, seed, layout="bhsd"):
    g = torch.Generator().manual_seed(seed)
    if layout == "bshd":  # what diffusers passes: transposed views of (B, S, H, D)
        ts = [torch.randn(B, s, H, D, generator=g).to(dtype).to(DEVICE).transpose(1, 2) for s in (Sq, Sk, Sk)]
    elif layout == "strided":  # last dim not contiguous: no TMA, pointer loads
        ts = [torch.randn(B, H, s, 2 * D, generator=g).to(dtype).to(DEVICE)[..., ::2] for s in (Sq, Sk, Sk)]
    elif layout == "bhds":  # dense with tokens innermost: empty_like keeps that, so outputs are strided too
        ts = [torch.randn(B, H, D, s, generator=g).to(dtype).to(DEVICE).transpose(2, 3) for s in (Sq, Sk, Sk)]
    else:
        ts = [torch.randn(B, H, s, D, generator=g).to(dtype).to(DEVICE) for s in (Sq, Sk, Sk)]
    return ts


def _random_mask(shape, nq, nk, density, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, nq, nk, generator=g) < density


def _structured_mask(kind, H, nq, nk):
    """An "empty", "full" or "diagonal" block mask (H, nq, nk)."""
    return {
        "empty": lambda: torch.zeros(H, nq, nk, dtype=torch.bool),
        "full": lambda: torch.ones(H, nq, nk, dtype=torch.bool),
        "diagonal": lambda: torch.eye(nq, nk, dtype=torch.bool).expand(H, nq, nk).clone(),
    }[kind]()


def _naive_lowp(q, k, v, block_mask, scale):
    """Attention computed in the input dtype: the error baseline of FlashAttention's rule."""
    Sq, Sk = q.shape[2], k.shape[2]
    tok = block_mask.repeat_interleave(BLOCK_SIZE, -2).repeat_interleave(BLOCK_SIZE, -1)[..., :Sq, :Sk]
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~tok.to(s.device), float("-inf"))
    p = torch.softmax(s.float(), -1).nan_to_num(0.0).to(q.dtype)
    return p @ v


def _rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _run_and_check(q, k, v, block_mask, scale, config, **kw):
    B, H, Sq, D = q.shape
    words = pack_block_mask(block_mask).to(q.device)
    # poison the outputs: every element the kernel should write must change
    out = torch.full((B, H, Sq, D), float("nan"), dtype=q.dtype, device=q.device)
    lse = torch.full((B, H, Sq), float("nan"), dtype=torch.float32, device=q.device)
    out, lse = block_sparse_attention(q, k, v, words, scale, config, out=out, lse=lse, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (B, H, Sq) and lse.dtype == torch.float32
    assert not out.isnan().any(), "unwritten or NaN outputs"
    assert not lse.isnan().any(), "unwritten or NaN lse"

    ref, ref_lse = masked_attention_reference(q.cpu(), k.cpu(), v.cpu(), block_mask, scale)
    out, lse = out.cpu(), lse.cpu()
    empty = torch.isneginf(ref_lse)
    # empty mask rows: out = 0, lse = -inf, exactly
    assert torch.equal(torch.isneginf(lse), empty)
    assert torch.all(out[empty] == 0)
    if (~empty).any():
        err = _rel_err(out[~empty], ref[~empty])
        if q.dtype == torch.float32:
            bound = 1e-5
        else:
            base = _rel_err(_naive_lowp(q, k, v, block_mask, scale)[~empty], ref[~empty])
            bound = 2 * base + 1e-5
        assert err <= bound, f"out rel. error {err:.3g} > {bound:.3g}"
        lse_err = (lse[~empty].double() - ref_lse[~empty]).abs().max().item()
        lse_bound = 1e-4 if q.dtype == torch.float32 else 2e-3
        assert lse_err <= lse_bound, f"lse error {lse_err:.3g} > {lse_bound}"
    return out, lse


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32] + LOW_DTYPES, ids=str)
@pytest.mark.parametrize("config", ["m128n64", "m64n128", "m128n128"])
def test_random_masks(shape, dtype, config):
    B, H, Sq, Sk, D = shape
    q, k, v = _qkv(B, H, Sq, Sk, D, dtype, seed=sum(shape))
    nq, nk = num_blocks(Sq), num_blocks(Sk)
    mask = _random_mask((H, ), nq, nk, 0.5, seed=D)
    mask[0, 0, :] = False  # an empty row
    mask[-1, -1, -1] = True  # the partial key block
    _run_and_check(q, k, v, mask, 1 / math.sqrt(D), _fp32_config(CONFIGS[config], dtype))


@pytest.mark.parametrize("kind", ["empty", "full", "diagonal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_structured_masks(kind, dtype):
    B, H, Sq, Sk, D = 1, 2, 300, 260, 64
    q, k, v = _qkv(B, H, Sq, Sk, D, dtype, seed=11)
    mask = _structured_mask(kind, H, num_blocks(Sq), num_blocks(Sk))
    out, lse = _run_and_check(q, k, v, mask, 0.125, _fp32_config(CONFIGS["m128n64"], dtype))
    if kind == "empty":
        assert torch.all(out == 0) and torch.all(torch.isneginf(lse))


@pytest.mark.parametrize("layout", ["bshd", "strided"])
@pytest.mark.parametrize("use_tma", [None, False])
def test_strided_inputs(layout, use_tma):
    B, H, Sq, Sk, D = 2, 2, 200, 330, 64
    q, k, v = _qkv(B, H, Sq, Sk, D, torch.float16, seed=5, layout=layout)
    assert not q.is_contiguous()
    mask = _random_mask((H, ), num_blocks(Sq), num_blocks(Sk), 0.6, seed=3)
    _run_and_check(q, k, v, mask, 0.1, CONFIGS["m128n64"], use_tma=use_tma)


@pytest.mark.parametrize("config", ["m128n64", "m128n128"])
def test_per_batch_masks(config):
    q, k, v, mask = per_batch_case(64)
    _run_and_check(q, k, v, mask, 0.125, CONFIGS[config])


def per_batch_case(head_dim: int):
    """(B, S, H, D)-transposed fp16 q, k, v (B=2, H=2, S=260) and a (B, H, Nq, Nk) mask whose batch
    entries differ."""
    B, H, S = 2, 2, 260
    q, k, v = _qkv(B, H, S, S, head_dim, torch.float16, seed=9, layout="bshd")
    mask = _random_mask((B, H), num_blocks(S), num_blocks(S), 0.5, seed=4)
    mask[1, 0, 2] = False
    mask[0, 1, 0] = True
    assert not torch.equal(mask[0], mask[1])
    return q, k, v, mask


@pytest.mark.parametrize("lpt_order", [True, False])
@pytest.mark.parametrize("precomputed", [False, True])
def test_order_and_precomputed_lists(lpt_order, precomputed):
    B, H, Sq, Sk, D = 1, 2, 384, 300, 64
    q, k, v = _qkv(B, H, Sq, Sk, D, torch.float32, seed=21)
    mask = _random_mask((H, ), num_blocks(Sq), num_blocks(Sk), 0.5, seed=8)
    mask[0, 1] = False
    mask[1, 2] = True
    mask[1, 0, :] = torch.tensor([True, False, False])  # a single kept block
    lists = prepare_block_lists(pack_block_mask(mask).to(DEVICE), Sk, lpt_order) if precomputed else None
    _run_and_check(q, k, v, mask, 0.1, _fp32_config(CONFIGS["m128n64"], torch.float32), lpt_order=lpt_order,
                   block_lists=lists)


def test_check_is_sensitive():
    """The comparison catches a kernel that uses the wrong mask (the test can fail)."""
    B, H, Sq, Sk, D = 1, 1, 256, 256, 64
    q, k, v = _qkv(B, H, Sq, Sk, D, torch.float32, seed=2)
    mask = torch.ones(H, 2, 2, dtype=torch.bool)
    wrong = mask.clone()
    wrong[0, 1, 0] = False
    out, _ = block_sparse_attention(q, k, v, pack_block_mask(wrong).to(DEVICE), 0.125,
                                    _fp32_config(CONFIGS["m128n64"], torch.float32))
    ref, _ = masked_attention_reference(q.cpu(), k.cpu(), v.cpu(), mask, 0.125)
    assert _rel_err(out.cpu(), ref) > 1e-2


def test_decode_mask_lists():
    nk = 70
    mask = _random_mask((3, ), 4, nk, 0.3, seed=1)
    mask[0, 0] = True
    mask[0, 1] = False
    idx, cnt = decode_mask(pack_block_mask(mask).to(DEVICE), nk)
    idx, cnt = idx.cpu(), cnt.cpu()
    assert torch.equal(cnt, mask.sum(-1).to(torch.int32))
    for h in range(3):
        for r in range(4):
            expect = mask[h, r].nonzero().flatten().to(torch.int32)
            assert torch.equal(idx[h, r, :cnt[h, r]], expect)
    assert torch.equal(unpack_block_mask(pack_block_mask(mask), nk), mask)


def test_unsupported_reason():
    def t(*shape, dtype=torch.float16):
        return torch.empty(*shape, dtype=dtype)

    assert unsupported_reason(t(1, 2, 8, 64), t(1, 2, 9, 64), t(1, 2, 9, 64)) is None
    assert unsupported_reason(t(1, 2, 8, 80), t(1, 2, 9, 80), t(1, 2, 9, 80)) is None
    assert unsupported_reason(t(1, 2, 8, 256), t(1, 2, 8, 256), t(1, 2, 8, 256)) == "head_dim 256 > 128"
    assert "head_dim 8" in unsupported_reason(t(1, 2, 8, 8), t(1, 2, 8, 8), t(1, 2, 8, 8))
    assert "dtype" in unsupported_reason(*(t(1, 2, 8, 64, dtype=torch.float64), ) * 3)
    assert "mixed" in unsupported_reason(t(1, 2, 8, 64), t(1, 2, 8, 64), t(1, 2, 8, 64, dtype=torch.bfloat16))
    assert "head dims" in unsupported_reason(t(1, 2, 8, 64), t(1, 2, 8, 64), t(1, 2, 8, 32))
    assert "4" in unsupported_reason(t(2, 8, 64), t(2, 8, 64), t(2, 8, 64))
    assert set(SUPPORTED_DTYPES) == {torch.float16, torch.bfloat16, torch.float32}
    with pytest.raises(ValueError, match="head_dim 256"):
        block_sparse_attention(t(1, 1, 8, 256), t(1, 1, 8, 256), t(1, 1, 8, 256),
                               torch.zeros(1, 1, 1, dtype=torch.int32), 1.0)


def test_rejects_bad_mask_shape():
    q = torch.randn(1, 2, 200, 64, device=DEVICE)
    with pytest.raises(ValueError, match="mask_words"):
        block_sparse_attention(q, q, q, torch.zeros(2, 1, 1, dtype=torch.int32, device=DEVICE), 1.0)


@gpu_only
def test_autotuned_path_gpu():
    """config=None autotunes (short config list) and stays correct."""
    B, H, Sq, Sk, D = 1, 2, 1000, 1100, 128
    q, k, v = _qkv(B, H, Sq, Sk, D, torch.bfloat16, seed=3, layout="bshd")
    mask = _random_mask((H, ), num_blocks(Sq), num_blocks(Sk), 0.4, seed=6)
    mask[0, 3] = False
    _run_and_check(q, k, v, mask, 1 / math.sqrt(D), None)


# ----------------------------------------------------------------------------------------------
# Full size, GPU only: Wan2.1-1.3B 480p self-attention, checked on a slice of query blocks.
# ----------------------------------------------------------------------------------------------
@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("config", ["m128n64", "m128n128"])
def test_full_size_gpu(dtype, layout, config):
    B, H, S, D = 1, 12, 32760, 128
    q, k, v = _qkv(B, H, S, S, D, dtype, seed=1, layout=layout)
    nb = num_blocks(S)
    mask = _random_mask((H, ), nb, nb, 0.1, seed=0)
    mask[:, :, -1] |= torch.rand(H, nb) < 0.5  # the partial key block
    mask[3, 77] = False  # an empty row
    words = pack_block_mask(mask).cuda()
    out, lse = block_sparse_attention(q, k, v, words, 1 / math.sqrt(D), CONFIGS[config])
    torch.cuda.synchronize()
    # reference on query blocks 0, 77 and the last (partial) one, in float64 on the GPU
    blocks = [0, 77, nb - 1]
    rows = torch.cat([torch.arange(b * BLOCK_SIZE, min((b + 1) * BLOCK_SIZE, S)) for b in blocks]).cuda()
    qs = q[:, :, rows]
    ms = mask[:, blocks]
    tok = ms.repeat_interleave(BLOCK_SIZE, -2)[:, :rows.numel()].repeat_interleave(BLOCK_SIZE, -1)[..., :S].cuda()
    s = (qs.double() @ k.double().transpose(-1, -2)) / math.sqrt(D)
    s = s.masked_fill(~tok, float("-inf"))
    ref_lse = torch.logsumexp(s, -1)
    empty = torch.isneginf(ref_lse)
    ref = torch.softmax(s, -1).nan_to_num(0.0) @ v.double()
    # the input-dtype baseline of the 2x rule
    sl = ((qs @ k.transpose(-1, -2)) / math.sqrt(D)).masked_fill(~tok, float("-inf"))
    base = torch.softmax(sl.float(), -1).nan_to_num(0.0).to(dtype) @ v
    del s, sl
    o, l = out[:, :, rows], lse[:, :, rows]
    assert torch.equal(torch.isneginf(l), empty) and torch.all(o[empty] == 0)
    err, base_err = _rel_err(o[~empty], ref[~empty]), _rel_err(base[~empty], ref[~empty])
    assert err <= 2 * base_err + 1e-5, f"rel. error {err:.3g} vs plain {dtype} attention {base_err:.3g}"
    assert (l[~empty].double() - ref_lse[~empty]).abs().max().item() <= 2e-3
    assert not out.isnan().any() and not lse.isnan().any()
