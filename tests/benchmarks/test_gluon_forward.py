"""The Gluon forward experiment's dry run: both kernels compile for sm_90 with the installed Triton,
keep P.V in flight while they wait for QK, and fit Hopper's shared memory.

It runs in a subprocess: the test session sets TRITON_INTERPRET=1 (conftest), under which Gluon
cannot compile, and the dry run swaps Triton's active driver."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")

ROOT = Path(__file__).resolve().parents[2]
HOPPER_SHARED_MEMORY = 232_448  # bytes per block (227 KiB)


def test_dry_run_compiles_both_kernels_for_hopper(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, not from a cache
    subprocess.run([sys.executable, "-m", "benchmarks.kernels.gluon_forward", "--dry-run", "--out-dir",
                    str(tmp_path)], cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    [path] = tmp_path.glob("gluon_forward_cpu_*_dry.json")
    rows = {row["kernel"]: row for row in json.loads(path.read_text())["compiled"]}
    assert set(rows) == {"bf16", "fp8"}
    for row in rows.values():
        assert row["target"] == "sm_90" and row["qk_waited_with_pv_in_flight"] and not row["ptx_local_memory"]
        assert 0 < row["shared_bytes"] <= HOPPER_SHARED_MEMORY


def test_dry_run_refuses_the_interpreter(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.kernels.gluon_forward", "--dry-run", "--out-dir",
                           str(tmp_path)], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "unset TRITON_INTERPRET" in done.stderr
    assert not list(tmp_path.glob("*.json"))
