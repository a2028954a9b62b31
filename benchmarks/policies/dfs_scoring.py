"""Cost of one DFSAttn refresh step at the Wan2.1-1.3B 480p self-attention shape, against the attention.

    python -m benchmarks.policies.dfs_scoring                              # GPU: B=1 and B=2, bf16 (about 35 s on an H100)
    python -m benchmarks.policies.dfs_scoring --batches 1                  # B=1 only
    python -m benchmarks.policies.dfs_scoring --quick --out-dir /tmp/dfsq  # tiny shapes on the CPU: checks the flow

Shape: H=12, S=32,760 tokens (token grid 21 x 30 x 52 after patchify), D=128, bf16, random q, k, v
(the costs timed here do not depend on the values). Timed per batch size, with the code the
compiled graph runs (eager here):
  (a) reorder: the Hilbert gather of q, k, v along the sequence and the inverse gather of the
      output (`torch.index_select`, as `passes/reorder.py` emits; inductor may fuse these into
      neighbouring kernels, so eager gathers are an upper bound). Paid on every step, not only
      on refreshes.
  (b) scores: `block_scores(q, k)` on the rows the refresh scores.
  (c) top-k + pack: `MaskCache.masks_for` on a refresh step with the scores precomputed (what a
      refresh does after scoring: `topk_block_mask`, `pack_block_mask`, the density read-back).
  (d) refresh: one callable of (a) around `DFSRegistry.masks` on a refresh step, the call
      `torch.ops.scaling_compiler.dfs_attention` makes (step lookup and host syncs included).
  (e) our sparse kernel on those masks (`block_sparse_attention`, autotuned, as the op calls it)
      and dense SDPA (cuDNN if available, else torch's default).
`lookup_ms` is `DFSRegistry.masks` on a non-refresh sparse step (the step read-back alone).
Keep ratios are the schedule's (0.3, 0.2, 0.1 at refresh steps 12, 24, 36). At B=2 the batch is
timed both as CFG halves sharing masks (the backend's default for an even batch: only the cond
half is scored) and without that reuse.

Times: `triton.testing.do_bench` medians in ms on the GPU; medians of `--reps` perf_counter
calls on the CPU (--quick: H=2, 1,000 tokens, D=64, fp32, one thread, no Triton kernel). The run also
checks `block_scores` on the device against `block_scores_reference` (float64) at 1 x 2 x 8,190
tokens for fp32 and bf16 inputs (and fp32 with TF32 matmuls allowed). Results: a table on stdout
and benchmarks/results/dfs_scoring_<device>_<date>[_quick].json.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from tabulate import tabulate

from benchmarks.common import RESULTS_DIR, cudnn_first, one_thread
from scaling_compiler.cost_model import slug
from scaling_compiler.policies.dfsattn.registry import DFSRegistry
from scaling_compiler.policies.dfsattn.schedule import DFSSchedule, MaskCache
from scaling_compiler.policies.dfsattn.scoring import block_scores, block_scores_reference, topk_block_mask
from scaling_compiler.policies.token_order import TokenOrder, inverse_permutation, sequence_order
from scaling_compiler.sites import Pattern, Site, SiteKind

SAMPLER_STEPS = 50
TIMESTEP_MAX = 1000.0
SITE_NAME = "blocks.1.attn1"


@dataclasses.dataclass(frozen=True)
class Shape:
    heads: int
    grid: tuple[int, int, int]  # (frames, height, width) of the video tokens
    head_dim: int
    dtype: torch.dtype

    @property
    def tokens(self) -> int:
        return math.prod(self.grid)


WAN_1_3B_480P = Shape(12, (21, 30, 52), 128, torch.bfloat16)  # 32,760 tokens
TINY = Shape(2, (5, 10, 20), 64, torch.float32)  # --quick: 1,000 tokens (tail tile and tail block)
CHECK_SHAPE = (1, 2, 8190, 128)  # (B, H, S, D) of the accuracy check: 8190 = 63 * 128 + 126 = 511 * 16 + 14
CHECK_SHAPE_QUICK = (1, 2, 1000, 64)


# ---------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Timer:
    cuda: bool
    reps: int  # CPU: timed calls per median
    warmup_ms: int = 25  # GPU: do_bench's budgets
    rep_ms: int = 100

    def __call__(self, fn: Callable[[], Any]) -> float:
        """Median milliseconds of one call of `fn`."""
        fn()  # compile / autotune / allocate outside the timing
        if self.cuda:
            import triton

            torch.cuda.synchronize()
            return triton.testing.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median")
        times = []
        for _ in range(self.reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    def describe(self) -> str:
        if self.cuda:
            return f"triton.testing.do_bench median (warmup {self.warmup_ms} ms, rep {self.rep_ms} ms)"
        return f"median of {self.reps} perf_counter calls"


# ---------------------------------------------------------------------------------------
# The pieces of a refresh step
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class Setup:
    """Tensors and DFSAttn state of one batch size."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor  # stands for the attention output that the inverse gather reads
    perm: torch.Tensor
    inverse: torch.Tensor
    scale: float
    site: Site
    schedule: DFSSchedule
    step_timesteps: list[float]


