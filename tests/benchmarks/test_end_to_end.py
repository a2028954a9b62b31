"""Smoke test of benchmarks.end_to_end in its --quick mode: tiny Wan on the CPU, aot_eager, the whole flow.

About 20 s on two cores: three compiles of a 2-layer model at 1024 tokens, one timed call each.
"""
import json
from pathlib import Path

import pytest
import torch

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
    # where the first call's time went: dynamo's timers, our passes' share only for our backend
    for name, r in results.items():
        phases = r["compile_phases_s"]
        assert 0 < phases["backend"] <= r["compile_s"] and 0 < phases["dynamo_trace"] <= r["compile_s"], (name, phases)
        assert ("ours" in phases) == (name != "dense")
    assert results["uniform-0.25"]["compile_phases_s"]["ours"] > 0  # WEST calibration at least
    assert "calibrated" in results["uniform-0.25"]["compile_state"]
    assert "from cache" in results["fast-0.25"]["compile_state"]
    assert len(results["fast-0.25"]["timed_timesteps"]) == len(results["fast-0.25"]["step_latency_ms"]) == 2
    saved = json.loads(Path(payload["path"]).read_text())
    assert saved["device"] == "cpu" and [r["variant"] for r in saved["results"]] == list(results)
    assert saved["compile_summary"][0]["ours_cold_variant"] == "uniform-0.25"


@pytest.mark.slow
def test_quick_salad_variant_times_the_branch_against_sparse_only(tmp_path):
    payload = end_to_end.main(["--quick", "--variants", "uniform-0.25,salad-0.25", "--reps", "1",
                               "--no-dense-recompile", "--out-dir", str(tmp_path)])
    results = {r["variant"]: r for r in payload["results"]}
    assert all(r["status"] == "ok" for r in results.values()), [r["error"] for r in results.values()]
    uniform, salad = results["uniform-0.25"], results["salad-0.25"]
    assert salad["options"]["linear_branch"] and "linear_branch" not in uniform["options"]
    assert salad["branch_overhead"] == pytest.approx(salad["latency_ms"] / uniform["latency_ms"] - 1)
    assert uniform["branch_overhead"] is None
    assert (salad["graphs"], salad["recompiles"]) == (1, 0)
    assert salad["self_density"] == pytest.approx(uniform["self_density"])  # the same masks
    assert any(c["check"] == "salad-0.25 step time / sparse-only - 1" for c in payload["checks"])


def test_salad_variant_spec():
    variant = end_to_end.Variant.parse("salad-0.1")
    assert (variant.schedule, variant.density, variant.linear_branch) == ("uniform", 0.1, True)
    assert not end_to_end.Variant.parse("uniform-0.1").linear_branch
    with pytest.raises(ValueError):
        end_to_end.Variant.parse("salad")


def test_random_branches_are_seeded_and_nonzero():
    from scaling_compiler import ScalingAttnBackend

    def branches(seed):
        backend = ScalingAttnBackend(density=0.1, linear_branch=True)
        backend.linear_branches.branch_for("blocks.0.attn1", 2, 16, torch.device("cpu"), None)
        assert end_to_end.randomize_branches(backend, seed) == 1
        return backend.linear_branches.state_dict()

    first, again = branches(0), branches(0)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert first["sites.blocks__0__attn1.proj.weight"].abs().min() > 0


def test_inductor_settings_are_parsed_checked_and_recorded(capsys):
    args = end_to_end.parse_args(["--quick", "--inductor", "triton.multi_kernel=1", "--inductor",
                                  "coordinate_descent_tuning=True"])
    assert args.inductor == {"triton.multi_kernel": 1, "coordinate_descent_tuning": True}
    with pytest.raises(SystemExit):
        end_to_end.parse_args(["--quick", "--inductor", "triton.no_such_setting=1"])
    assert "no_such_setting" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        end_to_end.parse_args(["--quick", "--inductor", "multi_kernel"])


@pytest.mark.slow
def test_inductor_settings_hold_during_the_run(tmp_path, monkeypatch):
    import torch._inductor.config as inductor_config

    from benchmarks.end_to_end import cli

    seen = []
    real = cli.run_all
    monkeypatch.setattr(cli, "run_all", lambda *a: (seen.append(inductor_config.triton.multi_kernel), real(*a))[1])
    payload = end_to_end.main(["--quick", "--variants", "dense", "--reps", "1", "--no-dense-recompile",
                               "--inductor", "triton.multi_kernel=1", "--out-dir", str(tmp_path)])
    assert seen == [1] and inductor_config.triton.multi_kernel == 0  # set for the run, restored after
    assert payload["inductor_config"] == {"triton.multi_kernel": 1}
    assert json.loads(Path(payload["path"]).read_text())["inductor_config"] == {"triton.multi_kernel": 1}
