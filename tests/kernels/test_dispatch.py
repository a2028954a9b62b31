"""kernels.dispatch: the reasons detection gets, the implementation each device and layout gets,
and both Triton load paths (TMA, and the pointer loads of GPUs without TMA) against the float64
reference, forced in the interpreter on CPU tensors.

Tolerances (FlashAttention's rule, as in test_block_sparse_kernel.py): fp16 outputs within 2x the
error of attention computed in fp16 by plain torch, plus 1e-5; fp32 within 1e-5 relative.
"""
import os

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from scaling_compiler.kernels import dispatch
from scaling_compiler.kernels.bitmask import BLOCK_SIZE, num_blocks, pack_block_mask
from scaling_compiler.kernels.dispatch import Implementation
from scaling_compiler.kernels.reference import masked_attention_reference
from scaling_compiler.kernels.triton import block_sparse_attention as triton_forward

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
interpreter_only = pytest.mark.skipif(not INTERPRET, reason="forces Triton paths on CPU tensors (interpreter)")
CONFIG = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}


def _fake(*shapes, device="cuda", dtype=torch.float16, view=lambda t: t):
    """Fake tensors (CUDA ones work without a GPU); `view` is taken inside the fake mode."""
    with FakeTensorMode():
        return [view(torch.empty(*s, dtype=dtype, device=device)) for s in shapes]


def _qkv(B, H, Sq, Sk, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, s, D, generator=g).to(dtype) for s in (Sq, Sk, Sk)]


def _rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


@pytest.fixture
def capability(monkeypatch):
    """Pretend the CUDA device has a given compute capability."""
    def set_to(major, minor=0):
        monkeypatch.setattr(dispatch, "device_capability", lambda device: (major, minor))
    return set_to


# ---------------------------------------------------------------------------------------
# Reasons
# ---------------------------------------------------------------------------------------
def test_reasons_on_fake_tensors():
    q, k, v = _fake((1, 2, 300, 64), (1, 2, 300, 64), (1, 2, 300, 64))
    assert dispatch.unsupported_reason(q, k, v) is None
    assert dispatch.unsupported_reason(q, k, v, key_padding=True) is None  # the CUDA kernel takes key padding
    cpu = _fake((1, 2, 300, 64), (1, 2, 300, 64), (1, 2, 300, 64), device="cpu")
    assert dispatch.unsupported_reason(*cpu, key_padding=True) is None  # the block-wise path takes the mask
    big = _fake((1, 2, 8, 256), (1, 2, 8, 256), (1, 2, 8, 256))
    # an input the kernel cannot take is the reason, with or without a mask
    assert dispatch.unsupported_reason(*big) == "head_dim 256 > 128"
    assert dispatch.unsupported_reason(*big, key_padding=True) == "head_dim 256 > 128"
    mixed = _fake((1, 2, 8, 64), (1, 2, 8, 64)) + _fake((1, 2, 8, 64), dtype=torch.bfloat16)
    assert "mixed" in dispatch.unsupported_reason(*mixed)


def test_detection_accepts_cuda_key_padding():
    """A key-padding site is rewritable on CUDA as on the CPU (the kernel takes the padding)."""
    from scaling_compiler.passes.detect import detect_sites

    def attention(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.125)

    reasons = {}
    for device in ("cuda", "cpu"):
        gm = torch.fx.symbolic_trace(attention)
        values = _fake((2, 4, 300, 64), (2, 4, 300, 64), (2, 4, 300, 64), device=device)
        values += _fake((2, 1, 1, 300), device=device, dtype=torch.bool)
        for node, value in zip([n for n in gm.graph.nodes if n.op == "placeholder"], values):
            node.meta["val"] = value
        (site,) = detect_sites(gm)
        reasons[device] = site.dense_reason
    assert reasons == {"cuda": None, "cpu": None}


