"""Backend registration, options, the report, the CLI and the custom op's registration."""
import json

import pytest
import torch

import scaling_compiler
from scaling_compiler import Config, ScalingAttnBackend, cli
from scaling_compiler.demo import zoo
from scaling_compiler.kernels.bitmask import pack_block_mask
from scaling_compiler.ops import block_sparse_attention_op

GRID = (3, 24, 24)


def tiny_wan():
    torch.manual_seed(0)
    model = zoo.build("WanTransformer3DModel")
    return model, zoo.example_inputs("WanTransformer3DModel", model, GRID)


def test_entry_point_registers_string_backend():
    assert "scalingattn" in torch._dynamo.list_backends()


def test_string_backend_with_options_matches_eager():
    model, inputs = tiny_wan()
    torch._dynamo.reset()
    with torch.no_grad():
        expected = model(**inputs)[0]
        out = torch.compile(model, backend="scalingattn", options={"density": 1.0, "compiler": "aot_eager"})(**inputs)[0]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"densty": 0.5}, "unknown scalingattn option(s) ['densty']; valid options are ['density'"),
        ({"density": 0.0}, "option 'density' must be in (0, 1]"),
        ({"density": 1.5}, "option 'density' must be in (0, 1]"),
        ({"density": "high"}, "option 'density' must be a number"),
        ({"compiler": "tvm"}, "option 'compiler' must be one of 'inductor', 'aot_eager', 'eager'"),
        ({"report": "yes"}, "option 'report' must be True or False"),
        ({"token_grid": (4, 8)}, "option 'token_grid' must be three positive ints"),
        ({"mode": "fastest"}, "option 'mode' must be one of"),
        ({"mode": "reduce-overhead", "compiler": "eager"}, "option 'mode' needs compiler='inductor'"),
    ],
)
def test_bad_options_name_the_option(options, message):
    with pytest.raises(ValueError) as error:
        ScalingAttnBackend(**options)
    assert message in str(error.value)


def test_bad_options_through_torch_compile():
    model, inputs = tiny_wan()
    torch._dynamo.reset()
    with pytest.raises(Exception, match="densty"):
        torch.compile(model, backend="scalingattn", options={"densty": 0.5})(**inputs)


def test_mode_reaches_the_inner_inductor():
    """`torch.compile(..., backend="scalingattn", mode=...)`: torch hands the backend `mode`
    (it takes options or mode, not both); the rewritten graph compiles with that mode's
    inductor settings (CUDA graphs for "reduce-overhead"; on the CPU inductor skips them)."""
    model, inputs = tiny_wan()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        expected = model(**inputs)[0]
        out = torch.compile(model, backend="scalingattn", mode="reduce-overhead")(**inputs)[0]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] >= 1  # cudagraphs were asked for
    backend = ScalingAttnBackend(density=0.5, calibration_samples=1)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend, mode="max-autotune-no-cudagraphs")(**inputs)
    assert backend.config.mode == "max-autotune-no-cudagraphs" and backend.report.config["mode"] == "max-autotune-no-cudagraphs"


@pytest.mark.parametrize("schedule", ["uniform", "fast"])
def test_mask_inputs_add_no_symbols_to_dynamos_shape_env(schedule):
    """The rewritten graph's extra inputs (masks, per-step levels, timesteps) have fixed shapes.

    A symbol the inner compiler made for one of them has no source among dynamo's inputs, and any
    guard on it fails the compile ("sources must not be empty for symbol sN", seen on the GPU).
    """
    model, inputs = tiny_wan()
    ours = ScalingAttnBackend(density=0.25, schedule=schedule, calibration_samples=1, cache=False)
    new_symbols = []

    def backend(gm, example_inputs):
        shape_env = torch._guards.detect_fake_mode(example_inputs).shape_env
        before = set(shape_env.backed_var_to_val)
        compiled = ours(gm, example_inputs)
        new_symbols.extend(set(shape_env.backed_var_to_val) - before)
        return compiled

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend)(**inputs)
    assert ours.report.schedule == schedule and len(ours.report.plans) == 2
    assert new_symbols == []


def test_report_env_var(monkeypatch):
    monkeypatch.setenv("SCALINGATTN_REPORT", "1")
    assert Config.from_options({}).report is True
    assert Config.from_options({"report": False}).report is False
    monkeypatch.setenv("SCALINGATTN_REPORT", "0")
    assert Config.from_options({}).report is False


