"""The custom ops: registration (torch.library.opcheck) and the autograd formula on the CPU path.

The Triton backward is tested against the same references in `tests/kernels/test_block_sparse_backward.py`.
"""
import pytest
import torch

from scaling_compiler import ops  # noqa: F401  (registers the ops)
from scaling_compiler.kernels.bitmask import num_blocks, pack_block_mask
from scaling_compiler.kernels.reference import masked_attention_reference

OPS = torch.ops.scaling_compiler


def _case(batch_masks: bool, seed: int = 0, S: int = 200, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 2, S, 64, generator=g, dtype=dtype) for _ in range(3))
    n = num_blocks(S)
    block_mask = torch.rand((2, 2, n, n) if batch_masks else (2, n, n), generator=g) > 0.3
    block_mask[..., 0] = True
    key_padding = torch.rand(2, S, generator=g) > 0.2
    return q, k, v, block_mask, key_padding


@pytest.mark.parametrize("batch_masks", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_op_registration(batch_masks, padded):
    """Schema, fake tensors, autograd registration and AOT dispatch (dynamic shapes) of the ops."""
    q, k, v, block_mask, key_padding = _case(batch_masks)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    args = (q, k, v, pack_block_mask(block_mask), 0.125, key_padding if padded else None)
    torch.library.opcheck(OPS.block_sparse_attention_lse.default, args)
    torch.library.opcheck(OPS.block_sparse_attention.default, args)
    out, lse = OPS.block_sparse_attention_lse(*args)
    grads = (torch.randn_like(out), torch.randn_like(lse))
    torch.library.opcheck(OPS.block_sparse_attention_backward.default,
                          (*grads, *(t.detach() for t in (q, k, v, out)), lse.detach(), *args[3:]))


# (Sq = Sk, mask) cases: odd lengths, empty rows and columns, full and empty masks
MASKS = {
    "random": lambda n: torch.rand(2, n, n) > 0.5,
    "full": lambda n: torch.ones(2, n, n, dtype=torch.bool),
    "empty": lambda n: torch.zeros(2, n, n, dtype=torch.bool),
    "empty row and column": lambda n: torch.ones(2, n, n, dtype=torch.bool).index_fill(1, torch.tensor([n - 1]), False)
    .index_fill(2, torch.tensor([0]), False),
}


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("S", [128, 300])
@pytest.mark.parametrize("padded", [False, True])
def test_op_gradients_match_float64_reference(mask, S, padded):
    """Gradients of out and lse through the op (CPU block-wise backward) equal autograd through
    the float64 masked reference; rows and key blocks nobody keeps get zero gradients."""
    torch.manual_seed(S)
    q, k, v = (torch.randn(2, 2, S, 32, requires_grad=True) for _ in range(3))
    block_mask = MASKS[mask](num_blocks(S))
    key_padding = (torch.rand(2, S) > 0.3) if padded else None
    out, lse = OPS.block_sparse_attention_lse(q, k, v, pack_block_mask(block_mask), 0.2, key_padding)
    qd, kd, vd = (t.double().detach().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = masked_attention_reference(qd, kd, vd, block_mask, 0.2, key_padding)
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], rtol=1e-5, atol=1e-5)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    got = torch.autograd.grad((out * grad_out).sum() + (lse.nan_to_num(neginf=0.0) * grad_lse).sum(), (q, k, v))
    loss = (ref_out * grad_out.double()).sum() + (ref_lse.masked_fill(~finite, 0.0) * grad_lse.double()).sum()
    expected = torch.autograd.grad(loss, (qd, kd, vd), allow_unused=True)
    for name, g, e in zip("qkv", got, expected):
        e = torch.zeros_like(g, dtype=torch.float64) if e is None else e
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-5, msg=lambda m: f"d{name}: {m}")
    if mask == "empty":
        assert all(bool((g == 0).all()) for g in got)


@pytest.mark.parametrize("op", ["block_sparse_attention_lse", "block_sparse_attention_fp8"])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_output_in_q_layout(op, layout):
    """The forward ops return out laid out like q (`torch.empty_like(q)`), fake and real alike (opcheck
    compares them): a transposed (B, S, H, D) q gives an out whose transpose back is contiguous, so
    a model's `transpose(1, 2).flatten(2)` after attention is a view, as after SDPA."""
    dtype = torch.float32 if op == "block_sparse_attention_lse" else torch.bfloat16
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton kernels on a GPU, the CPU paths here
    q, k, v, block_mask, key_padding = _case(False, seed=5, S=260, dtype=dtype)
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    q, k, v, key_padding = (t.to(device) for t in (q, k, v, key_padding))
    args = (q, k, v, pack_block_mask(block_mask).to(device), 0.125, key_padding)
    torch.library.opcheck(getattr(OPS, op).default, args)
    out = getattr(OPS, op)(*args)
    out = out[0] if isinstance(out, tuple) else out
    assert out.stride() == q.stride()
    assert out.transpose(1, 2).is_contiguous() == (layout == "bshd")
    # the values do not depend on the layout
    contiguous = getattr(OPS, op)(*(t.contiguous() for t in args[:3]), *args[3:])
    contiguous = contiguous[0] if isinstance(contiguous, tuple) else contiguous
    torch.testing.assert_close(out, contiguous, rtol=0, atol=0)
