"""The flatten pass: torchao's subclass weights reach the inner compiler as plain inner tensors, rebuilt
inside the graph, with the same outputs as without the pass: int8 weight-only weights (on the CPU,
through aot_eager and inductor) and float8 weights (on a GPU with float8 tensor cores through
inductor, else on the CPU through aot_eager).

Tolerances: the pass changes only how the weights reach the graph, so outputs are compared exactly,
except float8 through inductor on a GPU: one bf16 rounding of the output (two compiles may fuse
differently).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

import scaling_compiler.backend as backend_module
from scaling_compiler import ScalingAttnBackend
from scaling_compiler.demo import zoo
from scaling_compiler.passes.flatten_weights import SubclassLayout, flatten_weights
from tests.test_composition import WAN, int8_wan, wan_inputs


def compile_and_run(model, inputs, monkeypatch, flatten: bool, **options):
    """Output of two calls and the example inputs the inner compiler got, with or without the pass."""
    seen = []
    inner = backend_module._inner_compile

    def spy(config, gm, example_inputs):
        seen.append(list(example_inputs))
        return inner(config, gm, example_inputs)

    monkeypatch.setattr(backend_module, "_inner_compile", spy)
    if not flatten:
        monkeypatch.setattr(backend_module, "flatten_weights", lambda gm, example_inputs: (gm, None, []))
    torch._dynamo.reset()
    backend = ScalingAttnBackend(calibration_samples=2, cache=False, **options)
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        outs = [compiled(**inputs)[0] for _ in range(2)]
    monkeypatch.undo()
    return outs, seen, backend


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("density", [1.0, 0.5])
def test_inner_compiler_sees_plain_weights_and_outputs_are_unchanged(monkeypatch, compiler, density):
    model = int8_wan()
    inputs = wan_inputs(model)
    quantized = sum(is_traceable_wrapper_subclass(p) for p in model.parameters())
    assert quantized > 0
    expected, seen_without, _ = compile_and_run(model, inputs, monkeypatch, False, compiler=compiler, density=density)
    outs, seen, backend = compile_and_run(model, inputs, monkeypatch, True, compiler=compiler, density=density)
    assert sum(is_traceable_wrapper_subclass(x) for x in seen_without[0]) == quantized
    assert not any(is_traceable_wrapper_subclass(x) for x in seen[0])
    # every int8 weight became its inner tensors (its values, scales, ...)
    leaves = sum(SubclassLayout.of(p).count() for p in model.parameters() if is_traceable_wrapper_subclass(p))
    assert leaves >= 2 * quantized and len(seen[0]) == len(seen_without[0]) - quantized + leaves
    assert [s.status for s in backend.report.sites if s.kind == "self"] == ["sparse", "sparse"]
    for out in outs:
        torch.testing.assert_close(out, expected[0], rtol=0, atol=0)


def test_weights_updated_in_place_are_read_at_every_call():
    """The inner tensors are read from each call's weights, not kept from the compile."""
    model = int8_wan()
    inputs = wan_inputs(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=ScalingAttnBackend(compiler="aot_eager", density=1.0, cache=False,
                                                               calibration_samples=2))
    weight = model.blocks[0].ffn.net[0].proj.weight
    with torch.no_grad():
        before = compiled(**inputs)[0]
        for attr in weight.__tensor_flatten__()[0]:
            inner = getattr(weight, attr)
            inner.copy_(inner.flip(0))  # same storage, other values
        after = compiled(**inputs)[0]
        eager = model(**inputs)[0]
    assert not torch.allclose(eager, before)
    torch.testing.assert_close(after, eager, rtol=1e-5, atol=1e-5)


def test_graph_without_subclass_weights_is_left_alone():
    gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 4))
    assert flatten_weights(gm, [torch.randn(2, 4)]) == (gm, None, [])


def test_layout_rebuilds_the_subclass_from_its_leaves():
    weight = int8_wan().blocks[0].attn1.to_q.weight
    layout = SubclassLayout.of(weight)
    leaves = layout.leaves(weight)
    assert len(leaves) == layout.count() >= 2 and not any(is_traceable_wrapper_subclass(t) for t in leaves)
    rebuilt = layout.rebuild(list(leaves))
    assert type(rebuilt) is type(weight) and rebuilt.shape == weight.shape
    torch.testing.assert_close(rebuilt.dequantize(), weight.dequantize(), rtol=0, atol=0)


def test_float8_weights_are_flattened_with_the_same_outputs(monkeypatch, float8_device):
    """torchao's Float8Tensor weights (the stack's float8 linears): rebuilt inside the traced graph, the model
    gives the same output as with subclass inputs, compiled once (no fallback). On a GPU through
    inductor, within one bf16 rounding of the output; on the CPU through aot_eager (inductor cannot
    compile float8 there), bit for bit."""
    quantization = pytest.importorskip("torchao.quantization")
    config = quantization.Float8DynamicActivationFloat8WeightConfig(granularity=quantization.PerRow(),
                                                                     set_inductor_config=False)
    torch.manual_seed(0)
    model = zoo.build(WAN).to(float8_device, torch.bfloat16)  # quantised where it runs, as torchao expects
    quantization.quantize_(model.blocks, config)
    model.eval()
    inputs = {k: v.to(float8_device) if isinstance(v, torch.Tensor) else v
              for k, v in wan_inputs(model, dtype=torch.bfloat16).items()}
    compiler = "inductor" if float8_device == "cuda" else "aot_eager"
    expected, _, _ = compile_and_run(model, inputs, monkeypatch, False, compiler=compiler, density=0.5)
    outs, seen, _ = compile_and_run(model, inputs, monkeypatch, True, compiler=compiler, density=0.5)
    assert len(seen) == 1 and not any(is_traceable_wrapper_subclass(x) for x in seen[0])
    tolerance = 2.0 ** -7 if float8_device == "cuda" else 0.0
    torch.testing.assert_close(outs[0], expected[0], rtol=tolerance, atol=tolerance)


def test_a_weight_the_rebuild_cannot_trace_falls_back_to_subclass_inputs(monkeypatch, caplog):
    """Should AOTAutograd fail on the rebuilt graph, the backend compiles the graph as it was (weights as
    subclass inputs), says so, and gives the same output."""
    import logging

    from scaling_compiler.passes import flatten_weights as pass_module

    model = int8_wan()
    inputs = wan_inputs(model)
    expected, _, _ = compile_and_run(model, inputs, monkeypatch, False, compiler="aot_eager", density=0.5)

    def broken_rebuild(self, leaves):
        raise RuntimeError("cannot rebuild")

    monkeypatch.setattr(pass_module.SubclassLayout, "rebuild", broken_rebuild)
    with caplog.at_level(logging.WARNING, logger="scaling_compiler.backend"):
        outs, seen, _ = compile_and_run(model, inputs, monkeypatch, True, compiler="aot_eager", density=0.5)
    assert len(seen) == 2 and any(is_traceable_wrapper_subclass(x) for x in seen[1])
    assert any("stay subclass inputs" in r.getMessage() and "cannot rebuild" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(outs[0], expected[0], rtol=0, atol=0)
