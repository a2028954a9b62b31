"""Quality of sparse attention on the tiny video DiT: PSNR/SSIM of sparse vs dense videos.

    python -m benchmarks.quality                       # 8 prompts, 30 steps, every variant at 0.5/0.25/0.1
    python -m benchmarks.quality --quick --out /tmp/q  # CI size on the CPU: 1 prompt, 2 steps, 3x32x32
    python -m benchmarks.quality --variants west:fast --densities 0.25 --prompts "red circle bounce" --seeds 0 1

Each video (prompt, seed) is generated from the noise of `seed` twice: by the plain model
(dense SDPA attention, eager) and by `torch.compile(model, backend=ScalingAttnBackend(...))`
under each variant (mask rule : schedule [: warm-up] x density). The sparse video is compared
with the dense one (`scaling_compiler.demo.metrics`: PSNR over the whole video, SSIM per frame, data
range 2).

Variants: "west:fast" (per-head masks calibrated from the weights, densities graded per layer,
step and head by FAST, which also fits a dense warm-up: the method under test; "west:fast:0"
without warm-up, "west:fast:0.1" with 10% fixed), "west:uniform:0.2" (the same masks, one density
everywhere after 20% dense warm-up steps: the paper's comparison), "west:uniform", and
"window_3d" (one 3-D local window shared by every head, uniform: the static Radial/STA-like
baseline). Density 1.0 keeps every block: it measures the block-wise path's rounding alone
(--quick adds it).

"dfsattn[:dense_fraction]" is DFSAttn (policy="dfsattn": masks scored at run time from q and k,
Hilbert token order) at the same average density, dense steps counted: the first
`dense_fraction` of the steps run dense (default: the paper's 12/50, at most half the density
budget), masks are refreshed three times at even intervals over the rest (the paper's 12/24/36
of 50), and the paper's keep ratios 0.3/0.2/0.1 are scaled by one factor so that the mean kept
block fraction over all steps meets the density. Every layer is sparse (the paper keeps Wan's
layer 0 dense, which alone would exceed low densities on a 6-layer model). A "/order" suffix
("west:fast/hilbert", "local_band/morton", "dfsattn/raster") sets the token order.

"salad" is "west:fast" plus SALAD's tuned linear branches: `--salad-weights` names branch files
written by examples/finetune_salad.py, each tuned at one density (in its header); the variant
runs at each --densities value with the file tuned there (a density without one is an error).
The harness says whether its prompts and seeds were held out of that tuning (the file records
the prompts it never drew and its seed range). Densities count attention blocks only, as for
"west:fast" (the same masks): the branch's linear attention is not counted.

Density actually used comes from the backend's PassReport: the attention-FLOP-weighted kept
fraction over every attention site (cross-attention stays dense and counts as 1.0) and over
the self-attention sites alone, averaged over the sampling steps ("with dense steps"); and the
self-attention density over the steps that are not fully dense ("without dense steps", from the
per-step plans at the sampler's steps).

`--attention-dtype fp8` runs every variant's sparse sites with the FP8 op (backend option
`attention_dtype`; with --dtype bf16 or fp16: it quantises 16-bit inputs only, other sites keep their
dtype), so the videos measure FP8's quality cost on top of the masks' against the same dense reference;
each variant records how many sparse sites ran in which dtype (`attention_dtypes`).

`--linears float8|int8` quantises the linear layers of a copy of the model's transformer blocks with
torchao before every variant compiles (float8: dynamic activation + weight with per-row scales, the
end-to-end benchmark's `+f8lin`, on a GPU of compute capability 8.9 or later; int8: weight-only, any
device). The dense reference stays the unquantised model, so the scores include the quantisation's
cost; at density 1.0 (every block kept) they are its cost alone. Each variant records how many linear
weights ran quantised (`quantized_linears`).

Times: `compile_s` is the first call of the compiled model (dynamo trace, WEST calibration
unless cached, mask building, the inner compiler; on CUDA the first sparse variant also pays
the Triton kernel's JIT and autotuning); `sample_s` is the sampling of all videos afterwards.
WEST topologies are cached by the backend; by default this script points the cache at a fresh
temporary directory, so the first "west" variant includes calibration and later "west"
densities reuse it (--cache-dir to keep one).

Writes benchmarks/results/quality_<device>.json and quality_contact_sheet_<device>.png (rows of
frames for the first two videos: dense, then every variant at --sheet-density).
"""
from __future__ import annotations

