"""Benchmark forward + backward of block-sparse attention against FlexAttention and dense SDPA.

    python -m benchmarks.kernels.block_sparse_backward                # Wan2.1-1.3B 480p and 14B 720p, 5 densities
    python -m benchmarks.kernels.block_sparse_backward --quick        # 1.3B shape, densities 1.0 / 0.1
    python -m benchmarks.kernels.block_sparse_backward --write-cost-table   # also merge "backward" cost rows
    python -m benchmarks.kernels.block_sparse_backward --dry-run      # tiny shape on the CPU (interpreter)

Run from the repository root. Shapes, masks (random per-head 128x128 block masks), FLOP counts
and timing come from ``benchmarks.kernels.block_sparse``; FlexAttention gets the identical mask
(``to_flex_block_mask``).

Per shape and density it times (ms; ``do_bench`` medians, the 14B shape the median of
``FEW_REPS`` calls):

- ours: the forward the op runs (``kernels.dispatch``), the op's backward called directly with the
  saved out / lse (``dispatch.block_sparse_attention_backward``: on Hopper the one-pass Gluon kernel,
  ``backward_kernel``; the dry run the Triton one), "kernel": the Triton backward with the row and
  column lists decoded beforehand, and forward + backward through the differentiable op
  (``torch.ops.scaling_compiler.block_sparse_attention`` under ``torch.autograd.grad``);
- FlexAttention (``torch.compile``'d) forward, and forward + backward;
- dense SDPA with cuDNN and with flash: forward, backward alone (``retain_graph``), and both.

TFLOP/s count kept blocks: forward 4 * D FLOPs per kept (query, key) pair, backward 2.5x that,
forward + backward 3.5x (dense pairs for SDPA). Peak memory is ``torch.cuda.max_memory_allocated``
above what was allocated before one forward + backward (gradients included), ours vs Flex. The
gradients of our backward are checked against Flex's (the CPU: the op's block-wise torch backward):
``grad_err`` is the worst relative Frobenius error of dq, dk, dv.

Results: ``benchmarks/results/kernel_backward_<gpu>_<date>[_dry].json``. ``--write-cost-table``
merges rows of direction "backward" (our backward keyed by the implementation the op runs, as the
forward's rows are; cuDNN's backward as the dense rows) into ``scaling_compiler/cost_tables/<gpu>.json``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Callable

if "--dry-run" in sys.argv:  # must precede the first Triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

from benchmarks.common import result_name, write_result  # noqa: E402
from benchmarks.kernels.block_sparse import (DENSITIES, SHAPES, bench, env_info, kept_flops, make_qkv,  # noqa: E402
                                             merge_cost_rows, random_mask)
from scaling_compiler import cost_model  # noqa: E402
from scaling_compiler.kernels import dispatch  # noqa: E402
from scaling_compiler.kernels.bitmask import num_blocks, pack_block_mask, to_flex_block_mask  # noqa: E402
from scaling_compiler.kernels.dispatch import Implementation  # noqa: E402

MODULE = "benchmarks.kernels.block_sparse_backward"
BACKWARD_FLOP_RATIO = 2.5  # the backward's matmuls: 5 of the 2 * D-FLOP products per pair vs the forward's 2
FEW_REPS = {"wan14b-720p": 3}  # calls of 0.2-1 s: the median of 3 timed calls instead of do_bench's 8+
QUICK_DENSITIES = [1.0, 0.1]
BACKENDS = ("cudnn", "flash")  # the dense rows: SDPA with one backend each
# the targets (Wan2.1-1.3B 480p, bf16): forward + backward vs Flex at 0.1, vs cuDNN at 1.0
TARGETS = [("wan1.3b-480p", 0.1, "speedup_vs_flex_fwd_bwd", 1.3), ("wan1.3b-480p", 1.0, "speedup_vs_cudnn_fwd_bwd", 0.8)]

Timer = Callable[[Callable[[], Any]], float]


def grads_of(fn: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             grad_out: torch.Tensor) -> Callable[[], tuple[torch.Tensor, ...]]:
    """A call of forward + backward: ``fn(q, k, v)`` then dq, dk, dv (inputs must require grad)."""
    return lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), grad_out)


def peak_memory_mb(fn: Callable[[], Any]) -> tuple[float | None, Any]:
    """(MiB allocated above the current allocation at the peak of one call (None off CUDA), its result)."""
    if not torch.cuda.is_available():
        return None, fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20, result


def grad_error(ours: tuple[torch.Tensor, ...], ref: tuple[torch.Tensor, ...]) -> float:
    """The worst relative Frobenius error of dq, dk, dv against a reference's."""
    return max(float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)) for a, b in zip(ours, ref))