def make_setup(shape: Shape, batch: int, device: str, seed: int = 0) -> Setup:
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v, out = (torch.randn(batch, shape.heads, shape.tokens, shape.head_dim, generator=g, device=device,
                                dtype=shape.dtype) for _ in range(4))
    perm = sequence_order(shape.tokens, shape.grid, (), TokenOrder.HILBERT)
    scale = shape.head_dim ** -0.5
    site = Site(
        name=SITE_NAME, pattern=Pattern.SDPA, kind=SiteKind.SELF, batch=batch, heads=shape.heads,
        kv_heads=shape.heads, q_len=shape.tokens, kv_len=shape.tokens, head_dim=shape.head_dim, dtype=shape.dtype,
        device=torch.device(device), q_stride=q.stride(), scale=scale, attn_mask=None, key_padding=False,
        is_causal=False, dropout_p=0.0, token_grid=shape.grid, grid_source="benchmark", text_spans=(),
        token_order=TokenOrder.HILBERT.value)
    step_timesteps = [TIMESTEP_MAX * (1 - (i + 0.5) / SAMPLER_STEPS) for i in range(SAMPLER_STEPS)]
    return Setup(q, k, v, out, perm.to(device), inverse_permutation(perm).to(device), scale, site,
                 DFSSchedule(num_steps=SAMPLER_STEPS, dense_layers=()), step_timesteps)


def reorder(s: Setup) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a): q, k, v gathered into Hilbert order and the output gathered back, as the reorder pass does."""
    q, k, v = (x.index_select(2, s.perm) for x in (s.q, s.k, s.v))
    return q, k, v, s.out.index_select(2, s.inverse)


def scored_rows(batch: int, cfg_reuse: bool) -> slice:
    """The batch rows a refresh scores: the cond half of a CFG batch whose halves share masks."""
    return slice(0, batch // 2) if cfg_reuse else slice(0, batch)


def refresh_steps(schedule: DFSSchedule) -> dict[float, int]:
    """keep ratio -> the plan's refresh step that uses it."""
    return {p.keep_ratio: p.step for p in schedule.plan() if p.refresh}


def time_topk_pack(s: Setup, scores: torch.Tensor, cfg_reuse: bool, step: int, timer: Timer) -> float:
    """(c): `MaskCache.masks_for` on a refresh step, scores precomputed; reset first so it recomputes."""
    cache = MaskCache(s.schedule, [s.site], SAMPLER_STEPS, cfg_batch=cfg_reuse)

    def call() -> torch.Tensor:
        cache.reset()
        return cache.masks_for(SITE_NAME, step, lambda rows: scores[rows])

    return timer(call)


def new_registry(s: Setup, cfg_reuse: bool) -> DFSRegistry:
    return DFSRegistry(s.schedule, [s.site], s.step_timesteps, cfg_batch=cfg_reuse)


