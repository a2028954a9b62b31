"""benchmarks.end_to_end's stack layers (issue #18): the +fp8 / +f8lin / +fbc grammar, why a layer is
skipped where it cannot run, each layer's contribution, and --quick runs on the CPU (fp32: FP8 refused)."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from benchmarks import end_to_end
from benchmarks.end_to_end import Variant, VariantResult, stack


def quick_settings(**changes) -> end_to_end.Settings:
    return dataclasses.replace(end_to_end.make_settings(end_to_end.parse_args(["--quick"])), **changes)


def test_modifiers_combine_in_any_order():
    variant = Variant.parse("uniform-0.1+fp8+f8lin")
    assert (variant.schedule, variant.density, variant.modifiers) == ("uniform", 0.1, ("fp8", "f8lin"))
    assert variant.fp8 and variant.f8lin and not variant.fbc and not variant.cuda_graphs
    assert Variant.parse("salad-0.1+f8lin+fp8").linear_branch
    dense = Variant.parse("dense+f8lin+fbc")
    assert dense.schedule is None and dense.f8lin and dense.fbc
    assert Variant.parse("uniform-0.1+cg").cuda_graphs and Variant.parse("uniform-0.1+cg").modifiers == ("cg",)
    assert end_to_end.backend_options(variant, quick_settings(), [500.0])["attention_dtype"] == "fp8"
    assert "attention_dtype" not in end_to_end.backend_options(Variant.parse("uniform-0.1"), quick_settings(), [500.0])


@pytest.mark.parametrize("spec, message", [
    ("dense+fp8", "option of our backend"), ("uniform-0.1+fp8+fp8", "each at most once"),
    ("uniform-0.1+int8", "each at most once"), ("uniform-0.1+fbc+cg", "CUDA graph"), ("fp8", "dense, uniform"),
])
def test_bad_specs_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        Variant.parse(spec)
    with pytest.raises(SystemExit):
        end_to_end.parse_args(["--quick", "--variants", spec])


def test_cache_variants_time_consecutive_middle_steps():
    timesteps = end_to_end.sampler_timesteps(end_to_end.SECTIONS["tiny"])
    settings = quick_settings(cache_steps=4)
    assert end_to_end.timed_steps(Variant.parse("dense+fbc"), timesteps, settings) == [23, 24, 25, 26]
    assert end_to_end.timed_steps(Variant.parse("uniform-0.1"), timesteps, settings) == [25]


def test_float8_linears_are_skipped_on_the_cpu_and_without_torchao(monkeypatch):
    settings = quick_settings()
    assert "compute capability >= 8.9" in end_to_end.skip_reason(Variant.parse("dense+f8lin"), settings)
    assert end_to_end.skip_reason(Variant.parse("uniform-0.1+fp8"), settings) is None  # refused per site instead
    assert end_to_end.skip_reason(Variant.parse("dense+fbc"), settings) is None
    assert end_to_end.skip_reason(Variant.parse("dense+cg"), settings) == "CUDA graphs need a GPU"
    real_import = stack.importlib.import_module

    def no_torchao(name, *args):
        if name.startswith("torchao"):
            raise ImportError(name)
        return real_import(name, *args)

    monkeypatch.setattr(stack.importlib, "import_module", no_torchao)
    assert "need torchao" in end_to_end.skip_reason(Variant.parse("uniform-0.1+f8lin"), settings)


@pytest.mark.parametrize("capability, skipped", [((8, 0), True), ((8, 9), False), ((9, 0), False)])
def test_float8_layers_need_compute_capability_8_9(monkeypatch, capability, skipped):
    monkeypatch.setattr(stack, "cuda_capability", lambda: capability)  # skip_reason looks it up there
    settings = quick_settings(device="cuda")
    for spec in ("uniform-0.1+fp8", "dense+f8lin"):
        reason = end_to_end.skip_reason(Variant.parse(spec), settings)
        assert (reason is not None and "this GPU is sm_80" in reason) if skipped else reason is None


def result(variant: str, latency_ms: float | None, status: str = "ok") -> VariantResult:
    return VariantResult("1.3b", 1, variant, "scalingattn", {}, status=status, latency_ms=latency_ms)


def test_stack_lines_give_each_layer_its_ratio():
    results = [result("dense", 500.0), result("uniform-0.1+fp8+f8lin", 160.0), result("uniform-0.1", 200.0),
               result("dense+f8lin", 400.0), result("uniform-0.2+fp8+fbc", None, "skipped: why"),
               result("uniform-0.1+fp8+f8lin+fbc", None, "skipped: why")]  # the measured stack below keeps its line
    end_to_end.add_ratios(results)
    rows = {row["variant"]: row for row in end_to_end.stacks(results)}
    assert list(rows) == ["uniform-0.1+fp8+f8lin", "dense+f8lin", "uniform-0.2+fp8+fbc", "uniform-0.1+fp8+f8lin+fbc"]
    stack = rows["uniform-0.1+fp8+f8lin"]
    assert [(layer["layer"], layer["ratio"]) for layer in stack["layers"]] == [
        ("uniform-0.1", 2.5), ("+fp8+f8lin", 1.25)]  # uniform-0.1+fp8 not measured: folded into the next layer
    assert end_to_end.stack_line(stack) == (
        "stack [1.3b b1] uniform-0.1+fp8+f8lin: 3.12x over dense = uniform-0.1 2.50x * +fp8+f8lin 1.25x")
    assert rows["dense+f8lin"]["layers"] == [{"layer": "+f8lin", "variant": "dense+f8lin", "ratio": 1.25}]
    assert end_to_end.stack_line(rows["uniform-0.2+fp8+fbc"]).endswith("skipped: why")
    check = next(c for c in end_to_end.checks(results) if c["check"] == "uniform-0.1+fp8+f8lin speedup")
    assert (check["target"], check["met"]) == (">= 3.0", True)


def test_quick_skips_what_cannot_run_on_the_cpu(tmp_path):
    payload = end_to_end.main(["--quick", "--variants", "dense+f8lin,uniform-0.25+fp8+f8lin", "--out-dir",
                               str(tmp_path)])
    saved = json.loads(Path(payload["path"]).read_text())
    assert [r["status"] for r in saved["results"]] == 2 * [
        "skipped: torchao float8 linears need a GPU of compute capability >= 8.9 (torchao refuses the CPU, and "
        "inductor cannot compile them there)"]
    assert all(r["latency_ms"] is None for r in saved["results"])
    assert [s["status"] for s in saved["stacks"]] == [r["status"] for r in saved["results"]]


def test_quick_fp8_is_refused_on_fp32_inputs(tmp_path, capsys):
    payload = end_to_end.main(["--quick", "--variants", "uniform-0.25+fp8", "--out-dir", str(tmp_path)])
    (r,) = payload["results"]
    assert r["status"] == "ok" and r["options"]["attention_dtype"] == "fp8"
    assert (r["fp8_sites"], r["sparse_sites"], r["float8_linears"]) == (0, 2, 0)
    assert r["fp8_refused"] == {"dtype torch.float32: the FP8 path quantises float16 or bfloat16 inputs": 2}
    assert "uniform-0.25+fp8: no site ran FP8 (2 site(s): dtype torch.float32" in capsys.readouterr().out


@pytest.mark.slow
def test_quick_first_block_cache_times_a_sequence_and_its_skips(tmp_path):
    payload = end_to_end.main(["--quick", "--variants", "dense,dense+fbc", "--cache-steps", "3", "--fbc-threshold",
                               "0.2", "--no-dense-recompile", "--out-dir", str(tmp_path)])
    dense, cached = payload["results"]
    assert cached["status"] == "ok", cached["error"]
    assert cached["cache_threshold"] == 0.2 and len(cached["step_latency_ms"]) == len(cached["cache_computed"]) == 3
    assert cached["cache_computed"][0]  # the first step of a sequence has nothing cached
    assert cached["cache_skip_rate"] == cached["cache_computed"].count(False) / 3
    assert dense["cache_skip_rate"] is None and dense["cache_computed"] == []
    assert cached["speedup"] == pytest.approx(dense["latency_ms"] / cached["latency_ms"])
    (stack,) = payload["stacks"]
    assert stack["variant"] == "dense+fbc" and stack["cache_skip_rate"] == cached["cache_skip_rate"]


def test_fp8_layer_forces_fp8_past_the_cost_models_fp8_rows(monkeypatch):
    """+fp8 times the FP8 layer itself: the backend gets the device's cost model without its FP8 line
    (with it, sites predicted no faster in FP8 would stay 16-bit), and the options stay JSON."""
    from benchmarks.end_to_end import measure
    from scaling_compiler.cost_model import CostModel

    with_fp8 = CostModel("device table", 1e-12, 0.1, 2e-12, 0.0, fp8_prep_ms_per_byte=1e-9, fp8_kernel_ratio=0.85)
    monkeypatch.setattr(CostModel, "for_device", classmethod(lambda cls, device, *a, **k: with_fp8))
    options = measure.backend_options(Variant.parse("uniform-0.1+fp8"), quick_settings(), [1000.0])
    forced = options["cost_model"]
    assert options["attention_dtype"] == "fp8" and forced.fp8_kernel_ratio is None and forced.fp8_prep_ms_per_byte is None
    assert (forced.sparse_ms_per_flop, forced.sparse_overhead_ms, forced.source) == (1e-12, 0.1, "device table")
    assert json.loads(json.dumps(measure._jsonable(options)))["cost_model"] == "device table"
    assert "cost_model" not in measure.backend_options(Variant.parse("uniform-0.1"), quick_settings(), [1000.0])


def test_a_variants_peak_memory_leaves_out_the_model_it_does_not_run(monkeypatch):
    """The float8 copy is built on first use; from then on both models are resident, and each variant's
    peak memory is to leave out the other one's weights (`Models.idle_gib`)."""
    allocated = iter([0.0, 2.0, 2.0, 3.5])  # GiB: before / after the plain model, before / after the copy
    monkeypatch.setattr(stack, "allocated_gib", lambda cuda: next(allocated))
    monkeypatch.setattr(stack, "build_model",
                        lambda section, settings: torch.nn.ModuleDict({"blocks": torch.nn.Linear(2, 2)}))
    monkeypatch.setattr(stack, "quantize_linears", lambda blocks, kind: None)
    monkeypatch.setattr(stack, "quantized_linears", lambda model: 1)
    models = stack.Models.build(end_to_end.SECTIONS["1.3b"], quick_settings())
    sparse, sparse_f8 = Variant.parse("uniform-0.1"), Variant.parse("uniform-0.1+f8lin")
    assert models.plain_gib == 2.0 and models.idle_gib(sparse) == 0.0  # no copy yet
    assert models.for_variant(sparse_f8) is models.float8 is not models.plain
    assert models.float8_gib == 1.5
    assert models.idle_gib(sparse) == 1.5 and models.idle_gib(sparse_f8) == 2.0