# ----------------------------------------------------------------------------------------------
# Dense SDPA: once per shape
# ----------------------------------------------------------------------------------------------
def dense_times(qkv: tuple[torch.Tensor, ...], grad_q: tuple[torch.Tensor, ...], grad_out: torch.Tensor,
                scale: float, timer: Timer) -> dict[str, dict[str, float | None]]:
    """Per backend: ms of the forward, the backward alone and both (None where it cannot run)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdpa = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    qg, kg, vg = grad_q
    res = {}
    for name in BACKENDS:
        backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[name]
        try:
            with sdpa_kernel(backend):
                fwd = timer(lambda: sdpa(*qkv))
                out = sdpa(qg, kg, vg)
                bwd = timer(lambda: torch.autograd.grad(out, (qg, kg, vg), grad_out, retain_graph=True))
                del out
                res[name] = {"fwd": fwd, "bwd": bwd, "fwd_bwd": timer(grads_of(sdpa, qg, kg, vg, grad_out))}
        except RuntimeError as error:  # backend unavailable (the CPU, a head dim it lacks)
            print(f"sdpa {name}: {str(error).splitlines()[0]}", flush=True)
            res[name] = {"fwd": None, "bwd": None, "fwd_bwd": None}
    return res


# ----------------------------------------------------------------------------------------------
# One shape and density
# ----------------------------------------------------------------------------------------------
def measure(shape: str, density: float, tensors: dict[str, Any], dense: dict[str, dict], flex: Callable | None,
            timer: Timer, dry_run: bool) -> dict[str, Any]:
    from scaling_compiler.kernels.triton.block_sparse_attention_bwd import (block_sparse_attention_backward,
                                                                            default_configs)
    from scaling_compiler.kernels.triton.mask_decode import prepare_block_lists, prepare_column_lists

    B, H, S, D, _ = SHAPES[shape]
    q, k, v, grad_out, grad_q = tensors["q"], tensors["k"], tensors["v"], tensors["grad_out"], tensors["grad_q"]
    scale = 1.0 / math.sqrt(D)
    mask = random_mask(H, num_blocks(S), num_blocks(S), density, seed=1)
    words = pack_block_mask(mask).to(q.device)
    flops = kept_flops(mask, S, D, B)
    # the Triton implementation (the interpreter: pointer loads), forward and backward
    forward_impl = Implementation.TRITON_POINTER if dry_run else dispatch.implementation_for(q, k, v)
    use_tma = forward_impl is Implementation.TRITON_TMA
    configs = default_configs(q.dtype) if dry_run else None  # None: autotuned, as the op runs it

    forward = lambda: dispatch.block_sparse_attention(q, k, v, words, scale, implementation=forward_impl)
    ms_fwd = timer(forward)
    out, lse = forward()
    if dry_run:  # the interpreter: the Triton backward at its default configs
        backward = lambda: block_sparse_attention_backward(q, k, v, out, lse, grad_out, words, scale, configs=configs,
                                                           use_tma=use_tma)
    else:  # the op's backward (on Hopper the Gluon kernel where it applies)
        backward = lambda: dispatch.block_sparse_attention_backward(q, k, v, out, lse, grad_out, words, scale,
                                                                    implementation=forward_impl)
    gluon = not dry_run and use_tma and dispatch.gluon_backward_reason(q, k, v, grad_out) is None
    backward_kernel = "gluon" if gluon else "triton"
    ms_bwd = timer(backward)
    direct = backward()  # checked below against Flex's gradients (the CPU: the op's block-wise torch backward)
    lists = prepare_block_lists(words, S), prepare_column_lists(words, S)
    ms_bwd_kernel = timer(lambda: block_sparse_attention_backward(q, k, v, out, lse, grad_out, words, scale,
                                                                  configs=configs, use_tma=use_tma, row_lists=lists[0],
                                                                  column_lists=lists[1]))
    del out, lse, lists
    op = lambda q, k, v: torch.ops.scaling_compiler.block_sparse_attention(q, k, v, words, scale)
    ours_fwd_bwd = grads_of(op, *grad_q, grad_out)
    ms_fwd_bwd = timer(ours_fwd_bwd)
    peak_ours, reference = peak_memory_mb(ours_fwd_bwd)
    reference_name = f"op ({dispatch.implementation_for(q, k, v).value})"

    ms_flex_fwd = ms_flex_fwd_bwd = peak_flex = None
    if flex is not None:
        block_mask = to_flex_block_mask(mask.to(q.device), S, S)
        flex_call = lambda q, k, v: flex(q, k, v, block_mask=block_mask, scale=scale)
        ms_flex_fwd = timer(lambda: flex_call(q, k, v))
        if q.device.type == "cuda":  # FlexAttention has no backward on the CPU
            flex_fwd_bwd = grads_of(flex_call, *grad_q, grad_out)
            ms_flex_fwd_bwd = timer(flex_fwd_bwd)
            peak_flex, reference = peak_memory_mb(flex_fwd_bwd)
            reference_name = "flex"
    err = grad_error(direct, reference)
    del direct, reference
    cudnn, flash = dense["cudnn"], dense["flash"]
    dense_flops = 4.0 * D * B * H * S * S
    ratio = lambda a, b: a / b if a is not None and b is not None else None
    per_ms = lambda f, ms: f / ms / 1e9 if ms else None  # TFLOP/s
    return {
        "implementation": forward_impl.value, "direction": cost_model.BACKWARD,
        "forward_implementation": forward_impl.value, "backward_kernel": backward_kernel,
        "op_implementation": dispatch.implementation_for(q, k, v).value,  # the op's forward on these tensors
        "shape": shape, "B": B, "H": H, "S": S, "D": D, "dtype": str(q.dtype).removeprefix("torch."), "mask": "random",
        "density": density, "density_actual": flops / dense_flops,
        "ms_fwd": ms_fwd, "ms_bwd": ms_bwd, "ms_bwd_kernel": ms_bwd_kernel, "ms_fwd_bwd": ms_fwd_bwd,
        "ms_flex_fwd": ms_flex_fwd, "ms_flex_fwd_bwd": ms_flex_fwd_bwd,
        "ms_flex_bwd": ms_flex_fwd_bwd - ms_flex_fwd if ms_flex_fwd_bwd is not None else None,  # derived
        **{f"ms_{name}_{part}": dense[name][part] for name in BACKENDS for part in ("fwd", "bwd", "fwd_bwd")},
        "tflops_fwd": per_ms(flops, ms_fwd), "tflops_bwd": per_ms(BACKWARD_FLOP_RATIO * flops, ms_bwd),
        "tflops_fwd_bwd": per_ms((1 + BACKWARD_FLOP_RATIO) * flops, ms_fwd_bwd),
        "tflops_flex_fwd_bwd": per_ms((1 + BACKWARD_FLOP_RATIO) * flops, ms_flex_fwd_bwd),
        "tflops_cudnn_fwd_bwd_dense": per_ms((1 + BACKWARD_FLOP_RATIO) * dense_flops, cudnn["fwd_bwd"]),
        "speedup_vs_flex_fwd": ratio(ms_flex_fwd, ms_fwd),
        "speedup_vs_flex_fwd_bwd": ratio(ms_flex_fwd_bwd, ms_fwd_bwd),
        "speedup_vs_cudnn_fwd_bwd": ratio(cudnn["fwd_bwd"], ms_fwd_bwd),
        "speedup_vs_flash_fwd_bwd": ratio(flash["fwd_bwd"], ms_fwd_bwd),
        "peak_mb_ours": peak_ours, "peak_mb_flex": peak_flex, "peak_ratio_vs_flex": ratio(peak_ours, peak_flex),
        "grad_err": err, "grad_reference": reference_name,
    }


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def plan(args: argparse.Namespace) -> tuple[list[str], list[float]]:
    if args.dry_run:
        shapes, densities = ["tiny"], [1.0, 0.25]
    elif args.quick:
        shapes, densities = ["wan1.3b-480p"], QUICK_DENSITIES
    else:
        shapes, densities = ["wan1.3b-480p", "wan14b-720p"], DENSITIES
    if args.shapes:
        shapes = args.shapes.split(",")
    if args.densities:
        densities = [float(d) for d in args.densities.split(",")]
    return shapes, densities


def run(args: argparse.Namespace) -> dict[str, Any]:
    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    dtype = torch.float16 if dry else torch.bfloat16
    shapes, densities = plan(args)
    from torch.nn.attention.flex_attention import flex_attention
    flex = flex_attention if dry else torch.compile(flex_attention, dynamic=False)  # the CPU: eager, forward only

    info = env_info()
    rows = []
    for shape in shapes:
        B, H, S, D, _ = SHAPES[shape]
        reps = None if dry else FEW_REPS.get(shape)
        timer: Timer = lambda fn: bench(fn, dry, reps)
        q, k, v = make_qkv(shape, dtype, device)
        grad_out = torch.randn_like(q)
        grad_q = tuple(t.detach().requires_grad_(True) for t in (q, k, v))  # the same storage, for autograd
        tensors = {"q": q, "k": k, "v": v, "grad_out": grad_out, "grad_q": grad_q}
        dense = dense_times((q, k, v), grad_q, grad_out, 1.0 / math.sqrt(D), timer)
        print(f"[{shape}] dense fwd+bwd: cudnn {_f(dense['cudnn']['fwd_bwd'])} ms, "
              f"flash {_f(dense['flash']['fwd_bwd'])} ms", flush=True)
        for density in densities:
            row = measure(shape, density, tensors, dense, flex, timer, dry)
            rows.append(row)
            print(progress_line(row), flush=True)
        del q, k, v, grad_out, grad_q, tensors
        if not dry:
            torch.cuda.empty_cache()

    payload = {"benchmark": "kernel_backward", **info, "dry_run": dry, "quick": args.quick,
               "flop_count": f"forward 4*D per kept pair, backward {BACKWARD_FLOP_RATIO}x, fwd+bwd "
                             f"{1 + BACKWARD_FLOP_RATIO}x (dense pairs for SDPA)",
               "timing": {"do_bench": "median, warmup 25 ms, rep 100 ms", "few_reps": FEW_REPS},
               "rows": rows, "checks": checks(rows)}
    print_table(rows)
    for check in payload["checks"]:
        print(f"target {check['shape']} d={check['density']}: {check['metric']} = {_f(check['value'], '{:.2f}')} "
              f"(>= {check['target']}) -> {'met' if check['met'] else 'NOT met'}")
    path = write_result(args.out_dir, result_name("kernel_backward", info, dry), payload)
    payload["path"] = str(path)
    if args.write_cost_table:
        payload["cost_table"] = str(merge_cost_rows(cost_rows(rows), info, dry, args.cost_dir))
    return payload


def checks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets for the rows that were measured (a missing baseline: not met)."""
    out = []
    for shape, density, metric, target in TARGETS:
        for r in rows:
            if r["shape"] == shape and r["density"] == density:
                value = r[metric]
                out.append({"shape": shape, "density": density, "metric": metric, "target": target, "value": value,
                            "met": value is not None and value >= target})
    return out


