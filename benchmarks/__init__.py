"""Benchmarks, laid out like the source; run each from the repository root as a module:

    python -m benchmarks.quality                   # PSNR/SSIM of sparse vs dense videos (tiny DiT)
    python -m benchmarks.end_to_end                # Wan2.1 step latency, dense inductor vs scalingattn
    python -m benchmarks.policies.west             # WEST topologies on held-out inputs
    python -m benchmarks.policies.fast_ablation    # FAST's fit settings, through benchmarks.quality
    python -m benchmarks.policies.dfs_scoring      # cost of a DFSAttn refresh step
    python -m benchmarks.kernels.block_sparse      # the block-sparse kernel vs SDPA and FlexAttention
    python -m benchmarks.kernels.block_sparse_backward  # forward + backward vs Flex and SDPA backward

Results go to benchmarks/results/ (one latest file per benchmark and device); benchmarks/NOTES.md
has what was measured and why.
"""
