"""Time SALAD's linear branch (`scaling_compiler.salad.LinearBranch`) beside the sparse op it joins.

    python -m benchmarks.kernels.linear_branch              # Wan2.1-1.3B and 14B site shapes, GPU
    python -m benchmarks.kernels.linear_branch --dry-run    # a tiny shape on the CPU: checks the script

Per shape: the branch alone (linear attention, projection, gate; compiled by inductor, as it runs
inside a compiled model), forward and forward + backward into its parameters (the tuning step),
against our sparse op at density 0.1 and 0.25, forward and forward + backward into q, k, v. The
branch's share of an attention site is what the issue's "at most 10% of the step" rests on.
Results: ``benchmarks/results/linear_branch_<gpu>_<date>[_dry].json``.
"""
from __future__ import annotations

import argparse

import torch
from tabulate import tabulate

from benchmarks.common import result_name, write_result
from benchmarks.kernels.block_sparse import SHAPES, bench, env_info, make_qkv, random_mask
from scaling_compiler import ops  # noqa: F401  (registers the op)
from scaling_compiler.kernels.bitmask import num_blocks, pack_block_mask
from scaling_compiler.salad import LinearBranch

SPARSE_DENSITIES = (0.1, 0.25)


def branch_times(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dry_run: bool) -> dict[str, float]:
    """ms of the branch's forward and of forward + backward into its parameters (random weights)."""
    B, H, S, D = q.shape
    branch = LinearBranch(H, D).to(q.device)
    torch.nn.init.normal_(branch.proj.weight, std=D ** -0.5)  # a tuned branch: nothing folds away
    sparse_out = torch.randn_like(q)
    run = branch if dry_run else torch.compile(branch, fullgraph=True)
    grad = torch.randn_like(q)

    def forward_backward():
        run(q, k, v, sparse_out).backward(grad)

    with torch.no_grad():
        forward = bench(lambda: run(q, k, v, sparse_out), dry_run)
    return {"branch_fwd": forward, "branch_fwd_bwd": bench(forward_backward, dry_run)}


def sparse_times(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, density: float, dry_run: bool) -> dict[str, float]:
    """ms of the sparse op's forward and forward + backward (into q, k, v) at `density`."""
    B, H, S, D = q.shape
    words = pack_block_mask(random_mask(H, num_blocks(S), num_blocks(S), density, seed=1)).to(q.device)
    op = torch.ops.scaling_compiler.block_sparse_attention
    ql, kl, vl = (t.detach().requires_grad_() for t in (q, k, v))
    grad = torch.randn_like(q)
    forward = bench(lambda: op(q, k, v, words, D ** -0.5), dry_run)
    return {"sparse_fwd": forward,
            "sparse_fwd_bwd": bench(lambda: op(ql, kl, vl, words, D ** -0.5).backward(grad), dry_run)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["wan1.3b-480p", "wan14b-720p"], choices=sorted(SHAPES))
    ap.add_argument("--dry-run", action="store_true", help="the tiny shape on the CPU, fp32 (the op's block-wise path)")
    ap.add_argument("--out-dir", help="where the result JSON goes (default benchmarks/results)")
    args = ap.parse_args(argv)
    dry = args.dry_run
    device, dtype = ("cpu", torch.float32) if dry else ("cuda", torch.bfloat16)
    shapes = ["tiny"] if dry else args.shapes
    rows = []
    for shape in shapes:
        q, k, v = make_qkv(shape, dtype, device)
        branch = branch_times(q, k, v, dry)
        for density in SPARSE_DENSITIES:
            sparse = sparse_times(q, k, v, density, dry)
            rows.append({"shape": shape, "density": density, **branch, **sparse,
                         "branch_share_fwd": branch["branch_fwd"] / (branch["branch_fwd"] + sparse["sparse_fwd"]),
                         "branch_share_fwd_bwd": branch["branch_fwd_bwd"]
                         / (branch["branch_fwd_bwd"] + sparse["sparse_fwd_bwd"])})
        del q, k, v
    print(tabulate([{k_: (f"{v_:.3f}" if isinstance(v_, float) else v_) for k_, v_ in r.items()} for r in rows],
                   headers="keys"))
    info = env_info()
    payload = {"benchmark": "linear_branch", **info, "dry_run": dry, "dtype": str(dtype).removeprefix("torch."),
               "rows": rows}
    write_result(args.out_dir, result_name("linear_branch", info, dry), payload)
    return payload


if __name__ == "__main__":
    main()