# ---------------------------------------------------------------------------------------
# Which implementation
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("major, expected", [
    (8, Implementation.TRITON_POINTER),  # Ampere (A100): no TMA
    (8.9, Implementation.TRITON_POINTER),  # Ada (L4, RTX 4090): no TMA
    (9, Implementation.TRITON_TMA),  # Hopper
    (10, Implementation.TRITON_TMA),  # Blackwell
])
def test_device_implementation_by_capability(capability, major, expected):
    capability(int(major), 9 if major == 8.9 else 0)
    assert dispatch.device_implementation(torch.device("cuda")) is expected
    q, k, v = _fake((1, 2, 300, 64), (1, 2, 300, 64), (1, 2, 300, 64))
    assert dispatch.implementation_for(q, k, v) is expected


def test_implementation_for_layouts(capability):
    capability(9)
    shape = (2, 4, 300, 64)
    q, k, v = _fake(shape, shape, shape)
    assert dispatch.implementation_for(q, k, v) is Implementation.TRITON_TMA
    # transposed views of (B, S, H, D), what diffusers passes: TMA still describes them
    bshd = _fake((2, 300, 4, 64), (2, 300, 4, 64), (2, 300, 4, 64), view=lambda t: t.transpose(1, 2))
    assert dispatch.implementation_for(*bshd) is Implementation.TRITON_TMA
    # last dim not contiguous, or a head dim that is padded: pointer loads
    with FakeTensorMode():  # like t[..., ::2] of a (2, 4, 300, 128) tensor (slicing a fake CUDA tensor needs CUDA)
        strided = [torch.empty_strided((2, 4, 300, 64), (4 * 300 * 128, 300 * 128, 128, 2), dtype=torch.float16,
                                       device="cuda") for _ in range(3)]
    assert dispatch.implementation_for(*strided) is Implementation.TRITON_POINTER
    d80 = _fake((1, 2, 300, 80), (1, 2, 300, 80), (1, 2, 300, 80))
    assert dispatch.implementation_for(*d80) is Implementation.TRITON_POINTER
    # key padding runs the same Triton paths
    assert dispatch.implementation_for(q, k, v, key_padding=True) is Implementation.TRITON_TMA
    assert dispatch.implementation_for(*strided, key_padding=True) is Implementation.TRITON_POINTER
    cpu = _fake(shape, shape, shape, device="cpu")
    assert dispatch.implementation_for(*cpu) is Implementation.TORCH_BLOCKWISE
    assert dispatch.device_implementation(torch.device("cpu")) is Implementation.TORCH_BLOCKWISE


# ---------------------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------------------
class _CountingDescriptor(triton_forward.TensorDescriptor):
    made = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        type(self).made += 1


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_forced_pointer_and_tma_paths_match_reference(monkeypatch, dtype):
    """The pointer path (GPUs without TMA) and the TMA path give the float64 reference's answer,
    and forcing really switches the path (TMA builds K and V descriptors, pointers none)."""
    monkeypatch.setattr(triton_forward, "TensorDescriptor", _CountingDescriptor)
    monkeypatch.setattr(triton_forward, "default_config",
                        lambda dtype, head_dim, device=None: dict(CONFIG))  # one small config in the interpreter
    B, H, Sq, Sk, D = 1, 2, 200, 300, 64
    q, k, v = _qkv(B, H, Sq, Sk, D, dtype, seed=7)
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(H, num_blocks(Sq), num_blocks(Sk), generator=g) < 0.6
    mask[0, 0] = False  # an empty row
    mask[1, 1, -1] = True  # the partial key block
    words = pack_block_mask(mask)
    ref, ref_lse = masked_attention_reference(q, k, v, mask, 0.125)
    rows = ~torch.isneginf(ref_lse)

    results = {}
    for implementation in (Implementation.TRITON_POINTER, Implementation.TRITON_TMA):
        before = _CountingDescriptor.made
        out, lse = dispatch.block_sparse_attention(q, k, v, words, 0.125, implementation=implementation)
        results[implementation] = (out, lse, _CountingDescriptor.made - before)
    assert results[Implementation.TRITON_POINTER][2] == 0
    assert results[Implementation.TRITON_TMA][2] == 2

    if dtype == torch.float32:
        bound = 1e-5
    else:
        tok = mask.repeat_interleave(BLOCK_SIZE, -2).repeat_interleave(BLOCK_SIZE, -1)[..., :Sq, :Sk]
        s = (q @ k.transpose(-1, -2) * 0.125).masked_fill(~tok, float("-inf"))
        naive = torch.softmax(s.float(), -1).nan_to_num(0.0).to(dtype) @ v
        bound = 2 * _rel_err(naive[0][rows[0]], ref[0][rows[0]]) + 1e-5
    for implementation, (out, lse, _) in results.items():
        assert torch.all(out[~rows] == 0) and torch.equal(torch.isneginf(lse), ~rows), implementation
        err = _rel_err(out[rows], ref[rows])
        assert err <= bound, f"{implementation.value}: out rel. error {err:.3g} > {bound:.3g}"
        lse_bound = 1e-4 if dtype == torch.float32 else 2e-3
        assert (lse[rows].double() - ref_lse[rows]).abs().max().item() <= lse_bound, implementation


