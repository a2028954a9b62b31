"""Option `attention_dtype="fp8"`: sparse sites of an inference graph run `block_sparse_attention_fp8`
(on the CPU its torch emulation: the same e4m3 quantisation as the Triton kernel); training sites,
inputs the FP8 path refuses and DFSAttn's sites keep their dtype, and the report says why.

Tolerance. `tests/kernels/test_block_sparse_fp8.py` bounds one FP8 attention output's relative error
against float64 by FP8_REL_TOL = 0.08 (1.5x the largest it measured, 5.4%). The model's output mixes
the attention outputs into the residual stream through the output projections, so against the same
model compiled without the option (bf16 attention) its relative error stays below that bound (measured
here: 0.35% at densities 1.0 and 0.5); the outputs must differ, or the FP8 path did not run.
"""
from __future__ import annotations

import json

import pytest
import torch

from scaling_compiler import ScalingAttnBackend
from scaling_compiler import backend as backend_module
from scaling_compiler.cost_model import CostModel
from scaling_compiler.demo import zoo
from scaling_compiler.kernels.triton.block_sparse_attention_fp8 import fp8_unsupported_reason

from tests.kernels.test_block_sparse_fp8 import FP8_REL_TOL, _fake

WAN = "WanTransformer3DModel"
HUNYUAN = "HunyuanVideoTransformer3DModel"  # joint sites with a key-padding mask
GRID = (3, 24, 24)  # 432 video tokens: 4 blocks of 128; head dim 64
FP8_OP = torch.ops.scaling_compiler.block_sparse_attention_fp8.default
BF16_OP = torch.ops.scaling_compiler.block_sparse_attention.default
IDEAL = CostModel.ideal("test: every supported site sparse")
WEST = {"calibration_samples": 2}  # west_fast's calibration at densities below 1, kept short


def zoo_model(dtype: torch.dtype = torch.bfloat16, train: bool = False, name: str = WAN) -> tuple[torch.nn.Module, dict]:
    """The zoo's tiny `name` (default Wan) in `dtype` and its inputs at GRID."""
    torch.manual_seed(0)
    model = zoo.build(name).to(dtype).train(train)
    inputs = zoo.example_inputs(name, model, GRID)
    return model, {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                   for k, v in inputs.items()}


def compile_and_run(model, inputs, monkeypatch=None, **options):
    """The model's output through the backend (no_grad unless the model trains), the backend, and the
    rewritten graphs handed to the inner compiler (recorded where `monkeypatch` is given)."""
    graphs = []
    if monkeypatch is not None:
        inner = backend_module._inner_compile
        monkeypatch.setattr(backend_module, "_inner_compile",
                            lambda config, gm, example: graphs.append(gm) or inner(config, gm, example))
    backend = ScalingAttnBackend(compiler="aot_eager", cost_model=IDEAL, **options)
    torch._dynamo.reset()
    with torch.set_grad_enabled(model.training):
        out = torch.compile(model, backend=backend)(**inputs)[0]
    return out, backend, graphs


def op_calls(graphs, op) -> int:
    return sum(node.target is op for gm in graphs for node in gm.graph.nodes)


def rel_err(out: torch.Tensor, expected: torch.Tensor) -> float:
    return float((out.double() - expected.double()).norm() / expected.double().norm())


@pytest.mark.parametrize("density", [1.0, 0.5])
def test_fp8_sites_run_the_fp8_op_within_its_tolerance(density, monkeypatch):
    model, inputs = zoo_model()
    expected, _, _ = compile_and_run(model, inputs, density=density, **WEST)
    out, backend, graphs = compile_and_run(model, inputs, monkeypatch, density=density, attention_dtype="fp8", **WEST)
    assert op_calls(graphs, FP8_OP) == 2 and op_calls(graphs, BF16_OP) == 0
    assert not torch.equal(out, expected)
    assert rel_err(out, expected) <= FP8_REL_TOL

    report = backend.report
    assert report.config["attention_dtype"] == "fp8"
    sparse = report.sparse_sites
    assert len(sparse) == 2 and all(s.attention_dtype == "fp8" and s.fp8_reason is None for s in sparse)
    assert density == 1.0 or all(s.density < 1.0 for s in sparse)
    for dense in report.dense_sites:  # cross-attention: SDPA
        assert dense.attention_dtype == "bfloat16" and dense.fp8_reason == "dense site: SDPA in its own dtype"
    data = json.loads(report.to_json())
    assert [s["attention_dtype"] for s in data["sites"]] == ["fp8", "bfloat16", "fp8", "bfloat16"]
    text = str(report)
    assert "attn dtype" in text and "2 of 2 sparse sites run the FP8 op" in text
    assert "FP8 rows predict it faster than the 16-bit kernel, or it has none" in text


@pytest.mark.parametrize("name, options", [(WAN, {"token_order": "hilbert"}), (HUNYUAN, {})],
                         ids=["reordered", "key-padding"])
def test_reordered_and_padded_sites_run_fp8(name, options, monkeypatch):
    """The FP8 rules read the fake values of the reorder pass's gathers (their sources') and of the
    key-padding vector."""
    model, inputs = zoo_model(name=name)
    expected, _, _ = compile_and_run(model, inputs, density=1.0, **options)
    out, backend, graphs = compile_and_run(model, inputs, monkeypatch, density=1.0, attention_dtype="fp8", **options)
    sparse = [s for r in backend.reports for s in r.sparse_sites]
    assert sparse and all(s.attention_dtype == "fp8" for s in sparse) and op_calls(graphs, FP8_OP) == len(sparse)
    assert all(s.token_order == "hilbert" for s in sparse) if options else all(s.attn_mask for s in sparse)
    assert not torch.equal(out, expected) and rel_err(out, expected) <= FP8_REL_TOL


