"""Predicted attention time per call of a site: a fixed per-call cost plus a time per FLOP.

    sparse_ms = sparse_overhead_ms + sparse_ms_per_flop * kept FLOPs      (our op, per implementation)
    dense_ms  = dense_overhead_ms  + dense_ms_per_flop  * dense FLOPs     (SDPA: cuDNN / flash)

The fixed costs matter at small sizes: the sparse op pays a mask decode, the per-step mask pick
(`ops.step_masks`) and several launches per call. On an H200 the README demo (the tiny DiT,
9,216 tokens, head dim 64) ran 0.69x of dense while an "ideal" model (sparse = density x dense)
predicted 4x; with fitted overheads such sites are predicted slower and stay dense.

Tables hold measured rows keyed by implementation (`kernels.dispatch.Implementation`, or `DENSE`)
and direction ("forward", "backward"), each at one shape and density. The backward rows of our op
are keyed by the same implementation as its forward (the Triton backward streams tiles through
TMA or pointer loads as the forward does); the dense ones time SDPA's backward alone. A training
site is predicted by `CostModel.for_training`: the forward's and the backward's lines added. The two lines are fitted by least squares on relative error over rows at several shapes,
small ones included, so the intercept is measured, not extrapolated. Where a model comes from
(`CostModel.source`):

- "committed table <gpu>.json": `scaling_compiler/cost_tables/<gpu-name-slug>.json`, written by
  `python -m scaling_compiler.cost_model --write scaling_compiler/cost_tables/` (or, for big shapes,
  merged in by `python -m benchmarks.kernels.block_sparse`). The H100 table of the first format
  (one shape, `ms_ours` / `ms_cudnn` columns) is still read, as the Triton TMA forward.
- "measured on first use, cached at <path>": a GPU with no committed rows for its implementation
  times the op path and SDPA at a few shapes (`MEASURE_SHAPES`: seconds of timing, plus the
  kernel's compiles and autotuning at each shape the first time) and caches the rows as JSON
  under `cache.cache_dir() / "cost_tables"`, keyed by GPU name, implementation, direction, torch
  and Triton versions.
- "ideal: no GPU": CPU (and other) devices: sparse = density x dense, no overhead (ratios only).
  A GPU without backward rows gets this ideal for its backward too (not measured on first use),
  at `BACKWARD_FLOP_RATIO` times the forward's time per FLOP.

FP8 attention (option `attention_dtype="fp8"`, `block_sparse_attention_fp8`) has forward rows of its
own where a GPU's table has them (key `FP8`, its quantisation prep included; written by
`benchmarks.kernels.block_sparse`, each with the time of the 16-bit op it was timed beside: `versus`,
`versus_ms`). They are modelled relative to that op:

    fp8_ms = prep_ms_per_byte * (bytes of q, k, v) + kernel_ratio * sparse_ms

the prep reads q, k, v once whatever the density, the FP8 kernel runs at a fixed fraction of the
16-bit one's time. (A line in kept FLOPs fitted to FP8 rows alone would be compared with a 16-bit line
fitted to other shapes, and the two lines' fitting errors, not the kernels, would decide.) Planning is
the same with or without the option: sparse or dense is decided on the 16-bit kernel's line. A sparse
site then runs FP8 only where it is predicted at least `MIN_PREDICTED_GAIN` faster than the 16-bit op
(FP8 costs accuracy, so it must buy time); without FP8 rows (the CPU, a GPU not timed) it runs FP8
wherever the option asks. The H200's rows (the Wan2.1-1.3B and 14B shapes; the FP8 op there is the Gluon
kernel with the three-launch prep, session 19): prep 0.21 ms at the 1.3B shape as fitted, kernel ratio
0.64, so FP8 pays there (by 5%) from about density 0.01 up (at 0.1 it predicts 1.17 ms against the 16-bit
line's 1.50; measured 1.02 against 1.23).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
from pathlib import Path
from typing import Callable, Iterable

import torch

from .cost_table_format import (BACKWARD, DENSE, FORWARD, FP8, MEASURE_DENSITIES, MEASURE_SHAPES, Shape, environment, row,
                                row_flops, slug, write_table)
from .cost_table_format import TABLE_FORMAT  # noqa: F401  (callers read the format as cost_model.TABLE_FORMAT)
from .kernels.dispatch import Implementation, device_implementation, implementation_for

log = logging.getLogger(__name__)

TABLES = Path(__file__).parent / "cost_tables"
DEFAULT_DENSE_FLOPS_PER_MS = 5.0e11  # 500 TFLOP/s: only ratios matter without a table
BACKWARD_FLOP_RATIO = 2.5  # backward / forward matmul FLOPs of attention (5 products of Sq x Sk x D vs 2)


@dataclasses.dataclass(frozen=True)
class CostModel:
    source: str  # which table (or why the ideal default)
    sparse_ms_per_flop: float  # our op, per kept FLOP
    sparse_overhead_ms: float  # our op, per call: mask pick, decode, launches
    dense_ms_per_flop: float  # SDPA
    dense_overhead_ms: float = 0.0  # SDPA, per call
    fp8_prep_ms_per_byte: float | None = None  # the FP8 op's quantisation prep (None: the table has no FP8 rows)
    fp8_kernel_ratio: float | None = None  # the FP8 op's time beyond its prep, over the 16-bit op's

    def sparse_ms(self, dense_flops: int, head_densities: torch.Tensor) -> float:
        """Predicted time of one call with these per-head densities (heads share the FLOPs evenly)."""
        kept = dense_flops * float(head_densities.double().mean())
        return self.sparse_overhead_ms + kept * self.sparse_ms_per_flop

    def fp8_sparse_ms(self, dense_flops: int, head_densities: torch.Tensor, qkv_bytes: int) -> float | None:
        """The FP8 op's predicted time of the same call (q, k and v together `qkv_bytes` in 16 bits);
        None without FP8 rows."""
        if self.fp8_prep_ms_per_byte is None or self.fp8_kernel_ratio is None:
            return None
        return self.fp8_prep_ms_per_byte * qkv_bytes + self.fp8_kernel_ratio * self.sparse_ms(dense_flops, head_densities)

    def dense_ms(self, dense_flops: int) -> float:
        return self.dense_overhead_ms + dense_flops * self.dense_ms_per_flop

    def plus(self, other: "CostModel") -> "CostModel":
        """Running this and `other` once each per call (a training site: forward, then backward):
        both lines add. The sum has no FP8 line (the FP8 op has no backward)."""
        return CostModel(f"{self.source} + {other.source}", self.sparse_ms_per_flop + other.sparse_ms_per_flop,
                         self.sparse_overhead_ms + other.sparse_overhead_ms,
                         self.dense_ms_per_flop + other.dense_ms_per_flop,
                         self.dense_overhead_ms + other.dense_overhead_ms)

    @classmethod
    def for_device(cls, device: torch.device, implementation: Implementation | str | None = None,
                   direction: str = FORWARD) -> "CostModel":
        """The model for `device`: its committed table, else one measured now (once per GPU and
        setup, then cached), else (no GPU) the ideal. `implementation`: default the one
        `kernels.dispatch` picks for the device (forward and backward alike)."""
        if device.type != "cuda":
            return cls.ideal("ideal: no GPU", BACKWARD_FLOP_RATIO if direction == BACKWARD else 1.0)
        implementation = Implementation(implementation or device_implementation(device))
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _for_gpu(torch.cuda.get_device_name(index), index, implementation.value, direction)

    @classmethod
    def for_training(cls, device: torch.device, implementation: Implementation | str | None = None) -> "CostModel":
        """The model of a site whose inputs require grad: forward plus backward, each from its rows."""
        return cls.for_device(device, implementation, FORWARD).plus(cls.for_device(device, implementation, BACKWARD))

    @classmethod
    def ideal(cls, source: str, flop_ratio: float = 1.0) -> "CostModel":
        """sparse = density x dense at 500 TFLOP/s over `flop_ratio` times the forward's FLOPs."""
        per_flop = flop_ratio / DEFAULT_DENSE_FLOPS_PER_MS
        return cls(source, per_flop, 0.0, per_flop, 0.0)

    @classmethod
    def from_table(cls, path: Path | str, implementation: Implementation | str = Implementation.TRITON_TMA,
                   direction: str = FORWARD, source: str | None = None) -> "CostModel | None":
        """The model fitted to a table file's rows for (implementation, direction); None if it has none."""
        path = Path(path)
        table = json.loads(path.read_text())
        source = source or f"committed table {path.name}"
        if "format" not in table:  # the first format: one shape, our op and cuDNN per density
            if Implementation(implementation) is not Implementation.TRITON_TMA or direction != FORWARD:
                return None
            return _from_legacy_table(table, source)
        return cls.from_rows(table["rows"], implementation, direction, source)

    @classmethod
    def from_rows(cls, rows: Iterable[dict], implementation: Implementation | str, direction: str,
                  source: str) -> "CostModel | None":
        """Fit both lines to table rows (see `row`); None without sparse and dense rows."""
        implementation = Implementation(implementation).value
        sparse = [(r["density"] * row_flops(r), r["ms"]) for r in rows
                  if r["implementation"] == implementation and r["direction"] == direction]
        dense = [(row_flops(r), r["ms"]) for r in rows if r["implementation"] == DENSE and r["direction"] == direction]
        if not sparse or not dense:
            return None
        sparse_overhead, sparse_slope = fit_line(sparse)
        dense_overhead, dense_slope = fit_line(dense)
        model = cls(source, sparse_slope, sparse_overhead, dense_slope, dense_overhead)
        fp8 = fit_fp8(rows, implementation) if direction == FORWARD else None
        if fp8 is not None:
            model = dataclasses.replace(model, fp8_prep_ms_per_byte=fp8[0], fp8_kernel_ratio=fp8[1])
        return model


