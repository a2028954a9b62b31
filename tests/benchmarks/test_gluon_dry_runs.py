"""The Gluon kernels' dry runs: each compiles for sm_90 with the installed Triton and keeps its design
in the PTX, and fits Hopper's shared memory.

- ``gluon_forward`` (the forward experiment): both kernels (bf16, FP8) keep P.V in flight while they
  wait for QK and use no local memory;
- ``gluon_backward`` (the package's backward on Hopper): D 64 fp16 and D 128 bf16 issue TMA reductions
  and use no local memory.

They run in a subprocess: the test session sets TRITON_INTERPRET=1 (conftest), under which Gluon
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


def _forward_rows_ok(rows):
    assert {row["kernel"] for row in rows} == {"bf16", "fp8"}
    return all(row["qk_waited_with_pv_in_flight"] for row in rows)


def _backward_rows_ok(rows):
    assert {(row["D"], row["dtype"]) for row in rows} == {(64, "float16"), (128, "bfloat16")}
    return all(row["tma_reduction"] for row in rows)


BENCHMARKS = {"gluon_forward": _forward_rows_ok, "gluon_backward": _backward_rows_ok}


def _dry_run(name, out_dir, env):
    return subprocess.run([sys.executable, "-m", f"benchmarks.kernels.{name}", "--dry-run", "--out-dir",
                           str(out_dir)], cwd=ROOT, env=env, check=False, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_dry_run_compiles_for_hopper(name, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, not from a cache
    done = _dry_run(name, tmp_path, env)
    assert done.returncode == 0, done.stderr[-2000:]
    [path] = tmp_path.glob(f"{name}_cpu_*_dry.json")
    rows = json.loads(path.read_text())["compiled"]
    assert BENCHMARKS[name](rows)
    for row in rows:
        assert row["target"] == "sm_90" and not row["ptx_local_memory"]
        assert 0 < row["shared_bytes"] <= HOPPER_SHARED_MEMORY


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_dry_run_refuses_the_interpreter(name, tmp_path):
    done = _dry_run(name, tmp_path, {**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode != 0 and "unset TRITON_INTERPRET" in done.stderr
    assert not list(tmp_path.glob("*.json"))