def test_token_grid_option_reaches_ltx_sites():
    torch.manual_seed(0)
    model = zoo.build("LTXVideoTransformer3DModel")
    inputs = zoo.example_inputs("LTXVideoTransformer3DModel", model, GRID)
    backend = ScalingAttnBackend(compiler="eager", token_grid=GRID)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend)(**inputs)
    self_sites = [s for s in backend.report.sites if s.kind == "self"]
    assert self_sites and all(s.token_grid == GRID and s.grid_source == "option" for s in self_sites)


def test_report_fields_and_json(tmp_path):
    model, inputs = tiny_wan()
    backend = ScalingAttnBackend(density=0.5, compiler="eager", report=True)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend)(**inputs)
    report = backend.report
    assert report is backend.reports[-1] and report.graph_index == 0
    assert {s.status for s in report.sites} == {"sparse", "dense"}
    sparse = report.sparse_sites[0]
    assert sparse.shape == (1, 2, 432, 64) and sparse.dtype == "float32" and sparse.scale == pytest.approx(0.125)
    assert sparse.q_stride == (55296, 64, 128, 1)  # a transposed view of (B, S, H, D)
    assert sparse.kv_heads == 2 and not sparse.is_causal and sparse.dropout_p == 0.0
    # kept token pairs: the FAST schedule meets 0.5 in blocks; the 48-token tail block weighs less
    assert 0.4 <= sparse.density < 1.0 and len(sparse.head_densities) == 2
    assert sparse.flops_saved == round(sparse.dense_flops * (1 - sparse.density))
    assert report.flops_saved == sum(s.flops_saved for s in report.sites)

    path = tmp_path / "report.json"
    data = json.loads(report.to_json(str(path)))
    assert json.loads(path.read_text()) == data
    assert data["config"]["density"] == 0.5 and data["config"]["compiler"] == "eager"
    assert [s["name"] for s in data["sites"]] == ["blocks.0.attn1", "blocks.0.attn2", "blocks.1.attn1", "blocks.1.attn2"]
    assert data["sites"][1]["status"] == "dense" and "cross-attention" in data["sites"][1]["reason"]
    table = str(report)
    assert "blocks.0.attn1" in table and "cross-attention" in table


def test_cli_inspect_writes_report(tmp_path):
    path = tmp_path / "inspect.json"
    torch._dynamo.reset()
    code = cli.main(["inspect", "CogVideoXTransformer3DModel", "--config", '{"num_layers": 1}', "--grid", "3,24,24",
                     "--options", '{"density": 0.5}', "--json", str(path)])
    assert code == 0
    [report] = json.loads(path.read_text())
    [site] = report["sites"]
    assert site["name"] == "transformer_blocks.0.attn1" and site["kind"] == "joint" and site["status"] == "sparse"
    assert site["text_spans"] == [[0, 8]]


def test_cli_inspect_factory_path(tmp_path):
    path = tmp_path / "inspect.json"
    torch._dynamo.reset()
    assert cli.main(["inspect", "tests.handwritten_dit:build_with_inputs", "--json", str(path)]) == 0
    [report] = json.loads(path.read_text())
    assert [s["pattern"] for s in report["sites"]] == ["softmax"] * 4


def test_cli_rejects_unknown_model():
    with pytest.raises(ValueError, match="no zoo entry for 'NoSuchModel'"):
        cli.main(["inspect", "NoSuchModel"])


@pytest.mark.parametrize("batch_masks", [False, True])
def test_op_registration(batch_masks):
    """torch.library.opcheck: schema, fake tensor and autograd-registration checks of the op."""
    q, k, v = (torch.randn(2, 2, 200, 64) for _ in range(3))
    block_mask = torch.rand((2, 2, 2, 2) if batch_masks else (2, 2, 2)) > 0.3
    block_mask[..., 0] = True
    key_padding = torch.rand(2, 200) > 0.2
    torch.library.opcheck(block_sparse_attention_op, (q, k, v, pack_block_mask(block_mask), 0.125, key_padding))
    torch.library.opcheck(block_sparse_attention_op, (q, k, v, pack_block_mask(block_mask), 0.125, None))


def test_public_names():
    assert set(scaling_compiler.__all__) >= {"ScalingAttnBackend", "Config", "PassReport"}