def _from_legacy_table(table: dict, source: str) -> CostModel:
    """The first table format's fit, unchanged: unweighted line through one shape's densities."""
    shape = table["shape"]
    flops = 4 * shape["B"] * shape["H"] * shape["S"] ** 2 * shape["D"]
    rows = table["rows"]
    x = torch.tensor([r["density"] * flops for r in rows], dtype=torch.float64)
    y = torch.tensor([r["ms_ours"] for r in rows], dtype=torch.float64)
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    overhead = max(0.0, float(y.mean() - slope * x.mean()))
    dense = sum(r["ms_cudnn"] for r in rows) / len(rows) / flops
    return CostModel(source, slope, overhead, dense, 0.0)


def qkv_bytes(B: int, H: int, Sq: int, Sk: int, D: int, kv_heads: int | None = None, itemsize: int = 2) -> int:
    """Bytes of q, k and v in a 16-bit dtype: what the FP8 op's quantisation prep reads."""
    return B * (H * Sq + 2 * (kv_heads or H) * Sk) * D * itemsize


def fit_fp8(rows: Iterable[dict], implementation: str) -> tuple[float, float] | None:
    """(prep_ms_per_byte, kernel_ratio) of `fp8_ms = prep_ms_per_byte * qkv_bytes + kernel_ratio * ms`,
    least squares over the FP8 rows timed beside `implementation` (each row holds that op's time of the
    same call, `versus_ms`); None without two such rows."""
    pairs = [(qkv_bytes(r["B"], r["H"], r["Sq"], r["Sk"], r["D"]), r["versus_ms"], r["ms"]) for r in rows
             if r["implementation"] == FP8 and r["direction"] == FORWARD and r.get("versus") == implementation]
    if len(pairs) < 2:
        return None
    x = torch.tensor([p[:2] for p in pairs], dtype=torch.float64)
    y = torch.tensor([p[2] for p in pairs], dtype=torch.float64)
    per_byte, ratio = torch.linalg.lstsq(x, y[:, None]).solution[:, 0].tolist()
    return max(per_byte, 0.0), ratio


