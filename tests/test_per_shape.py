"""Graphs with symbolic shapes (dynamo's recompile after a shape change, or `dynamic=True`).

The backend specialises such a graph per concrete shape at call time (per_shape.PerShapeCompiled).
Each specialisation must calibrate the real model (weights kept, activations randomised), find
the timestep input, fold the model's Python numbers as a static graph does, and keep the static
path's dense rules (gradients).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scaling_compiler import ScalingAttnBackend
from scaling_compiler.kernels.bitmask import BLOCK_SIZE

from tests.attention_reference import token_mask
from tests.topology_model import TopologyAttention, true_recall

RECALL_TOLERANCE = 0.02  # the bound on the recall lost by a recompile
SPARSE_STEP = 500.0  # a timestep of a sparse step of the schedule below (warmup: its first 5 of 50 steps)


def _run(compiled, model, batch, seq_len, timestep, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq_len, 8, generator=generator)
    t = torch.full((batch,), timestep)
    with torch.no_grad():
        return compiled(x, t), model(x, t)


def _site_recall(model, report, seq_len):
    [site] = report.sites
    assert site.status == "sparse", site.reason
    assert site.shape[2] == seq_len
    masks = report.masks_at(SPARSE_STEP)[site.name]
    assert masks.shape[-2] == -(-seq_len // BLOCK_SIZE)
    return true_recall(model, seq_len, token_mask(masks, seq_len, seq_len))


def test_recompile_calibrates_the_real_model_and_keeps_the_timestep():
    """Compiled at batch 1, then called at batch 2 and at another length: dynamo recompiles with
    symbolic shapes. Each new graph's masks keep the model's own attention (recall measured on the
    exact attention of the real model, within 0.02 of the first compile's), the timestep input is
    still found, and a t=999 call (a dense warm-up step) equals eager."""
    torch.manual_seed(0)
    model = TopologyAttention().eval()
    backend = ScalingAttnBackend(density=0.5, warmup=0.1, calibration_samples=2, compiler="eager", cache=False)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)

    _run(compiled, model, 1, 768, SPARSE_STEP, seed=0)
    first = _site_recall(model, backend.report, 768)
    assert min(first) > 0.95  # the weight-encoded topology is found (a random mask keeps ~0.5)
    assert backend.report.step_source.startswith("timestep input #")

    for graphs, (batch, seq_len) in enumerate([(2, 768), (2, 1024)], start=2):
        _run(compiled, model, batch, seq_len, SPARSE_STEP, seed=graphs)
        report = backend.report
        assert len(backend.reports) == graphs  # a new graph for the new shape
        recall = _site_recall(model, report, seq_len)
        for head, (before, after) in enumerate(zip(first, recall)):
            assert after >= before - RECALL_TOLERANCE, \
                f"head {head}: recall {after:.3f} after the recompile, {before:.3f} before"
        assert report.step_source.startswith("timestep input #"), report.step_source

        # the first steps of the schedule are dense: a t=999 call is the eager model
        [site] = report.sites
        assert bool((token_mask(report.masks_at(999.0)[site.name], seq_len, seq_len)).all())
        out, expected = _run(compiled, model, batch, seq_len, 999.0, seed=10 + graphs)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


class ScaledAttention(nn.Module):
    """Keeps its softmax scale and dropout probability as Python floats (attributes, not tensors)."""

    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.scale = 0.3
        self.dropout_p = 0.0

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, self.heads, -1).transpose(1, 2) for p in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale, dropout_p=self.dropout_p)
        return out.transpose(1, 2).reshape(b, s, -1)


class ScaleArgumentAttention(ScaledAttention):
    """Takes its scale as a Python float argument, and uses it in arithmetic."""

    def forward(self, x, scale):
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, self.heads, -1).transpose(1, 2) for p in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v, scale=scale * 2)
        return out.transpose(1, 2).reshape(b, s, -1) * scale


def test_dynamic_true_with_python_float_attributes():
    """dynamic=True passes the float attributes as 0-d tensors; each shape's graph folds them back
    into constants: the site runs through the op with the model's scale and equals eager."""
    check_dynamic_true_site(ScaledAttention(), lambda seq_len: 0.3)


def test_dynamic_true_with_a_python_float_argument():
    """A float argument of the forward, used in arithmetic and as the scale: each value is its own
    specialisation (as dynamo keys static graphs), and every call equals eager."""
    torch.manual_seed(0)
    model = ScaleArgumentAttention().eval()
    backend = ScalingAttnBackend(density=1.0, compiler="eager")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, dynamic=True)
    for scale in (0.1, 0.2, 0.1):
        x = torch.randn(1, 256, 32)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, scale), model(x, scale), rtol=1e-5, atol=1e-5)
    assert len(backend.reports) == 2  # the third call reuses the first value's specialisation
    for report, scale in zip(backend.reports, (0.1, 0.2)):
        [site] = report.sites
        assert site.status == "sparse" and site.scale == pytest.approx(2 * scale), site.reason


def _site_verdict(dynamic, case):
    torch.manual_seed(0)
    model = ScaledAttention()
    backend = ScalingAttnBackend(density=1.0, compiler="eager")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, dynamic=dynamic)
    x = torch.randn(1, 256, 32)
    if case == "grad":  # a training graph: the op's backward runs, gradients equal eager's (density 1.0)
        compiled(x).sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        model(x).sum().backward()
        for got, expected in zip(grads, (p.grad for p in model.parameters())):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    else:  # dropout in training mode, a Python float attribute
        model.dropout_p = 0.1
        with torch.no_grad():
            compiled(x)
    [site] = backend.report.sites
    return site.status, site.reason


@pytest.mark.parametrize("case, status, reason", [("grad", "sparse", None), ("dropout", "dense", "dropout_p=0.1")])
def test_per_shape_site_rules_match_static(case, status, reason):
    """On the per-shape path as on the static one, a training graph's site runs sparse (with the
    op's backward) and a site that drops out stays dense with the same reason."""
    static = _site_verdict(dynamic=False, case=case)
    per_shape = _site_verdict(dynamic=True, case=case)
    assert static[0] == status and (reason is None or reason in static[1])
    assert per_shape == static


class LengthScaledSoftmaxAttention(nn.Module):
    """Hand-written attention whose scores are divided by the sequence length (found by the fuzz
    suite): with dynamic=True the length is a SymInt input of the graph."""

    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, self.heads, -1).transpose(1, 2) for p in (self.to_q, self.to_k, self.to_v))
        probs = (q @ k.transpose(-2, -1) * 8.0 / s).softmax(dim=-1)
        return (probs @ v).transpose(1, 2).reshape(b, s, -1)


def test_dynamic_true_folds_sizes_as_a_static_graph_does():
    """A SymInt size in the scale (`scores / seq_len`) is its value in each shape's graph: the hand-written
    site is found and runs sparse with the static graph's scale (it was missed: 'no softmax attention in
    this graph'), and every call equals eager."""
    check_dynamic_true_site(LengthScaledSoftmaxAttention(), lambda seq_len: 8.0 / seq_len)


def check_dynamic_true_site(model, expected_scale) -> None:
    """Compiled with dynamic=True and called at two lengths: equal to eager, one site run through the op
    at each length with `expected_scale(length)`."""
    torch.manual_seed(0)
    model = model.eval()
    backend = ScalingAttnBackend(density=1.0, compiler="eager")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, dynamic=True)
    for seq_len in (256, 300):
        x = torch.randn(2, seq_len, 32)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
        [site] = backend.report.sites
        assert site.status == "sparse" and site.scale == pytest.approx(expected_scale(seq_len)), site.reason
        assert site.shape[2] == seq_len