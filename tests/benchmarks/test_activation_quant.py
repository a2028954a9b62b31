"""The activation-quantisation benchmark's CPU dry run: its row, and our kernel agreeing with torchao's operations."""
import json

from benchmarks.kernels import activation_quant


def test_dry_run_writes_rows(tmp_path):
    payload = activation_quant.main(["--dry-run", "--out-dir", str(tmp_path)])
    [path] = tmp_path.glob("activation_quant_cpu_*_dry.json")
    saved = json.loads(path.read_text())
    assert saved["benchmark"] == "activation_quant" and saved["dry_run"] is True and saved["rows"] == payload["rows"]
    [row] = saved["rows"]
    assert (row["shape"], row["tokens"], row["width"]) == ("tiny", 40, 300)
    assert all(row[key] > 0 for key in ("ms_inductor", "ms_ours", "ms_bf16_gelu"))
    assert row["ours_equal_values"] >= 0.999 and row["ours_equal_scales"] >= 0.99
