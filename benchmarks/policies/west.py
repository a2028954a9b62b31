"""WEST benchmark: how well compile-time topologies hold on inputs they never saw.

For each model (the project's trained tiny video DiT; diffusers WanTransformer3DModel at the
Wan2.1-1.3B configuration with random weights), through the public backend API:

- held-out recall: attention mass kept by the WEST mask at density p, measured on fresh
  inputs (other noise, conditioning and timesteps: calibration seed 1000) that calibration
  never saw, averaged over self-attention sites, heads and query rows;
- stability: IoU of the masks from two disjoint calibration sets (seeds 0 and 1);
- scale transfer: a map calibrated at half spatial resolution, resized to the full token
  grid; the share of the native mask's blocks it keeps (mask recall, the paper's >96%), and
  its held-out attention recall;
- cost: calibration time beside plain inductor compile time.

    python -m benchmarks.policies.west                 # GPU: both models, full sizes
    python -m benchmarks.policies.west --quick         # CPU-sized smoke run

Prints a table and writes JSON (device, versions, date) to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch
from tabulate import tabulate

from benchmarks.common import RESULTS_DIR
from scaling_compiler import ScalingAttnBackend
from scaling_compiler.cost_model import slug
from scaling_compiler.demo import video_dit, zoo

DENSITIES = (0.05, 0.1, 0.25, 0.5)
WAN_1_3B = dict(num_attention_heads=12, attention_head_dim=128, num_layers=30, ffn_dim=8960, text_dim=4096,
                freq_dim=256, in_channels=16, out_channels=16, rope_max_seq_len=1024)


def tiny_dit(quick: bool, device: str, dtype: torch.dtype):
    model = video_dit.load_pretrained(device=device, dtype=dtype)
    frames, height, width = (3, 32, 32) if quick else (9, 64, 64)

    def inputs(scale: int):
        video, timestep, tokens = video_dit.example_inputs(
            model.config, batch=2, frames=frames, height=height // scale, width=width // scale, device=device,
            dtype=dtype)
        return (video, timestep, tokens), {}

    return "tiny video DiT (trained)", model, inputs


def wan_1_3b(quick: bool, device: str, dtype: torch.dtype, layers: int):
    config = dict(WAN_1_3B, num_layers=layers) if not quick else {}
    torch.manual_seed(0)
    model = zoo.build("WanTransformer3DModel", config).to(device, dtype)
    grid = (3, 24, 32) if quick else (21, 60, 104)  # latent of 480p x 81 frames

    def inputs(scale: int):
        kwargs = zoo.example_inputs("WanTransformer3DModel", model, (grid[0], grid[1] // scale, grid[2] // scale))
        kwargs = {k: v.to(device, dtype) if torch.is_tensor(v) and v.is_floating_point() else v
                  for k, v in kwargs.items()}
        kwargs["timestep"] = kwargs["timestep"].to(device)
        return (), kwargs

    name = "Wan2.1-1.3B config (random weights)" if not quick else "Wan (tiny config, random weights)"
    return f"{name}, {layers if not quick else 2} layers", model, inputs


def compile_topology(model, args, kwargs, **options):
    """Compile with WEST (eager inner compiler: only the pass matters here); returns the report."""
    backend = ScalingAttnBackend(density=0.5, compiler="eager", cache=False, **options)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend)(*args, **kwargs)
    if len(backend.reports) != 1:
        raise RuntimeError(f"expected one graph, got {len(backend.reports)}")
    return backend.report


def plain_compile_seconds(model, args, kwargs, device) -> float:
    torch._dynamo.reset()
    start = time.perf_counter()
    with torch.no_grad():
        torch.compile(model)(*args, **kwargs)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(name, model, inputs, samples: int, device: str) -> dict:
    args, kwargs = inputs(1)
    print(f"== {name}: calibrating (seed 0, {samples} samples)", flush=True)
    first = compile_topology(model, args, kwargs, calibration_samples=samples, calibration_seed=0)
    print(f"   {first.topology_origin}", flush=True)
    second = compile_topology(model, args, kwargs, calibration_samples=samples, calibration_seed=1)
    heldout = compile_topology(model, args, kwargs, calibration_samples=max(2, samples // 2), calibration_seed=1000)
    half_args, half_kwargs = inputs(2)
    half = compile_topology(model, half_args, half_kwargs, calibration_samples=samples, calibration_seed=0)
    compile_s = plain_compile_seconds(model, args, kwargs, device)

    sites = [s for s in first.sparse_sites if s.kind in ("self", "joint")]
    rows = []
    for density in DENSITIES:
        recall, iou, transfer_blocks, transfer_recall = [], [], [], []
        for site in sites:
            native = first.topology.sites[site.name]
            mask, _ = native.mask_for_density(density)
            truth = heldout.topology.sites[site.name]  # its mass: fresh inputs only
            recall += truth.recall(mask)
            other, _ = second.topology.sites[site.name].mask_for_density(density)
            iou += ((mask & other).flatten(1).sum(1) / (mask | other).flatten(1).sum(1)).tolist()
            small = half.topology.sites.get(site.name)
            if small is not None and site.token_grid:
                moved, _ = small.transfer(native.q_len, native.token_grid, native.text_spans).mask_for_density(density)
                transfer_blocks += ((mask & moved).flatten(1).sum(1) / mask.flatten(1).sum(1)).tolist()
                transfer_recall += truth.recall(moved)
        rows.append({
            "density": density, "heldout_recall": _mean(recall), "disjoint_iou": _mean(iou),
            "transfer_mask_recall": _mean(transfer_blocks), "transfer_heldout_recall": _mean(transfer_recall),
        })
    site = sites[0]
    return {
        "model": name, "sites": len(sites), "shape": site.shape, "token_grid": site.token_grid,
        "calibration_samples": samples, "calibration_seconds": first.calibration_seconds,
        "half_resolution_calibration_seconds": half.calibration_seconds,
        "plain_inductor_compile_seconds": compile_s, "rows": rows,
    }


def _mean(values):
    return sum(values) / len(values) if values else None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a CPU smoke run")
    parser.add_argument("--samples", type=int, default=8, help="calibration samples")
    parser.add_argument("--wan-layers", type=int, default=30)
    parser.add_argument("--models", default="tiny,wan", help="comma list of: tiny, wan")
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    builders = {"tiny": lambda: tiny_dit(args.quick, device, dtype),
                "wan": lambda: wan_1_3b(args.quick, device, dtype, args.wan_layers)}
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    record = {
        "benchmark": "west", "device": gpu, "torch": torch.__version__,
        "triton": _triton_version(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "quick": args.quick, "results": [],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"west_{slug(gpu)}{'_quick' if args.quick else ''}.json"
    for key in args.models.split(","):
        name, model, inputs = builders[key]()
        result = measure(name, model, inputs, args.samples, device)
        record["results"].append(result)
        path.write_text(json.dumps(record, indent=2, default=str) + "\n")  # after each model: a timeout keeps it
        print_result(result)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    print(f"\nwrote {path}")
    return record


def print_result(result: dict) -> None:
    print(f"\n{result['model']}: {result['sites']} self-attention sites {result['shape']}, grid "
          f"{result['token_grid']}; calibration {result['calibration_seconds']:.1f} s "
          f"({result['calibration_samples']} samples), plain inductor compile "
          f"{result['plain_inductor_compile_seconds']:.1f} s", flush=True)
    print(tabulate([[r["density"], r["heldout_recall"], r["disjoint_iou"], r["transfer_mask_recall"],
                     r["transfer_heldout_recall"]] for r in result["rows"]],
                   headers=["density", "held-out recall", "IoU disjoint calib.", "half-res map: mask recall",
                            "half-res map: held-out recall"], floatfmt=".3f"), flush=True)


def _triton_version() -> str | None:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
