"""Check and time the one-pass Gluon backward (``scaling_compiler/kernels/gluon/``) against the ``tl`` backward.

    python -m benchmarks.kernels.gluon_backward             # Hopper GPU: float64 checks, the reduction ceiling, timings
    python -m benchmarks.kernels.gluon_backward --dry-run   # no GPU: compile the kernel for sm_90 and read the PTX

Checks (GPU): dq, dk, dv against the float64 autograd gradients of ``masked_attention_reference``,
beside the ``tl`` backward's errors on the same forward output (bf16 and fp16, D 64 and 128, odd
lengths, contiguous and transposed ``(B, S, H, D)`` layouts, shared and per-batch masks, full and
random masks with an empty row and an empty column, with and without an lse gradient).

The reduction ceiling: TB/s of float32 TMA reductions alone (and of TMA stores) in the kernel's boxes,
by staging tiles in flight and by footprint: one head's dq (what the head-by-head launch order keeps
in L2) up to the whole Wan2.1-1.3B-sized buffer (reductions that miss L2 and go to HBM).

Timing (``do_bench`` medians, random per-head masks, bf16, Wan2.1-1.3B shape): the ``tl`` backward and
the Gluon one called directly (lists decoded beforehand), then forward + backward under autograd:
the package's op (its backward now the Gluon kernel) and FlexAttention with the same BlockMask.
TFLOP/s count kept blocks (forward 4 * D per kept pair, backward 2.5x).

Results: ``benchmarks/results/gluon_backward_<gpu>_<date>[_dry].json``.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, tma

import scaling_compiler.ops  # noqa: F401  (registers torch.ops.scaling_compiler)
from benchmarks.kernels.gluon_forward import hopper_target, qkv, rel_err, run_gluon_benchmark
from scaling_compiler.kernels.bitmask import num_blocks, pack_block_mask, to_flex_block_mask
from scaling_compiler.kernels.gluon.block_sparse_attention_bwd import _dq_descriptor, _tma_reduce_add
from scaling_compiler.kernels.reference import masked_attention_reference

# benchmarks.kernels.block_sparse is imported inside the GPU functions (see gluon_forward).

CHECK_CASES = [  # B, H, S, D, layout, dtype, masks per batch entry
    (2, 3, 1000, 128, "bhsd", torch.bfloat16, False), (1, 2, 777, 64, "bshd", torch.bfloat16, False),
    (1, 3, 1024, 128, "bshd", torch.float16, False), (1, 2, 1500, 64, "bhsd", torch.float16, False),
    (2, 2, 900, 128, "bshd", torch.bfloat16, True)]
WAN = (1, 12, 32760, 128)  # Wan2.1-1.3B 480p
DENSITIES = (0.1, 0.05, 0.25, 1.0)


def _forward(q, k, v, words, scale):
    from scaling_compiler.kernels.triton.block_sparse_attention import block_sparse_attention

    return block_sparse_attention(q, k, v, words, scale)


class _TlForwardAndBackward(torch.autograd.Function):
    """The ``tl`` forward and the ``tl`` backward under autograd: the op as it ran before the Gluon backward."""

    @staticmethod
    def forward(ctx, q, k, v, words, scale):
        out, lse = _forward(q, k, v, words, scale)
        ctx.save_for_backward(q, k, v, out, lse, words)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from scaling_compiler.kernels.triton.block_sparse_attention_bwd import block_sparse_attention_backward

        q, k, v, out, lse, words = ctx.saved_tensors
        return (*block_sparse_attention_backward(q, k, v, out, lse, grad_out, words, ctx.scale), None, None)


def _masks(B: int, H: int, S: int, density: float, per_batch: bool, seed: int) -> torch.Tensor:
    """Random block masks (H, Nq, Nk) or (B, H, Nq, Nk) with an empty row (head 0, block 0) and an empty
    column (last head, block 1)."""
    from benchmarks.kernels.block_sparse import random_mask

    nb = num_blocks(S)
    mask = torch.stack([random_mask(H, nb, nb, density, seed=seed + b) for b in range(B if per_batch else 1)])
    mask[..., 0, 0, :] = False
    mask[..., -1, :, 1] = False
    return mask if per_batch else mask[0]


def check_rows() -> list[dict[str, Any]]:
    from scaling_compiler.kernels.gluon.block_sparse_attention_bwd import block_sparse_attention_backward as ours
    from scaling_compiler.kernels.triton.block_sparse_attention_bwd import block_sparse_attention_backward as tl_bwd

    rows = []
    for B, H, S, D, layout, dtype, per_batch in CHECK_CASES:
        for density, with_dlse in ((1.0, False), (0.3, False), (0.3, True)):
            q, k, v = qkv(B, H, S, D, layout, dtype, seed=S)
            do = qkv(B, H, S, D, layout, dtype, seed=S + 7)[0]
            mask = _masks(B, H, S, density, per_batch, seed=S + 1)
            if with_dlse:  # no empty row: the reference's lse gradient there is 0 * nan
                mask[..., 0, 0, 0] = True
            words = pack_block_mask(mask).cuda()
            dlse = torch.randn(B, H, S, device="cuda") if with_dlse else None
            scale = 1.0 / math.sqrt(D)
            ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
            ref_out, ref_lse = masked_attention_reference(*ref, mask.cuda(), scale)
            if with_dlse:
                ref_grads = torch.autograd.grad((ref_out, ref_lse), ref, (do.double(), dlse.double()))
            else:
                ref_grads = torch.autograd.grad(ref_out, ref, do.double())
            out, lse = _forward(q, k, v, words, scale)
            grads = ours(q, k, v, out, lse, do, words, scale, dlse)
            tl_grads = tl_bwd(q, k, v, out, lse, do, words, scale, grad_lse=dlse)
            row = {"B": B, "H": H, "S": S, "D": D, "layout": layout, "dtype": str(dtype).removeprefix("torch."),
                   "per_batch_masks": per_batch, "density": density, "grad_lse": with_dlse}
            for name, grad, tl_grad, ref_grad in zip(("dq", "dk", "dv"), grads, tl_grads, ref_grads):
                row[f"{name}_err"] = rel_err(grad, ref_grad)
                row[f"tl_{name}_err"] = rel_err(tl_grad, ref_grad)
            row["layouts_kept"] = all(g.stride() == t.stride() for g, t in zip(grads, (q, k, v)))
            row["empty_column_zero"] = bool((grads[1][:, -1, 128:256] == 0).all()
                                            and (grads[2][:, -1, 128:256] == 0).all())
            rows.append(row)
    return rows


def timing_rows() -> list[dict[str, Any]]:
    from torch.nn.attention.flex_attention import flex_attention

    from benchmarks.kernels.block_sparse import bench, random_mask
    from scaling_compiler.kernels.gluon.block_sparse_attention_bwd import block_sparse_attention_backward as ours
    from scaling_compiler.kernels.triton.block_sparse_attention_bwd import block_sparse_attention_backward as tl_bwd
    from scaling_compiler.kernels.triton.mask_decode import prepare_block_lists, prepare_column_lists

    flex = torch.compile(flex_attention, dynamic=False)
    B, H, S, D = WAN
    scale = 1.0 / math.sqrt(D)
    q, k, v = qkv(B, H, S, D, "bhsd", torch.bfloat16, seed=0)
    do = qkv(B, H, S, D, "bhsd", torch.bfloat16, seed=1)[0]
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    rows = []
    for density in DENSITIES:
        mask = random_mask(H, num_blocks(S), num_blocks(S), density, seed=1)
        words = pack_block_mask(mask).cuda()
        row_lists, columns = prepare_block_lists(words, S), prepare_column_lists(words, S)
        out, lse = _forward(q, k, v, words, scale)
        block_mask = to_flex_block_mask(mask.cuda(), S, S)
        flex_call = lambda q, k, v: flex(q, k, v, block_mask=block_mask, scale=scale)
        ms = {"fwd": bench(lambda: _forward(q, k, v, words, scale)),
              "tl_bwd": bench(lambda: tl_bwd(q, k, v, out, lse, do, words, scale, row_lists=row_lists,
                                             column_lists=columns)),
              "gluon_bwd": bench(lambda: ours(q, k, v, out, lse, do, words, scale, column_lists=columns)),
              "flex_fwd": bench(lambda: flex_call(q, k, v))}
        calls = {"op_fwd_bwd": lambda q, k, v: torch.ops.scaling_compiler.block_sparse_attention(q, k, v, words, scale),
                 "tl_fwd_bwd": lambda q, k, v: _TlForwardAndBackward.apply(q, k, v, words, scale),
                 "flex_fwd_bwd": flex_call}
        for name, fn in calls.items():
            ms[name] = bench(lambda: torch.autograd.grad(fn(*leaves), leaves, do))
        diff = max(rel_err(a, b) for a, b in zip(ours(q, k, v, out, lse, do, words, scale),
                                                 tl_bwd(q, k, v, out, lse, do, words, scale)))
        flops = 4.0 * D * B * int(mask.sum()) * 128 * 128
        rows.append({"shape": "wan1.3b-480p", "density": density, "density_actual": mask.float().mean().item(),
                     **{f"ms_{name}": t for name, t in ms.items()},
                     "tflops_tl_bwd": 2.5 * flops / ms["tl_bwd"] / 1e9,
                     "tflops_gluon_bwd": 2.5 * flops / ms["gluon_bwd"] / 1e9,
                     "tflops_op_fwd_bwd": 3.5 * flops / ms["op_fwd_bwd"] / 1e9,
                     "gluon_bwd_vs_tl": ms["tl_bwd"] / ms["gluon_bwd"],
                     "op_vs_flex": ms["flex_fwd_bwd"] / ms["op_fwd_bwd"],
                     "tl_fwd_bwd_vs_flex": ms["flex_fwd_bwd"] / ms["tl_fwd_bwd"],
                     "grad_diff_vs_tl": diff})
    return rows


@gluon.jit
def _reductions_only(dq_desc, N_ROWS, ITERS, HEAD_DIM: gl.constexpr, NB: gl.constexpr, REDUCE: gl.constexpr):
    """Each program streams ITERS float32 boxes (the kernel's) from NB shared staging buffers into the
    first N_ROWS rows of the dq buffer by TMA reductions (or plain TMA stores), keeping NB - 1 in flight."""
    COLS: gl.constexpr = dq_desc.block_type.shape[1]
    N_COL_BOXES: gl.constexpr = HEAD_DIM // COLS
    ones = gl.full([64, COLS], 1.0, gl.float32, gl.BlockedLayout([1, 4], [8, 4], [4, 1], [1, 0]))
    bufs = gl.allocate_shared_memory(gl.float32, [NB, 64, COLS], dq_desc.layout)
    for b in gl.static_range(NB):
        bufs.index(b).store(ones)
    fence_async_shared()
    pid = gl.program_id(0)
    n_prog = gl.num_programs(0)
    for i in range(ITERS):
        tma.store_wait(NB - 1)
        row = ((pid + i * n_prog) * 64) % N_ROWS
        if REDUCE:
            _tma_reduce_add(dq_desc, [row, (i % N_COL_BOXES) * COLS], bufs.index(i % NB))
        else:
            tma.async_copy_shared_to_global(dq_desc, [row, (i % N_COL_BOXES) * COLS], bufs.index(i % NB))
    tma.store_wait(0)


def reduction_rows() -> list[dict[str, Any]]:
    """The dq reductions' ceiling on this GPU: TB/s of the kernel's float32 TMA reductions (and of stores)
    into the first 1, 2, 4 and all 12 heads' rows of a Wan2.1-1.3B-sized dq buffer, by boxes in flight
    (one program per SM). The kernel runs the heads one after another, so one head's dq is its footprint."""
    from benchmarks.kernels.block_sparse import bench

    B, H, S, D = WAN
    dq = torch.zeros(B, H, S, D, device="cuda")
    desc = _dq_descriptor(dq)
    box_bytes = 64 * desc.block_shape[1] * 4
    grid = torch.cuda.get_device_properties(0).multi_processor_count
    iters = 256
    out = []
    for reduce in (True, False):
        for heads in (1, 2, 4, B * H):
            rows = heads * S // 64 * 64
            for nb in (2, 4):
                ms = bench(lambda: _reductions_only[(grid, )](desc, rows, iters, HEAD_DIM=D, NB=nb, REDUCE=reduce,
                                                              num_warps=4))
                out.append({"op": "reduce-add" if reduce else "store", "footprint_mb": rows * D * 4 / 1e6,
                            "in_flight": nb, "ms": ms, "tb_per_s": grid * iters * box_bytes / ms / 1e9})
    return out


def compile_rows() -> list[dict[str, Any]]:
    """Compile the kernel for sm_90 (D 64 and 128, bf16 and fp16) and record its shared memory, whether
    its PTX issues TMA reductions, and whether it uses local memory."""
    from scaling_compiler.kernels.gluon import block_sparse_attention_bwd as gluon_bwd
    from scaling_compiler.kernels.triton import block_sparse_attention_bwd as tl_bwd
    from scaling_compiler.kernels.triton.mask_decode import BlockLists

    rows = []
    with hopper_target(gluon_bwd._attn_bwd, tl_bwd._bwd_preprocess) as new_binaries:
        B, H, S = 1, 2, 1000
        nb = num_blocks(S)
        columns = BlockLists(torch.zeros(H, nb, nb, dtype=torch.int32), torch.ones(H * nb, dtype=torch.int32),
                             torch.zeros(H * nb, dtype=torch.int32))
        words = torch.zeros(H, nb, 1, dtype=torch.int32)
        for D, dtype in ((64, torch.float16), (128, torch.bfloat16)):
            q, k, v, out, do = (torch.randn(B, S, H, D, dtype=dtype).transpose(1, 2) for _ in range(5))
            since = new_binaries(gluon_bwd._attn_bwd)
            gluon_bwd.block_sparse_attention_backward(q, k, v, out, torch.zeros(B, H, S), do, words,
                                                      column_lists=columns)
            [binary] = since()
            ptx = binary.asm["ptx"]
            rows.append({"D": D, "dtype": str(dtype).removeprefix("torch."), "target": "sm_90",
                         "shared_bytes": binary.metadata.shared,
                         "tma_reduction": "cp.reduce.async.bulk.tensor" in ptx,
                         "ptx_local_memory": ".local" in ptx})
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_gluon_benchmark("gluon_backward", __doc__, argv, compile_rows,
                               [("checks", check_rows, "{:.3g}"), ("reductions", reduction_rows, "{:.3f}"),
                                ("rows", timing_rows, "{:.3f}")])


if __name__ == "__main__":
    main()