def test_cuda_graph_variants_are_checked_against_dense_and_dense_under_cuda_graphs():
    results = [result("dense", 520.0), result("dense+cg", 500.0), result("uniform-0.1+fp8+f8lin+cg", 170.0),
               result("uniform-0.1+cg", 240.0), result("fast-0.25+cg", None, "skipped: deadline")]
    end_to_end.add_ratios(results)
    rows = {c["check"]: c for c in end_to_end.checks(results)}
    assert set(rows) >= {"uniform-0.1+fp8+f8lin+cg speedup", "uniform-0.1+fp8+f8lin+cg speedup over dense+cg",
                         "uniform-0.1+cg speedup", "uniform-0.1+cg speedup over dense+cg"}
    assert not any(check.startswith("fast-0.25+cg") for check in rows)  # has a target, was not measured
    stack = rows["uniform-0.1+fp8+f8lin+cg speedup"]
    assert (stack["value"], stack["target"], stack["met"]) == (520.0 / 170.0, ">= 3.0", True)
    assert (rows["uniform-0.1+fp8+f8lin+cg speedup over dense+cg"]["value"], rows[
        "uniform-0.1+fp8+f8lin+cg speedup over dense+cg"]["met"]) == (500.0 / 170.0, False)
    assert rows["uniform-0.1+cg speedup over dense+cg"]["target"] == ">= 2.3"
