"""Predicted attention time per site, from the kernel benchmark's measured tables.

`benchmarks/kernel.py` writes `cost_tables/<gpu-name-slug>.json`: our kernel's time against
density at one shape, beside cuDNN's dense time. A straight line through (kept FLOPs, ms)
gives the sparse kernel's time per kept FLOP and its fixed per-call overhead; cuDNN's time
per FLOP gives the dense time. Other shapes scale by their FLOPs. On a GPU with no table (or
a CPU) the documented default is the ideal: sparse time = density x dense time, no overhead.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch

TABLES = Path(__file__).parent / "cost_tables"
DEFAULT_DENSE_FLOPS_PER_MS = 5.0e11  # 500 TFLOP/s: only ratios matter without a table


@dataclasses.dataclass(frozen=True)
class CostModel:
    source: str  # the table file, or why the default is used
    sparse_ms_per_flop: float  # our kernel, per kept FLOP
    sparse_overhead_ms: float  # our kernel, per call
    dense_ms_per_flop: float  # cuDNN SDPA

    def sparse_ms(self, dense_flops: int, head_densities: torch.Tensor) -> float:
        """Predicted time of one call with these per-head densities (heads share the FLOPs evenly)."""
        kept = dense_flops * float(head_densities.double().mean())
        return self.sparse_overhead_ms + kept * self.sparse_ms_per_flop

    def dense_ms(self, dense_flops: int) -> float:
        return dense_flops * self.dense_ms_per_flop

    @classmethod
    def for_device(cls, device: torch.device) -> "CostModel":
        if device.type != "cuda":
            return cls.ideal(f"default: no measured table for {device.type}")
        name = torch.cuda.get_device_name(device)
        path = TABLES / f"{slug(name)}.json"
        return cls.from_table(path) if path.exists() else cls.ideal(f"default: no measured table for {name}")

    @classmethod
    def ideal(cls, source: str) -> "CostModel":
        per_flop = 1.0 / DEFAULT_DENSE_FLOPS_PER_MS
        return cls(source, per_flop, 0.0, per_flop)

    @classmethod
    def from_table(cls, path: Path) -> "CostModel":
        table = json.loads(Path(path).read_text())
        shape = table["shape"]
        flops = 4 * shape["B"] * shape["H"] * shape["S"] ** 2 * shape["D"]
        rows = table["rows"]
        x = torch.tensor([r["density"] * flops for r in rows], dtype=torch.float64)
        y = torch.tensor([r["ms_ours"] for r in rows], dtype=torch.float64)
        slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
        overhead = max(0.0, float(y.mean() - slope * x.mean()))
        dense = sum(r["ms_cudnn"] for r in rows) / len(rows) / flops
        return cls(str(path.name), slope, overhead, dense)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
