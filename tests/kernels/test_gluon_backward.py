"""The one-pass Gluon backward (``kernels/gluon/block_sparse_attention_bwd.py``) and when the op runs it.

Its GPU tests run on Hopper only (the kernel needs wgmma), with ``check_backward``'s rule: each
gradient within 2x the error of PyTorch's SDPA backward against float64, exact zeros where no
attention flows. With an lse gradient (which SDPA's backward has no counterpart of) the Gluon
gradients are compared with the Triton backward's, itself checked against float64 in
``test_block_sparse_backward.py``. Without a GPU: which inputs it takes (``unsupported_reason``);
that it compiles for sm_90 is ``tests/benchmarks/test_gluon_dry_runs.py``'s business.
"""
import pytest
import torch

from scaling_compiler.kernels import dispatch
from scaling_compiler.kernels.bitmask import pack_block_mask
from scaling_compiler.kernels.gluon import block_sparse_attention_bwd as gluon_bwd
from scaling_compiler.kernels.triton.block_sparse_attention import block_sparse_attention
from scaling_compiler.kernels.triton.block_sparse_attention_bwd import block_sparse_attention_backward

from .test_block_sparse_backward import check_backward
from .test_block_sparse_kernel import DEVICE, _qkv, _random_mask, _rel_err, _structured_mask

HOPPER = DEVICE == "cuda" and torch.cuda.get_device_capability() == (9, 0)
hopper_only = pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU (sm_90)")


def _gluon(q, k, v, out, lse, grad_out, words, scale, key_padding, grad_lse):
    assert key_padding is None
    return gluon_bwd.block_sparse_attention_backward(q, k, v, out, lse, grad_out, words, scale, grad_lse)


@hopper_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("shape,layout", [((1, 2, 1000, 1000), "bhsd"), ((2, 3, 777, 1290), "bshd"),
                                          ((1, 2, 1500, 300), "bhsd")], ids=["1000", "777x1290", "1500x300"])
def test_matches_reference(dtype, D, shape, layout):
    """Odd lengths (partial last query and key blocks), Sq != Sk, both layouts, random masks."""
    B, H, Sq, Sk = shape
    q, k, v = _qkv(B, H, Sq, Sk, D, dtype, seed=D + Sq, layout=layout)
    nq, nk = -(-Sq // 128), -(-Sk // 128)
    check_backward(q, k, v, _random_mask((H,), nq, nk, 0.4, seed=Sk), D ** -0.5, backward=_gluon, autotune=True)


@hopper_only
@pytest.mark.parametrize("kind", ["empty", "full", "diagonal"])
def test_structured_masks(kind):
    """Empty rows get dq = 0 and key blocks nobody keeps dk = dv = 0, exactly."""
    q, k, v = _qkv(1, 2, 600, 600, 128, torch.bfloat16, seed=3)
    check_backward(q, k, v, _structured_mask(kind, 2, 5, 5), 128 ** -0.5, backward=_gluon, autotune=True)


@hopper_only
def test_per_batch_masks_and_lse_gradient_match_triton():
    B, H, S, D = 2, 3, 700, 64
    q, k, v = _qkv(B, H, S, S, D, torch.float16, seed=8, layout="bshd")
    words = pack_block_mask(_random_mask((B, H), 6, 6, 0.5, seed=9)).cuda()
    out, lse = block_sparse_attention(q, k, v, words, 0.125)
    grad_out, grad_lse = torch.randn_like(q), torch.randn_like(lse)
    ours = gluon_bwd.block_sparse_attention_backward(q, k, v, out, lse, grad_out, words, 0.125, grad_lse)
    triton = block_sparse_attention_backward(q, k, v, out, lse, grad_out, words, 0.125, grad_lse=grad_lse)
    for name, a, b in zip("qkv", ours, triton):
        assert a.stride() == b.stride(), f"d{name} layout"
        assert _rel_err(a, b.double()) < 2e-3, f"d{name} differs from the Triton backward's"


@hopper_only
def test_the_op_runs_it():
    """On Hopper the op's backward is the Gluon kernel for bf16 (B, S, H, D) views."""
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 500, 500, 128, torch.bfloat16, seed=1, layout="bshd"))
    assert dispatch.gluon_backward_reason(q, k, v, q.detach()) is None
    words = pack_block_mask(_random_mask((2,), 4, 4, 0.5, seed=2)).cuda()
    out = torch.ops.scaling_compiler.block_sparse_attention(q, k, v, words, 0.1)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    o, lse = block_sparse_attention(q.detach(), k.detach(), v.detach(), words, 0.1)
    expected = gluon_bwd.block_sparse_attention_backward(q.detach(), k.detach(), v.detach(), o, lse, grad_out, words, 0.1)
    for a, b in zip(grads, expected):  # dq's reductions add in a run-dependent order: not bit-equal
        assert _rel_err(a, b.double()) < 1e-3


def _cpu(shape=(1, 2, 300, 128), dtype=torch.bfloat16, layout="bhsd"):
    B, H, S, D = shape
    if layout == "bshd":
        return [torch.zeros(B, S, H, D, dtype=dtype).transpose(1, 2) for _ in range(4)]
    if layout == "strided":
        return [torch.zeros(B, H, S, 2 * D, dtype=dtype)[..., ::2] for _ in range(4)]
    return [torch.zeros(B, H, S, D, dtype=dtype) for _ in range(4)]


@pytest.mark.parametrize("case,expected", [
    ("bf16", None), ("fp16 bshd", None), ("hopper only", "capability 9.0"), ("fp32", "dtype"),
    ("mixed dtypes", "dtype"), ("D 80", "head dim"), ("key padding", "key padding"), ("strided", "TMA view")])
def test_unsupported_reason(case, expected):
    """Which inputs the Gluon backward takes (the Triton backward runs the rest)."""
    capability = (8, 0) if case == "hopper only" else (9, 0)
    dtype = {"fp32": torch.float32, "fp16 bshd": torch.float16}.get(case, torch.bfloat16)
    q, k, v, do = _cpu((1, 2, 300, 80 if case == "D 80" else 128), dtype,
                       "strided" if case == "strided" else "bshd" if case == "fp16 bshd" else "bhsd")
    if case == "mixed dtypes":
        do = do.half()
    padding = torch.ones(1, 300, dtype=torch.bool) if case == "key padding" else None
    reason = gluon_bwd.unsupported_reason(q, k, v, do, padding, capability)
    assert reason is None if expected is None else expected in reason


def test_dispatch_keeps_cpu_tensors_on_the_triton_or_torch_path():
    q, k, v, do = _cpu()
    assert "device cpu" in dispatch.gluon_backward_reason(q, k, v, do)


@hopper_only
def test_opcheck_of_the_backward_op():
    """``torch.library.opcheck`` of the backward op on the Gluon path (schema, fake tensors, AOT
    dispatch with dynamic shapes), bf16 on the GPU, with an lse gradient."""
    q, k, v = _qkv(1, 2, 300, 300, 128, torch.bfloat16, seed=4, layout="bshd")
    words = pack_block_mask(_random_mask((2,), 3, 3, 0.6, seed=5)).cuda()
    out, lse = torch.ops.scaling_compiler.block_sparse_attention_lse(q, k, v, words, 0.1, None)
    assert dispatch.gluon_backward_reason(q, k, v, out) is None
    torch.library.opcheck(torch.ops.scaling_compiler.block_sparse_attention_backward.default,
                          (torch.randn_like(out), torch.randn_like(lse), q, k, v, out, lse, words, 0.1, None))