def fit_line(points: Iterable[tuple[float, float]]) -> tuple[float, float]:
    """(overhead_ms, ms_per_flop) of `ms = overhead + per_flop * flops` through (flops, ms) points.

    Least squares on relative error (weights 1 / ms^2), so a 0.05 ms call counts as much as a
    10 ms one and the intercept comes from the small shapes. A negative intercept (noise) is
    clamped to 0 and the slope refitted through the origin.
    """
    x, y = (torch.tensor(v, dtype=torch.float64) for v in zip(*points))
    w = 1.0 / y**2
    if len(x) > 1 and float(x.max() - x.min()) > 0:
        sw, sx, sy, sxx, sxy = w.sum(), (w * x).sum(), (w * y).sum(), (w * x * x).sum(), (w * x * y).sum()
        slope = (sw * sxy - sx * sy) / (sw * sxx - sx**2)
        overhead = (sy - slope * sx) / sw
        if overhead >= 0 and slope > 0:
            return float(overhead), float(slope)
    return 0.0, float((w * x * y).sum() / (w * x * x).sum())


# ---------------------------------------------------------------------------------------
# Measured on first use
# ---------------------------------------------------------------------------------------
Measure = Callable[[str, Shape, float], tuple[float, float]]  # (implementation, shape, density) -> (density, ms)


