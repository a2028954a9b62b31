"""The Gluon forward (``kernels/gluon/block_sparse_attention.py``): the FP8 op on Hopper, and its 16-bit path.

GPU tests run on Hopper only (the kernel needs wgmma). The FP8 path is held to the FP8 kernel's rules
(``test_block_sparse_fp8.py`` derives them: relative error against float64 at most ``FP8_REL_TOL``, worst
row ``FP8_ROW_TOL``, empty rows exactly 0) and to the torch emulation of the same quantisation within
``EMULATION_TOL`` (1% on a GPU: FP8 tensor cores accumulate with fewer bits than float32; measured
0.35-0.55%). The 16-bit path (the benchmark's, not the package's) gets FlashAttention's rule of
``test_block_sparse_kernel.py``: within 2x the error of attention computed in the input dtype. Without a
GPU: which inputs it takes, and that it refuses v^T in the plain key order; that it compiles for sm_90
(including the layout conversion that must move no data) is ``tests/benchmarks/test_gluon_dry_runs.py``'s.
"""
import math

import pytest
import torch

from scaling_compiler import ops  # noqa: F401  (registers the ops)
from scaling_compiler.kernels import dispatch
from scaling_compiler.kernels.bitmask import num_blocks, pack_block_mask
from scaling_compiler.kernels.gluon import block_sparse_attention as gluon_fwd
from scaling_compiler.kernels.reference import (blockwise_attention_fp8, masked_attention_reference,
                                                quantize_fp8)
from scaling_compiler.kernels.triton.block_sparse_attention_fp8 import quantize
from scaling_compiler.kernels.triton.mask_decode import prepare_block_lists

from .test_block_sparse_fp8 import EMULATION_TOL, FP8_REL_TOL, FP8_ROW_TOL, _fake
from .test_block_sparse_kernel import (DEVICE, _naive_lowp, _qkv, _random_mask, _rel_err, _structured_mask,
                                       per_batch_case)

HOPPER = DEVICE == "cuda" and torch.cuda.get_device_capability() == (9, 0)
hopper_only = pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU (sm_90)")
OPS = torch.ops.scaling_compiler


def _check_fp8(q, k, v, block_mask, scale):
    """The op on Hopper (the Gluon kernel) against float64 and the emulation; returns out (CPU)."""
    words = pack_block_mask(block_mask).cuda()
    assert dispatch.gluon_fp8_reason(q, k, v) is None
    out = OPS.block_sparse_attention_fp8(q, k, v, words, scale, None)
    assert torch.equal(out, gluon_fwd.block_sparse_attention_fp8(q, k, v, words, scale))  # the op runs it
    assert out.dtype == q.dtype and out.stride() == torch.empty_like(q).stride() and not out.isnan().any()
    ref, ref_lse = masked_attention_reference(q.cpu(), k.cpu(), v.cpu(), block_mask, scale)
    emulated = blockwise_attention_fp8(q.cpu(), k.cpu(), v.cpu(), words.cpu(), scale)
    out = out.cpu()
    empty = torch.isneginf(ref_lse)
    assert torch.all(out[empty] == 0)
    if empty.all():
        return out
    err = _rel_err(out[~empty], ref[~empty])
    assert err <= FP8_REL_TOL, f"FP8 rel. error {err:.3g} > {FP8_REL_TOL}"
    rows = (out[~empty].double() - ref[~empty]).norm(dim=-1) / ref[~empty].norm(dim=-1).clamp_min(1e-30)
    assert rows.max() <= FP8_ROW_TOL, f"worst row's rel. error {rows.max():.3g} > {FP8_ROW_TOL}"
    emulation_err = _rel_err(out, emulated.double())
    assert emulation_err <= EMULATION_TOL, f"{emulation_err:.3g} from the emulation"
    return out


@hopper_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("shape,layout", [((1, 2, 1000, 1000), "bhsd"), ((2, 3, 777, 1290), "bshd"),
                                          ((1, 2, 1500, 300), "strided"), ((1, 1, 100, 70), "bhsd"),
                                          ((1, 2, 600, 450), "bhds")],
                         ids=["1000", "777x1290", "1500x300", "100x70", "600x450-strided-out"])
def test_fp8_matches_reference(dtype, D, shape, layout):
    """Odd lengths (partial last query and key blocks), Sq != Sk, one block, every layout, an empty row;
    an output whose last dim is strided (the epilogue's other store path)."""
    B, H, Sq, Sk = shape
    q, k, v = _qkv(B, H, Sq, Sk, D, dtype, seed=D + Sq, layout=layout)
    assert (torch.empty_like(q).stride(3) == 1) == (layout != "bhds")
    mask = _random_mask((H, ), num_blocks(Sq), num_blocks(Sk), 0.5, seed=Sk)
    mask[0, 0, :] = False
    mask[-1, -1, -1] = True
    _check_fp8(q, k, v, mask, 1 / math.sqrt(D))


@hopper_only
@pytest.mark.parametrize("kind", ["empty", "full", "diagonal"])
def test_fp8_structured_masks(kind):
    q, k, v = _qkv(1, 2, 600, 520, 128, torch.bfloat16, seed=3)
    out = _check_fp8(q, k, v, _structured_mask(kind, 2, 5, 5), 128 ** -0.5)
    if kind == "empty":
        assert torch.all(out == 0)