import argparse
import collections
import copy
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

from benchmarks.common import FLOAT8_CAPABILITY, RESULTS_DIR, TORCHAO_LINEARS, quantize_linears, quantized_linears
from benchmarks.variants import SALAD, backend_options, variants
from scaling_compiler import ScalingAttnBackend
from scaling_compiler.cache import CACHE_DIR_ENV_VAR
from scaling_compiler.cost_model import CostModel, slug
from scaling_compiler.demo import synthetic_videos as sv
from scaling_compiler.demo.metrics import psnr, ssim
from scaling_compiler.demo.sampling import (DEFAULT_GUIDANCE, DEFAULT_SHIFT, compile_call_inputs, sample,
                                            sampler_timesteps, save_contact_sheet)
from scaling_compiler.demo.video_dit import load_pretrained
from scaling_compiler.kernels.bitmask import num_blocks, unpack_block_mask
from scaling_compiler.policies.west_fast.policy import DEFAULT_CALIBRATION_SAMPLES
from scaling_compiler.salad import read_metadata

PROMPTS = list(sv.EVAL_PROMPTS)  # every shape, colour and motion at least once; never tuned on
VARIANTS = ["west:fast", "west:uniform:0.2", "window_3d", "dfsattn"]
DENSITIES = [0.5, 0.25, 0.1]
SHEET_DENSITY = 0.25
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# --quick: CI size on the CPU
QUICK = {"prompts": PROMPTS[:1], "steps": 2, "frames": 3, "height": 32, "width": 32, "densities": [0.5, 1.0]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="CI size: 1 prompt, 2 steps, 3x32x32 video, densities 0.5 and 1.0")
    p.add_argument("--prompts", nargs="+", default=None, help=f"default: {len(PROMPTS)} varied prompts")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="noise seeds; each prompt runs with each")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 30, --quick 2)")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--frames", type=int, default=None, help="default: the model's (9), --quick 3")
    p.add_argument("--height", type=int, default=None, help="default: the model's (64), --quick 32")
    p.add_argument("--width", type=int, default=None, help="default: the model's (64), --quick 32")
    p.add_argument("--variants", nargs="+", default=VARIANTS,
                   help="mask rule (west, window_3d, local_band) [: schedule (fast, uniform) [: warm-up fraction]], "
                        "or dfsattn [: dense-step fraction]; either with /order (raster, morton, hilbert); "
                        "or salad (west:fast + tuned linear branches, --salad-weights)")
    p.add_argument("--densities", nargs="+", type=float, default=None,
                   help=f"default {DENSITIES}; --quick {QUICK['densities']}")
    p.add_argument("--sheet-density", type=float, default=None,
                   help=f"density of the variants in the contact sheet (default {SHEET_DENSITY} if run, "
                        "else the lowest)")
    p.add_argument("--salad-weights", nargs="+", default=[],
                   help="branch files of the 'salad' variant (examples/finetune_salad.py), one per density")
    p.add_argument("--attention-dtype", choices=["fp8"], default=None,
                   help="backend option attention_dtype: sparse sites in FP8 (default: the model's dtype)")
    p.add_argument("--linears", choices=sorted(TORCHAO_LINEARS), default=None,
                   help="quantise the transformer blocks' linears with torchao before compiling each variant (the "
                        "dense reference stays unquantised): float8 (sm89+ GPU) or int8 weight-only")
    p.add_argument("--calibration-samples", type=int, default=None, help="WEST calibration runs (backend default 8)")
    p.add_argument("--compiler", default="aot_eager", choices=["aot_eager", "inductor", "eager"],
                   help="inner compiler of the backend (quality does not depend on it)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 otherwise")
    p.add_argument("--cache-dir", default=None, help="WEST topology cache (default: a fresh temporary directory)")
    p.add_argument("--out", default=str(RESULTS_DIR), help="folder for the JSON and PNG")
    p.add_argument("--tag", default="", help="suffix of the output file names (keeps runs apart)")
    args = p.parse_args(argv)
    if args.quick:
        args.prompts = args.prompts or QUICK["prompts"]
        for name in ("steps", "frames", "height", "width", "densities"):
            if getattr(args, name) is None:
                setattr(args, name, QUICK[name])
    args.prompts = args.prompts or PROMPTS
    args.steps = args.steps or 30
    args.densities = args.densities or DENSITIES
    args.dtype = args.dtype or ("bf16" if str(args.device).startswith("cuda") else "fp32")
    for prompt in args.prompts:
        sv.parse_prompt(prompt)  # fail early on a bad prompt
    if not all(0 < d <= 1 for d in args.densities):
        p.error("densities must be in (0, 1]")
    if args.linears:
        try:
            import torchao  # noqa: F401
        except ImportError:
            p.error("--linears needs torchao (pip install torchao)")
        if args.linears == "float8" and not (str(args.device).startswith("cuda") and torch.cuda.is_available()
                                             and torch.cuda.get_device_capability(args.device) >= FLOAT8_CAPABILITY):
            p.error("--linears float8 needs a CUDA GPU of compute capability 8.9 or later (torchao's float8 matmuls)")
    try:
        args.salad_files = salad_files(args.salad_weights)
        for variant, density in variants(args.variants, args.densities):
            if variant != "all_blocks":  # fail early on a bad variant
                backend_options(variant, density, "eager", args.steps, linear_branch_weights=salad_file(args, density))
    except (ValueError, FileNotFoundError) as error:
        p.error(str(error))
    return args


