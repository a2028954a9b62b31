"""Packing, unpacking and FlexAttention conversion of 128x128 block masks."""
import pytest
import torch

from scaling_compiler.kernels.bitmask import (BLOCK_SIZE, num_blocks, num_words, pack_block_mask, to_flex_block_mask,
                                              unpack_block_mask)

NK_VALUES = [1, 31, 32, 33, 64, 70]


def test_num_blocks():
    assert BLOCK_SIZE == 128
    assert [num_blocks(s) for s in (1, 127, 128, 129, 32760, 75600)] == [1, 1, 1, 2, 256, 591]
    assert [num_words(n) for n in (1, 31, 32, 33, 256, 591)] == [1, 1, 1, 2, 8, 19]


@pytest.mark.parametrize("nk", NK_VALUES)
@pytest.mark.parametrize("lead", [(), (3, ), (2, 3)])
def test_pack_unpack_round_trip(nk, lead):
    g = torch.Generator().manual_seed(nk)
    mask = torch.rand(*lead, 5, nk, generator=g) < 0.5
    mask[..., 0, :] = True  # a full row: every bit of a word set, sign bit included
    mask[..., 1, :] = False
    words = pack_block_mask(mask)
    assert words.dtype == torch.int32
    assert words.shape == (*lead, 5, num_words(nk))
    assert torch.equal(unpack_block_mask(words, nk), mask)


def test_bit_layout():
    # key block 32*w + j is bit j of word w; bit 31 is the int32 sign bit
    mask = torch.zeros(1, 70, dtype=torch.bool)
    mask[0, [0, 31, 33, 69]] = True
    words = pack_block_mask(mask)
    expected = [(1 | (1 << 31)) - (1 << 32), 1 << 1, 1 << 5]
    assert words[0].tolist() == expected
    full = pack_block_mask(torch.ones(1, 32, dtype=torch.bool))
    assert full.item() == -1  # 0xFFFFFFFF
    # padding bits past Nk stay zero
    assert pack_block_mask(torch.ones(1, 33, dtype=torch.bool)).tolist() == [[-1, 1]]


def test_pack_rejects_bad_input():
    with pytest.raises(TypeError):
        pack_block_mask(torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError):
        unpack_block_mask(torch.zeros(2, 3, dtype=torch.int32), 33)


@pytest.mark.parametrize("q_len,kv_len", [(256, 256), (200, 300), (130, 4100), (1, 1)])
@pytest.mark.parametrize("batched", [False, True])
def test_flex_block_mask_matches_unpack(q_len, kv_len, batched):
    nq, nk = num_blocks(q_len), num_blocks(kv_len)
    g = torch.Generator().manual_seed(q_len + kv_len)
    shape = (2, 3, nq, nk) if batched else (3, nq, nk)
    mask = torch.rand(*shape, generator=g) < 0.4
    mask[..., 0, :] = True
    if nq > 1:
        mask[..., 1, :] = False
    words = pack_block_mask(mask)
    bm = to_flex_block_mask(mask, q_len, kv_len)
    dense = bm.to_dense().bool()  # (B, H, Nq, Nk): full and partial blocks together
    expect = unpack_block_mask(words, nk)
    expect = expect if batched else expect[None]
    assert torch.equal(dense[..., :nq, :nk], expect)
    assert bm.seq_lengths == (q_len, kv_len)


def test_flex_attention_agrees_with_reference():
    """The converted BlockMask computes the same attention as the float64 reference."""
    from torch.nn.attention.flex_attention import flex_attention

    from scaling_compiler.kernels.reference import masked_attention_reference

    torch.manual_seed(0)
    B, H, Sq, Sk, D = 1, 2, 200, 300, 16
    q, k, v = (torch.randn(B, H, s, D) for s in (Sq, Sk, Sk))
    mask = torch.rand(H, num_blocks(Sq), num_blocks(Sk)) < 0.6
    mask[:, :, -1] = True  # the partial key block is kept somewhere
    mask[0, 0] = True
    mask[1, 1, :-1] = False  # a row whose only kept block is the partial one
    # compiled: torch 2.13's eager (unfused) flex path gets rows without full blocks wrong
    out = torch.compile(flex_attention)(q, k, v, block_mask=to_flex_block_mask(mask, Sq, Sk), scale=0.3)
    ref, _ = masked_attention_reference(q, k, v, mask, 0.3)
    rows = mask.repeat_interleave(128, 1)[:, :Sq].any(-1)[None]  # flex's value on empty rows is its own
    torch.testing.assert_close(out[rows].double(), ref[rows], atol=1e-5, rtol=1e-5)  # fp32 computation