@hopper_only
def test_fp8_per_batch_masks_and_offset_keys():
    """A (B, H, Nq, W) mask whose batch entries differ; keys with a large common offset (the prep's
    smoothing removes it)."""
    q, k, v, mask = per_batch_case(128)
    offset = 20 * torch.randn(1, 2, 1, 128, generator=torch.Generator().manual_seed(0))
    _check_fp8(q, k + offset.to(k), v, mask, 1 / math.sqrt(128))


@hopper_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("D", [64, 128])
def test_16bit_path_matches_reference(dtype, D):
    B, H, Sq, Sk = 2, 3, 777, 1290
    q, k, v = _qkv(B, H, Sq, Sk, D, dtype, seed=D, layout="bshd")
    mask = _random_mask((H, ), num_blocks(Sq), num_blocks(Sk), 0.5, seed=2)
    mask[0, 0, :] = False
    lse = torch.full((B, H, Sq), float("nan"), device="cuda")
    out = gluon_fwd.forward(q, k, v, prepare_block_lists(pack_block_mask(mask).cuda(), Sk), D ** -0.5, lse=lse)
    ref, ref_lse = masked_attention_reference(q.cpu(), k.cpu(), v.cpu(), mask, D ** -0.5)
    out, lse = out.cpu(), lse.cpu()
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty) and torch.all(out[empty] == 0)
    bound = 2 * _rel_err(_naive_lowp(q, k, v, mask, D ** -0.5)[~empty], ref[~empty]) + 1e-5
    assert _rel_err(out[~empty], ref[~empty]) <= bound
    assert (lse[~empty].double() - ref_lse[~empty]).abs().max() <= 2e-3


@hopper_only
@pytest.mark.parametrize("programs", [1, 5])
def test_programs_walking_many_items_give_the_same_output(programs):
    """The kernel is persistent: with a few programs, each walks many work items (its K/V ring and q
    buffers wrap around across items, some of them with no kept block). Outputs and lse must equal, bit
    for bit, those of one program per item (what the shapes above get: fewer items than SMs)."""
    B, H, Sq, Sk, D = 2, 3, 1000, 777, 128
    q, k, v = _qkv(B, H, Sq, Sk, D, torch.bfloat16, seed=5, layout="bhsd")
    mask = _random_mask((H, ), num_blocks(Sq), num_blocks(Sk), 0.4, seed=6)
    mask[0, 2, :] = False
    mask[1, :3, :] = False
    lists = prepare_block_lists(pack_block_mask(mask).cuda(), Sk)
    one_each = B * H * num_blocks(Sq)
    for fp8 in (None, quantize(q, k, v, permute_value_keys=True)):
        lse = [torch.full((B, H, Sq), float("nan"), device="cuda") if fp8 is None else None for _ in range(2)]
        want = gluon_fwd.forward(q, k, v, lists, D ** -0.5, fp8=fp8, lse=lse[0], programs=one_each)
        got = gluon_fwd.forward(q, k, v, lists, D ** -0.5, fp8=fp8, lse=lse[1], programs=programs)
        assert torch.equal(got, want)
        if fp8 is None:
            assert torch.equal(lse[1], lse[0])


def test_refuses_plain_key_order():
    """v^T in the plain order would give a wrong answer, not an error, so the launcher checks the flag."""
    q, k, v = _qkv(1, 1, 130, 130, 64, torch.float16, seed=0)
    lists = prepare_block_lists(torch.ones(1, 2, 1, dtype=torch.int32, device=q.device), 130)
    with pytest.raises(ValueError, match="permute_value_keys=True"):
        gluon_fwd.forward(q, k, v, lists, fp8=quantize_fp8(q.cpu(), k.cpu(), v.cpu()))


def test_unsupported_reason(monkeypatch):
    def qkv(D=64, dtype=torch.float16):
        return [_fake(2, 3, s, D, dtype=dtype) for s in (100, 300, 300)]

    reason = gluon_fwd.fp8_unsupported_reason
    assert reason(*qkv(), None, (9, 0)) is None
    assert reason(*qkv(128, torch.bfloat16), None, (9, 0)) is None
    assert "capability 9.0" in reason(*qkv(), None, (8, 9))
    assert "capability 9.0" in reason(*qkv(), None, (10, 0))
    assert "dtype" in reason(*qkv(dtype=torch.float32), None, (9, 0))
    assert "head dim 80" in reason(*qkv(80), None, (9, 0))
    assert "key padding" in reason(*qkv(), _fake(2, 300, dtype=torch.bool), (9, 0))
    q, k, v = _qkv(1, 1, 100, 100, 64, torch.float16, seed=0)
    if DEVICE == "cpu":
        assert "device cpu" in dispatch.gluon_fp8_reason(q, k, v)
    monkeypatch.setattr(dispatch, "device_capability", lambda device: (9, 0))
    assert dispatch.gluon_fp8_reason(*qkv()) is None
    assert dispatch.gluon_fp8_reason(*qkv(), key_padding=_fake(2, 300, dtype=torch.bool)) == "key padding"
