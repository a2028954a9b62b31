"""Training through the rewritten graph: a compiled training step of real diffusers DiTs.

Issue: "A compiled training step of a diffusers DiT (Wan, CogVideoX, Flux from small configs): at
density 1.0 its parameter gradients equal eager's (fp32, 1e-4 relative); at density 0.5 they equal
a masked-reference model's." `fullgraph=True` holds, the masks are constants (no gradient flows into
them), and an optimizer step after the compiled backward moves the weights as eager's does.

Tolerance (fp32 models): each parameter's gradient within rtol 1e-4 plus an absolute 1e-4 of the
largest gradient of the model. The absolute part is for gradients that are zero in exact arithmetic
(a key projection's bias: softmax is shift-invariant), where both sides are rounding noise around 0;
measured errors are ~1e-6 relative (float32 block-wise backward against eager's float32 SDPA backward,
or the float64 masked reference): the bound holds with a margin of ~100x.
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

from scaling_compiler import ScalingAttnBackend
from scaling_compiler.cost_model import CostModel
from scaling_compiler.demo import zoo

from tests.attention_reference import AllReports, masked_sites, model_order_mask
from tests.test_backend_models import first_output, timestep_of

# the three, and HunyuanVideo: its joint sites take a key-padding mask, which the backward honours too
MODELS = ["WanTransformer3DModel", "CogVideoXTransformer3DModel", "FluxTransformer2DModel",
          "HunyuanVideoTransformer3DModel"]
GRID = (3, 24, 24)  # latent (frames, height, width): 3 x 12 x 12 = 432 video tokens = 4 blocks of 128
RTOL = 1e-4  # the bound (fp32)
ATOL_OF_LARGEST = 1e-4  # absolute, times the model's largest gradient (see the module docstring)
LEARNING_RATE = 0.1


class RecordingBackend(ScalingAttnBackend):
    """Keeps each compiled graph's extra inputs (packed masks, step tables) for the tests to inspect."""

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.extra_inputs: list[torch.Tensor] = []

    def _compile_graph(self, gm, example_inputs, same_graph_as):
        compiled, report = super()._compile_graph(gm, example_inputs, same_graph_as)
        self.extra_inputs += compiled.extra_inputs
        return compiled, report


def make_backend(density: float, compiler: str = "aot_eager", **options) -> RecordingBackend:
    return RecordingBackend(density=density, compiler=compiler, cache=False, calibration_samples=1,
                            cost_model=CostModel.ideal("test: every supported site sparse"), **options)


def build(name: str):
    """The zoo's small config in train mode, its inputs at GRID, and a fixed regression target."""
    torch.manual_seed(0)
    model = zoo.build(name).train()
    inputs = zoo.example_inputs(name, model, GRID)
    with torch.no_grad():
        target = torch.randn_like(first_output(model(**inputs)))
    return model, inputs, target


def training_step(model, inputs, target, reference=None) -> torch.Tensor:
    """Forward (under `reference`, e.g. masked_sites), MSE loss, backward; the detached output."""
    with reference or contextlib.nullcontext():
        out = first_output(model(**inputs))
    F.mse_loss(out, target).backward()
    return out.detach()


def reference_context(report, inputs, density: float) -> masked_sites | None:
    """What the compiled step must equal: eager at density 1.0 (None), the masked float64 reference below
    (a reordered site's masks put back in the model's token order)."""
    if density >= 1.0:
        return None
    if all(site.token_order == "raster" for site in report.sparse_sites):
        return masked_sites(report, timestep_of(inputs))
    masks = report.masks_at(timestep_of(inputs))
    return masked_sites(report, token_masks={s.name: model_order_mask(masks[s.name], s) for s in report.sparse_sites})


def assert_grads_close(model, expected_model) -> None:
    """Every parameter's .grad within RTOL, plus ATOL_OF_LARGEST of the largest gradient."""
    expected = dict(expected_model.named_parameters())
    largest = max(float(p.grad.abs().max()) for p in expected.values() if p.grad is not None)
    for name, p in model.named_parameters():
        if expected[name].grad is None:  # AOTAutograd gives zeros where eager leaves None (plain aot_eager too)
            assert p.grad is None or not p.grad.any(), name
            continue
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, expected[name].grad, rtol=RTOL, atol=ATOL_OF_LARGEST * largest,
                                   msg=lambda m: f"{name}: {m}")