@functools.lru_cache(maxsize=None)
def _for_gpu(gpu: str, index: int, implementation: str, direction: str) -> CostModel:
    committed = TABLES / f"{slug(gpu)}.json"
    if committed.exists():
        model = CostModel.from_table(committed, implementation, direction)
        if model is not None:
            return model
        log.info("scalingattn: %s has no %s %s rows", committed, implementation, direction)
    if direction != FORWARD:
        return CostModel.ideal(f"ideal: no measured {direction} rows for {gpu}", BACKWARD_FLOP_RATIO)
    try:
        return measured_model(gpu, implementation, direction, op_timer(torch.device("cuda", index)))
    except Exception as error:  # noqa: BLE001 - planning goes on with the documented default
        log.warning("scalingattn: measuring a cost table on %s failed (%r); using the ideal model", gpu, error)
        return CostModel.ideal(f"ideal: measuring on {gpu} failed")


def cached_table_path(gpu: str, implementation: str, direction: str, root: Path | None = None) -> Path:
    import triton

    root = Path(root) if root is not None else _cache_root()
    name = f"{slug(gpu)}_{implementation}_{direction}_torch-{torch.__version__}_triton-{triton.__version__}"
    return root / f"{slug(name)}.json"


def _cache_root() -> Path:
    from .cache import cache_dir

    return cache_dir() / "cost_tables"


def measured_model(gpu: str, implementation: str, direction: str, measure: Measure, root: Path | None = None,
                   shapes: tuple[Shape, ...] = MEASURE_SHAPES,
                   densities: tuple[float, ...] = MEASURE_DENSITIES) -> CostModel:
    """The model from this GPU's cached measured table, measuring it first if there is none (or
    the cached file describes another setup)."""
    path = cached_table_path(gpu, implementation, direction, root)
    source = f"measured on first use, cached at {path}"
    env = environment(gpu)
    if path.exists():
        try:
            table = json.loads(path.read_text())
            same = all(table.get(k) == env[k] for k in ("format", "gpu", "torch", "triton"))
            model = CostModel.from_rows(table["rows"], implementation, direction, source) if same else None
        except (ValueError, KeyError) as error:
            log.warning("scalingattn: unreadable cost table %s (%r)", path, error)
            model = None
        if model is not None:
            return model
        log.warning("scalingattn: ignoring cost table %s (another setup or incomplete); measuring again", path)
    log.warning("scalingattn: measuring a cost table for %s (%s) now, once: it is cached at %s",
                gpu, implementation, path)
    rows = measure_rows(implementation, direction, measure, shapes, densities)
    write_table(path, rows, {**env, "implementation": implementation, "direction": direction,
                             "how": "measured on first use"}, merge=False)
    log.info("scalingattn: cost table for %s (%s) cached at %s", gpu, implementation, path)
    return CostModel.from_rows(rows, implementation, direction, source)


