"""Check and time the Gluon forward (``kernels/gluon/block_sparse_attention.py``) against the ``tl`` kernels.

    python -m benchmarks.kernels.gluon_forward             # Hopper GPU: float64 checks, then the Wan2.1-1.3B shape
    python -m benchmarks.kernels.gluon_forward --dry-run   # no GPU: compile both kernels for sm_90 and read the PTX

Checks (GPU): the 16-bit kernel's out and lse against ``masked_attention_reference`` (float64) beside
the ``tl`` kernel's errors (bf16 and fp16, D 64 and 128, odd lengths, contiguous and transposed
``(B, S, H, D)`` layouts, full and random masks with an empty row); the FP8 kernel against the torch
emulation of the FP8 forward (``reference.blockwise_attention_fp8``) beside the ``tl`` FP8 kernel's.

Timing (``do_bench`` medians, random per-head masks, lists decoded beforehand, bf16): the ``tl``
16-bit kernel at the package's benchmark config, ours (with and without lse), FlexAttention with
the same BlockMask; for FP8 the prep with and without the permuted v^T keys, the ``tl`` FP8 op (prep,
list decoding and kernel), ours on the quantised operands, and the package's FP8 op on Hopper
(``dispatch.block_sparse_attention_fp8``: prep, decoding and our kernel) beside the ``tl`` 16-bit
kernel (issue #18 asks 1.6x at density 0.1). TFLOP/s count kept blocks (4 * D per kept pair).

Results: ``benchmarks/results/gluon_forward_<gpu>_<date>[_dry].json``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
from typing import Any

import torch
import triton
from tabulate import tabulate

from benchmarks.common import result_name, write_result
from scaling_compiler.kernels.bitmask import (
    num_blocks,
    pack_block_mask,
    to_flex_block_mask,
)
from scaling_compiler.kernels.reference import (
    blockwise_attention_fp8,
    masked_attention_reference,
)
from scaling_compiler.kernels.triton.mask_decode import prepare_block_lists

# benchmarks.kernels.block_sparse (bench, masks, env_info) is imported inside the GPU functions: its
# import turns on TRITON_INTERPRET for any --dry-run, under which Gluon cannot compile.

CHECK_CASES = [  # B, H, S, D, layout, dtype
    (2, 3, 1000, 128, "bhsd", torch.bfloat16), (1, 2, 777, 64, "bshd", torch.bfloat16),
    (1, 3, 1024, 128, "bshd", torch.float16), (1, 2, 1500, 64, "bhsd", torch.float16)]
WAN = (1, 12, 32760, 128)  # Wan2.1-1.3B 480p
DENSITIES = (0.1, 0.25, 1.0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def qkv(B: int, H: int, S: int, D: int, layout: str, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = (B, S, H, D) if layout == "bshd" else (B, H, S, D)
    ts = [torch.randn(shape, generator=g, device="cuda", dtype=dtype) for _ in range(3)]
    return [t.transpose(1, 2) for t in ts] if layout == "bshd" else ts


def check_rows() -> list[dict[str, Any]]:
    from benchmarks.kernels.block_sparse import BENCH_CONFIG, random_mask
    from scaling_compiler.kernels.gluon.block_sparse_attention import forward as block_sparse_attention_gluon
    from scaling_compiler.kernels.triton.block_sparse_attention import (
        block_sparse_attention,
    )
    from scaling_compiler.kernels.triton.block_sparse_attention_fp8 import (
        block_sparse_attention_fp8,
        quantize,
    )

    rows = []
    for B, H, S, D, layout, dtype in CHECK_CASES:
        for density in (1.0, 0.3):
            q, k, v = qkv(B, H, S, D, layout, dtype, seed=S)
            nb = num_blocks(S)
            mask = random_mask(H, nb, nb, density, seed=S + 1)
            mask[0, 0] = False  # an empty row
            words = pack_block_mask(mask).cuda()
            lists = prepare_block_lists(words, S)
            scale = 1.0 / math.sqrt(D)
            ref_out, ref_lse = masked_attention_reference(q, k, v, mask.cuda(), scale)
            tl_out, tl_lse = block_sparse_attention(q, k, v, words, scale, dict(BENCH_CONFIG), block_lists=lists)
            kept = torch.isfinite(ref_lse)
            x = quantize(q, k, v, permute_value_keys=True)
            emulated = blockwise_attention_fp8(q, k, v, words, scale)
            tl_fp8 = block_sparse_attention_fp8(q, k, v, words, scale)
            lse = torch.full((B, H, S), float("nan"), device="cuda")
            out = block_sparse_attention_gluon(q, k, v, lists, scale, lse=lse)
            out8 = block_sparse_attention_gluon(q, k, v, lists, scale, fp8=x)
            rows.append({
                "B": B, "H": H, "S": S, "D": D, "layout": layout, "dtype": str(dtype).removeprefix("torch."),
                "density": density,
                "out_err": rel_err(out, ref_out), "tl_out_err": rel_err(tl_out, ref_out),
                "lse_err": (lse[kept] - ref_lse[kept]).abs().max().item(),
                "tl_lse_err": (tl_lse[kept] - ref_lse[kept]).abs().max().item(),
                "empty_row_ok": bool(torch.isneginf(lse[~kept]).all() and (out[:, 0, :128] == 0).all()),
                "fp8_vs_emulation": rel_err(out8, emulated), "tl_fp8_vs_emulation": rel_err(tl_fp8, emulated),
                "fp8_err": rel_err(out8, ref_out), "tl_fp8_err": rel_err(tl_fp8, ref_out)})
    return rows


def timing_rows() -> list[dict[str, Any]]:
    from torch.nn.attention.flex_attention import flex_attention

    from benchmarks.kernels.block_sparse import BENCH_CONFIG, bench, random_mask
    from scaling_compiler.kernels import dispatch
    from scaling_compiler.kernels.gluon.block_sparse_attention import forward as ours
    from scaling_compiler.kernels.triton.block_sparse_attention import (
        block_sparse_attention,
    )
    from scaling_compiler.kernels.triton.block_sparse_attention_fp8 import (
        block_sparse_attention_fp8,
        quantize,
    )

    flex = torch.compile(flex_attention, dynamic=False)
    B, H, S, D = WAN
    scale = 1.0 / math.sqrt(D)
    q, k, v = qkv(B, H, S, D, "bhsd", torch.bfloat16, seed=0)
    x = quantize(q, k, v, permute_value_keys=True)
    ms_prep = bench(lambda: quantize(q, k, v, permute_value_keys=True))
    ms_prep_plain = bench(lambda: quantize(q, k, v))
    lse = torch.empty(B, H, S, device="cuda")
    rows = []
    for density in DENSITIES:
        mask = random_mask(H, num_blocks(S), num_blocks(S), density, seed=1)
        words = pack_block_mask(mask).cuda()
        lists = prepare_block_lists(words, S)
        block_mask = to_flex_block_mask(mask.cuda(), S, S)
        ms = {
            "tl": bench(lambda: block_sparse_attention(q, k, v, words, scale, dict(BENCH_CONFIG), block_lists=lists)),
            "ours": bench(lambda: ours(q, k, v, lists, scale)),
            "ours_lse": bench(lambda: ours(q, k, v, lists, scale, lse=lse)),
            "flex": bench(lambda: flex(q, k, v, block_mask=block_mask, scale=scale)),
            "tl_fp8_op": bench(lambda: block_sparse_attention_fp8(q, k, v, words, scale)),
            "ours_fp8_kernel": bench(lambda: ours(q, k, v, lists, scale, fp8=x)),
            "fp8_op": bench(lambda: dispatch.block_sparse_attention_fp8(q, k, v, words, scale)),
        }
        flops = 4.0 * D * B * int(mask.sum()) * 128 * 128
        rows.append({"shape": "wan1.3b-480p", "density": density, "density_actual": mask.float().mean().item(),
                     "ms_fp8_prep": ms_prep, "ms_fp8_prep_plain_keys": ms_prep_plain,
                     **{f"ms_{name}": t for name, t in ms.items()},
                     **{f"tflops_{name}": flops / t / 1e9 for name, t in ms.items()},
                     "ours_vs_tl": ms["tl"] / ms["ours"], "ours_vs_flex": ms["flex"] / ms["ours"],
                     "fp8_op_vs_tl": ms["tl"] / ms["fp8_op"], "ours_fp8_kernel_vs_tl": ms["tl"] / ms["ours_fp8_kernel"],
                     "tl_fp8_op_vs_tl": ms["tl"] / ms["tl_fp8_op"]})
    return rows


@contextlib.contextmanager
def hopper_target(*kernels):
    """Compile ``kernels`` for sm_90 without a GPU: an active driver that only names the target, and
    launches that compile without running. Yields a function returning the kernel binaries compiled
    since a call of it. (Refuses the interpreter, which replaces the library functions Gluon needs.)"""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # the interpreter replaces triton's library functions (gl.max, ...), which Gluon then cannot compile
        raise SystemExit("--dry-run compiles for sm_90: unset TRITON_INTERPRET")
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class _Hopper:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

    def compiled(kernel):
        return [c for cache in kernel.device_caches.values() for c in cache[0].values()]

    def new_binaries(kernel):
        before = {id(c) for c in compiled(kernel)}
        return lambda: [c for c in compiled(kernel) if id(c) not in before]

    runs = {kernel: kernel.run for kernel in kernels}
    for kernel, run in runs.items():
        kernel.run = (lambda run: lambda *args, grid, warmup, **kw: run(*args, grid=grid, warmup=True, **kw))(run)
    previous = driver._active  # reset_active() would build the default driver, which needs a GPU
    driver.set_active(_Hopper())
    try:
        yield new_binaries
    finally:
        driver._active = previous
        for kernel, run in runs.items():
            kernel.run = run
            kernel.device_caches.clear()  # sm_90 binaries under this process's device 0


def compile_rows() -> list[dict[str, Any]]:
    """Compile both kernels for sm_90 and record their shared memory and whether the loop keeps
    P.V in flight while it waits for QK (``wgmma.wait_group 1`` in the PTX)."""
    from scaling_compiler.kernels.gluon import block_sparse_attention as gluon_attention
    from scaling_compiler.kernels.reference import Fp8Inputs
    from scaling_compiler.kernels.triton.mask_decode import BlockLists

    rows = []
    with hopper_target(gluon_attention._attn_fwd) as new_binaries:
        B, H, S, D = 1, 2, 1000, 128
        nq = num_blocks(S)
        q, k, v = (torch.randn(B, S, H, D, dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
        lists = BlockLists(torch.zeros(H, nq, nq, dtype=torch.int32), torch.ones(H * nq, dtype=torch.int32),
                           torch.zeros(H * nq, dtype=torch.int32))
        e4m3 = torch.float8_e4m3fn
        fp8 = Fp8Inputs(torch.zeros(B, H, nq * 128, D, dtype=e4m3), torch.ones(B, H, nq),
                        torch.zeros(B, H, nq * 128, D, dtype=e4m3), torch.ones(B, H, nq),
                        torch.zeros(B, H, D, nq * 128, dtype=e4m3), torch.ones(B, H, D), keys_permuted=True)
        for name, operands in (("bf16", None), ("fp8", fp8)):
            since = new_binaries(gluon_attention._attn_fwd)
            gluon_attention.forward(q, k, v, lists, fp8=operands, lse=torch.empty(B, H, S))
            [binary] = since()
            ptx = binary.asm["ptx"]
            rows.append({"kernel": name, "target": "sm_90", "shared_bytes": binary.metadata.shared,
                         "qk_waited_with_pv_in_flight": "wgmma.wait_group.sync.aligned 1;" in ptx,
                         "ptx_local_memory": ".local" in ptx})
    return rows


def run_gluon_benchmark(name: str, doc: str, argv: list[str] | None, compile_rows, gpu_parts) -> dict[str, Any]:
    """The command line both Gluon benchmarks share: ``--dry-run`` compiles for sm_90 (``compile_rows``),
    else on a Hopper GPU each ``(key, rows function, float format)`` of ``gpu_parts`` runs and prints in turn.
    Writes ``benchmarks/results/<name>_<gpu>_<date>[_dry].json``."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="no GPU: compile for sm_90 and read the PTX")
    ap.add_argument("--out-dir", help="where the result JSON goes (default benchmarks/results)")
    args = ap.parse_args(argv)
    if args.dry_run:
        info = {"gpu": "cpu", "torch": torch.__version__, "triton": triton.__version__,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        payload = {"benchmark": name, **info, "dry_run": True, "compiled": compile_rows()}
        print(tabulate(payload["compiled"], headers="keys"))
    else:
        from benchmarks.kernels.block_sparse import env_info

        info = env_info()
        if torch.cuda.get_device_capability() != (9, 0):
            raise SystemExit(f"{name} needs a Hopper GPU (sm_90: wgmma); use --dry-run elsewhere")
        payload = {"benchmark": name, **info, "dry_run": False}
        for key, rows_of, fmt in gpu_parts:
            payload[key] = rows_of()
            print(tabulate([{k: (fmt.format(v) if isinstance(v, float) else v) for k, v in r.items()}
                            for r in payload[key]], headers="keys"), flush=True)
    write_result(args.out_dir, result_name(name, info, args.dry_run), payload)
    return payload


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_gluon_benchmark("gluon_forward", __doc__, argv, compile_rows,
                               [("checks", check_rows, "{:.3g}"), ("rows", timing_rows, "{:.3f}")])


if __name__ == "__main__":
    main()