@pytest.mark.parametrize("fp8_faster", [False, True])
def test_cost_model_fp8_rows_decide_where_fp8_runs(fp8_faster, monkeypatch):
    """With an FP8 line in the cost model, a site runs FP8 only where it is predicted faster; else it
    keeps the 16-bit op and the report gives both times."""
    per_flop = 1 / 500e9
    cost = CostModel("test: FP8 rows", per_flop, 0.0, per_flop, 0.0, fp8_prep_ms_per_byte=0.0 if fp8_faster else 1e-3,
                     fp8_kernel_ratio=0.5)
    model, inputs = zoo_model()
    graphs = []
    inner = backend_module._inner_compile
    monkeypatch.setattr(backend_module, "_inner_compile",
                        lambda config, gm, example: graphs.append(gm) or inner(config, gm, example))
    backend = ScalingAttnBackend(compiler="aot_eager", cost_model=cost, density=1.0, attention_dtype="fp8")
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend)(**inputs)
    sparse = backend.report.sparse_sites
    assert len(sparse) == 2
    if fp8_faster:
        assert op_calls(graphs, FP8_OP) == 2 and all(s.attention_dtype == "fp8" and s.fp8_reason is None for s in sparse)
    else:
        assert op_calls(graphs, FP8_OP) == 0 and op_calls(graphs, BF16_OP) == 2
        for site in sparse:
            assert site.attention_dtype == "bfloat16"
            assert site.fp8_reason.startswith("cost model: FP8 ") and "the 16-bit kernel's" in site.fp8_reason
        assert "0 of 2 sparse sites run the FP8 op" in str(backend.report)


def test_without_the_option_sites_report_their_dtype(monkeypatch):
    model, inputs = zoo_model()
    _, backend, graphs = compile_and_run(model, inputs, monkeypatch, density=1.0)
    assert op_calls(graphs, FP8_OP) == 0 and op_calls(graphs, BF16_OP) == 2
    sites = backend.report.to_dict()["sites"]
    assert {s["attention_dtype"] for s in sites} == {"bfloat16"} and all(s["fp8_reason"] is None for s in sites)
    assert "FP8" not in str(backend.report)


def test_training_graph_keeps_bf16_and_its_backward(monkeypatch):
    model, inputs = zoo_model(train=True)
    out, backend, graphs = compile_and_run(model, inputs, monkeypatch, density=0.5, attention_dtype="fp8",
                                           cache=False, **WEST)
    out.float().square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert op_calls(graphs, FP8_OP) == 0
    sparse = backend.report.sparse_sites
    assert sparse and all(s.requires_grad and s.attention_dtype == "bfloat16" for s in sparse)
    assert all(s.fp8_reason == "inputs require grad (the FP8 op has no backward)" for s in sparse)
    assert "in their own dtype: blocks.0.attn1: inputs require grad" in str(backend.report)


def test_float32_sites_keep_their_dtype_with_the_reason(monkeypatch):
    model, inputs = zoo_model(torch.float32)
    _, backend, graphs = compile_and_run(model, inputs, monkeypatch, density=1.0, attention_dtype="fp8")
    assert op_calls(graphs, FP8_OP) == 0
    sparse = backend.report.sparse_sites
    assert sparse and all(s.attention_dtype == "float32" and "float16 or bfloat16" in s.fp8_reason for s in sparse)


def test_linear_branch_runs_its_sparse_part_in_fp8(monkeypatch):
    model, inputs = zoo_model()
    expected, _, _ = compile_and_run(model, inputs, density=1.0, attention_dtype="fp8")
    out, backend, graphs = compile_and_run(model, inputs, monkeypatch, density=1.0, attention_dtype="fp8",
                                           linear_branch=True)
    assert op_calls(graphs, FP8_OP) == 2
    assert all(s.attention_dtype == "fp8" for s in backend.report.sparse_sites)
    torch.testing.assert_close(out, expected)  # a fresh branch adds zero


def test_dfsattn_sites_keep_their_dtype(monkeypatch):
    model, inputs = zoo_model()
    _, backend, graphs = compile_and_run(model, inputs, monkeypatch, policy="dfsattn", dense_layers=(),
                                         attention_dtype="fp8")
    assert op_calls(graphs, FP8_OP) == 0
    sparse = backend.report.sparse_sites
    assert sparse and all(s.attention_dtype == "bfloat16" and "DFSAttn" in s.fp8_reason for s in sparse)


@pytest.mark.parametrize("value", ["bf8", "FP8", torch.float8_e4m3fn, 8])
def test_bad_attention_dtype_names_the_option(value):
    with pytest.raises(ValueError, match=r"option 'attention_dtype' must be None \(each site's own dtype\) or 'fp8'"):
        ScalingAttnBackend(attention_dtype=value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks fake CUDA tensors where CUDA cannot be queried")
def test_fp8_reason_on_fake_cuda_tensors_without_cuda():
    """Detection's fake values may be CUDA tensors where this process has no CUDA: the capability
    query answers 'none' instead of failing torch's assertion."""
    q, k, v = (_fake(1, 2, 256, 64, dtype=torch.bfloat16) for _ in range(3))
    assert "capability (0, 0)" in fp8_unsupported_reason(q, k, v)
