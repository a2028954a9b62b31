"""Benchmark the block-sparse kernel (bf16, and its FP8 variant) against SDPA (cuDNN, flash) and
compiled FlexAttention.

    python -m benchmarks.kernels.block_sparse             # Wan2.1-1.3B 480p and Wan2.1-14B 720p, all densities
    python -m benchmarks.kernels.block_sparse --quick     # 1.3B shape, densities 1.0 / 0.25 / 0.1, random masks
    python -m benchmarks.kernels.block_sparse --compile --shapes wan1.3b-480p   # compile VARIANTS in parallel
    python -m benchmarks.kernels.block_sparse --sweep [--then-bench]  # time VARIANTS at the 1.3B shape
    python -m benchmarks.kernels.block_sparse --dry-run   # tiny shapes on the CPU (interpreter): checks the script

Run from the repository root.

Masks are per-head 128x128 block masks: "random" (each block kept with probability = density)
and "structured" (a 3-D local window over the frame x height x width grid of block centres,
per-head window aspect, plus a few global key blocks; exact density per row). Our kernel and
FlexAttention get the identical mask (``to_flex_block_mask``). The package's FP8 op
(``dispatch.block_sparse_attention_fp8``: the Gluon kernel on Hopper, the autotuned Triton FP8 kernel
on other GPUs and in ``--dry-run``) is timed beside ours on the same bf16 inputs, its
quantisation prep included (``ms_fp8``) and alone (``ms_fp8_quantize``), with its speedup over
ours and its output's relative difference from ours (``fp8_rel_diff``). Times are
``triton.testing.do_bench`` medians in ms; TFLOP/s count 4 * D FLOPs per kept (query, key)
token pair (dense pairs for SDPA). Results go to ``benchmarks/results/kernel_<gpu>_<date>.json``
and the random-mask rows (implementation, direction "forward", shape, kept density, ms; SDPA's
cuDNN time as the dense rows) are merged into the cost model's table
``scaling_compiler/cost_tables/<gpu>.json`` (its small shapes come from
``python -m scaling_compiler.cost_model --write scaling_compiler/cost_tables/``).
"""
import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if "--dry-run" in sys.argv:  # must precede the first Triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from benchmarks.common import result_name  # noqa: E402
from scaling_compiler import cost_model  # noqa: E402
from scaling_compiler.cost_model import slug  # noqa: E402
from scaling_compiler.kernels.bitmask import BLOCK_SIZE, num_blocks, pack_block_mask, to_flex_block_mask  # noqa: E402
from scaling_compiler.kernels.dispatch import Implementation  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MODULE = "benchmarks.kernels.block_sparse"

# name: (B, H, S, D, (frames, height, width) token grid)
SHAPES = {
    "wan1.3b-480p": (1, 12, 32760, 128, (21, 30, 52)),
    "wan14b-720p": (1, 40, 75600, 128, (21, 45, 80)),
    "tiny": (1, 2, 1000, 64, (5, 10, 20)),  # --dry-run
}
DENSITIES = [1.0, 0.5, 0.25, 0.1, 0.05]
# the config our kernel runs in the benchmark tables (chosen by --sweep on an H100)
BENCH_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 5}