def cost_rows(rows: list[dict[str, Any]]) -> list[dict]:
    """Cost-table rows of direction "backward": our backward (decode included, as the op runs it)
    at each density, and cuDNN's backward once per shape as the dense rows."""
    table, dense_done = [], set()
    for r in rows:
        shape = cost_model.Shape(r["shape"], r["B"], r["H"], r["S"], r["D"])
        table.append(cost_model.row(r["implementation"], cost_model.BACKWARD, shape, r["density_actual"], r["ms_bwd"],
                                    r["dtype"], nominal_density=r["density"], kernel_config="autotuned", source=MODULE))
        if r["ms_cudnn_bwd"] is not None and r["shape"] not in dense_done:
            dense_done.add(r["shape"])
            table.append(cost_model.row(cost_model.DENSE, cost_model.BACKWARD, shape, 1.0, r["ms_cudnn_bwd"],
                                        r["dtype"], backend="cudnn", source=MODULE))
    return table


def _f(x: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def progress_line(r: dict[str, Any]) -> str:
    return (f"{r['shape']:>13} {r['density']:>5.2f} | ours fwd {_f(r['ms_fwd'])} bwd {_f(r['ms_bwd'])} "
            f"fwd+bwd {_f(r['ms_fwd_bwd'])} ms ({_f(r['tflops_fwd_bwd'], '{:.0f}')} TF/s) | flex fwd+bwd "
            f"{_f(r['ms_flex_fwd_bwd'])} | cudnn {_f(r['ms_cudnn_fwd_bwd'])} | x flex "
            f"{_f(r['speedup_vs_flex_fwd_bwd'], '{:.2f}')} x cudnn {_f(r['speedup_vs_cudnn_fwd_bwd'], '{:.2f}')} | "
            f"peak {_f(r['peak_mb_ours'], '{:.0f}')} vs {_f(r['peak_mb_flex'], '{:.0f}')} MiB")


COLUMNS = [  # (header, key, format)
    ("shape", "shape", "{}"), ("density", "density", "{:.2f}"),
    ("fwd ms", "ms_fwd", "{:.3f}"), ("bwd ms", "ms_bwd", "{:.3f}"), ("bwd kernel ms", "ms_bwd_kernel", "{:.3f}"),
    ("fwd+bwd ms", "ms_fwd_bwd", "{:.3f}"), ("bwd TF/s", "tflops_bwd", "{:.0f}"),
    ("fwd+bwd TF/s", "tflops_fwd_bwd", "{:.0f}"),
    ("flex fwd ms", "ms_flex_fwd", "{:.3f}"), ("flex fwd+bwd ms", "ms_flex_fwd_bwd", "{:.3f}"),
    ("flex TF/s", "tflops_flex_fwd_bwd", "{:.0f}"),
    ("cuDNN fwd+bwd ms", "ms_cudnn_fwd_bwd", "{:.3f}"), ("flash fwd+bwd ms", "ms_flash_fwd_bwd", "{:.3f}"),
    ("vs flex", "speedup_vs_flex_fwd_bwd", "{:.2f}x"), ("vs cuDNN", "speedup_vs_cudnn_fwd_bwd", "{:.2f}x"),
    ("peak MiB", "peak_mb_ours", "{:.0f}"), ("flex peak MiB", "peak_mb_flex", "{:.0f}"),
    ("grad err", "grad_err", "{:.1e}"), ("vs", "grad_reference", "{}"),
]


def print_table(rows: list[dict[str, Any]]) -> None:
    print(tabulate([[_f(r[key], fmt) for _, key, fmt in COLUMNS] for r in rows],
                   headers=[h for h, _, _ in COLUMNS], tablefmt="github"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1.3B shape, densities 1.0 / 0.1")
    ap.add_argument("--dry-run", action="store_true", help="tiny shape on the CPU in the interpreter (fp16)")
    ap.add_argument("--shapes", help=f"comma-separated subset of {list(SHAPES)}")
    ap.add_argument("--densities", help="comma-separated densities")
    ap.add_argument("--write-cost-table", action="store_true", help="merge the backward rows into the cost table")
    ap.add_argument("--out-dir", help="where the result JSON goes (default benchmarks/results)")
    ap.add_argument("--cost-dir", help="where the cost table goes (default scaling_compiler/cost_tables)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--dry-run needs TRITON_INTERPRET=1 before Triton is imported (pass --dry-run on the "
                         "command line, or set it)")
    return run(args)


if __name__ == "__main__":
    main()