def largest_grad_difference(model, other) -> float:
    """max |grad - other's grad| over all parameters, over the largest of other's gradients."""
    pairs = [(p.grad, q.grad) for p, q in zip(model.parameters(), other.parameters()) if q.grad is not None]
    return max(float((g - h).abs().max()) for g, h in pairs) / max(float(h.abs().max()) for _, h in pairs)


def assert_sparse_training_report(report, density: float) -> None:
    """Some self/joint sites run sparse (the op and its backward), at the density asked."""
    sparse = report.sparse_sites
    assert sparse, [s.reason for s in report.sites]
    assert all(s.requires_grad for s in report.sites)
    assert all(s.kind != "cross" for s in sparse)
    assert all(s.shape[2] > 128 for s in sparse)  # at least 2 mask blocks: 0.5 can drop some
    if density < 1.0:
        assert all(s.density < 1.0 for s in sparse) and report.flops_saved > 0
    else:
        assert all(s.density == 1.0 for s in sparse)
    assert report.to_dict()["sites"][0]["requires_grad"] is True
    assert f"autograd runs the block-sparse backward of {len(sparse)} sparse" in str(report)


def check_training_step(name: str, density: float, compiler: str = "aot_eager", dynamic: bool = False,
                        **options) -> RecordingBackend:
    """Compile `name` (fullgraph=True), take one training step, and check the report, the output and every
    parameter gradient against eager (density 1.0) or the masked reference (below)."""
    model, inputs, target = build(name)
    expected_model = copy.deepcopy(model)
    backend = make_backend(density, compiler, **options)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=dynamic)
    out = training_step(compiled, inputs, target)
    report = backend.report
    assert_sparse_training_report(report, density)

    dense_model = copy.deepcopy(expected_model)
    expected = training_step(expected_model, inputs, target, reference_context(report, inputs, density))
    torch.testing.assert_close(out, expected, rtol=RTOL, atol=RTOL)
    assert_grads_close(model, expected_model)
    if density < 1.0:  # the masks really changed the gradients (the comparison is not with a dense step)
        training_step(dense_model, inputs, target)
        assert largest_grad_difference(model, dense_model) > 10 * ATOL_OF_LARGEST  # measured: 2e-3 (Flux) and up
    return backend


@pytest.mark.parametrize("density", [1.0, 0.5])
@pytest.mark.parametrize("name", MODELS)
def test_training_step_gradients_equal_reference(name, density):
    """fullgraph=True, loss.backward() through the compiled model: every parameter gradient equals
    eager's (density 1.0) or the masked reference's (0.5); so do the outputs."""
    check_training_step(name, density)


@pytest.mark.slow
def test_inductor_training_step():
    """The default inner compiler (inductor) compiles the forward and backward graphs around the op."""
    check_training_step("WanTransformer3DModel", 0.5, compiler="inductor")


def test_dynamic_true_training_step():
    """dynamic=True (the per-shape path): the training graph runs sparse, with gradients equal to the
    masked reference's."""
    backend = check_training_step("WanTransformer3DModel", 0.5, dynamic=True)
    assert len(backend.reports) == 1


def test_reordered_sites_train():
    """token_order="hilbert": q, k, v are gathered along the curve and the output scattered back; the
    gradients flow back through both and equal the masked reference's (masks in the model's order)."""
    backend = check_training_step("WanTransformer3DModel", 0.5, token_order="hilbert")
    assert all(site.token_order == "hilbert" for site in backend.report.sparse_sites)


def test_separable_mask_and_graph_breaks_train():
    """HunyuanVideo-1.5: dynamo breaks the model into graphs, and its joint site's mask is key padding x
    query padding (padded query rows zeroed after the op): the gradients flow through both and equal the
    masked reference's."""
    model, inputs, target = build("HunyuanVideo15Transformer3DModel")
    expected_model = copy.deepcopy(model)
    backend = make_backend(0.5)
    torch._dynamo.reset()
    out = training_step(torch.compile(model, backend=backend), inputs, target)
    reports = AllReports(backend.reports)
    [joint] = [s for s in reports.sites if s.status == "sparse"]
    assert "separable" in joint.attn_mask and joint.density < 1.0 and joint.requires_grad
    expected = training_step(expected_model, inputs, target, masked_sites(reports, timestep_of(inputs)))
    torch.testing.assert_close(out, expected, rtol=RTOL, atol=RTOL)
    assert_grads_close(model, expected_model)