def timestep_of(s: Setup, step: int) -> torch.Tensor:
    return torch.tensor([s.step_timesteps[step]], device=s.q.device)


def time_refresh(s: Setup, registry: DFSRegistry, step: int, timer: Timer) -> tuple[float, torch.Tensor]:
    """(d): reorder + `DFSRegistry.masks` on a refresh step + inverse gather; returns (ms, packed masks)."""
    timestep = timestep_of(s, step)

    def call() -> torch.Tensor:
        registry.reset()  # the registry would otherwise reuse this step's masks
        q, k, _, _ = reorder(s)  # all four gathers of (a), as the graph runs them around the op
        return registry.masks(SITE_NAME, timestep, q, k, s.scale)

    ms = timer(call)
    return ms, call()


def time_lookup(s: Setup, registry: DFSRegistry, step: int, timer: Timer) -> float:
    """`DFSRegistry.masks` on the sparse step after a refresh: the step read-back and cache lookup."""
    registry.reset()
    registry.masks(SITE_NAME, timestep_of(s, step), s.q, s.k, s.scale)
    timestep = timestep_of(s, step + 1)
    return timer(lambda: registry.masks(SITE_NAME, timestep, s.q, s.k, s.scale))


# ---------------------------------------------------------------------------------------
# Attention for scale
# ---------------------------------------------------------------------------------------
def time_dense(s: Setup, timer: Timer) -> tuple[float, str]:
    """Dense SDPA, cuDNN first in torch's priority order on the GPU."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with cudnn_first(s.q.device.type):
        return timer(lambda: sdpa(s.q, s.k, s.v, scale=s.scale)), "cudnn first" if s.q.is_cuda else "default (CPU)"


def time_sparse(s: Setup, words: torch.Tensor, timer: Timer) -> float | None:
    """Our kernel as the op calls it (autotuned, mask decode included); None without CUDA."""
    if not s.q.is_cuda:
        return None
    from scaling_compiler.kernels.dispatch import block_sparse_attention

    return timer(lambda: block_sparse_attention(s.q, s.k, s.v, words, s.scale))


# ---------------------------------------------------------------------------------------
# One batch size
# ---------------------------------------------------------------------------------------
def measure_batch(shape: Shape, batch: int, device: str, timer: Timer) -> list[dict[str, Any]]:
    """Rows (one per CFG mode and keep ratio) for one batch size."""
    s = make_setup(shape, batch, device)
    shared = {"reorder_ms": timer(lambda: reorder(s)), "sparse_ms": {}}
    shared["dense_ms"], shared["dense_backend"] = time_dense(s, timer)
    rows = []
    for cfg_reuse in ([True, False] if batch % 2 == 0 else [False]):
        rows += measure_cfg_mode(s, cfg_reuse, shared, timer)
    return rows


def measure_cfg_mode(s: Setup, cfg_reuse: bool, shared: dict[str, Any], timer: Timer) -> list[dict[str, Any]]:
    """Rows of one CFG mode, one per refresh step's keep ratio. `shared` holds the times that do not
    depend on the mode; sparse times are filled in per keep ratio by the first mode."""
    rows_scored = scored_rows(s.q.shape[0], cfg_reuse)
    q, k, _, _ = reorder(s)
    scores_ms = timer(lambda: block_scores(q[rows_scored], k[rows_scored], s.scale))
    scores = block_scores(q, k, s.scale)
    registry = new_registry(s, cfg_reuse)
    steps = refresh_steps(s.schedule)
    lookup_ms = time_lookup(s, registry, min(steps.values()), timer)
    rows = []
    for keep, step in steps.items():
        topk_ms = time_topk_pack(s, scores, cfg_reuse, step, timer)
        refresh_ms, words = time_refresh(s, registry, step, timer)
        if keep not in shared["sparse_ms"]:
            shared["sparse_ms"][keep] = time_sparse(s, words, timer)
        rows.append(make_row(s.q.shape[0], cfg_reuse, keep, step, registry, shared["reorder_ms"], scores_ms,
                             topk_ms, refresh_ms, lookup_ms, shared["sparse_ms"][keep], shared["dense_ms"],
                             shared["dense_backend"]))
        print(format_progress(rows[-1]), flush=True)
    return rows


def make_row(batch: int, cfg_reuse: bool, keep: float, step: int, registry: DFSRegistry, reorder_ms: float,
             scores_ms: float, topk_ms: float, refresh_ms: float, lookup_ms: float, sparse_ms: float | None,
             dense_ms: float, dense_name: str) -> dict[str, Any]:
    sum_abc = reorder_ms + scores_ms + topk_ms
    return {
        "B": batch, "cfg_reuse": cfg_reuse, "keep_ratio": keep, "refresh_step": step,
        "density": registry.cache.refreshes[-1].density,
        "reorder_ms": reorder_ms, "scores_ms": scores_ms, "topk_pack_ms": topk_ms, "sum_abc_ms": sum_abc,
        "refresh_ms": refresh_ms, "lookup_ms": lookup_ms, "sparse_ms": sparse_ms, "dense_ms": dense_ms,
        "dense_backend": dense_name,
        "refresh_pct_of_sparse": _pct(refresh_ms, sparse_ms), "refresh_pct_of_dense": _pct(refresh_ms, dense_ms),
        "sum_abc_pct_of_sparse": _pct(sum_abc, sparse_ms), "sum_abc_pct_of_dense": _pct(sum_abc, dense_ms),
    }


def _pct(part: float, whole: float | None) -> float | None:
    return None if not whole else 100.0 * part / whole


# ---------------------------------------------------------------------------------------
# Accuracy of block_scores on the device
# ---------------------------------------------------------------------------------------
def structured_qk(shape: tuple[int, int, int, int], device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 q, k with a component shared by runs of 32 tokens, so tile means are far from 0 and the
    tile softmax is peaked (logit std ~4), plus token noise."""
    batch, heads, length, dim = shape
    g = torch.Generator(device=device).manual_seed(seed)

    def one() -> torch.Tensor:
        smooth = torch.randn(batch, heads, -(-length // 32), dim, generator=g, device=device)
        noise = torch.randn(batch, heads, length, dim, generator=g, device=device)
        return 2.0 * smooth.repeat_interleave(32, dim=2)[:, :, :length] + 0.5 * noise

    return one(), one()


def check_accuracy(device: str, shape: tuple[int, int, int, int]) -> dict[str, Any]:
    """Max abs error of `block_scores` on `device` against the float64 reference on the same input values."""
    q, k = structured_qk(shape, device)
    scale = shape[3] ** -0.5
    cases = {"fp32": (torch.float32, False), "bf16": (torch.bfloat16, False)}
    if device == "cuda":
        cases["fp32_tf32"] = (torch.float32, True)
    result: dict[str, Any] = {"shape": list(shape), "device": device}
    references: dict[torch.dtype, torch.Tensor] = {}
    for name, (dtype, tf32) in cases.items():
        qd, kd = q.to(dtype), k.to(dtype)
        with allow_tf32(tf32):
            scores = block_scores(qd, kd, scale).cpu().double()
        if dtype not in references:  # the reference sees the same (bf16-rounded) values, upcast to float64
            references[dtype] = block_scores_reference(qd.cpu(), kd.cpu(), scale)
        reference = references[dtype]
        same = topk_block_mask(scores, 0.1) == topk_block_mask(reference, 0.1)
        result[name] = {"max_abs_err": (scores - reference).abs().max().item(),
                        "max_score": reference.max().item(),
                        "topk_0.1_mask_agreement": same.double().mean().item()}
    return result


@contextlib.contextmanager
def allow_tf32(enabled: bool) -> Iterator[None]:
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------
def _f(x: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def format_progress(r: dict[str, Any]) -> str:
    return (f"B={r['B']} cfg_reuse={r['cfg_reuse']} keep={r['keep_ratio']}: refresh {_f(r['refresh_ms'])} ms "
            f"(a {_f(r['reorder_ms'])} + b {_f(r['scores_ms'])} + c {_f(r['topk_pack_ms'])}), "
            f"sparse {_f(r['sparse_ms'])} ms, dense {_f(r['dense_ms'])} ms")


def print_table(payload: dict[str, Any]) -> None:
    rows = [[
        r["B"], "yes" if r["cfg_reuse"] else "no", r["keep_ratio"], _f(r["reorder_ms"]), _f(r["scores_ms"]),
        _f(r["topk_pack_ms"]), _f(r["sum_abc_ms"]), _f(r["refresh_ms"]), _f(r["lookup_ms"]), _f(r["sparse_ms"]),
        _f(r["dense_ms"]), _f(r["refresh_pct_of_sparse"], "{:.1f}%"), _f(r["refresh_pct_of_dense"], "{:.1f}%"),
    ] for r in payload["rows"]]
    headers = ["B", "CFG reuse", "keep", "(a) reorder", "(b) scores", "(c) top-k+pack", "a+b+c", "(d) refresh",
               "lookup", "(e) sparse", "dense", "(d) % sparse", "(d) % dense"]
    shape = payload["shape"]
    print(f"\n{payload['device']}, torch {payload['torch']}, triton {payload['triton']}; H={shape['H']} "
          f"S={shape['S']} D={shape['D']} {shape['dtype']}; ms, {payload['timing']}; dense SDPA: "
          f"{payload['rows'][0]['dense_backend']}")
    print(tabulate(rows, headers=headers))
    check = payload["accuracy"]
    print(f"\nblock_scores on {check['device']} vs float64 reference at {tuple(check['shape'])}: " + ", ".join(
        f"{name} max abs err {v['max_abs_err']:.2e} (top-k 0.1 agreement {v['topk_0.1_mask_agreement']:.4f})"
        for name, v in check.items() if isinstance(v, dict)))


def environment(args: argparse.Namespace, cuda: bool, shape: Shape) -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "triton": triton_version, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "args": vars(args), "quick": args.quick,
        "shape": {"H": shape.heads, "S": shape.tokens, "D": shape.head_dim, "grid": list(shape.grid),
                  "dtype": str(shape.dtype).removeprefix("torch."), "token_order": TokenOrder.HILBERT.value},
        "schedule": {"keep_ratios": list(DFSSchedule().keep_ratios),
                     "refresh_steps": list(refresh_steps(DFSSchedule()).values())},
        "sparse_kernel": "block_sparse_attention(q, k, v, words, scale): autotuned, mask decode included"
                         if cuda else None,
    }


def write_json(payload: dict[str, Any], out_dir: Path) -> Path:
    suffix = "_quick" if payload["quick"] else ""
    path = out_dir / f"dfs_scoring_{slug(payload['device'])}_{payload['date'][:10]}{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes on the CPU, no Triton kernel: checks the flow")
    p.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 2],
                   help="batch sizes, e.g. 1 or 1,2 (default 1,2)")
    p.add_argument("--reps", type=int, default=3, help="CPU: timed calls per median")
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.monotonic()
    cuda = not args.quick
    if cuda and not torch.cuda.is_available():
        raise SystemExit("dfs_scoring.py needs a GPU (use --quick on a CPU)")
    device, shape = ("cuda", WAN_1_3B_480P) if cuda else ("cpu", TINY)
    timer = Timer(cuda, args.reps)
    payload = environment(args, cuda, shape) | {"timing": timer.describe()}
    payload["rows"] = []
    with one_thread(args.quick):
        for batch in args.batches:
            payload["rows"] += measure_batch(shape, batch, device, timer)
            if cuda:
                torch.cuda.empty_cache()
        payload["accuracy"] = check_accuracy(device, CHECK_SHAPE if cuda else CHECK_SHAPE_QUICK)
    payload["elapsed_s"] = round(time.monotonic() - start, 1)
    print_table(payload)
    path = write_json(payload, Path(args.out_dir))
    print(f"wrote {path}")
    payload["path"] = str(path)
    return payload


if __name__ == "__main__":
    main()
