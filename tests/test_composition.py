"""The backend stacked with torchao quantisation and CFG batches (diffusers' cache hooks: test_step_caches.py).

torchao is an optional test dependency (`pip install -e ".[test]"` installs it): its tests skip
without it. Int8 weight-only weights (`Int8Tensor`) run on the CPU. Float8 dynamic activation +
weight (`Float8Tensor`, `_scaled_mm`) is refused by torchao without an sm89 GPU, by a hardware
check before it quantises; torch's `_scaled_mm` runs it on the CPU all the same, so the CPU test
bypasses that check and runs the real float8 weights and activation quantisation (plain inductor
cannot compile it on the CPU, a C++ codegen error: that test uses aot_eager; the GPU check covers
inductor and the float8 kernels).

Tolerances. At density 1.0 the backend's op keeps every block and computes the same attention in
fp32 as SDPA, in another order: 1e-5 on a model whose outputs are of order 1 (as
test_backend_models). At density 0.5 the model equals a float64 masked-attention reference
within 1e-4: the rounding of the surrounding fp32 layers only. In bf16 (float8) the rule of the
style guide: the backend's error against the float64-attention reference is within 2x the error
plain compile makes against it, plus one bf16 rounding of the output.
"""
from __future__ import annotations

import logging

import pytest
import torch
import torch.fx

from scaling_compiler import ScalingAttnBackend, cache
from scaling_compiler.passes.inputs import META_KEY, GraphInput, InputKind
from scaling_compiler.policies.west_fast import calibrate
from scaling_compiler.demo import zoo

from tests.attention_reference import masked_sites

torchao_quant = pytest.importorskip("torchao.quantization")

WAN = "WanTransformer3DModel"
GRID = (3, 24, 24)  # 3 x 12 x 12 = 432 video tokens: 4 blocks of 128
TIMESTEP = 500.0  # zoo's Wan inputs
BF16_EPS = 2.0 ** -7  # bf16's machine epsilon: one rounding of an output


def quantized_wan(config, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """The zoo's tiny Wan with its blocks quantised by torchao (`quantize_(model.blocks, config)`)."""
    torch.manual_seed(seed)
    model = zoo.build(WAN).to(dtype)
    torchao_quant.quantize_(model.blocks, config)
    return model.eval()


def wan_inputs(model: torch.nn.Module, batch: int = 1, dtype: torch.dtype = torch.float32) -> dict:
    """Forward kwargs; with batch 2 a CFG batch: the same latents, a prompt and another (the "negative")."""
    torch.manual_seed(1)
    inputs = zoo.example_inputs(WAN, model, GRID)
    if batch == 2:
        inputs = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        inputs["encoder_hidden_states"][1] = torch.randn_like(inputs["encoder_hidden_states"][1])
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}


def run(model, inputs, backend="aot_eager"):
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(model, backend=backend)(**inputs)[0]


def ours(density: float, **options) -> ScalingAttnBackend:
    return ScalingAttnBackend(compiler="aot_eager", density=density, calibration_samples=2, **options)


def masked_reference(model, inputs, report):
    with torch.no_grad(), masked_sites(report, TIMESTEP):
        return model(**inputs)[0]


def assert_sparse_self_attention(report) -> None:
    self_sites = [s for s in report.sites if s.kind == "self"]
    assert len(self_sites) == 2 and all(s.status == "sparse" and s.density < 1.0 for s in self_sites)
    assert report.flops_saved > 0


def int8_wan(seed: int = 0) -> torch.nn.Module:
    model = quantized_wan(torchao_quant.Int8WeightOnlyConfig(set_inductor_config=False), seed=seed)
    assert type(model.blocks[0].attn1.to_q.weight).__name__ == "Int8Tensor"
    return model


# ---------------------------------------------------------------------------------------
# int8 weight-only
# ---------------------------------------------------------------------------------------