def test_gradient_checkpointing_is_reported():
    """With diffusers' gradient checkpointing, dynamo puts each block in a checkpointed subgraph, which the
    passes do not rewrite: the report counts its attention calls and says they run dense (instead of "no
    softmax attention"), and the training step equals eager's."""
    model, inputs, target = build("WanTransformer3DModel")
    model.enable_gradient_checkpointing()
    expected_model = copy.deepcopy(model)
    backend = make_backend(0.5)
    torch._dynamo.reset()
    out = training_step(torch.compile(model, backend=backend, fullgraph=True), inputs, target)
    report = backend.report
    assert not report.sites and report.subgraph_attention == 4  # 2 blocks x (self, cross)
    assert report.to_dict()["subgraph_attention"] == 4
    assert "4 attention calls inside subgraphs (activation checkpointing" in str(report)
    assert "4 attention calls inside subgraphs" in backend.summary() and "no softmax" not in backend.summary()
    torch.testing.assert_close(out, training_step(expected_model, inputs, target), rtol=RTOL, atol=RTOL)
    assert_grads_close(model, expected_model)


def test_masks_are_constants_and_an_optimizer_step_matches_eager():
    """The graph's extra inputs (int32 masks, int64 step tables, float step timesteps) never require
    grad nor get one; an SGD step after the compiled backward moves the weights as eager's does, and
    the next compiled step (same graph, updated weights, same masks) equals the reference again."""
    model, inputs, target = build("WanTransformer3DModel")
    expected_model = copy.deepcopy(model)
    backend = make_backend(0.5)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    optimizers = [torch.optim.SGD(m.parameters(), lr=LEARNING_RATE) for m in (model, expected_model)]
    for step in range(2):
        for optimizer in optimizers:
            optimizer.zero_grad()
        out = training_step(compiled, inputs, target)
        reference = reference_context(backend.report, inputs, 0.5)
        expected = training_step(expected_model, inputs, target, reference)
        torch.testing.assert_close(out, expected, rtol=RTOL, atol=RTOL, msg=lambda m: f"step {step}: {m}")
        assert_grads_close(model, expected_model)
        for optimizer in optimizers:
            optimizer.step()
        for (name, p), expected_p in zip(model.named_parameters(), expected_model.parameters()):
            torch.testing.assert_close(p, expected_p, rtol=RTOL, atol=RTOL * LEARNING_RATE, msg=name)
    assert len(backend.reports) == 1  # the updated weights ran through the same graph
    assert backend.extra_inputs and any(not t.is_floating_point() for t in backend.extra_inputs)
    assert all(not t.requires_grad and t.grad is None for t in backend.extra_inputs)


def test_inference_graph_reports_no_backward():
    """Under no_grad the same model's sites are not training sites, and the report says nothing of a backward."""
    model, inputs, _ = build("WanTransformer3DModel")
    backend = make_backend(0.5)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(**inputs)
    assert backend.report.sparse_sites and not any(s.requires_grad for s in backend.report.sites)
    assert "backward" not in str(backend.report)


def test_dfsattn_training_graph_stays_dense():
    """DFSAttn scores blocks at run time, with no backward: its training graph keeps every site dense
    (saying why), and the compiled step equals eager's."""
    model, inputs, target = build("WanTransformer3DModel")
    expected_model = copy.deepcopy(model)
    backend = ScalingAttnBackend(policy="dfsattn", compiler="aot_eager")
    torch._dynamo.reset()
    out = training_step(torch.compile(model, backend=backend, fullgraph=True), inputs, target)
    sites = backend.report.sites
    assert sites and not backend.report.sparse_sites
    assert any("inputs require grad" in s.reason for s in sites)
    expected = training_step(expected_model, inputs, target)
    torch.testing.assert_close(out, expected, rtol=RTOL, atol=RTOL)
    assert_grads_close(model, expected_model)