def salad_files(paths: list[str]) -> dict[float, tuple[str, dict]]:
    """Branch files by the density they were tuned at (their header): density -> (path, tuning record)."""
    files: dict[float, tuple[str, dict]] = {}
    for path in paths:
        metadata = read_metadata(path) if Path(path).is_file() else None
        if metadata is None or "density" not in metadata:
            raise ValueError(f"--salad-weights {path}: not a branch file written by examples/finetune_salad.py "
                             "(no density in its header)")
        density = float(metadata["density"])
        if density in files:
            raise ValueError(f"--salad-weights: {files[density][0]} and {path} were both tuned at density {density:g}")
        files[density] = (str(path), json.loads(metadata.get("tuning", "{}")))
    return files


def salad_file(args: argparse.Namespace, density: float) -> str | None:
    """The branch file of the "salad" variant at `density`; ValueError if none was tuned there."""
    if SALAD not in args.variants:
        return None
    if density not in args.salad_files:
        tuned = ", ".join(f"{d:g}" for d in sorted(args.salad_files)) or "none given"
        raise ValueError(f"variant 'salad' at density {density:g}: no --salad-weights file tuned at that density "
                         f"(tuned: {tuned}); run examples/finetune_salad.py --density {density:g}")
    return args.salad_files[density][0]


def salad_entry(args: argparse.Namespace, density: float, jobs: list[tuple[str, int]],
                video_shape: tuple[int, int, int, int]) -> dict:
    """The "salad" variant's branch file, how it was tuned, and whether this run's videos were held out
    of that tuning (printed as a warning where not, or where the tuning's steps or video differ)."""
    path, tuning = args.salad_files[density]
    held_out = salad_held_out(tuning, jobs)
    if not held_out:
        print(f"  warning: {path} was tuned on some of these prompts or seeds (not held out)", flush=True)
    for name, here in (("sampler_steps", args.steps), ("video", list(video_shape[1:]))):
        if name in tuning and tuning[name] != here:
            print(f"  note: {path} was tuned with {name} {tuning[name]}, this run has {here}", flush=True)
    return {"weights": path, "held_out": held_out, "tuning": tuning}


def salad_held_out(tuning: dict, jobs: list[tuple[str, int]]) -> bool:
    """Whether every (prompt, seed) of the harness was kept out of the tuning the record describes."""
    prompts = set(tuning.get("held_out_prompts", ()))
    seed_base = tuning.get("train_seed_base")
    return all(prompt in prompts and seed_base is not None and seed < seed_base for prompt, seed in jobs)


