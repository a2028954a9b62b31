"""The inductor pass that fuses a feed-forward's tanh-GELU with torchao's rowwise float8 quantisation
of its output (`passes/float8_activations.py`), on diffusers' FeedForward with torchao float8 linears
on a GPU with float8 tensor cores, else on the CPU (torchao's hardware check bypassed: `float8_device`
in conftest.py).

Where the pass fires, the compiled graph calls `scaling_compiler.gelu_tanh_float8_rows` (checked in
the code inductor generates). Tolerance: against torchao's eager model, the backend errs by at most
2x what plain inductor errs by, plus one bf16 rounding of the output (the style guide's rule; the
op computes torchao's own operations, while inductor's fused quantisation keeps some float32
intermediates that eager rounds to bf16, so neither equals eager bit for bit).
"""
from __future__ import annotations

import pytest
import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.utils import run_and_get_code

from scaling_compiler import ScalingAttnBackend

torchao_quant = pytest.importorskip("torchao.quantization")
diffusers_attention = pytest.importorskip("diffusers.models.attention")

FUSED_OP = "scaling_compiler.gelu_tanh_float8_rows"
BF16_EPS = 2.0 ** -7


class FeedForwardAndHidden(torch.nn.Module):
    """A feed-forward block that also returns its GELU output (a second user of the hidden state)."""

    def __init__(self, ff: torch.nn.Module):
        super().__init__()
        self.ff = ff

    def forward(self, x):
        hidden = self.ff.net[0](x)
        return self.ff.net[2](hidden), hidden


def feed_forward(float8: bool, device: str = "cpu", dim: int = 64) -> torch.nn.Module:
    torch.manual_seed(0)
    ff = diffusers_attention.FeedForward(dim, activation_fn="gelu-approximate").to(device, torch.bfloat16).eval()
    if float8:
        torchao_quant.quantize_(ff, torchao_quant.Float8DynamicActivationFloat8WeightConfig(
            granularity=torchao_quant.PerRow(), set_inductor_config=False))
    return ff


def compiled_run(model, x, backend):
    """(outputs, the code inductor generated), compiled afresh: inductor's and AOTAutograd's caches
    could serve a graph compiled under another post-grad pass (their keys differ in the pass, but a
    cached AOT entry was seen to come back for the same graph with another pass configured)."""
    from torch._inductor import config as inductor_config

    torch._dynamo.reset()
    with torch.no_grad(), inductor_config.patch(force_disable_caches=True):
        out, code = run_and_get_code(torch.compile(model, backend=backend), x)
    return out, "\n".join(code)


def max_error(out, reference):
    return (out.float() - reference.float()).abs().max()


@pytest.mark.parametrize("shape", [(2, 40, 64), (75, 64)], ids=["batch-tokens-features", "tokens-features"])
def test_fused_and_close_to_eager(float8_device, shape):
    model = feed_forward(float8=True, device=float8_device)
    x = torch.randn(shape, dtype=torch.bfloat16, device=float8_device)
    with torch.no_grad():
        eager = model(x)
    ours, code = compiled_run(model, x, ScalingAttnBackend())
    assert FUSED_OP in code
    plain, plain_code = compiled_run(model, x, "inductor")
    assert FUSED_OP not in plain_code
    assert max_error(ours, eager) <= 2 * max_error(plain, eager) + BF16_EPS * eager.abs().max()


def test_gelu_used_elsewhere_stays_with_inductor(float8_device):
    """The GELU output is also returned: the pattern's inner node has another user, so no match, and
    the backend's graph computes what plain inductor's does."""
    model = FeedForwardAndHidden(feed_forward(float8=True, device=float8_device))
    x = torch.randn(2, 40, 64, dtype=torch.bfloat16, device=float8_device)
    (out, hidden), code = compiled_run(model, x, ScalingAttnBackend())
    assert FUSED_OP not in code
    (plain_out, plain_hidden), _ = compiled_run(model, x, "inductor")
    torch.testing.assert_close(hidden, plain_hidden, rtol=0, atol=0)
    torch.testing.assert_close(out, plain_out, rtol=0, atol=0)


def test_no_float8_no_fusion():
    model = feed_forward(float8=False)
    x = torch.randn(2, 40, 64, dtype=torch.bfloat16)
    out, code = compiled_run(model, x, ScalingAttnBackend())
    assert FUSED_OP not in code
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=2 * BF16_EPS, atol=2 * BF16_EPS)


class CountingPass(CustomGraphPass):
    def __init__(self):
        self.calls = 0

    def __call__(self, graph):
        self.calls += 1

    def uuid(self):
        return "counting-pass"


def test_a_configured_post_grad_pass_still_runs(float8_device, monkeypatch):
    """The backend installs its pass in front of the user's `post_grad_custom_post_pass`, not instead."""
    from torch._inductor import config as inductor_config

    user_pass = CountingPass()
    monkeypatch.setattr(inductor_config, "post_grad_custom_post_pass", user_pass)
    _, code = compiled_run(feed_forward(float8=True, device=float8_device),
                           torch.randn(2, 40, 64, dtype=torch.bfloat16, device=float8_device), ScalingAttnBackend())
    assert FUSED_OP in code and user_pass.calls >= 1


def test_a_configured_plain_callable_runs_and_turns_the_cache_off(float8_device, monkeypatch):
    """A plain function has no cache key: the chained pass has none either (inductor bypasses its cache,
    as for the function alone), and the function still runs."""
    from torch._inductor import config as inductor_config

    from scaling_compiler.passes.float8_activations import Float8ActivationFusion

    calls = []
    monkeypatch.setattr(inductor_config, "post_grad_custom_post_pass", lambda graph: calls.append(graph))
    _, code = compiled_run(feed_forward(float8=True, device=float8_device),
                           torch.randn(2, 40, 64, dtype=torch.bfloat16, device=float8_device), ScalingAttnBackend())
    assert FUSED_OP in code and calls
    assert Float8ActivationFusion(then=lambda graph: None).uuid() is None
    assert Float8ActivationFusion(then=[CountingPass()]).uuid() != Float8ActivationFusion().uuid()
