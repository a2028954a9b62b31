"""Smoke test of benchmarks.end_to_end in its --quick mode: tiny Wan on the CPU, aot_eager, the whole flow.

About 20 s on two cores: three compiles of a 2-layer model at 1024 tokens, one timed call each.
"""
import json
from pathlib import Path

import pytest

from benchmarks import end_to_end


@pytest.mark.slow
def test_quick_mode_measures_each_variant(tmp_path):
    payload = end_to_end.main(["--quick", "--variants", "dense,uniform-0.25,fast-0.25", "--reps", "1", "--fast-steps", "2",
                        "--no-dense-recompile", "--out-dir", str(tmp_path)])
    results = {r["variant"]: r for r in payload["results"]}
    assert list(results) == ["dense", "uniform-0.25", "fast-0.25"]
    assert all(r["status"] == "ok" for r in results.values()), [r["error"] for r in results.values()]
    assert results["dense"]["predicted_attention_speedup"] is None
    for name in ("uniform-0.25", "fast-0.25"):
        r = results[name]
        assert r["latency_ms"] > 0 and 0 < r["attention_share"] <= 1
        # every ratio is against the dense variant of the same run
        assert r["speedup"] == pytest.approx(results["dense"]["latency_ms"] / r["latency_ms"])
        assert (r["graphs"], r["recompiles"], r["graph_breaks"]) == (1, 0, 0)  # FAST: masks follow the timestep
        assert r["self_density"] == pytest.approx(0.25, abs=0.03)
        assert r["predicted_attention_speedup"] > 1 and r["amdahl_speedup"] > 1
    assert "calibrated" in results["uniform-0.25"]["compile_state"]
    assert "from cache" in results["fast-0.25"]["compile_state"]
    assert len(results["fast-0.25"]["timed_timesteps"]) == len(results["fast-0.25"]["step_latency_ms"]) == 2
    saved = json.loads(Path(payload["path"]).read_text())
    assert saved["device"] == "cpu" and [r["variant"] for r in saved["results"]] == list(results)
    assert saved["compile_summary"][0]["ours_cold_variant"] == "uniform-0.25"
