"""benchmarks.policies.fast_ablation at CI size on the CPU: each design's FitSettings reach the backend."""
import json

import pytest

fast = pytest.importorskip("scaling_compiler.policies.west_fast.fast")  # FitSettings: the FAST fit's settings

from benchmarks import quality  # noqa: E402
from benchmarks.policies import fast_ablation  # noqa: E402


def test_designs_are_fit_settings():
    assert all(isinstance(d, fast.FitSettings) for d in fast_ablation.DESIGNS.values())
    # the design named as the default is the default
    assert fast_ablation.DESIGNS["w1-floor75-fitwarm"] == fast.FitSettings()
    assert len(set(fast_ablation.DESIGNS.values())) == len(fast_ablation.DESIGNS)  # no two designs alike


@pytest.mark.slow
def test_each_design_reaches_the_backend(tmp_path, monkeypatch):
    seen = []

    class Recording(quality.ScalingAttnBackend):
        def __init__(self, **options):
            seen.append(options.get("fast_fit"))
            super().__init__(**options)

    monkeypatch.setattr(quality, "ScalingAttnBackend", Recording)
    result = fast_ablation.main(["--designs", "unweighted", "w1-floor75-fitwarm", "--warmup-designs",
                                 "--no-baselines", "--densities", "0.5", "--out", str(tmp_path), "--device", "cpu",
                                 "--prompts", "red circle bounce", "--steps", "4", "--frames", "3", "--height", "32",
                                 "--width", "32"])
    designs = fast_ablation.DESIGNS
    assert seen == [designs["unweighted"], designs["w1-floor75-fitwarm"]]
    data = json.loads((tmp_path / "fast_ablation_cpu.json").read_text())
    assert data["device"] and data["versions"]["torch"] and data["settings"]["steps"] == 4
    assert [(r["design"], r["variant"]) for r in data["results"]] == [
        ("unweighted", "west:fast@0.5"), ("w1-floor75-fitwarm", "west:fast@0.5")]
    for entry in result["results"]:
        assert entry["fit_settings"] == fast_ablation.settings_dict(designs[entry["design"]])
        assert entry["fit_settings"]["head_floor"] == designs[entry["design"]].head_floor
        assert entry["psnr_mean"] > 0 and abs(entry["density_used"]["self_attention_sites_with_dense_steps"] - 0.5) < 0.1
