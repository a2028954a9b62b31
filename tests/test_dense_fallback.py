"""Attention calls the pass must leave dense: the report says why and the output equals eager."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scaling_compiler import ScalingAttnBackend

S = 300  # three mask blocks, the last one partial


class SDPACall(nn.Module):
    """One projection-fed SDPA call, configurable through the case's `call` function."""

    def __init__(self, call, heads=2, kv_heads=2, head_dim=64, kv_len=S):
        super().__init__()
        self.call, self.heads, self.kv_heads, self.head_dim, self.kv_len = call, heads, kv_heads, head_dim, kv_len
        dim = 32
        self.to_q = nn.Linear(dim, heads * head_dim)
        self.to_kv = nn.Linear(dim, 2 * kv_heads * head_dim)

    def forward(self, x, context):
        b = x.shape[0]
        source = x if self.kv_len == x.shape[1] else context
        q = self.to_q(x).view(b, -1, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.to_kv(source).view(b, -1, 2 * self.kv_heads, self.head_dim).transpose(1, 2).chunk(2, dim=1)
        return self.call(q, k, v)


float_mask = torch.randn(1, 1, S, S)
full_bool_mask = torch.rand(1, 2, S, S) > 0.5

CASES = {
    # name: (module kwargs, sdpa call, dtype, expected words in the reason)
    "float mask": (dict(), lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=float_mask), torch.float32,
                   "float32 attn_mask (1, 1, 300, 300)"),
    "full bool mask": (dict(), lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=full_bool_mask),
                       torch.float32, "bool attn_mask (1, 2, 300, 300)"),
    "causal": (dict(), lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), torch.float32,
               "is_causal"),
    "dropout": (dict(), lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.1), torch.float32,
                "dropout_p=0.1"),
    "gqa": (dict(heads=4, kv_heads=2), lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
            torch.float32, "grouped-query"),
    "head dim 8": (dict(head_dim=8), F.scaled_dot_product_attention, torch.float32, "head_dim 8 < 16"),
    "head dim 256": (dict(head_dim=256), F.scaled_dot_product_attention, torch.float32, "head_dim 256 > 128"),
    "float64": (dict(), F.scaled_dot_product_attention, torch.float64, "dtype torch.float64"),
    "cross-attention": (dict(kv_len=7), F.scaled_dot_product_attention, torch.float32, "cross-attention"),
    "3-D layout": (dict(), lambda q, k, v: F.scaled_dot_product_attention(q[0], k[0], v[0])[None], torch.float32,
                   "is not (B, H, S, D)"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_unsupported_attention_stays_dense(case):
    module_kwargs, call, dtype, reason = CASES[case]
    torch.manual_seed(0)
    model = SDPACall(call, **module_kwargs).to(dtype).eval()
    x, context = torch.randn(1, S, 32, dtype=dtype), torch.randn(1, 7, 32, dtype=dtype)
    backend = ScalingAttnBackend(density=0.25, compiler="aot_eager")
    torch._dynamo.reset()
    with torch.no_grad():
        torch.manual_seed(1)
        out = torch.compile(model, backend=backend, fullgraph=True)(x, context)
        torch.manual_seed(1)
        expected = model(x, context)

    [site] = backend.report.sites
    assert site.status == "dense"
    assert reason in site.reason
    assert backend.report.masks == {}
    if case != "dropout":  # dropout draws different random numbers under AOT than in eager
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
