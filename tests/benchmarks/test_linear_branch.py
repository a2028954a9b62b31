"""The linear-branch benchmark's CPU dry run: its rows and shares add up."""
import json

import pytest

from benchmarks.kernels import linear_branch


def test_dry_run_writes_rows(tmp_path):
    payload = linear_branch.main(["--dry-run", "--out-dir", str(tmp_path)])
    [path] = tmp_path.glob("linear_branch_cpu_*_dry.json")
    saved = json.loads(path.read_text())
    assert saved["benchmark"] == "linear_branch" and saved["dry_run"] is True and saved["rows"] == payload["rows"]
    assert [(r["shape"], r["density"]) for r in saved["rows"]] == [("tiny", 0.1), ("tiny", 0.25)]
    for r in saved["rows"]:
        assert all(r[key] > 0 for key in ("branch_fwd", "branch_fwd_bwd", "sparse_fwd", "sparse_fwd_bwd"))
        assert r["branch_share_fwd"] == pytest.approx(r["branch_fwd"] / (r["branch_fwd"] + r["sparse_fwd"]))