def measure_rows(implementation: str, direction: str, measure: Measure, shapes: Iterable[Shape] = MEASURE_SHAPES,
                 densities: Iterable[float] = MEASURE_DENSITIES, dense: bool = True) -> list[dict]:
    """Rows for `implementation` and (with `dense`) the dense baseline at each shape, labelled
    `direction` (`measure` times that direction: `op_timer(..., direction=...)`)."""
    rows = []
    shapes = list(shapes)
    for i, shape in enumerate(shapes):
        log.info("scalingattn: measuring the cost table, shape %d/%d: %s (B=%d, H=%d, S=%d, D=%d)",
                 i + 1, len(shapes), shape.name, shape.B, shape.H, shape.S, shape.D)
        if dense:
            _, ms = measure(DENSE, shape, 1.0)
            rows.append(row(DENSE, direction, shape, 1.0, ms))
        for density in densities:
            actual, ms = measure(implementation, shape, density)
            rows.append(row(implementation, direction, shape, actual, ms, nominal_density=density))
    return rows


def op_timer(device: torch.device, time_fn: Callable[[Callable[[], object]], float] | None = None,
             dtype: torch.dtype = torch.bfloat16, direction: str = FORWARD) -> Measure:
    """Times what a rewritten graph runs per site: `ops.step_masks` then the sparse op (the custom
    op when `implementation` is the device's own, else dispatch forced to it), or dense SDPA.
    With `direction` BACKWARD: what autograd runs after them, the op's backward on the forward's
    out / lse (the picked masks given), or SDPA's backward alone.

    Inputs are transposed views of (B, S, H, D), as diffusers passes them; masks are random per
    head. `time_fn(fn) -> ms` (default: CUDA events over back-to-back calls, so per-call host
    work counts as it does in a model whose GPU is waiting on it).
    """
    import torch.nn.functional as F

    from .kernels.bitmask import BLOCK_SIZE, num_blocks, pack_block_mask

    time_fn = time_fn or _cuda_time_ms
    steps = 8

    inputs: dict[Shape, tuple[torch.Tensor, ...]] = {}

    def measure(implementation: str, shape: Shape, density: float) -> tuple[float, float]:
        if shape not in inputs:  # one shape at a time: the last one's tensors are dropped
            inputs.clear()
            g = torch.Generator(device=device).manual_seed(shape.S)
            inputs[shape] = tuple(torch.randn(shape.B, shape.S, shape.H, shape.D, generator=g, device=device,
                                              dtype=dtype).transpose(1, 2) for _ in range(3))
        q, k, v = inputs[shape]
        g = torch.Generator().manual_seed(shape.S)
        scale = shape.D**-0.5
        if implementation == DENSE:
            if direction == BACKWARD:
                return 1.0, time_fn(_dense_backward(q, k, v, scale))
            return 1.0, time_fn(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale))
        nb = num_blocks(shape.S)
        keep = torch.rand(2, shape.H, nb, nb, generator=g) < density  # two density levels, the first one used
        keep[1] = True
        tokens = torch.full((nb,), float(BLOCK_SIZE), dtype=torch.float64)
        tokens[-1] = shape.S - BLOCK_SIZE * (nb - 1)
        actual = float(torch.einsum("i,hij,j->", tokens, keep[0].double(), tokens)) / (shape.H * shape.S**2)
        words = pack_block_mask(keep).to(device)
        level_index = torch.zeros(steps, shape.H, dtype=torch.int64, device=device)
        timestep = torch.full((shape.B,), 500.0, device=device)
        step_times = torch.linspace(990.0, 10.0, steps, device=device)  # the picked step does not change the time
        step_masks = torch.ops.scaling_compiler.step_masks
        if direction == BACKWARD:
            return actual, time_fn(_sparse_backward(q, k, v, step_masks(words, level_index, timestep, step_times),
                                                    scale, implementation))
        if Implementation(implementation) is device_implementation(q.device):
            op = torch.ops.scaling_compiler.block_sparse_attention
        else:
            from .kernels import dispatch
            op = lambda q, k, v, w, s: dispatch.block_sparse_attention(q, k, v, w, s, implementation=implementation)
        return actual, time_fn(lambda: op(q, k, v, step_masks(words, level_index, timestep, step_times), scale))

    return measure


