"""Time a feed-forward's GELU + torchao's rowwise float8 quantisation: inductor's kernel against ours.

    python -m benchmarks.kernels.activation_quant            # Wan2.1-1.3B 480p and 14B 720p, GPU
    python -m benchmarks.kernels.activation_quant --dry-run  # a tiny shape on the CPU: checks the script

Per shape (tokens x FFN width, bf16): inductor's compile of torchao's operations
(``gelu_tanh_float8_rows_reference``: what plain inductor runs in a model with torchao float8
linears), our kernel (``scaling_compiler::gelu_tanh_float8_rows`` on CUDA, which
``passes/float8_activations.py`` puts in its place), and, for scale, the bf16 GELU alone (a bf16
model's cost of the same step). Agreement with torchao's eager operations: the fractions of equal
e4m3 values and of equal row scales. Results: ``benchmarks/results/activation_quant_<gpu>_<date>[_dry].json``.
"""
from __future__ import annotations

import argparse

import torch
from tabulate import tabulate

from benchmarks.common import result_name, write_result
from benchmarks.kernels.block_sparse import bench, env_info
from scaling_compiler.kernels.activation_quant import gelu_tanh_float8_rows_reference
from scaling_compiler.kernels.triton.activation_quant import gelu_tanh_float8_rows

SHAPES = {"wan1.3b-480p": (32760, 8960), "wan14b-720p": (75600, 13824), "tiny": (40, 300)}  # (tokens, FFN width)


def agreement(q: torch.Tensor, scale: torch.Tensor, ref_q: torch.Tensor, ref_scale: torch.Tensor) -> dict[str, float]:
    """Fractions of e4m3 values (NaN equal to NaN) and of row scales equal to the eager reference's."""
    q, ref_q = q.float(), ref_q.float()
    equal = (q == ref_q) | (q.isnan() & ref_q.isnan())
    return {"equal_values": equal.float().mean().item(), "equal_scales": (scale == ref_scale).float().mean().item()}


def measure(shape: str, device: str, dry_run: bool) -> dict:
    tokens, width = SHAPES[shape]
    torch.manual_seed(0)
    h = (torch.randn(tokens, width, device=device) * 2.5).to(torch.bfloat16)
    ref_q, ref_scale = gelu_tanh_float8_rows_reference(h)
    inductor = torch.compile(gelu_tanh_float8_rows_reference)
    gelu = torch.compile(lambda x: torch.nn.functional.gelu(x, approximate="tanh"))
    ind_q, ind_scale = inductor(h)
    our_q, our_scale = gelu_tanh_float8_rows(h)
    ms_inductor = bench(lambda: inductor(h), dry_run)
    ms_ours = bench(lambda: gelu_tanh_float8_rows(h), dry_run)
    moved = h.numel() * (h.element_size() + 1)  # one read of the hidden state, one e4m3 write
    return {"shape": shape, "tokens": tokens, "width": width,
            "ms_inductor": ms_inductor, "ms_ours": ms_ours, "ms_bf16_gelu": bench(lambda: gelu(h), dry_run),
            "speedup_vs_inductor": ms_inductor / ms_ours, "ours_tb_per_s": moved / ms_ours / 1e9,
            **{f"inductor_{k}": v for k, v in agreement(ind_q, ind_scale, ref_q, ref_scale).items()},
            **{f"ours_{k}": v for k, v in agreement(our_q, our_scale, ref_q, ref_scale).items()}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["wan1.3b-480p", "wan14b-720p"], choices=sorted(SHAPES))
    ap.add_argument("--dry-run", action="store_true", help="the tiny shape on the CPU (the kernel in the interpreter)")
    ap.add_argument("--out-dir", help="where the result JSON goes (default benchmarks/results)")
    args = ap.parse_args(argv)
    dry = args.dry_run
    rows = [measure(shape, "cpu" if dry else "cuda", dry) for shape in (["tiny"] if dry else args.shapes)]
    print(tabulate([{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
                   headers="keys"))
    info = env_info()
    payload = {"benchmark": "activation_quant", **info, "dry_run": dry, "rows": rows}
    write_result(args.out_dir, result_name("activation_quant", info, dry), payload)
    return payload


if __name__ == "__main__":
    main()
