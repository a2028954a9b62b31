"""The decoded-list cache: a static mask is decoded once, a changed or new mask never reuses stale lists."""
import gc

import pytest
import torch

from scaling_compiler.kernels.bitmask import pack_block_mask, unpack_block_mask
from scaling_compiler.kernels.triton import list_cache
from scaling_compiler.kernels.triton.mask_decode import prepare_block_lists, prepare_column_lists

from .test_block_sparse_kernel import DEVICE, _random_mask


@pytest.fixture(autouse=True)
def empty_cache():
    list_cache.clear()
    yield
    list_cache.clear()


def _rows_of(lists, nk):
    """The kept-block boolean mask (H, Nq, Nk) that row lists describe."""
    kv_idx, kv_cnt, _ = lists
    keep = torch.zeros(*kv_cnt.shape, nk, dtype=torch.bool)
    for index in torch.cartesian_prod(*(torch.arange(n) for n in kv_cnt.shape)):
        h, r = index.tolist()
        keep[h, r, kv_idx[h, r, :kv_cnt[h, r]].long().cpu()] = True
    return keep


def test_same_mask_decoded_once():
    words = pack_block_mask(_random_mask((2,), 3, 4, 0.5, seed=0)).to(DEVICE)
    rows, columns = prepare_block_lists(words, 4 * 128), prepare_column_lists(words, 4 * 128)
    assert prepare_block_lists(words, 4 * 128) is rows
    assert prepare_column_lists(words, 4 * 128) is columns
    assert prepare_block_lists(words, 4 * 128, lpt_order=False) is not rows  # another decoding, another entry
    assert list_cache.held_bytes() > 0


def test_in_place_change_decodes_again():
    mask = _random_mask((2,), 3, 4, 0.5, seed=1)
    words = pack_block_mask(mask).to(DEVICE)
    first = prepare_block_lists(words, 500)
    words.copy_(pack_block_mask(~mask).to(DEVICE))
    second = prepare_block_lists(words, 500)
    assert second is not first
    assert torch.equal(_rows_of(second, 4), ~mask)
    assert torch.equal(unpack_block_mask(words.cpu(), 4), ~mask)


def test_entry_dies_with_its_mask():
    words = pack_block_mask(_random_mask((2,), 3, 4, 0.5, seed=2)).to(DEVICE)
    prepare_column_lists(words, 512)
    assert list_cache.held_bytes() > 0
    del words
    gc.collect()
    assert list_cache.held_bytes() == 0


def test_budget_drops_least_recently_used(monkeypatch):
    masks = [pack_block_mask(_random_mask((2,), 3, 4, 0.5, seed=s)).to(DEVICE) for s in range(3)]
    first = prepare_block_lists(masks[0], 512)
    one_entry = list_cache.held_bytes()
    monkeypatch.setattr(list_cache, "BUDGET_BYTES", 2 * one_entry)
    prepare_block_lists(masks[1], 512)
    prepare_block_lists(masks[0], 512)  # masks[0] now the most recent
    prepare_block_lists(masks[2], 512)  # evicts masks[1]
    assert list_cache.held_bytes() == 2 * one_entry
    assert prepare_block_lists(masks[0], 512) is first


def test_inference_tensors_are_not_cached():
    with torch.inference_mode():
        words = pack_block_mask(_random_mask((2,), 3, 4, 0.5, seed=3)).to(DEVICE)
        assert prepare_block_lists(words, 512) is not prepare_block_lists(words, 512)
    assert list_cache.held_bytes() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (streams)")
def test_masks_on_a_side_stream_are_not_cached():
    """CUDA graphs warm up and capture on a side stream, allocating into the graph's private pool: a
    list kept from there would outlive the run inside the pool, which inductor's CUDA graphs refuse."""
    words = pack_block_mask(_random_mask((2,), 3, 4, 0.5, seed=4)).cuda()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        first = prepare_block_lists(words, 512)
        assert prepare_block_lists(words, 512) is not first
    torch.cuda.current_stream().wait_stream(stream)
    assert list_cache.held_bytes() == 0
    assert torch.equal(_rows_of(first, 4), _rows_of(prepare_block_lists(words, 512), 4))
    assert list_cache.held_bytes() > 0  # the default stream caches
    pinned = pack_block_mask(_random_mask((2,), 3, 4, 0.5, seed=6)).cuda()
    lists = prepare_block_lists(pinned, 512, pin=True)
    with torch.cuda.stream(stream):
        assert prepare_block_lists(pinned, 512) is lists  # a pinned entry is served on any stream


def test_pinned_entries_outlive_the_budget_but_not_their_mask(monkeypatch):
    """A compiled graph's constant masks (pinned) are never evicted (a captured CUDA graph reads their
    lists at fixed addresses); they still die with their mask, and unpinned entries are evicted first."""
    masks = [pack_block_mask(_random_mask((2,), 3, 4, 0.5, seed=s)).to(DEVICE) for s in range(3)]
    pinned = prepare_block_lists(masks[0], 512, pin=True)
    one_entry = list_cache.held_bytes()
    monkeypatch.setattr(list_cache, "BUDGET_BYTES", 2 * one_entry)
    second = prepare_block_lists(masks[1], 512)
    prepare_block_lists(masks[2], 512)  # over budget: the unpinned masks[1] goes, the pinned (older) one stays
    assert list_cache.held_bytes() == 2 * one_entry
    assert prepare_block_lists(masks[0], 512) is pinned
    assert prepare_block_lists(masks[1], 512) is not second
    masks[1:] = []
    del masks[0]
    gc.collect()
    assert list_cache.held_bytes() == 0


def test_pinning_an_existing_entry_keeps_it():
    words = pack_block_mask(_random_mask((2,), 3, 4, 0.5, seed=5)).to(DEVICE)
    first = prepare_block_lists(words, 512)
    assert prepare_block_lists(words, 512, pin=True) is first
    words.copy_(words ^ 1)  # changed in place: decoded again, and still pinned
    again = prepare_block_lists(words, 512)
    assert again is not first
    assert list_cache._entries[next(iter(list_cache._entries))].pinned
