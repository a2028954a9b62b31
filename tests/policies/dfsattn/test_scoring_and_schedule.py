"""DFSAttn building blocks: block scores vs a float64 reference, top-k masks, schedule, mask cache."""
import pytest
import torch

from scaling_compiler.kernels.bitmask import unpack_block_mask
from scaling_compiler.policies.block_masks import with_text_dense
from scaling_compiler.policies.dfsattn.schedule import DFSSchedule, MaskCache
from scaling_compiler.policies.dfsattn.scoring import (
    DEFAULT_CHUNK_BYTES, block_scores, block_scores_reference, text_block_indices, topk_block_mask,
)
from scaling_compiler.sites import Site, Pattern, SiteKind

# (q_len, kv_len, head_dim, magnitude): tails of tiles and blocks, a single token, peaky softmax
SHAPES = [(300, 200, 64, 1.0), (300, 200, 64, 4.0), (129, 1000, 32, 3.0), (256, 256, 16, 1.0), (1, 5, 8, 1.0)]

# fp32 unit roundoff is 6e-8; a score (<= 8) sums <= 64 tile probabilities, each from a D-term
# dot product and a softmax: measured max error 5e-7 against float64, so 2e-6 leaves 4x.
ATOL = 2e-6


@pytest.mark.parametrize("q_len,kv_len,dim,magnitude", SHAPES)
def test_block_scores_match_float64_reference(q_len, kv_len, dim, magnitude):
    torch.manual_seed(0)
    q = torch.randn(2, 3, q_len, dim) * magnitude
    k = torch.randn(2, 3, kv_len, dim) * magnitude
    scores = block_scores(q, k, dim**-0.5)
    reference = block_scores_reference(q, k, dim**-0.5)
    assert scores.dtype == torch.float32 and scores.shape == reference.shape
    torch.testing.assert_close(scores.double(), reference, atol=ATOL, rtol=0)
    # each query tile's probabilities sum to 1: a block row sums to its number of tiles
    tiles = torch.tensor([min(8, -(-(q_len - 128 * u) // 16)) for u in range(scores.shape[2])], dtype=torch.float32)
    torch.testing.assert_close(scores.sum(-1), tiles.expand_as(scores.sum(-1)), atol=1e-5, rtol=0)


def test_block_scores_chunked_and_low_precision():
    torch.manual_seed(1)
    q, k = torch.randn(1, 2, 700, 32), torch.randn(1, 2, 650, 32)
    torch.testing.assert_close(block_scores(q, k, 0.2, max_chunk_bytes=1), block_scores(q, k, 0.2), atol=0, rtol=0)
    qb, kb = q.bfloat16(), k.bfloat16()  # pooled in fp32: equals the reference on the bf16 values
    torch.testing.assert_close(block_scores(qb, kb, 0.2).double(), block_scores_reference(qb, kb, 0.2),
                               atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="tile"):
        block_scores(q, k, 0.2, tile=24)


# Tolerance on CUDA, fp32 and bf16 inputs alike: block_scores upcasts to fp32 before pooling, so on
# bf16 inputs it computes in fp32 from the exact bf16 values that the float64 reference sees
# (upcast); what differs is fp32 rounding, in another order than on the CPU (cuBLAS dot products
# of length 128, the softmax over ~190 key tiles, sums of 64 tile probabilities per block). Here
# the logits have std ~4 and the scores reach ~4. Measured on an H100 (seeds 0-4, IEEE fp32
# matmuls): max abs error 1.2e-6 to 2.5e-6 for fp32 and bf16 inputs alike, ~10 fp32 ulps of the
# largest scores and above the CPU tests' ATOL. 1e-5 leaves 4x and still fails on reduced-precision
# arithmetic: TF32 matmuls give 1.1e-3 to 2.0e-3 at this shape.
CUDA_ATOL = 1e-5


def _clustered_qk(q_len: int, kv_len: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 q, k on the CPU with a component shared by runs of 32 tokens: tile means far from 0,
    peaked tile softmax (logit std ~4), plus token noise."""
    g = torch.Generator().manual_seed(seed)

    def one(length: int) -> torch.Tensor:
        shared = torch.randn(1, 2, -(-length // 32), dim, generator=g).repeat_interleave(32, dim=2)[:, :, :length]
        return 2.0 * shared + 0.5 * torch.randn(1, 2, length, dim, generator=g)

    return one(q_len), one(kv_len)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_block_scores_on_cuda_match_float64_reference(dtype, monkeypatch):
    # 4100 = 32 * 128 + 4 queries and 3000 = 23 * 128 + 56 keys: tail tiles and tail blocks, D = 128
    # as in Wan; ~250 x 190 tiles per head (the reference loops over tile pairs in Python: ~2 s)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # the tolerance assumes IEEE fp32
    q, k = (x.to(dtype) for x in _clustered_qk(4100, 3000, 128, seed=0))
    scale = 128**-0.5
    reference = block_scores_reference(q, k, scale)  # from the same (bf16-rounded) values, in float64
    for chunk in (DEFAULT_CHUNK_BYTES, 1 << 16):  # one chunk; 7 chunks of 5 query blocks
        scores = block_scores(q.cuda(), k.cuda(), scale, max_chunk_bytes=chunk)
        assert scores.device.type == "cuda" and scores.dtype == torch.float32
        torch.testing.assert_close(scores.cpu().double(), reference, atol=CUDA_ATOL, rtol=0)


@pytest.mark.parametrize("keep", [1.0, 0.3, 0.1, 0.01, 0.29])
def test_topk_keeps_the_best_blocks(keep):
    torch.manual_seed(2)
    scores = torch.rand(2, 3, 7, 100)
    mask = topk_block_mask(scores, keep)
    expected = max(1, round(keep * 100 - 0.5 + 1e-9))  # floor without float noise (0.29 -> 29)
    assert torch.all(mask.sum(-1) == expected)
    kept_min = scores.masked_fill(~mask, float("inf")).amin(-1)
    dropped_max = scores.masked_fill(mask, float("-inf")).amax(-1)
    assert torch.all(kept_min > dropped_max)


def test_topk_keeps_text_blocks():
    torch.manual_seed(3)
    text_spans = ((1000, 1226),)  # 1000 video tokens, 226 text tokens: blocks 7, 8, 9 hold text
    text = text_block_indices(text_spans)
    assert text.tolist() == [7, 8, 9]
    scores = torch.rand(1, 2, 10, 10)
    scores[..., 7:] = -1.0  # text keys score lowest: kept anyway
    mask = topk_block_mask(scores, 0.5, text)
    assert torch.equal(mask, with_text_dense(mask, text_spans))  # text rows and columns all kept
    video_rows = mask[..., :7, :]
    assert torch.all(video_rows.sum(-1) == 5)  # int(0.5 * 10) blocks, the 3 text blocks among them
    assert torch.all(video_rows[..., :7].sum(-1) == 2)
    # a budget smaller than the text still keeps one video block per row
    tight = topk_block_mask(scores, 0.1, text)
    assert torch.all(tight[..., :7, :7].sum(-1) == 1) and torch.all(tight[..., 7:])


# ---------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------
def test_schedule_reproduces_the_published_plan():
    plan = DFSSchedule().plan()
    assert len(plan) == 50
    assert [p.step for p in plan if p.dense] == list(range(12))
    assert [p.step for p in plan if p.refresh] == [12, 24, 36]  # not 48: the ratio would reach 0
    expected_keep = {**{s: 0.3 for s in range(12, 24)}, **{s: 0.2 for s in range(24, 36)},
                     **{s: 0.1 for s in range(36, 50)}}
    assert {p.step: p.keep_ratio for p in plan if not p.dense} == expected_keep
    assert all(p.mask_from == 12 + (min(p.step - 12, 24) // 12) * 12 for p in plan if not p.dense)
    assert all(p.keep_ratio is None and p.mask_from is None for p in plan[:12])
    assert DFSSchedule().dense_layers == (0,) and DFSSchedule().cfg_reuse


@pytest.mark.parametrize("field,value", [("dense_steps", -1), ("refresh_interval", 0), ("num_steps", 2.5),
                                         ("keep_ratios", ()), ("keep_ratios", (0.3, 1.5)),
                                         ("dense_layers", (-1,)), ("cfg_reuse", "yes")])
def test_schedule_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"option '{field}'"):
        DFSSchedule(**{field: value})


def test_density_with_and_without_dense_steps():
    one = DFSSchedule(dense_layers=()).density_report(num_layers=1)
    sparse_sum = 12 * 0.3 + 12 * 0.2 + 14 * 0.1  # steps 12-23, 24-35, 36-49
    assert one.excluding_dense_steps == pytest.approx(sparse_sum / 38)  # 0.195
    assert one.including_dense_steps == pytest.approx((12 + sparse_sum) / 50)  # 0.388
    wan = DFSSchedule().density_report(num_layers=30)  # layer 0 dense on every step
    assert wan.per_step[12] == pytest.approx((1 + 29 * 0.3) / 30)
    assert wan.excluding_dense_steps == pytest.approx((38 + 29 * sparse_sum) / (30 * 38))
    realised = DFSSchedule(dense_layers=()).density_report(num_layers=1, num_k_blocks=14)
    assert realised.per_step[12:14] == (4 / 14, 4 / 14) and realised.per_step[24] == 2 / 14
    assert realised.per_step[-1] == 1 / 14


# ---------------------------------------------------------------------------------------
# Mask cache
# ---------------------------------------------------------------------------------------
def _site(name: str, batch: int = 2, heads: int = 2, seq: int = 1000, text_spans=()) -> Site:
    return Site(
        name=name, pattern=Pattern.SDPA, kind=SiteKind.JOINT if text_spans else SiteKind.SELF, batch=batch,
        heads=heads, kv_heads=heads, q_len=seq, kv_len=seq, head_dim=32, dtype=torch.float32,
        device=torch.device("cpu"), q_stride=(), scale=32**-0.5, attn_mask=None, key_padding=False,
        is_causal=False, dropout_p=0.0, token_grid=None, grid_source="test", text_spans=text_spans)


class _Scorer:
    """scores_fn over fixed random q, k; records the batch rows of every call."""

    def __init__(self, batch: int = 2, heads: int = 2, seq: int = 1000):
        self.q, self.k = torch.randn(batch, heads, seq, 32), torch.randn(batch, heads, seq, 32)
        self.calls: list[slice] = []

    def __call__(self, rows: slice) -> torch.Tensor:
        self.calls.append(rows)
        return block_scores(self.q[rows], self.k[rows], 32**-0.5)


def test_mask_cache_follows_the_schedule_with_cfg_reuse():
    torch.manual_seed(4)
    sites = [_site("blocks.0.attn1"), _site("blocks.1.attn1")]
    cache = MaskCache(DFSSchedule(), sites, cfg_batch=True)
    scorers = {s.name: _Scorer() for s in sites}
    computed_at, previous = [], None
    for step in range(50):
        assert cache.masks_for("blocks.0.attn1", step, scorers["blocks.0.attn1"]) is None  # layer 0 dense
        words = cache.masks_for("blocks.1.attn1", step, scorers["blocks.1.attn1"])
        if step < 12:
            assert words is None
            continue
        assert words.dtype == torch.int32 and words.shape == (2, 2, 8, 1)
        assert torch.equal(words[0], words[1])  # the uncond row uses the cond row's masks
        if words is not previous:
            computed_at.append(step)
        previous = words
        kept = unpack_block_mask(words, 8).sum(-1)
        assert torch.all(kept == max(1, int(cache.plan[step].keep_ratio * 8 + 1e-9)))
    assert computed_at == [12, 24, 36]
    assert scorers["blocks.0.attn1"].calls == []
    assert scorers["blocks.1.attn1"].calls == [slice(0, 1)] * 3  # only the cond half is scored
    assert [(r.step, r.keep_ratio) for r in cache.refreshes] == [(12, 0.3), (24, 0.2), (36, 0.1)]


def test_mask_cache_without_cfg_reuse_scores_every_row():
    torch.manual_seed(5)
    cache = MaskCache(DFSSchedule(cfg_reuse=False, dense_layers=()), [_site("a")], cfg_batch=True)
    scorer = _Scorer()
    words = cache.masks_for("a", 12, scorer)
    assert scorer.calls == [slice(0, 2)]
    assert not torch.equal(words[0], words[1])  # independent random q, k per row
    odd = MaskCache(DFSSchedule(dense_layers=()), [_site("b", batch=3)], cfg_batch=True)
    with pytest.raises(ValueError, match="even batch"):
        odd.masks_for("b", 12, _Scorer(batch=3))


def test_mask_cache_recomputes_once_per_step_and_after_a_restart():
    torch.manual_seed(6)
    cache = MaskCache(DFSSchedule(dense_layers=()), [_site("a", batch=1)])
    scorer = _Scorer(batch=1)
    first = cache.masks_for("a", 13, scorer)  # the refresh step 12 was skipped: computed now
    assert cache.masks_for("a", 14, scorer) is first and len(scorer.calls) == 1
    cache.masks_for("a", 24, scorer)
    assert cache.masks_for("a", 24, scorer) is cache.masks_for("a", 25, scorer)  # CFG as two passes
    assert len(scorer.calls) == 2
    cache.masks_for("a", 12, scorer)  # a new sample reaches step 12 again: fresh masks
    assert len(scorer.calls) == 3
    assert cache.masks_for("a", 0, scorer) is None  # a sample stopped at step 12 and a new one began
    cache.masks_for("a", 12, scorer)
    assert len(scorer.calls) == 4
    with pytest.raises(IndexError):
        cache.masks_for("a", 50, scorer)


def test_mask_cache_keeps_text_blocks():
    torch.manual_seed(7)
    spans = ((1000, 1226),)
    cache = MaskCache(DFSSchedule(dense_layers=()), [_site("j", batch=1, seq=1226, text_spans=spans)])
    words = cache.masks_for("j", 36, _Scorer(batch=1, seq=1226))
    mask = unpack_block_mask(words, 10)
    assert torch.equal(mask, with_text_dense(mask, spans))