def salad_gains(results: list[dict]) -> list[dict]:
    """Per density run with both: the salad variant's mean PSNR and SSIM against west:fast's."""
    by_name = {r["variant"]: r for r in results}
    gains = []
    for r in results:
        west = by_name.get(f"west:fast@{r['density_target']:g}")
        if r["salad"] is not None and west is not None:
            gains.append({"density": r["density_target"], "psnr_gain_db": r["psnr_mean"] - west["psnr_mean"],
                          "ssim_west_fast": west["ssim_mean"], "ssim_salad": r["ssim_mean"],
                          "held_out": r["salad"]["held_out"]})
    return gains


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def result_slug(name: str, device: torch.device) -> str:
    return slug(name) if device.type == "cuda" else "cpu"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate(model, jobs, args, video_shape, device) -> tuple[torch.Tensor, float]:
    """Videos (N, C, F, H, W) on the CPU for `jobs` [(prompt, seed)], and the seconds it took."""
    sync(device)
    start = time.perf_counter()
    videos = []
    for prompt, seed in jobs:
        tokens = sv.labels_to_tokens(sv.parse_prompt(prompt)[None]).to(device)
        video = sample(model, tokens, sv.null_tokens(1, device), video_shape, seed=seed, steps=args.steps,
                       guidance_scale=args.guidance, shift=DEFAULT_SHIFT)
        videos.append(video.float().cpu())
    sync(device)
    return torch.cat(videos), time.perf_counter() - start


def density_used(reports, steps: int) -> dict:
    """Kept fraction of attention from every graph the backend compiled, with and without dense steps.

    With dense steps: FLOP-weighted over sites, each site's density averaged over steps. Without:
    the self-attention density over the sampler's steps that are not fully dense, from the
    per-step plans (block counts) at the timesteps the sampler visits.
    """
    sites = [s for report in reports for s in report.sites]
    self_sites = [s for s in sites if s.kind != "cross"]

    def kept(group):
        total = sum(s.dense_flops for s in group)
        return 1.0 - sum(s.flops_saved for s in group) / total if total else None

    if any(report.policy_state for report in reports):
        return _dfs_density_used(reports, steps)
    per_step = _self_density_per_step(reports, steps)
    sparse_steps = [d for d in per_step if d < 1.0]
    heads = [d for s in self_sites for d in s.head_densities]
    return {
        "all_sites_with_dense_steps": kept(sites),
        "self_attention_sites_with_dense_steps": kept(self_sites),
        "self_attention_sites_without_dense_steps": sum(sparse_steps) / len(sparse_steps) if sparse_steps else 1.0,
        "dense_steps": len(per_step) - len(sparse_steps),
        "per_step_self_attention": per_step,
        "head_density_min": min(heads) if heads else None,
        "head_density_max": max(heads) if heads else None,
        "sites": {"sparse": sum(s.status == "sparse" for s in sites), "dense": sum(s.status == "dense" for s in sites),
                  "self_attention_left_dense": sum(s.status == "dense" for s in self_sites)},
    }


def _dfs_density_used(reports, steps: int) -> dict:
    """`density_used` for DFSAttn, from the kept block fraction each site really used at each step
    (its masks are chosen at run time: the last video sampled counts)."""
    self_flops = cross_flops = 0
    kept_by_step = [0.0] * steps
    site_means = []
    for report in reports:
        for site in report.sites:
            if site.kind == "cross":
                cross_flops += site.dense_flops
                continue
            used = report.policy_state.density_per_step(site.name) if site.name in report.policy_state.site_ids else [1.0] * steps
            used = [1.0 if d is None else d for d in used[:steps]]
            self_flops += site.dense_flops
            site_means.append(sum(used) / steps)
            kept_by_step = [k + site.dense_flops * d for k, d in zip(kept_by_step, used)]
    per_step = [round(k / self_flops, 4) for k in kept_by_step]
    self_kept = sum(kept_by_step) / steps
    sparse_steps = [d for d in per_step if d < 1.0]
    return {
        "all_sites_with_dense_steps": (self_kept + cross_flops) / (self_flops + cross_flops),
        "self_attention_sites_with_dense_steps": self_kept / self_flops,
        "self_attention_sites_without_dense_steps": sum(sparse_steps) / len(sparse_steps) if sparse_steps else 1.0,
        "dense_steps": len(per_step) - len(sparse_steps),
        "per_step_self_attention": per_step,
        "head_density_min": min(site_means), "head_density_max": max(site_means),  # DFSAttn: heads alike
        "sites": {"sparse": sum(s.status == "sparse" for r in reports for s in r.sites),
                  "dense": sum(s.status == "dense" for r in reports for s in r.sites),
                  "self_attention_left_dense": sum(s.status == "dense" and s.kind != "cross"
                                                   for r in reports for s in r.sites)},
    }


