"""Smoke test of benchmarks.kernels.block_sparse_backward in its --dry-run mode: the tiny shape on the
CPU, the Triton kernels in the interpreter (fp16, fixed configs), the op through autograd, eager
Flex forward; asserts on the JSON and the cost-table rows only.

About 45 s on two cores (the interpreter runs the forward and the backward kernels at 1,000 tokens).
"""
import json
import os
from pathlib import Path

import pytest

from benchmarks.kernels import block_sparse_backward
from scaling_compiler import cost_model
from scaling_compiler.kernels.dispatch import Implementation


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the dry run needs the Triton interpreter")
def test_dry_run_times_every_path_and_writes_backward_rows(tmp_path):
    payload = block_sparse_backward.main(["--dry-run", "--write-cost-table", "--out-dir", str(tmp_path),
                                          "--cost-dir", str(tmp_path / "tables")])
    path = Path(payload["path"])
    assert path.parent == tmp_path and path.name.startswith("kernel_backward_cpu_") and path.name.endswith("_dry.json")
    saved = json.loads(path.read_text())
    assert saved["benchmark"] == "kernel_backward" and saved["dry_run"] is True and saved["gpu"] == "cpu"
    assert saved["torch"] and saved["triton"] and saved["date"]
    assert saved["checks"] == []  # the targets are at the Wan2.1-1.3B shape only

    rows = saved["rows"]
    assert [(r["shape"], r["density"]) for r in rows] == [("tiny", 1.0), ("tiny", 0.25)]
    for r in rows:
        assert (r["implementation"], r["direction"]) == (Implementation.TRITON_POINTER.value, cost_model.BACKWARD)
        assert r["dtype"] == "float16" and r["op_implementation"] == Implementation.TORCH_BLOCKWISE.value
        for key in ("ms_fwd", "ms_bwd", "ms_bwd_kernel", "ms_fwd_bwd", "ms_flex_fwd"):
            assert r[key] > 0, key
        # kept-block FLOPs: forward 4 * D per kept pair, backward 2.5x, both 3.5x
        flops = 4.0 * r["D"] * r["B"] * r["H"] * r["S"] ** 2 * r["density_actual"]
        assert r["tflops_fwd"] == pytest.approx(flops / r["ms_fwd"] / 1e9)
        assert r["tflops_bwd"] == pytest.approx(2.5 * flops / r["ms_bwd"] / 1e9)
        assert r["tflops_fwd_bwd"] == pytest.approx(3.5 * flops / r["ms_fwd_bwd"] / 1e9)
        assert r["speedup_vs_flex_fwd"] == pytest.approx(r["ms_flex_fwd"] / r["ms_fwd"])
        # no Flex backward, cuDNN or CUDA memory counters on the CPU
        assert r["ms_flex_fwd_bwd"] is r["speedup_vs_flex_fwd_bwd"] is r["ms_cudnn_fwd_bwd"] is None
        assert r["peak_mb_ours"] is r["peak_mb_flex"] is None
        # the Triton backward against the op's block-wise torch backward: fp16 rounding only
        assert r["grad_reference"] == "op (torch_blockwise)" and r["grad_err"] < 1e-2
    assert rows[0]["density_actual"] == 1.0 and 0.0 < rows[1]["density_actual"] < 1.0

    table = json.loads(Path(payload["cost_table"]).read_text())
    assert Path(payload["cost_table"]).name == "cpu_dry.json" and table["format"] == cost_model.TABLE_FORMAT
    assert [(t["implementation"], t["direction"], t["ms"]) for t in table["rows"]] == [
        (Implementation.TRITON_POINTER.value, cost_model.BACKWARD, r["ms_bwd"]) for r in rows]  # no cuDNN on the CPU