def test_key_padding_runs_blockwise_on_cpu():
    """CPU tensors with a key-padding mask: the block-wise path, equal to SDPA with the block mask
    and the padding combined (float64: rounding level, 1e-10)."""
    B, H, Sq, Sk, D = 2, 2, 150, 260, 32
    q, k, v = _qkv(B, H, Sq, Sk, D, torch.float64, seed=4)
    mask = torch.ones(H, num_blocks(Sq), num_blocks(Sk), dtype=torch.bool)
    mask[0, 1, 0] = False
    padding = torch.ones(B, Sk, dtype=torch.bool)
    padding[0, 200:] = False
    padding[1, :10] = False
    assert dispatch.implementation_for(q, k, v, key_padding=True) is Implementation.TORCH_BLOCKWISE
    out, lse = dispatch.block_sparse_attention(q, k, v, pack_block_mask(mask), 0.2, padding)
    tok = mask.repeat_interleave(BLOCK_SIZE, -2).repeat_interleave(BLOCK_SIZE, -1)[..., :Sq, :Sk]
    allowed = tok[None] & padding[:, None, None, :]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=0.2)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    unpadded, _ = dispatch.block_sparse_attention(q, k, v, pack_block_mask(mask), 0.2)
    assert (unpadded - out).abs().max() > 1e-3  # the padding changed the answer


@pytest.mark.parametrize("implementation", [Implementation.TRITON_POINTER, Implementation.TRITON_TMA])
def test_forced_triton_path_takes_key_padding(monkeypatch, implementation):
    """Both Triton paths honour key padding (float32: 1e-5 of the float64 reference), in the
    interpreter on CPU tensors or on a GPU; the kernel's own tests on every dtype are
    tests/kernels/test_key_padding.py."""
    device = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
    if device == "cpu" and not INTERPRET:
        pytest.skip("Triton paths need a GPU or TRITON_INTERPRET=1")
    if device == "cuda" and implementation is Implementation.TRITON_TMA and \
            torch.cuda.get_device_capability()[0] < triton_forward.TMA_MIN_CAPABILITY:
        pytest.skip("TMA descriptors need capability >= 9")
    if INTERPRET:  # one small config in the interpreter
        monkeypatch.setattr(triton_forward, "default_config", lambda dtype, head_dim, device=None: dict(CONFIG))
    q, k, v = _qkv(2, 1, 128, 200, 32, torch.float32, seed=0)
    mask = torch.ones(1, 1, 2, dtype=torch.bool)
    padding = torch.ones(2, 200, dtype=torch.bool)
    padding[0, 150:] = False
    padding[1] = False  # no valid key: out 0, lse -inf, as on the CPU path
    out, lse = dispatch.block_sparse_attention(*(t.to(device) for t in (q, k, v, pack_block_mask(mask))), 0.1,
                                               padding.to(device), implementation=implementation)
    out, lse = out.cpu(), lse.cpu()
    ref, ref_lse = masked_attention_reference(q, k, v, mask, 0.1, key_padding=padding)
    assert torch.all(out[1] == 0) and torch.all(torch.isneginf(lse[1]))
    assert _rel_err(out[0], ref[0]) <= 1e-5 and not out.isnan().any()
