"""benchmarks/fast_ablation.py at CI size on the CPU: a design's constants reach the fit, and are restored."""
import json

from scaling_compiler.passes import tune

from .benchmark_scripts import load_benchmark


def test_designs_set_the_fit_constants_and_restore_them(tmp_path):
    module = load_benchmark("fast_ablation.py")
    before = (tune.STEP_WEIGHT, tune.HEAD_FLOOR, tune.FIT_WARMUPS)
    result = module.main(["--designs", "unweighted", "w1-floor75-fitwarm", "--warmup-designs", "--no-baselines",
                          "--densities", "0.5", "--out", str(tmp_path), "--device", "cpu",
                          "--prompts", "red circle bounce", "--steps", "4", "--frames", "3", "--height", "32",
                          "--width", "32"])
    assert (tune.STEP_WEIGHT, tune.HEAD_FLOOR, tune.FIT_WARMUPS) == before
    data = json.loads((tmp_path / "fast_ablation_cpu.json").read_text())
    assert data["device"] and data["versions"]["torch"] and data["settings"]["steps"] == 4
    assert [(r["design"], r["variant"]) for r in data["results"]] == [
        ("unweighted", "west:fast@0.5"), ("w1-floor75-fitwarm", "west:fast@0.5")]
    for entry in result["results"]:
        assert entry["constants"] == module.DESIGNS[entry["design"]]
        assert entry["psnr_mean"] > 0 and abs(entry["density_used"]["self_attention_sites_with_dense_steps"] - 0.5) < 0.1