def _self_density_per_step(reports, steps: int) -> list[float]:
    """FLOP-weighted self-attention block density at each sampling step (dense sites count 1)."""
    result = []
    for timestep in sampler_timesteps(steps, DEFAULT_SHIFT):
        kept = total = 0.0
        for report in reports:
            masks = report.masks_at(timestep)
            for site in report.sites:
                if site.kind == "cross":
                    continue
                total += site.dense_flops
                words = masks.get(site.name)
                kept += site.dense_flops * (1.0 if words is None else
                                            unpack_block_mask(words, num_blocks(site.kv_len)).float().mean().item())
        result.append(round(kept / total, 4) if total else 1.0)
    return result


def mean_recall(reports, west_topology=None) -> float | None:
    """Mean over heads and sparse sites of the calibration attention mass kept.

    WEST reports it per head; for other rules it is measured here against `west_topology`
    (the WEST calibration of the same model and shape), when one is known.
    """
    values = []
    for report in reports:
        if report.policy_state:
            return None  # DFSAttn: masks chosen at run time
        for site in report.sparse_sites:
            recall = site.head_recall
            if recall is None and west_topology is not None and site.name in west_topology.sites \
                    and site.token_order == "raster":  # the calibration's order
                block_mask = unpack_block_mask(report.masks_at(500.0)[site.name].cpu(), num_blocks(site.kv_len))
                recall = west_topology.sites[site.name].recall(block_mask)
            if recall is None:
                return None
            values += recall
    return sum(values) / len(values) if values else None


def quantized_copy(model: torch.nn.Module, kind: str) -> tuple[torch.nn.Module, int]:
    """A copy of the tiny DiT whose transformer blocks' linears torchao quantised (`--linears`), and how
    many linear weights became quantised tensors."""
    quantized = copy.deepcopy(model)
    quantize_linears(quantized.transformer.blocks, kind)
    count = quantized_linears(quantized)
    if count == 0:
        raise RuntimeError(f"--linears {kind}: torchao quantised no linear layer of the blocks")
    return quantized, count


def run_variant(model, variant, density, args, jobs, video_shape, device, fast_fit=None):
    """Compile, sample every job, and return (videos, backend, compile seconds, sampling seconds).

    `fast_fit` (a `FitSettings`, or None for the default fit) goes to the backend as its FAST fit.
    """
    torch._dynamo.reset()
    num_k_blocks = num_blocks(model.config.num_tokens(*video_shape[1:]))
    weights = salad_file(args, density) if variant == SALAD else None
    options = backend_options("window_3d" if variant == "all_blocks" else variant, density, args.compiler, args.steps,
                              num_k_blocks, linear_branch_weights=weights)
    if args.calibration_samples is not None and options.get("policy") != "dfsattn":
        options["calibration_samples"] = args.calibration_samples
    if args.attention_dtype is not None:
        options["attention_dtype"] = args.attention_dtype
    # the masks' quality, not the device's speed: every plannable site sparse, whatever the device's costs
    backend = ScalingAttnBackend(**options, fast_fit=fast_fit, cost_model=CostModel.ideal("quality harness"))
    compiled = torch.compile(model, backend=backend)
    # first call at the sampler's shapes (batch 2: cond + uncond) compiles; time it alone
    prompt, seed = jobs[0]
    tokens = sv.labels_to_tokens(sv.parse_prompt(prompt)[None]).to(device)
    first_call = compile_call_inputs(tokens, sv.null_tokens(1, device), video_shape, seed)
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        compiled(*first_call)
    sync(device)
    compile_s = time.perf_counter() - start
    for report in backend.reports:
        if report.policy_state:
            report.policy_state.reset()  # DFSAttn: masks scored on this call's noise must not serve the first video
    graphs = len(backend.reports)
    videos, sample_s = generate(compiled, jobs, args, video_shape, device)
    if len(backend.reports) != graphs:
        print(f"  warning: {len(backend.reports) - graphs} more graph(s) compiled during sampling "
              "(recompilation): densities below count every compiled graph", flush=True)
    return videos, backend, compile_s, sample_s


def main(argv: list[str] | None = None, fast_fit=None) -> dict:
    """Run the harness with command-line `argv`; `fast_fit` (a
    `scaling_compiler.policies.west_fast.fast.FitSettings`) replaces FAST's default fit settings
    in every variant (benchmarks.policies.fast_ablation passes its designs this way)."""
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    previous_cache = os.environ.get(CACHE_DIR_ENV_VAR)
    os.environ[CACHE_DIR_ENV_VAR] = args.cache_dir or tempfile.mkdtemp(prefix="scalingattn_quality_cache_")
    try:
        return _run(args, device, dtype, out, fast_fit)
    finally:
        if previous_cache is None:
            os.environ.pop(CACHE_DIR_ENV_VAR, None)
        else:
            os.environ[CACHE_DIR_ENV_VAR] = previous_cache


