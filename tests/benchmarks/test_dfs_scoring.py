"""Smoke test of benchmarks.policies.dfs_scoring in its --quick mode: tiny shapes on the CPU, the whole flow.

A few seconds: B=1 and 2, H=2, 1,000 tokens, fp32, one thread, no Triton kernel; asserts on the JSON only.
"""
import json
from pathlib import Path

import pytest

from benchmarks.policies import dfs_scoring


@pytest.mark.slow
def test_quick_mode_times_every_piece_and_checks_accuracy(tmp_path):
    payload = dfs_scoring.main(["--quick", "--reps", "1", "--out-dir", str(tmp_path)])
    saved = json.loads(Path(payload["path"]).read_text())
    assert Path(payload["path"]).parent == tmp_path and Path(payload["path"]).name.endswith("_quick.json")
    assert saved["device"] == "cpu" and saved["quick"] is True
    assert saved["torch"] and saved["date"] and "triton" in saved
    assert saved["shape"] == {"H": 2, "S": 1000, "D": 64, "grid": [5, 10, 20], "dtype": "float32",
                              "token_order": "hilbert"}
    assert saved["schedule"] == {"keep_ratios": [0.3, 0.2, 0.1], "refresh_steps": [12, 24, 36]}

    rows = saved["rows"]  # B=1; B=2 as CFG halves sharing masks and without that reuse
    assert [(r["B"], r["cfg_reuse"], r["keep_ratio"]) for r in rows] == [
        (b, cfg, keep) for b, cfg in ((1, False), (2, True), (2, False)) for keep in (0.3, 0.2, 0.1)]
    for r in rows:
        for key in ("reorder_ms", "scores_ms", "topk_pack_ms", "refresh_ms", "lookup_ms", "dense_ms"):
            assert r[key] > 0, key
        assert r["sum_abc_ms"] == pytest.approx(r["reorder_ms"] + r["scores_ms"] + r["topk_pack_ms"])
        assert r["refresh_pct_of_dense"] == pytest.approx(100 * r["refresh_ms"] / r["dense_ms"])
        assert r["sparse_ms"] is None and r["refresh_pct_of_sparse"] is None  # no Triton kernel on the CPU
        # 8 key blocks: the top-k keeps floor(keep * 8) = 2, 1, 0 -> at least 1 per row
        assert r["density"] == {0.3: 2 / 8, 0.2: 1 / 8, 0.1: 1 / 8}[r["keep_ratio"]]

    accuracy = saved["accuracy"]
    assert accuracy["device"] == "cpu" and accuracy["shape"] == [1, 2, 1000, 64]
    for dtype in ("fp32", "bf16"):
        assert accuracy[dtype]["max_abs_err"] < 1e-5  # fp32 arithmetic on exactly representable inputs
        assert accuracy[dtype]["topk_0.1_mask_agreement"] > 0.99  # a near-tie may flip a block
