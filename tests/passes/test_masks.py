"""Separable attention masks (passes/masks.py): an attn_mask the graph builds as query validity x key
validity becomes key padding plus query padding, in each usual spelling; other masks stay dense.

Compiled at density 1.0 the model equals eager (1e-5: float32 around the float32 block-wise path),
fully masked query rows included (eager SDPA gives zeros there on torch 2.13, bool and 0/-inf alike,
and so must we); at density 0.5 it equals the float64 masked reference built from the op's own
masks (1e-4).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scaling_compiler import ScalingAttnBackend
from scaling_compiler.policies.token_order import inverse_permutation, sequence_order

from tests.attention_reference import masked_sites, token_mask

from .graphs import dynamo_graph


def _outer(valid):
    return valid[:, None, :, None] & valid[:, None, None, :]


def _repeat_transpose(valid):  # HunyuanVideo-1.5's spelling
    batch, length = valid.shape
    rows = valid.view(batch, 1, 1, length).repeat(1, 1, length, 1)
    return (rows & rows.transpose(2, 3)).bool()


SEPARABLE = {
    "and": _outer,
    "mul": lambda valid: valid.unsqueeze(1).unsqueeze(-1) * valid.unsqueeze(1).unsqueeze(2),
    "logical_and": lambda valid: torch.logical_and(valid[:, :, None], valid[:, None, :]).unsqueeze(1),
    "int_mul_bool": lambda valid: (valid.long()[:, None, :, None] * valid.long()[:, None, None, :]).bool(),
    "expand": lambda valid: _outer(valid).expand(-1, 1, -1, -1).contiguous(),
    "repeat_transpose": _repeat_transpose,
    "additive_masked_fill": lambda valid: torch.zeros(_outer(valid).shape).masked_fill(~_outer(valid), float("-inf")),
    "additive_where": lambda valid: torch.where(_outer(valid), 0.0, float("-inf")),
    "additive_or_of_complements": lambda valid: torch.zeros(valid.shape[0], 1, valid.shape[1], valid.shape[1])
    .masked_fill(~valid[:, None, :, None] | ~valid[:, None, None, :], float("-inf")),
}

NOT_SEPARABLE = {
    "or": lambda valid: valid[:, None, :, None] | valid[:, None, None, :],
    "bitwise_and_of_ints": lambda valid: (valid.long()[:, None, :, None] & (2 * valid.long())[:, None, None, :]).bool(),
    "causal_and_padding": lambda valid: _outer(valid) & torch.ones(valid.shape[1], valid.shape[1], dtype=torch.bool).tril(),
    "finfo_min": lambda valid: torch.zeros(_outer(valid).shape).masked_fill(~_outer(valid), torch.finfo(torch.float32).min),
    "bool_as_float": lambda valid: _outer(valid).float(),  # 0/1 added to the scores: no masking at all
    "per_head": lambda valid: _outer(valid).expand(-1, 2, -1, -1) & torch.rand(1, 2, 1, 1).gt(-1),
}


class Masked(nn.Module):
    """Self-attention over x with a mask built from per-token validity by `build`."""

    def __init__(self, build, heads=2, head_dim=32):
        super().__init__()
        self.build, self.heads = build, heads
        self.proj = nn.Linear(16, 3 * heads * head_dim)

    def forward(self, x, valid):
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.proj(x).chunk(3, dim=-1))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.build(valid)).transpose(1, 2).flatten(2)


def _inputs(batch=2, length=300):
    torch.manual_seed(0)
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[0, 250:] = False  # padded tail: fully masked query rows (inside the last block and a whole block)
    valid[1, :5] = False
    valid[1, 140:150] = False
    return torch.randn(batch, length, 16), valid


def _compile(model, inputs, density):
    backend = ScalingAttnBackend(compiler="aot_eager", density=density, calibration_samples=1)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True)(*inputs)
    return backend, out


@pytest.mark.parametrize("spelling", SEPARABLE)
def test_separable_mask_padding_detected(spelling):
    graph = dynamo_graph(Masked(SEPARABLE[spelling]).eval(), *_inputs())
    (site,) = graph.sites
    assert site.rewritable, site.dense_reason
    assert site.key_padding and site.query_padding and "separable" in site.attn_mask
    assert site.query_padding_node is not None and site.mask_node is not None
    key, query = site.mask_node.meta["val"], site.query_padding_node.meta["val"]
    assert (tuple(key.shape), tuple(query.shape)) == ((2, 1, 1, 300), (2, 1, 300, 1))


@pytest.mark.parametrize("spelling", NOT_SEPARABLE)
def test_masks_that_are_not_separable_stay_dense(spelling):
    model = Masked(NOT_SEPARABLE[spelling]).eval()
    graph = dynamo_graph(model, *_inputs())
    (site,) = graph.sites
    assert not site.rewritable and not site.query_padding and "attn_mask" in site.dense_reason
    backend, out = _compile(model, _inputs(), 0.5)  # dense: eager's answer
    with torch.no_grad():
        torch.testing.assert_close(out, model(*_inputs()), rtol=1e-5, atol=1e-5)
    assert backend.report.sites[0].status == "dense"


@pytest.mark.parametrize("spelling", SEPARABLE)
def test_separable_mask_padding_equals_eager_at_density_one(spelling):
    model = Masked(SEPARABLE[spelling]).eval()
    inputs = _inputs()
    with torch.no_grad():
        expected = model(*inputs)
    assert torch.all(expected[0, 250:] == 0) and not expected.isnan().any()  # eager: padded rows are zero
    backend, out = _compile(model, inputs, 1.0)
    assert backend.report.sites[0].status == "sparse"
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.all(out[0, 250:] == 0) and torch.all(out[1, :5] == 0)


@pytest.mark.parametrize("spelling", ["and", "repeat_transpose", "additive_where"])
@pytest.mark.parametrize("order", ["raster", "hilbert"])
def test_separable_mask_padding_sparse_equals_masked_reference(spelling, order):
    """At density 0.5 (and with the tokens reordered along a curve, which moves the padding vectors
    with them): the float64 reference with the op's block masks and the model's own mask."""
    model = Masked(SEPARABLE[spelling]).eval()
    inputs = _inputs(length=2 * 12 * 12)
    inputs[1][0, 250:] = False
    backend = ScalingAttnBackend(compiler="aot_eager", density=0.5, calibration_samples=1, token_grid=(2, 12, 12),
                                 token_order=order)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True)(*inputs)
        site = backend.report.sites[0]
        assert site.status == "sparse" and site.density < 1.0 and site.token_order == order
        words = backend.report.masks_at(None)[site.name]
        inverse = inverse_permutation(sequence_order(site.shape[2], (2, 12, 12), (), order))
        allowed = token_mask(words, site.shape[2], site.shape[2])[:, inverse][:, :, inverse]  # model order
        with masked_sites(backend.report, token_masks={site.name: allowed}):
            expected = model(*inputs)
        dense = model(*inputs)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert (out - dense).abs().max() > 1e-3


@pytest.mark.parametrize("spelling", ["and", "additive_masked_fill"])
def test_separable_mask_padding_all_padded_batch_entry_equals_eager(spelling):
    """A batch entry with no valid token (every row fully masked) gives eager's zeros, never NaN."""
    torch.manual_seed(0)
    x, valid = torch.randn(3, 200, 16), torch.ones(3, 200, dtype=torch.bool)
    valid[1] = False
    valid[2, 100:] = False
    model = Masked(SEPARABLE[spelling]).eval()
    with torch.no_grad():
        expected = model(x, valid)
    backend, out = _compile(model, (x, valid), 1.0)
    assert backend.report.sites[0].status == "sparse"
    assert torch.all(out[1] == 0) and not out.isnan().any()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
