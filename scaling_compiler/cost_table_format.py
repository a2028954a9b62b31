"""The cost tables' file format: rows (one timed shape, density, implementation and direction),
the shapes measured on first use, and writing a table file (`cost_model.py` fits and reads them;
`benchmarks/kernels/` merges rows in)."""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import tempfile
from pathlib import Path

import torch

TABLE_FORMAT = 2
DENSE = "sdpa"  # the dense rows' implementation key: F.scaled_dot_product_attention (cuDNN / flash)
FORWARD, BACKWARD = "forward", "backward"
FP8 = "triton_fp8"  # forward rows of `block_sparse_attention_fp8` (its quantisation included): no backward


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    B: int
    H: int
    S: int  # Sq = Sk
    D: int


# Where the first-use measurement times the op (seconds in all): small shapes pin the per-call
# cost, the demo's tiny DiT (9x64x64 latents / 2x2 patches, CFG batch 2, 4 heads of 64) is the
# case the ideal model got wrong, the Wan2.1-1.3B 480p layer is where sparse pays.
MEASURE_SHAPES = (
    Shape("small", 1, 4, 1024, 64),
    Shape("tiny-dit-5x32x32", 2, 4, 1280, 64),
    Shape("tiny-dit-9x64x64", 2, 4, 9216, 64),
    Shape("wan-like-8k", 1, 12, 8190, 128),
    Shape("wan1.3b-480p", 1, 12, 32760, 128),
)
MEASURE_DENSITIES = (1.0, 0.5, 0.25, 0.1)


def row(implementation: str, direction: str, shape: Shape, density: float, ms: float, dtype: str = "bfloat16",
        **extra) -> dict:
    """One table row: `density` is the kept fraction of (query, key) pairs (1.0 for dense rows)."""
    return {"implementation": implementation, "direction": direction, "shape": shape.name, "B": shape.B,
            "H": shape.H, "Sq": shape.S, "Sk": shape.S, "D": shape.D, "dtype": dtype, "density": density,
            "ms": ms, **extra}


def row_flops(r: dict) -> float:
    """Dense attention FLOPs of a row's shape: two products of 2 * Sq * Sk * D per (batch, head)."""
    return 4.0 * r["B"] * r["H"] * r["Sq"] * r["Sk"] * r["D"]


def environment(gpu: str) -> dict:
    import triton

    return {"format": TABLE_FORMAT, "gpu": gpu, "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def write_table(path: Path, rows: list[dict], env: dict, merge: bool = True) -> Path:
    """Write a table file atomically; with `merge`, rows of an existing file (same format) whose
    (implementation, direction, shape, dtype, density) the new rows do not cover are kept. The density
    of that key is the nominal one where a row has it: random masks keep a slightly different
    fraction in every run (0.4994 vs 0.5006), and a new measurement must replace the old."""
    path = Path(path)
    if merge and path.exists():
        old = json.loads(path.read_text())
        if old.get("format") == TABLE_FORMAT:
            key = lambda r: (r["implementation"], r["direction"], r["B"], r["H"], r["Sq"], r["Sk"], r["D"],
                             r["dtype"], round(r.get("nominal_density", r["density"]), 3))
            new_keys = {key(r) for r in rows}
            rows = [r for r in old["rows"] if key(r) not in new_keys] + rows
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump({**env, "rows": rows}, f, indent=1)
    os.replace(tmp, path)
    return path


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