def test_int8_weight_only_density_one_equals_plain_compile():
    model = int8_wan()
    inputs = wan_inputs(model)
    plain = run(model, inputs)
    backend = ours(1.0)
    out = run(model, inputs, backend)
    assert [s.status for s in backend.report.sites if s.kind == "self"] == ["sparse", "sparse"]
    assert all(s.density == 1.0 for s in backend.report.sites)
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 2], ids=["batch1", "cfg-batch2"])
def test_int8_weight_only_sparse_equals_masked_reference(batch):
    """Density 0.5: the masks change the output (by far more than the tolerance), and the output is the
    quantised model's with float64 attention restricted to the reported masks; batch 2 is a CFG batch
    (one prompt, another), whose rows share the site's masks."""
    model = int8_wan()
    inputs = wan_inputs(model, batch)
    backend = ours(0.5)
    out = run(model, inputs, backend)
    report = backend.report
    assert_sparse_self_attention(report)
    assert all(s.shape[0] == batch for s in report.sites)
    assert "calibrated" in report.topology_origin
    torch.testing.assert_close(out, masked_reference(model, inputs, report), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        dense = model(**inputs)[0]
    assert (out - dense).abs().max() > 100 * 1e-4


@pytest.mark.slow
def test_quantized_weights_are_calibrated_as_weights_and_cached(tmp_path, monkeypatch):
    """The second compile of the same quantised model reuses the calibration from the cache; the
    same architecture with other quantised weights does not (its fingerprint differs)."""
    monkeypatch.setenv(cache.CACHE_DIR_ENV_VAR, str(tmp_path))
    model = int8_wan()
    inputs = wan_inputs(model)
    origins = []
    for candidate in (model, model, int8_wan(seed=1)):
        backend = ours(0.5)
        run(candidate, inputs, backend)
        origins.append(backend.report.topology_origin)
    assert "calibrated" in origins[0] and "from cache" in origins[1] and "calibrated" in origins[2]
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_fingerprint_reads_quantized_values():
    """The fingerprint of Int8Tensor weights: the same for the same weights, another for other weights,
    for the same int8 values with other scales, and for the unquantised weights."""
    def weights(model):
        return [p for _, p in sorted(model.blocks.named_parameters())]

    first, again, other = int8_wan(), int8_wan(), int8_wan(seed=1)
    fingerprint = cache.weights_fingerprint(weights(first))
    assert cache.weights_fingerprint(weights(again)) == fingerprint
    assert cache.weights_fingerprint(weights(other)) != fingerprint
    rescaled = int8_wan()
    rescaled.blocks[0].attn1.to_q.weight.scale.mul_(2.0)  # same int8 values, other scales: other weights
    assert cache.weights_fingerprint(weights(rescaled)) != fingerprint
    torch.manual_seed(0)
    assert cache.weights_fingerprint(weights(zoo.build(WAN))) != fingerprint


class _Opaque(torch.Tensor):
    """A wrapper subclass without `__tensor_flatten__`: its values cannot be reached."""

    @staticmethod
    def __new__(cls, shape):
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=torch.float32)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(func)


def test_fingerprint_refuses_a_weight_it_cannot_read(caplog):
    """Rather than hash such a weight by its shape alone (a cache hit for other weights), it raises;
    calibration then says the weights are unknown, which keeps the cache off, and warns."""
    with pytest.raises(cache.UnfingerprintableWeight, match="_Opaque"):
        cache.weights_fingerprint([torch.ones(3), _Opaque((4, 4))])
    graph = torch.fx.Graph()
    weight = graph.placeholder("w")
    weight.meta[META_KEY] = GraphInput("weight", InputKind.PARAMETER, "w")
    graph.output(weight)
    with caplog.at_level(logging.WARNING):
        assert calibrate._fingerprint(torch.fx.GraphModule({}, graph), [_Opaque((4, 4))]) == calibrate.UNKNOWN_WEIGHTS
    assert any("calibrating without the cache" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------
# float8 dynamic activation + weight, on the CPU
# ---------------------------------------------------------------------------------------


@pytest.fixture
def float8_on_cpu(float8_hardware_check_bypassed):
    """The tiny Wan with Float8DynamicActivationFloat8WeightConfig(PerRow) linears, on the CPU."""
    config = torchao_quant.Float8DynamicActivationFloat8WeightConfig(granularity=torchao_quant.PerRow(),
                                                                     set_inductor_config=False)
    model = quantized_wan(config, dtype=torch.bfloat16)  # PerRow wants bf16 weights
    assert type(model.blocks[0].attn1.to_q.weight).__name__ == "Float8Tensor"
    return model


@pytest.mark.slow
@pytest.mark.parametrize("density", [1.0, 0.5])
def test_float8_dynamic_matches_float64_attention_reference(float8_on_cpu, density):
    """bf16 model with float8 linears: against the model with float64 attention under the same masks
    (all blocks at density 1.0), the backend errs by at most 2x what plain compile errs by."""
    model = float8_on_cpu
    inputs = wan_inputs(model, dtype=torch.bfloat16)
    backend = ours(density)
    out = run(model, inputs, backend).float()
    reference = masked_reference(model, inputs, backend.report).float()
    if density < 1.0:
        assert_sparse_self_attention(backend.report)
        torch.testing.assert_close(out, reference, rtol=BF16_EPS, atol=BF16_EPS)
        return
    plain_error = (run(model, inputs).float() - reference).abs().max()
    assert (out - reference).abs().max() <= 2 * plain_error + BF16_EPS * reference.abs().max()