# --sweep variants: name -> (config, use_tma, lpt_order)
VARIANTS = {  # ordered from safe to risky: a hang or crash loses only the variants after it
    "tma_m128n64_w8_s3": ({"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}, True, True),
    "tma_m128n64_w8_s5": ({"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 5}, True, True),
    "tma_m128n64_w8_s7": ({"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 7}, True, True),
    "tma_m128n64_w8_s3_r128": ({"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3, "maxnreg": 128},
                               True, True),
    "tma_m128n128_w8_s3": ({"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}, True, True),
    "ptr_m128n128_w8_s3": ({"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}, False, True),
    "ptr_m128n64_w8_s5": ({"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 5}, False, True),
    "tma_m128n64_w8_s5_nolpt": ({"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 5}, True, False),
    "tma_m64n64_w4_s3": ({"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}, True, True),
    "tma_m64n64_w4_s5": ({"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 5}, True, True),
    "tma_m128n128_w8_s5": ({"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 5}, True, True),
    "tma_m64n128_w4_s3": ({"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3}, True, True),
}


# ----------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------
def random_mask(H, nq, nk, density, seed=0, device="cpu"):
    if density >= 1.0:
        return torch.ones(H, nq, nk, dtype=torch.bool, device=device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.rand(H, nq, nk, generator=g) < density).to(device)


def structured_mask(H, S, grid, density, n_global=2, seed=0, device="cpu"):
    """3-D local window over block centres (frame, row, col), per-head aspect, plus global key blocks.

    Each query block keeps its ``round(density * Nk)`` nearest key blocks under a per-head
    scaled max-norm, after the ``n_global`` global key blocks (evenly spaced), so every row has
    the same exact count.
    """
    nb = num_blocks(S)
    if density >= 1.0:
        return torch.ones(H, nb, nb, dtype=torch.bool, device=device)
    F, Hh, W = grid
    centre = (torch.arange(nb) * BLOCK_SIZE + BLOCK_SIZE // 2).clamp(max=S - 1)
    pos = torch.stack([centre // (Hh * W), (centre // W) % Hh, centre % W], -1).float()  # (nb, 3)
    g = torch.Generator().manual_seed(seed)
    # per-head aspect: how far the window reaches in frames vs rows vs columns
    aspect = torch.exp(torch.randn(H, 3, generator=g) * 0.7) * torch.tensor([1.0, Hh / F, W / F])
    diff = (pos[:, None, :] - pos[None, :, :]).abs()  # (nq, nk, 3)
    dist = (diff[None] / aspect[:, None, None, :]).amax(-1)  # (H, nq, nk)
    glob = torch.linspace(0, nb - 1, n_global).round().long()
    dist[:, :, glob] = -1.0  # global blocks first
    keep = max(1, round(density * nb))
    idx = dist.topk(keep, dim=-1, largest=False).indices
    mask = torch.zeros(H, nb, nb, dtype=torch.bool)
    mask.scatter_(-1, idx, True)
    return mask.to(device)


def kept_flops(mask, S, D, B=1):
    """4 * D FLOPs per kept (query, key) token pair, counting partial tail blocks exactly."""
    nb = num_blocks(S)
    tokens = torch.full((nb, ), BLOCK_SIZE, dtype=torch.float64)
    tokens[-1] = S - (nb - 1) * BLOCK_SIZE
    m = mask.to(torch.float64).cpu()
    pairs = (tokens[None, :, None] * m * tokens[None, None, :]).sum().item()
    return 4.0 * D * B * pairs


# ----------------------------------------------------------------------------------------------
# Timing helpers
# ----------------------------------------------------------------------------------------------
def bench(fn, dry_run=False, reps=None):
    """Median ms of ``fn``: ``triton.testing.do_bench`` (at least 8 calls), or with ``reps`` the
    median of that many CUDA-event-timed calls after one warm-up (calls of a second or more)."""
    if dry_run:  # the interpreter has no do_bench: one timed call
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton
    fn()
    torch.cuda.synchronize()
    if reps is None:
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def gpu_name():
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def env_info():
    import triton
    return {
        "gpu": gpu_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def make_qkv(shape, dtype, device, seed=0):
    B, H, S, D, _ = SHAPES[shape]
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(B, H, S, D, generator=g, device=device, dtype=dtype) for _ in range(3)]


def sdpa_times(q, k, v, scale):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    F = torch.nn.functional
    res = {}
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                res[name] = bench(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale))
        except RuntimeError as e:  # backend unavailable
            print(f"sdpa {name}: {e}", flush=True)
            res[name] = None
    return res


# ----------------------------------------------------------------------------------------------
# Main benchmark
# ----------------------------------------------------------------------------------------------
def run_benchmark(args):
    from scaling_compiler.kernels import dispatch
    from scaling_compiler.kernels.triton.block_sparse_attention import (block_sparse_attention, decode_mask,
                                                                        prepare_block_lists)
    from scaling_compiler.kernels.triton.block_sparse_attention_fp8 import block_sparse_attention_fp8, quantize

    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    dtype = torch.float32 if dry else torch.bfloat16  # the interpreter's bf16 arithmetic is wrong
    config = json.loads(args.config) if args.config else dict(BENCH_CONFIG)
    flags = {"use_tma": config.pop("use_tma", None), "lpt_order": config.pop("lpt_order", True)}
    variant = config.pop("variant", None)
    if dry:
        shapes, densities, kinds = ["tiny"], [1.0, 0.25], ["random", "structured"]
    elif args.quick:
        shapes, densities, kinds = ["wan1.3b-480p"], [1.0, 0.25, 0.1], ["random"]
    else:
        shapes, densities, kinds = ["wan1.3b-480p", "wan14b-720p"], DENSITIES, ["random", "structured"]
    if args.shapes:
        shapes = args.shapes.split(",")
    if args.densities:
        densities = [float(d) for d in args.densities.split(",")]

    flex = None
    if not dry:
        from torch.nn.attention.flex_attention import flex_attention
        flex = torch.compile(flex_attention, dynamic=False)

    rows = []
    info = env_info()
    for shape in shapes:
        B, H, S, D, grid = SHAPES[shape]
        scale = 1.0 / math.sqrt(D)
        q, k, v = make_qkv(shape, dtype, device)
        dense_flops = 4.0 * D * B * H * S * S
        dense = {"cudnn": None, "flash": None} if dry else sdpa_times(q, k, v, scale)
        print(f"[{shape}] sdpa cudnn {dense['cudnn']} ms, flash {dense['flash']} ms", flush=True)
        nb = num_blocks(S)
        implementation = _implementation(q, k, v, flags["use_tma"])
        fp8_inputs = [t.half() for t in (q, k, v)] if dry else (q, k, v)  # the FP8 path takes fp16/bf16
        # the package's FP8 op on a GPU (Gluon on Hopper, its prep with v^T's keys permuted); the Triton kernel dry
        fp8_op = block_sparse_attention_fp8 if dry else dispatch.block_sparse_attention_fp8
        gluon_fp8 = not dry and dispatch.gluon_fp8_reason(*fp8_inputs) is None
        t_quantize = bench(lambda: quantize(*fp8_inputs, permute_value_keys=gluon_fp8), dry)
        for kind in kinds:
            for density in densities:
                mask = (random_mask(H, nb, nb, density, seed=1) if kind == "random" else structured_mask(
                    H, S, grid, density, seed=1))
                words = pack_block_mask(mask).to(device)
                flops = kept_flops(mask, S, D, B)
                t_ours = bench(lambda: block_sparse_attention(q, k, v, words, scale, config, **flags), dry)
                lists = prepare_block_lists(words, S, flags["lpt_order"])
                t_kernel = bench(lambda: block_sparse_attention(q, k, v, words, scale, config, block_lists=lists,
                                                                **flags), dry)
                t_decode = bench(lambda: decode_mask(words, nb), dry)
                t_fp8 = bench(lambda: fp8_op(*fp8_inputs, words, scale), dry)
                fp8_diff = _relative_difference(fp8_op(*fp8_inputs, words, scale),
                                                block_sparse_attention(q, k, v, words, scale, config, **flags)[0])
                t_flex = None
                if flex is not None:
                    bm = to_flex_block_mask(mask.to(device), S, S)
                    try:
                        t_flex = bench(lambda: flex(q, k, v, block_mask=bm, scale=scale))
                    except Exception as e:  # noqa: BLE001 - report and go on
                        print(f"flex failed: {e}", flush=True)
                row = {
                    "implementation": implementation, "direction": cost_model.FORWARD,
                    "shape": shape, "B": B, "H": H, "S": S, "D": D, "mask": kind,
                    "density": density, "density_actual": mask.float().mean().item(),
                    "ms_ours": t_ours, "ms_ours_kernel": t_kernel, "ms_decode": t_decode, "ms_flex": t_flex,
                    "ms_cudnn": dense["cudnn"], "ms_flash": dense["flash"],
                    "ms_fp8": t_fp8, "ms_fp8_quantize": t_quantize, "fp8_speedup": t_ours / t_fp8,
                    "fp8_rel_diff": fp8_diff,
                    "tflops_ours": flops / t_ours / 1e9, "tflops_fp8": flops / t_fp8 / 1e9,
                    "tflops_flex": flops / t_flex / 1e9 if t_flex else None,
                    "tflops_cudnn_dense": dense_flops / dense["cudnn"] / 1e9 if dense["cudnn"] else None,
                    "ideal_ms": density * dense["cudnn"] if dense["cudnn"] else None,
                }
                rows.append(row)
                print(_fmt_row(row), flush=True)
                del words
        del q, k, v
        if not dry:
            torch.cuda.empty_cache()

    print_table(rows)
    result = {**info, "config": config, **flags, "variant": variant, "rows": rows}
    out_dir = Path(args.out_dir) if args.out_dir else ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    name = result_name("kernel", info, dry)
    (out_dir / name).write_text(json.dumps(result, indent=1))
    print(f"wrote {out_dir / name}")
    write_cost_table(rows, info, config, args)


def _relative_difference(out_fp8, out_ours):
    """||fp8 - ours|| / ||ours|| over the whole output (a sanity check beside the timings)."""
    return ((out_fp8.float() - out_ours.float()).norm() / out_ours.float().norm().clamp_min(1e-30)).item()


def _fmt(x, f="{:.3f}"):
    return "-" if x is None else f.format(x)


def _fmt_row(r):
    sp_flex = r["ms_flex"] / r["ms_ours"] if r["ms_flex"] else None
    sp_cudnn = r["ms_cudnn"] / r["ms_ours"] if r["ms_cudnn"] else None
    return (f"{r['shape']:>13} {r['mask']:>10} {r['density']:>5.2f} | ours {_fmt(r['ms_ours'])} ms "
            f"(kernel {_fmt(r['ms_ours_kernel'])}) "
            f"({_fmt(r['tflops_ours'], '{:.0f}')} TF/s) | fp8 {_fmt(r['ms_fp8'])} ms "
            f"(quantize {_fmt(r['ms_fp8_quantize'])}, x ours {_fmt(r['fp8_speedup'], '{:.2f}')}, "
            f"diff {_fmt(r['fp8_rel_diff'], '{:.1e}')}) | flex {_fmt(r['ms_flex'])} ms "
            f"({_fmt(r['tflops_flex'], '{:.0f}')}) | cudnn {_fmt(r['ms_cudnn'])} flash {_fmt(r['ms_flash'])} | "
            f"x flex {_fmt(sp_flex, '{:.2f}')} x cudnn {_fmt(sp_cudnn, '{:.2f}')} | ideal {_fmt(r['ideal_ms'])}")


def print_table(rows):
    hdr = ("| shape | mask | density | ours ms | ours kernel-only ms | ours TFLOP/s (kept) | fp8 ms | fp8 quantize ms "
           "| fp8 vs ours | fp8 rel. diff | flex ms | flex TFLOP/s | cuDNN ms (dense) "
           "| flash ms (dense) | ours vs flex | ours vs cuDNN | ideal ms (density x cuDNN) |")
    print(hdr)
    print("|" + "|".join(["---"] * (hdr.count("|") - 1)) + "|")
    for r in rows:
        sp_flex = r["ms_flex"] / r["ms_ours"] if r["ms_flex"] else None
        sp_cudnn = r["ms_cudnn"] / r["ms_ours"] if r["ms_cudnn"] else None
        print(f"| {r['shape']} | {r['mask']} | {r['density']:.2f} | {_fmt(r['ms_ours'])} | {_fmt(r['ms_ours_kernel'])} | "
              f"{_fmt(r['tflops_ours'], '{:.0f}')} | {_fmt(r['ms_fp8'])} | {_fmt(r['ms_fp8_quantize'])} | "
              f"{_fmt(r['fp8_speedup'], '{:.2f}x')} | {_fmt(r['fp8_rel_diff'], '{:.1e}')} | "
              f"{_fmt(r['ms_flex'])} | {_fmt(r['tflops_flex'], '{:.0f}')} | "
              f"{_fmt(r['ms_cudnn'])} | {_fmt(r['ms_flash'])} | {_fmt(sp_flex, '{:.2f}x')} | "
              f"{_fmt(sp_cudnn, '{:.2f}x')} | {_fmt(r['ideal_ms'])} |")


def _implementation(q, k, v, use_tma):
    """What the launcher runs with this ``use_tma`` flag (None: the device's choice, as dispatch makes it)."""
    from scaling_compiler.kernels import dispatch
    from scaling_compiler.kernels.triton.block_sparse_attention import tma_layout_ok

    if use_tma is None:  # the launcher's default: TMA on a GPU that has it (and in the interpreter)
        use_tma = q.device.type != "cuda" or dispatch.device_implementation(q.device) is Implementation.TRITON_TMA
    tma = use_tma and tma_layout_ok(k, v)
    return (Implementation.TRITON_TMA if tma else Implementation.TRITON_POINTER).value


def write_cost_table(rows, info, config, args):
    """Merge the random-mask rows (our kernel, the FP8 kernel with its prep, and cuDNN as the dense rows)
    into the cost table."""
    table_rows = []
    dtype = "float32" if args.dry_run else "bfloat16"  # as run_benchmark runs them
    for r in rows:
        if r["mask"] != "random":
            continue
        shape = cost_model.Shape(r["shape"], r["B"], r["H"], r["S"], r["D"])
        table_rows.append(cost_model.row(r["implementation"], r["direction"], shape, r["density_actual"],
                                         r["ms_ours"], dtype, kernel_config=config, source=MODULE))
        if r["ms_fp8"] is not None:  # with the 16-bit op's time of the same run: the FP8 model is relative to it
            table_rows.append(cost_model.row(cost_model.FP8, r["direction"], shape, r["density_actual"], r["ms_fp8"],
                                             dtype, versus=r["implementation"], versus_ms=r["ms_ours"], source=MODULE))
        if r["ms_cudnn"] is not None and not any(t["implementation"] == cost_model.DENSE and t["shape"] == r["shape"]
                                                 for t in table_rows):
            table_rows.append(cost_model.row(cost_model.DENSE, r["direction"], shape, 1.0, r["ms_cudnn"], dtype,
                                             backend="cudnn", source=MODULE))
    merge_cost_rows(table_rows, info, args.dry_run, args.cost_dir)


def merge_cost_rows(table_rows, info, dry_run, cost_dir=None):
    """Merge ``cost_model.row`` rows into ``<cost_dir>/<gpu>.json`` (default: the committed tables;
    a dry run writes ``<gpu>_dry.json``); rows of other keys already there are kept."""
    if not table_rows:
        return None
    out_dir = Path(cost_dir) if cost_dir else ROOT / "scaling_compiler" / "cost_tables"
    path = out_dir / f"{slug(info['gpu'])}{'_dry' if dry_run else ''}.json"
    env = {**cost_model.environment(info["gpu"]), "date": info["date"]}
    cost_model.write_table(path, table_rows, env)
    print(f"wrote {path}")
    return path


# ----------------------------------------------------------------------------------------------
# Tuning sweep. Device time is scarce, so one session does: --compile (all variants in parallel
# processes, on a small problem with the same integer specialisation as the 1.3B shape:
# S % 16 = 8, S % 128 = 120, Nq % 16 = 0; plus one flex_attention call per shape to fill
# inductor's cache), then --sweep (one process times every variant, under a timeout, riskiest
# last), then optionally the benchmark with the fastest correct variant (--then-bench).
# ----------------------------------------------------------------------------------------------
def _variant_call(name, q, k, v, words, scale):
    from scaling_compiler.kernels.triton import block_sparse_attention as bsa
    config, use_tma, lpt = VARIANTS[name]
    return lambda: bsa.block_sparse_attention(q, k, v, words, scale, config, use_tma=use_tma, lpt_order=lpt)


def compile_one_variant(name):
    # 2040 specialises like 32760 (S % 16 = 8, S % 128 = 120), 2128 like 75600 (S % 16 = 0, S % 128 = 80)
    for H, S in ((12, 2040), (40, 2128)):
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, H, S, 128, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        words = pack_block_mask(random_mask(H, num_blocks(S), num_blocks(S), 0.5)).cuda()
        _variant_call(name, q, k, v, words, 0.1)()
        torch.cuda.synchronize()


def warm_flex(shape):
    from torch.nn.attention.flex_attention import flex_attention
    B, H, S, D, _ = SHAPES[shape]
    q, k, v = make_qkv(shape, torch.bfloat16, "cuda")
    bm = to_flex_block_mask(random_mask(H, num_blocks(S), num_blocks(S), 0.1).cuda(), S, S)
    torch.compile(flex_attention, dynamic=False)(q, k, v, block_mask=bm, scale=1 / math.sqrt(D))
    torch.cuda.synchronize()


def run_compile(args):
    names = args.variants.split(",") if args.variants else list(VARIANTS)
    me = [sys.executable, "-m", MODULE]
    jobs = [(n, me + ["--compile-variant", n]) for n in names]
    jobs += [(f"flex:{s}", me + ["--warm-flex", s]) for s in (args.shapes.split(",") if args.shapes else [])]
    t0 = time.time()

    def go(job):
        name, cmd = job
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.compile_timeout, cwd=ROOT)
            return name, p.returncode, (p.stdout + p.stderr)[-1500:]
        except subprocess.TimeoutExpired:
            return name, "timeout", ""

    with ThreadPoolExecutor(max_workers=min(len(jobs), 14)) as ex:
        for name, rc, tail in ex.map(go, jobs):
            print(f"compile {name}: rc={rc} ({time.time() - t0:.0f}s)" + (f"\n{tail}" if rc != 0 else ""), flush=True)


def time_variants(args):
    """One process, every variant: spot-check correctness, time at the densities, print RESULT lines."""
    from scaling_compiler.kernels.triton import block_sparse_attention as bsa
    names = args.variants.split(",") if args.variants else list(VARIANTS)
    B, H, S, D, _ = SHAPES["wan1.3b-480p"]
    scale = 1.0 / math.sqrt(D)
    q, k, v = make_qkv("wan1.3b-480p", torch.bfloat16, "cuda")
    nb = num_blocks(S)
    densities = [float(d) for d in (args.densities or "0.1,1.0").split(",")]
    masks = {d: random_mask(H, nb, nb, d, seed=1) for d in densities}
    words = {d: pack_block_mask(m).cuda() for d, m in masks.items()}
    # reference rows: query blocks 0 and 1 of every head, float32 math
    rows = torch.arange(0, 2 * BLOCK_SIZE, device="cuda")
    refs = {}
    for d, m in masks.items():
        tok = m[:, :2].repeat_interleave(BLOCK_SIZE, 1).repeat_interleave(BLOCK_SIZE, 2)[..., :S].cuda()
        s = (q[0, :, rows].float() @ k[0].float().transpose(-1, -2)) * scale
        refs[d] = torch.softmax(s.masked_fill(~tok, float("-inf")), -1).nan_to_num(0.0) @ v[0].float()
    for name in names:
        config, use_tma, lpt = VARIANTS[name]
        res = {"variant": name, "config": config, "use_tma": use_tma, "lpt_order": lpt}
        try:
            for d in densities:
                fn = _variant_call(name, q, k, v, words[d], scale)
                out, _ = fn()
                res[f"err@{d}"] = ((out[0, :, rows].float() - refs[d]).norm() / refs[d].norm()).item()
                t = bench(fn)
                res[f"ms@{d}"] = t
                res[f"tflops@{d}"] = kept_flops(masks[d], S, D, B) / t / 1e9
            res.update(_kernel_resources(bsa._attn_fwd))
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: report, go on
            res["error"] = repr(e)[:300]
        print("RESULT " + json.dumps(res), flush=True)
    t = bench(lambda: bsa.decode_mask(words[densities[0]], nb))
    print("RESULT " + json.dumps({"variant": "decode_mask_only", f"ms@{densities[0]}": t}), flush=True)


def _kernel_resources(jit_fn):
    """Registers, spills, shared memory and PTX instruction counts of the last compiled kernel."""
    out = {}
    try:
        kern = None
        for cache in jit_fn.device_caches.values():
            for kern in cache[0].values():
                pass
        if kern is not None:
            ptx = kern.asm.get("ptx", "")
            out = {
                "n_regs": kern.n_regs, "n_spills": kern.n_spills, "shared": kern.metadata.shared,
                "ptx_wgmma": ptx.count("wgmma.mma_async"), "ptx_tma_loads": ptx.count("cp.async.bulk.tensor"),
                "ptx_mma_sync": ptx.count("mma.sync"), "ptx_ex2": ptx.count("ex2.approx"),
            }
    except Exception as e:  # noqa: BLE001 - introspection is best effort
        out["introspection_error"] = repr(e)[:200]
    return out


def run_sweep(args):
    densities = (args.densities or "0.1,1.0").split(",")
    cmd = [sys.executable, "-m", MODULE, "--time-variants"]
    cmd += (["--variants", args.variants] if args.variants else []) + ["--densities", ",".join(densities)]
    log = Path(args.out_dir or "/tmp") / "sweep_timing.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            p.wait(timeout=args.variant_timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            print("sweep timed out: keeping the variants timed so far", flush=True)
    results = [json.loads(ln[7:]) for ln in log.read_text().splitlines() if ln.startswith("RESULT ")]
    print(log.read_text()[-3000:] if not results else "", flush=True)

    print("\n| variant | " + " | ".join(f"ms@{d} | TFLOP/s@{d} | err@{d}" for d in densities)
          + " | regs | spills | smem | wgmma | tma |")
    print("|" + "|".join(["---"] * (2 + 3 * len(densities) + 5)) + "|")
    for r in results:
        cells = " | ".join(f"{_fmt(r.get(f'ms@{d}'))} | {_fmt(r.get(f'tflops@{d}'), '{:.0f}')} | "
                           f"{_fmt(r.get(f'err@{d}'), '{:.1e}')}" for d in densities)
        err = f" error: {r['error'][:100]}" if "error" in r else ""
        print(f"| {r['variant']} | {cells} | {r.get('n_regs', '-')} | {r.get('n_spills', '-')} | "
              f"{r.get('shared', '-')} | {r.get('ptx_wgmma', '-')} | {r.get('ptx_tma_loads', '-')} |{err}")
    info = env_info()
    out_dir = Path(args.out_dir) if args.out_dir else ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"kernel_sweep_{slug(info['gpu'])}_{info['date'][:10]}.json"
    path.write_text(json.dumps({**info, "shape": "wan1.3b-480p", "dtype": "bfloat16", "results": results}, indent=1))
    print(f"wrote {path}", flush=True)

    # fastest correct variant at the first density (0.1 by default)
    ok = [r for r in results if r["variant"] in VARIANTS and "error" not in r
          and all(r.get(f"err@{d}", 1.0) < 2e-2 for d in densities)]
    if not ok:
        return None
    best = min(ok, key=lambda r: r[f"ms@{densities[0]}"])
    print(f"best variant: {best['variant']}", flush=True)
    return {**best["config"], "use_tma": best["use_tma"], "lpt_order": best["lpt_order"], "variant": best["variant"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1.3B shape, densities 1.0/0.25/0.1, random masks")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes in the interpreter, no baselines")
    ap.add_argument("--shapes", help=f"comma-separated subset of {list(SHAPES)}")
    ap.add_argument("--densities", help="comma-separated densities")
    ap.add_argument("--config", help="kernel config as JSON (default: BENCH_CONFIG)")
    ap.add_argument("--out-dir", help="where the result JSON goes (default benchmarks/results)")
    ap.add_argument("--cost-dir", help="where the cost table goes (default scaling_compiler/cost_tables)")
    ap.add_argument("--compile", action="store_true", help="compile VARIANTS (and warm flex for --shapes) in parallel")
    ap.add_argument("--sweep", action="store_true", help="time the kernel variants (VARIANTS)")
    ap.add_argument("--then-bench", action="store_true", help="with --sweep: benchmark with the fastest variant")
    ap.add_argument("--variants", help="comma-separated subset of VARIANTS")
    ap.add_argument("--bench-shapes", help="with --then-bench: shapes for the benchmark")
    ap.add_argument("--compile-timeout", type=int, default=150)
    ap.add_argument("--variant-timeout", type=int, default=120, help="seconds for the whole --sweep timing")
    ap.add_argument("--compile-variant", help=argparse.SUPPRESS)
    ap.add_argument("--warm-flex", help=argparse.SUPPRESS)
    ap.add_argument("--time-variants", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.compile_variant:
        compile_one_variant(args.compile_variant)
    elif args.warm_flex:
        warm_flex(args.warm_flex)
    elif args.time_variants:
        time_variants(args)
    elif args.compile:
        run_compile(args)
    elif args.sweep:
        best = run_sweep(args)
        if args.then_bench and best is not None:
            args.config = json.dumps(best)
            args.densities = None
            args.shapes = args.bench_shapes
            run_benchmark(args)
    else:
        run_benchmark(args)


if __name__ == "__main__":
    main()
