"""Backend registration, options, the report, the CLI and the custom op's registration."""
import json

import pytest
import torch

import scaling_compiler
from scaling_compiler import Config, ScalingAttnBackend, cli
from scaling_compiler.demo import zoo
from scaling_compiler.kernels.bitmask import pack_block_mask

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
        ({"attention_dtype": "bf8"}, "option 'attention_dtype' must be None (each site's own dtype) or 'fp8'"),
        ({"token_grid": (4, 8)}, "option 'token_grid' must be three positive ints"),
        ({"mode": "fastest"}, "option 'mode' must be one of"),
        ({"mode": "reduce-overhead", "compiler": "eager"}, "option 'mode' needs compiler='inductor'"),
        # issue 15, item 4: each call picks the nearest step, so these picked one step for every call
        ({"timesteps": [999.0, float("nan"), 500.0]}, "option 'timesteps' must be finite numbers"),
        ({"timesteps": [1.0, 500.0, 999.0]}, "option 'timesteps' must be strictly decreasing"),
        ({"timesteps": [999.0, 500.0, 500.0]}, "got 500 then 500 at positions 1, 2"),
        ({"timesteps": [999.0, float("inf")]}, "option 'timesteps' must be finite numbers"),
        ({"timesteps": []}, "option 'timesteps' must be a non-empty sequence"),
        ({"timestep_max": float("inf")}, "option 'timestep_max' must be a positive number"),
        # found from the options alone (50 steps), not after calibrating a graph
        ({"density": 0.25, "warmup": 0.3}, "option 'warmup'=0.3: 15 dense steps of 50 already exceed option "
                                            "'density'=0.25"),
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


@pytest.mark.parametrize("options", [[("density", 0.5)], "density=0.5", 0.5])
def test_non_dict_options_name_options(options):
    model, inputs = tiny_wan()
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"scalingattn: 'options' must be a dict of option names to values") as error:
        torch.compile(model, backend="scalingattn", options=options)(**inputs)
    assert "argument after ** must be a mapping" not in str(error.value)
    with pytest.raises(TypeError, match="'options' must be a dict"):
        Config.from_options(options)


def test_bad_topology_file_names_the_option(tmp_path):
    """A file that is not a topology fails when the options are read, naming the option (it used to
    fail inside the compile as '<path>: not a readable topology file')."""
    path = tmp_path / "topology.safetensors"
    path.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ValueError, match=r"^option 'topology_file': .*topology.safetensors: not a readable topology"):
        ScalingAttnBackend(density=0.5, topology_file=str(path))


def test_warmup_error_is_found_before_calibration(monkeypatch):
    """A graph without a timestep input has one step: warmup 0.6 makes it dense, leaving nothing sparse.
    The error comes before WEST calibrates the graph (it came after, from FAST's fit)."""
    from scaling_compiler.policies.west_fast import policy as west_policy
    from tests.handwritten_dit import build_with_inputs

    calls = []
    monkeypatch.setattr(west_policy, "west_topology", lambda *args: calls.append(args) or pytest.fail("calibrated"))
    model, inputs = build_with_inputs()
    backend = ScalingAttnBackend(density=0.9, warmup=0.6, compiler="eager")  # 30 of 50 steps: fine so far
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"option 'warmup'=0.6: 1 dense steps of 1 \(the graph has no timestep input"):
        with torch.no_grad():
            torch.compile(model, backend=backend)(**inputs)
    assert calls == []


def test_token_grid_that_matches_no_site_keeps_it_dense_with_the_reason(caplog):
    """LTX at 3x24x24 has 1,728 video tokens; a token_grid of 3x5x7 (105 tokens) was silently ignored
    (the sites ran sparse, treated as 1-D). Now they stay dense, saying why, with one warning."""
    torch.manual_seed(0)
    model = zoo.build("LTXVideoTransformer3DModel")
    inputs = zoo.example_inputs("LTXVideoTransformer3DModel", model, GRID)
    backend = ScalingAttnBackend(compiler="eager", token_grid=(3, 5, 7))
    torch._dynamo.reset()
    with torch.no_grad():
        expected = model(**inputs)[0]
        out = torch.compile(model, backend=backend)(**inputs)[0]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    self_sites = [s for s in backend.report.sites if s.kind == "self"]
    assert len(self_sites) == 2
    for site in self_sites:
        assert site.status == "dense" and site.token_grid is None
        assert site.reason == "option 'token_grid' 3x5x7 has 105 tokens, the site's video sequence 1728"
    assert "option 'token_grid' (3, 5, 7) (105 tokens) matches no attention site's video length" in caplog.text


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("schedule, requires_grad", [("uniform", False), ("uniform", True), ("fast", False)])
def test_sparse_graph_under_cuda_graphs(schedule, requires_grad):
    """mode="reduce-overhead" with sparse sites: the masks' block lists are decoded at compile time
    (`dispatch.decode_constant_mask`), so CUDA graphs' warm-up allocates nothing that outlives it in
    the graph's pool (it did: every sparse +cg variant of the end-to-end benchmark failed); FAST's
    per-step masks, picked in the graph, are decoded there. The replayed graph gives the output (and
    gradients) of the same model compiled without CUDA graphs."""
    from scaling_compiler.cost_model import CostModel
    from scaling_compiler.kernels.triton import list_cache

    model, inputs = tiny_wan()
    model = model.cuda().requires_grad_(requires_grad)
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    options = {"density": 0.5, "calibration_samples": 1, "schedule": schedule, "cache": False,
               "cost_model": CostModel.ideal("test: every supported site sparse")}

    def run(mode):
        torch._dynamo.reset()
        list_cache.clear()
        backend = ScalingAttnBackend(**options)
        compiled = torch.compile(model, backend=backend, mode=mode)
        outs, grads = [], []
        for _ in range(3):  # warm-up, recording, replay
            torch.compiler.cudagraph_mark_step_begin()
            model.zero_grad(set_to_none=True)
            with torch.set_grad_enabled(requires_grad):
                out = compiled(**inputs)[0]
            if requires_grad:
                out.float().square().mean().backward()
                grads.append(model.proj_out.weight.grad.clone())
            outs.append(out.detach().clone())
        return backend, outs, grads

    backend, outs, grads = run("reduce-overhead")
    assert len(backend.report.sparse_sites) > 0
    if schedule == "uniform":
        assert list_cache.held_bytes() > 0  # decoded when the graph was compiled
    _, expected, expected_grads = run(None)
    for out in outs:
        torch.testing.assert_close(out, expected[0], rtol=2e-3, atol=2e-3)
    for grad in grads:
        torch.testing.assert_close(grad, expected_grads[0], rtol=2e-3, atol=2e-3)


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


def test_cli_rejects_unknown_model(capsys):
    assert cli.main(["inspect", "NoSuchModel"]) == 2  # a command-line mistake: one line, argparse's status
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("scalingattn inspect: error: unknown model 'NoSuchModel'") and "WanTransformer3DModel" in line


def test_public_names():
    assert set(scaling_compiler.__all__) >= {"ScalingAttnBackend", "Config", "PassReport"}