def _run(args, device, dtype, out, fast_fit=None) -> dict:
    model = load_pretrained(device, dtype)
    config = model.config
    video_shape = (config.in_channels, args.frames or config.frames, args.height or config.height,
                   args.width or config.width)
    jobs = [(prompt, seed) for seed in args.seeds for prompt in args.prompts]
    name = device_name(device)
    tokens = config.num_tokens(*video_shape[1:])
    print(f"quality: {len(jobs)} videos of {video_shape[1]}x{video_shape[2]}x{video_shape[3]} ({tokens} tokens, "
          f"{num_blocks(tokens)} blocks), {args.steps} steps, CFG {args.guidance:g}, {args.dtype} on {name}; "
          f"compiler {args.compiler}", flush=True)

    print("dense (plain model, SDPA) ...", flush=True)
    with torch.no_grad():
        dense, dense_s = generate(model, jobs, args, video_shape, device)
    print(f"  sampled in {dense_s:.1f} s", flush=True)
    quantized_linears = 0
    if args.linears:  # every variant runs the quantised copy; the dense reference above did not
        model, quantized_linears = quantized_copy(model, args.linears)
        print(f"linears: {quantized_linears} quantised ({args.linears}, torchao) in every variant below", flush=True)

    results, sheet_videos = [], {}
    west_topology = None
    for variant, density in variants(args.variants, args.densities):
        label = f"{variant}@{density:g}"
        masks = "west" if variant == SALAD else variant.partition("/")[0].split(":")[0]
        salad = salad_entry(args, density, jobs, video_shape) if variant == SALAD else None
        print(f"{label} ...", flush=True)
        videos, backend, compile_s, sample_s = run_variant(model, variant, density, args, jobs, video_shape, device,
                                                                 fast_fit)
        reports = backend.reports
        if masks == "west" and reports and reports[0].topology is not None and reports[0].token_order == "raster":
            west_topology = reports[0].topology
        p, s = psnr(videos, dense), ssim(videos, dense)
        recall = mean_recall(reports, west_topology)
        entry = {
            "variant": label, "masks": masks, "schedule": reports[0].schedule if reports else None,
            "token_order": reports[0].token_order if reports else None,
            "density_target": density,
            "psnr_mean": float(p.mean()), "ssim_mean": float(s.mean()),
            "psnr_min": float(p.min()), "ssim_min": float(s.min()),
            "density_used": density_used(reports, args.steps),
            "calibration_recall_mean": recall,
            "recall_source": None if recall is None else "WEST per-head report" if masks == "west" else
                             "WEST calibration mass",
            "dfsattn": reports[0].to_dict()["dfsattn"] if reports and reports[0].policy_state else None,
            "compile_s": compile_s, "sample_s": sample_s, "sample_s_per_video": sample_s / len(jobs),
            "graphs_compiled": len(reports),
            "attention_dtypes": dict(collections.Counter(site.attention_dtype for r in reports
                                                         for site in r.sparse_sites)),
            "quantized_linears": quantized_linears,
            "backend_config": reports[0].config if reports else None,
            "topology_origin": [r.topology_origin for r in reports],
            "salad": salad,
            "videos": [{"prompt": prompt, "seed": seed, "psnr": float(pv), "ssim": float(sv_)}
                       for (prompt, seed), pv, sv_ in zip(jobs, p, s)],
        }
        results.append(entry)
        sheet_videos[label] = videos[:2]
        used = entry["density_used"]
        print(f"  PSNR {entry['psnr_mean']:.2f} dB  SSIM {entry['ssim_mean']:.4f}  density used "
              f"{used['all_sites_with_dense_steps']:.3f} (self-attn {used['self_attention_sites_with_dense_steps']:.3f}"
              f", {used['dense_steps']} dense steps)  recall "
              f"{'-' if recall is None else f'{recall:.3f}'}  compile {compile_s:.1f} s  sample {sample_s:.1f} s",
              flush=True)
    torch._dynamo.reset()

    rows = [[
        r["variant"], f"{r['psnr_mean']:.2f}", f"{r['psnr_min']:.2f}", f"{r['ssim_mean']:.4f}",
        f"{r['density_used']['self_attention_sites_with_dense_steps']:.3f}",
        f"{r['density_used']['self_attention_sites_without_dense_steps']:.3f}", r["density_used"]["dense_steps"],
        "-" if r["calibration_recall_mean"] is None else f"{r['calibration_recall_mean']:.3f}",
        f"{r['compile_s']:.1f}", f"{r['sample_s']:.1f}",
    ] for r in results]
    print()
    print(tabulate(rows, headers=["variant", "PSNR dB", "min PSNR", "SSIM", "self-attn density",
                                  "w/o dense steps", "dense steps", "calib. recall", "compile s", "sample s"]))
    print(f"dense: sampled in {dense_s:.1f} s. Self-attention densities are FLOP-weighted over sites and "
          f"averaged over steps; 'w/o dense steps' leaves out the steps where every site is dense.")
    for gain in salad_gains(results):
        print(f"salad vs west:fast at density {gain['density']:g}: {gain['psnr_gain_db']:+.2f} dB PSNR, "
              f"SSIM {gain['ssim_west_fast']:.4f} -> {gain['ssim_salad']:.4f} "
              f"({'held-out' if gain['held_out'] else 'NOT held-out'} prompts and seeds)")

    device_slug = result_slug(name, device) + (f"_{args.tag}" if args.tag else "")
    result = {
        "benchmark": "quality",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": name, "device_slug": device_slug,
        "versions": {"torch": torch.__version__, "triton": _version("triton"), "diffusers": _version("diffusers"),
                     "python": platform.python_version()},
        "settings": {
            "prompts": args.prompts, "seeds": args.seeds, "steps": args.steps, "guidance_scale": args.guidance,
            "shift": DEFAULT_SHIFT, "video": list(video_shape), "tokens": tokens, "dtype": args.dtype,
            "compiler": args.compiler, "attention_dtype": args.attention_dtype, "linears": args.linears,
            "calibration_samples": args.calibration_samples or DEFAULT_CALIBRATION_SAMPLES,
            "quick": args.quick,
            "metrics": "PSNR over the whole video, SSIM per frame (11x11 Gaussian, sigma 1.5), data range 2",
            "dense_reference": "plain model, eager (SDPA)",
        },
        "notes": ("Densities are FLOP-weighted over attention sites and averaged over steps; 'all_sites' "
                  "counts dense cross-attention as 1, 'self_attention_sites' is self-attention alone; "
                  "'without_dense_steps' leaves out the steps where every site is dense."),
        "dense": {"sample_s": dense_s, "sample_s_per_video": dense_s / len(jobs)},
        "variants": results,
        "salad_gains": salad_gains(results),
    }
    json_path = out / f"quality_{device_slug}.json"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    sheet_path = _contact_sheet(dense, sheet_videos, results, jobs, args,
                                out / f"quality_contact_sheet_{device_slug}.png")
    print(f"wrote {json_path}" + (f" and {sheet_path}" if sheet_path else ""))
    result["json_path"], result["sheet_path"] = str(json_path), str(sheet_path) if sheet_path else None
    return result


def _contact_sheet(dense, sheet_videos, results, jobs, args, path):
    """Rows per video (first two): dense, then each variant at the sheet density, PSNR in the label."""
    targets = sorted({r["density_target"] for r in results if r["density_target"] < 1.0})
    if not targets:
        return None
    wanted = args.sheet_density if args.sheet_density is not None else SHEET_DENSITY
    density = wanted if wanted in targets else targets[0] if args.sheet_density is None else None
    if density is None:
        print(f"no variant at sheet density {wanted:g}: no contact sheet")
        return None
    shown = [r for r in results if r["density_target"] == density]
    rows, labels = [], []
    for i, (prompt, seed) in enumerate(jobs[:2]):
        rows.append(dense[i : i + 1])
        labels.append(f"{prompt} s{seed}: dense")
        for r in shown:
            rows.append(sheet_videos[r["variant"]][i : i + 1])
            labels.append(f"{r['variant']}: {r['videos'][i]['psnr']:.1f} dB")
    return save_contact_sheet(torch.cat(rows), labels, path, label_width=190)


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        return None


if __name__ == "__main__":
    main()