def _upstream_grad(out: torch.Tensor) -> torch.Tensor:
    """A fixed random gradient of the output (the same for the dense and the sparse timer)."""
    g = torch.Generator(device=out.device).manual_seed(0)
    return torch.randn(out.shape, generator=g, device=out.device, dtype=out.dtype)


def _dense_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> Callable[[], object]:
    """SDPA's backward alone, repeatable: the forward's graph is kept (`retain_graph`)."""
    import torch.nn.functional as F

    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    grad_out = _upstream_grad(out)
    return lambda: torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True)


def _sparse_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: torch.Tensor, scale: float,
                     implementation: str) -> Callable[[], object]:
    """The op's backward alone on its forward's out / lse: the backward op where `implementation` is
    the one it picks for these inputs, else dispatch forced to it."""
    from .kernels import dispatch

    out, lse = dispatch.block_sparse_attention(q, k, v, masks, scale)
    grad_out = _upstream_grad(out)
    if Implementation(implementation) is implementation_for(q, k, v):
        op = torch.ops.scaling_compiler.block_sparse_attention_backward
        return lambda: op(grad_out, None, q, k, v, out, lse, masks, scale)
    return lambda: dispatch.block_sparse_attention_backward(q, k, v, out, lse, grad_out, masks, scale,
                                                            implementation=implementation)


def _cuda_time_ms(fn: Callable[[], object], rounds: int = 3, min_round_ms: float = 20.0) -> float:
    """Median over `rounds` of the mean time per call of back-to-back calls (CUDA events)."""
    def timed(reps: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / reps

    for _ in range(3):  # compile, autotune, warm caches
        fn()
    torch.cuda.synchronize()
    reps = max(5, min(500, int(min_round_ms / max(timed(3), 1e-3))))
    return sorted(timed(reps) for _ in range(rounds))[rounds // 2]


def write_committed_table(out_dir: Path, implementations: Iterable[str] | None = None,
                          directions: Iterable[str] = (FORWARD, BACKWARD)) -> Path:
    """Measure this GPU's rows (every Triton implementation it runs, in each direction; SDPA in
    each direction) and write them to `out_dir/<gpu>.json` (merged
    with rows already there)."""
    device = torch.device("cuda", torch.cuda.current_device())
    gpu = torch.cuda.get_device_name(device)
    if implementations is None:
        own = device_implementation(device)
        implementations = [own.value] + ([Implementation.TRITON_POINTER.value]
                                         if own is Implementation.TRITON_TMA else [])
    rows: list[dict] = []
    fitted = []
    for direction in directions:
        measure = op_timer(device, direction=direction)
        own = list(implementations)
        for i, implementation in enumerate(own):
            rows += measure_rows(implementation, direction, measure, dense=i == 0)
        fitted += [(implementation, direction) for implementation in own]
    path = write_table(Path(out_dir) / f"{slug(gpu)}.json", rows, {**environment(gpu), "how": "cost_model --write"})
    for implementation, direction in fitted:
        log.info("%s %s: %s", implementation, direction, CostModel.from_table(path, implementation, direction))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scaling_compiler.cost_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", metavar="DIR", required=True,
                        help="measure this GPU and write DIR/<gpu>.json (e.g. scaling_compiler/cost_tables/)")
    parser.add_argument("--implementations", help="comma-separated (default: the GPU's own, plus "
                        "triton_pointer on a TMA GPU)")
    parser.add_argument("--directions", default=f"{FORWARD},{BACKWARD}", help="comma-separated (default: both)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    implementations = args.implementations.split(",") if args.implementations else None
    log.info("wrote %s", write_committed_table(Path(args.write), implementations, args.directions.split(",")))


if __name__ == "__main__":
    main()
