"""Static mask rules: the built-in ones, and a new rule defined here, registered with one line and compiled."""
import pytest
import torch

from scaling_compiler import ScalingAttnBackend
from scaling_compiler.kernels.bitmask import num_blocks, unpack_block_mask
from scaling_compiler.policies.static import RULES, StaticRule, register_rule
from scaling_compiler.sites import Site
from tests.attention_reference import masked_sites
from tests.passes.graphs import VideoAttention, video_inputs


def every_other_key_block(site: Site, density: float) -> torch.Tensor:
    """bool (H, Nq, Nk): head h keeps the key blocks of its parity, plus the diagonal (density ignored)."""
    nq, nk = num_blocks(site.q_len), num_blocks(site.kv_len)
    keys = torch.arange(nk)
    per_head = [(keys % 2 == h % 2).expand(nq, nk) | torch.eye(nq, nk, dtype=torch.bool) for h in range(site.heads)]
    return torch.stack(per_head)


@pytest.fixture
def stripes():
    rule = register_rule(StaticRule("stripes", every_other_key_block, describe=lambda site: "stripes"))  # the one line
    yield rule
    del RULES[rule.name]


def test_a_rule_defined_here_compiles_and_matches_its_masked_reference(stripes):
    torch.manual_seed(0)
    model, inputs = VideoAttention(layers=2).eval(), video_inputs(frames=2, height=32, width=32)  # 512 tokens
    backend = ScalingAttnBackend(density=0.5, masks="stripes", compiler="aot_eager")
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True)(*inputs)
    report = backend.report
    sparse = report.sparse_sites
    assert len(sparse) == 2 and all(site.reason.startswith("stripes, uniform density 0.5") for site in sparse)
    for name, words in report.masks.items():
        site = next(s for s in sparse if s.name == name)
        blocks = unpack_block_mask(words.cpu(), num_blocks(site.kv_len))
        torch.testing.assert_close(blocks, every_other_key_block(_site_like(site), 0.5))
    with torch.no_grad(), masked_sites(report):
        expected = model(*inputs)
    torch.testing.assert_close(out, expected.float(), rtol=2e-5, atol=2e-5)  # fp32 vs the fp64 masked reference


def test_unknown_rule_names_the_option_and_the_rules():
    with pytest.raises(ValueError, match="option 'masks' must be one of 'west', 'local_band', 'window_3d'"):
        ScalingAttnBackend(density=0.5, masks="stripes")


def _site_like(report_site) -> Site:
    batch, heads, q_len, head_dim = report_site.shape
    return Site(report_site.name, None, None, batch, heads, heads, q_len, report_site.kv_len, head_dim, torch.float32,
                torch.device("cpu"), (), None, None, False, False, 0.0, None, "", ())
