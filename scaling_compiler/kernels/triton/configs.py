"""Launch configs of the block-sparse attention kernels (``block_sparse_attention.py`` and its FP8
variant ``block_sparse_attention_fp8.py``).

The autotune lists with their pruning filters (shared memory per device, warps per tile) and the
default configs used without autotuning (the interpreter, fixed-config benchmarks).
"""
import functools

import torch
import triton

from . import interpreting

MIN_HEAD_DIM = 16  # tl.dot needs K >= 16: smaller head dims are not supported (not padded)


# BLOCK_M must divide the 128-row mask block and BLOCK_N the 128-key mask block.
def _host_descriptor_pre_hook(nargs):
    if nargs["USE_TMA"]:
        nargs["desc_k"].block_shape = [nargs["BLOCK_N"], nargs["HEAD_DIM_PAD"]]
        nargs["desc_v"].block_shape = [nargs["BLOCK_N"], nargs["HEAD_DIM_PAD"]]


def _fp8_descriptor_pre_hook(nargs):
    if nargs["USE_TMA"]:  # the FP8 kernel's v is stored transposed, (D, Sk): its tiles are (D, BLOCK_N)
        nargs["desc_k"].block_shape = [nargs["BLOCK_N"], nargs["HEAD_DIM"]]
        nargs["desc_v"].block_shape = [nargs["HEAD_DIM"], nargs["BLOCK_N"]]


def _config(block_m, block_n, num_warps, num_stages, maxnreg=None, pre_hook=_host_descriptor_pre_hook):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "NUM_STAGES": num_stages},
                         num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg, pre_hook=pre_hook)


# A short list: each config costs a compile (seconds) on the first call of every new shape.
# The K/V loads depend on a load (the kept-block index), and Triton's pipeliner gives such
# indirect loads (num_stages - 1) // 2 iterations of lookahead: num_stages 2-4 prefetch one
# tile ahead (2 buffers), 5 two tiles (3 buffers), 7 three tiles (4 buffers). On an H100
# (benchmarks/NOTES.md) 128x128 tiles with 3 buffers (229 KB of shared memory) were fastest at
# every density; maxnreg=128 fits two 8-warp programs per SM (spills only outside the key loop).
configs = [
    _config(128, 128, 8, 5),
    _config(128, 64, 8, 7),
    _config(128, 64, 8, 3, maxnreg=128),
    _config(64, 64, 4, 5),
]

# The FP8 kernel: 1-byte q/k/v tiles take half the shared memory of bf16 ones, so 128x128 tiles
# fit 3 or 4 K/V buffers on Hopper; the 128x64 and 64x64 configs fit Ada's 99 KB. The autotuner
# picks among them (which one won on the H200 in session 8 was not recorded; NOTES has the times).
fp8_configs = [
    _config(128, 128, 8, 5, pre_hook=_fp8_descriptor_pre_hook),
    _config(128, 128, 8, 7, pre_hook=_fp8_descriptor_pre_hook),
    _config(128, 64, 8, 5, pre_hook=_fp8_descriptor_pre_hook),
    _config(64, 64, 4, 5, pre_hook=_fp8_descriptor_pre_hook),
]

SMEM_FALLBACK = 227 * 1024  # Hopper's per-block shared-memory limit, when the device cannot be asked
_SMEM_MARGIN = 1024  # barriers and scratch the compiler adds (40 bytes seen for 128x128, 3 buffers)


def _max_shared_mem(device: torch.device) -> int:
    if interpreting() or device.type != "cuda":
        return SMEM_FALLBACK
    return _device_shared_mem(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _device_shared_mem(index: int) -> int:
    try:
        return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])
    except Exception:  # noqa: BLE001 - an unusual driver: assume Hopper
        return SMEM_FALLBACK


def _kv_buffers(num_stages):
    return max(2, (num_stages - 1) // 2 + 1)


def _smem_estimate(block_m, block_n, head_dim_pad, elem_bytes, num_stages):
    # q tile + the (k, v) tile buffers
    return (block_m + 2 * _kv_buffers(num_stages) * block_n) * head_dim_pad * elem_bytes + _SMEM_MARGIN


def keep(conf):
    BLOCK_M, BLOCK_N = conf.kwargs["BLOCK_M"], conf.kwargs["BLOCK_N"]
    # 8 warps = 2 warpgroups of 64 query rows each; 4 warps with 128x128 tiles spill registers
    if BLOCK_M == 64 and conf.num_warps == 8:
        return False
    if BLOCK_M * BLOCK_N >= 128 * 128 and conf.num_warps == 4:
        return False
    return True


def _fits(block_m, block_n, num_stages, head_dim_pad, elem_bytes, smem):
    return _smem_estimate(block_m, block_n, head_dim_pad, elem_bytes, num_stages) <= smem


def _fitting(candidates, head_dim_pad, elem_bytes, smem):
    """The configs among ``candidates`` whose tiles fit ``smem`` bytes of shared memory."""
    return [
        conf for conf in candidates
        if _fits(conf.kwargs["BLOCK_M"], conf.kwargs["BLOCK_N"], conf.num_stages, head_dim_pad, elem_bytes, smem)
    ]


def prune_invalid_configs(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    out = args["Out"]
    if out.dtype == torch.float32:  # IEEE fp32 dots run on the FMA units: small tiles only (tests)
        return [_config(64, 64, 4, 2)]
    kept = _fitting(configs, args["HEAD_DIM_PAD"], out.element_size(), _max_shared_mem(out.device))
    return kept or [_config(64, 64, 4, 2)]  # fp32 with large head dims: the smallest tiles


def prune_fp8_configs(configs, named_args, **kwargs):
    """The FP8 kernel's configs whose 1-byte tiles fit the device (else its smallest one)."""
    args = {**named_args, **kwargs}
    return _fitting(configs, args["HEAD_DIM"], 1, _max_shared_mem(args["Out"].device)) or configs[-1:]


def _as_dict(conf) -> dict:
    return {"BLOCK_M": conf.kwargs["BLOCK_M"], "BLOCK_N": conf.kwargs["BLOCK_N"], "num_warps": conf.num_warps,
            "num_stages": conf.num_stages, **({"maxnreg": conf.maxnreg} if conf.maxnreg else {})}


def default_config(dtype: torch.dtype, head_dim: int, device: torch.device | None = None) -> dict:
    """The fastest measured config that fits the device's shared memory (used without autotuning)."""
    if dtype == torch.float32:  # IEEE fp32 dots run on the FMA units: small tiles only (tests)
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    head_dim_pad = max(MIN_HEAD_DIM, triton.next_power_of_2(head_dim))
    elem = torch.empty((), dtype=dtype).element_size()
    smem = _max_shared_mem(device) if device is not None else SMEM_FALLBACK
    kept = _fitting(configs, head_dim_pad, elem, smem)
    return _as_dict(kept[0]) if kept else {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}


def fp8_default_config(head_dim: int, device: torch.device | None = None) -> dict:
    """The FP8 kernel's first config that fits the device (used without autotuning: the interpreter)."""
    smem = _max_shared_mem(device) if device is not None else SMEM_FALLBACK
    return _as_dict((_fitting(fp8_configs, head_dim, 1, smem) or fp8_configs[-1:])[0])
