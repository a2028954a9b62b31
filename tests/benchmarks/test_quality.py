"""benchmarks.quality --quick on the CPU: runs end to end and writes the fields it promises."""
import json
import math

import pytest

from benchmarks import quality

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    result = quality.main(["--quick", "--device", "cpu", "--out", str(out), "--cache-dir", str(out / "cache")])
    return out, result


def test_writes_json_and_contact_sheet(quick_run):
    out, result = quick_run
    data = json.loads((out / "quality_cpu.json").read_text())
    assert data["device_slug"] == "cpu" and data["device"]
    assert data["versions"]["torch"] and "triton" in data["versions"] and data["date"]
    settings = data["settings"]
    assert settings["quick"] and settings["steps"] == 2 and settings["video"] == [3, 3, 32, 32]
    assert len(settings["prompts"]) == 1
    assert data["dense"]["sample_s"] > 0
    assert (out / "quality_contact_sheet_cpu.png").stat().st_size > 0
    assert json.loads(json.dumps(result["variants"])) == data["variants"]


def test_variants_and_metrics(quick_run):
    _, data = quick_run
    by_name = {v["variant"]: v for v in data["variants"]}
    assert set(by_name) == {"all_blocks@1", "west:fast@0.5", "west:uniform:0.2@0.5", "window_3d@0.5", "dfsattn@0.5"}
    for v in data["variants"]:
        assert len(v["videos"]) == 1
        assert -1 <= v["ssim_mean"] <= 1 + 1e-12
        assert v["compile_s"] > 0 and v["sample_s"] > 0
        if v["density_target"] < 1:
            assert math.isfinite(v["psnr_mean"]) and v["psnr_mean"] > 0
            assert v["ssim_mean"] < 1
        used = v["density_used"]
        for key in ("all_sites_with_dense_steps", "self_attention_sites_with_dense_steps",
                    "self_attention_sites_without_dense_steps", "head_density_min", "head_density_max"):
            assert 0 < used[key] <= 1, (v["variant"], key, used[key])
        assert len(used["per_step_self_attention"]) == 2
        assert used["sites"]["sparse"] > 0 and used["sites"]["self_attention_left_dense"] == 0
        # cross-attention stays dense, so the all-sites density is at least the self-attention one
        assert used["all_sites_with_dense_steps"] >= used["self_attention_sites_with_dense_steps"] - 1e-12
    for name in ("west:fast@0.5", "west:uniform:0.2@0.5", "window_3d@0.5"):
        assert 0 < by_name[name]["calibration_recall_mean"] <= 1 + 1e-6
    assert by_name["window_3d@0.5"]["density_used"]["dense_steps"] == 0
    # 2 steps with 20% warm-up: round(0.4) = 0 dense steps, so one density everywhere
    assert by_name["west:uniform:0.2@0.5"]["schedule"] == "uniform"
    assert by_name["west:fast@0.5"]["schedule"] == "fast"
    # DFSAttn: run-time masks in Hilbert order, keep ratios fitted to the density with dense steps counted
    dfs = by_name["dfsattn@0.5"]
    assert dfs["schedule"] == "dfsattn" and dfs["token_order"] == "hilbert" and dfs["calibration_recall_mean"] is None
    assert dfs["density_used"]["self_attention_sites_with_dense_steps"] == pytest.approx(0.5, abs=1 / 6)
    assert dfs["dfsattn"]["refreshes_run"] > 0 and dfs["dfsattn"]["scoring_seconds"] > 0
    # west calibrates: its compile reports where the topology came from
    assert any("calibrated" in origin for origin in by_name["west:fast@0.5"]["topology_origin"])


def test_density_one_matches_dense(quick_run):
    _, data = quick_run
    full = next(v for v in data["variants"] if v["density_target"] == 1.0)
    assert full["density_used"]["all_sites_with_dense_steps"] == 1.0
    # Every block kept: the same function as dense, computed by the block-wise float32 path instead of
    # SDPA, so only rounding differs (~1e-6 per step, ~120 dB measured). 40 dB leaves room for other
    # platforms' summation orders while failing at once on any masked or misplaced block (< 30 dB).
    assert full["psnr_mean"] >= 40, full["psnr_mean"]
    assert full["ssim_mean"] > 0.999


def test_int8_linears_cost_is_measured_against_the_unquantised_dense(tmp_path):
    """--linears int8: every variant runs a torchao-quantised copy while the dense reference stays
    unquantised, so at density 1.0 (every block) the score is the quantisation's cost alone: far below
    the ~120 dB of the unquantised run (test_density_one_matches_dense), yet a recognisable video."""
    pytest.importorskip("torchao")
    result = quality.main(["--quick", "--device", "cpu", "--densities", "1.0", "--linears", "int8",
                           "--out", str(tmp_path), "--cache-dir", str(tmp_path / "cache")])
    assert result["settings"]["linears"] == "int8"
    (full,) = result["variants"]
    assert full["quantized_linears"] > 0
    assert 15 < full["psnr_mean"] < 80, full["psnr_mean"]


def test_float8_linears_refused_on_the_cpu(capsys):
    pytest.importorskip("torchao")
    with pytest.raises(SystemExit):
        quality.parse_args(["--quick", "--device", "cpu", "--linears", "float8"])
    assert "compute capability" in capsys.readouterr().err
