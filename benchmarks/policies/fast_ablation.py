"""Ablation of FAST's fit on the trained tiny DiT: each design is a set of fit settings.

    python -m benchmarks.policies.fast_ablation        # every design, 0.25 and 0.1
    python -m benchmarks.policies.fast_ablation --designs w1 w1-floor75-fitwarm --densities 0.25 \
        --prompts "red circle bounce"

A design is a `FitSettings` (step weight, head floor, warm-up candidates; the rest at their
defaults), passed to `benchmarks.quality.main(argv, fast_fit=...)`, which gives it to every
`ScalingAttnBackend(fast_fit=...)` it builds; each design runs the harness's "west:fast" variant
(same videos, noise, WEST topology cached once), and the baselines run once: uniform density
after dense warm-up (20% at 0.25, 5% at 0.1, where 20% cannot average 0.1) and plain uniform.
Writes benchmarks/results/fast_ablation_<device>.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import tempfile

from tabulate import tabulate

from benchmarks import quality
from benchmarks.common import RESULTS_DIR, write_result
from scaling_compiler.policies.west_fast.fast import FitSettings

WARMUPS = (0.0, 0.05, 0.1, 0.2)
# each design sets every setting it ablates, so it means the same whatever FitSettings' defaults are
DESIGNS: dict[str, FitSettings] = {
    "unweighted": FitSettings(step_weight=0.0, head_floor=0.5, warmups=(0.0,)),
    "w1": FitSettings(step_weight=1.0, head_floor=0.5, warmups=(0.0,)),
    "w4": FitSettings(step_weight=4.0, head_floor=0.5, warmups=(0.0,)),
    "w1-floor75": FitSettings(step_weight=1.0, head_floor=0.75, warmups=(0.0,)),
    "w1-fitwarm": FitSettings(step_weight=1.0, head_floor=0.5, warmups=WARMUPS),
    "w4-fitwarm": FitSettings(step_weight=4.0, head_floor=0.5, warmups=WARMUPS),
    "w1-floor75-fitwarm": FitSettings(step_weight=1.0, head_floor=0.75, warmups=WARMUPS),  # the default
    "w2-floor75-fitwarm": FitSettings(step_weight=2.0, head_floor=0.75, warmups=WARMUPS),
}
BASELINES = {0.25: ["west:uniform:0.2", "west:uniform"], 0.1: ["west:uniform:0.05", "west:uniform"]}


def settings_dict(settings: FitSettings | None) -> dict[str, object]:
    """The design's fit settings as JSON values ({} for the baselines, which have no FAST fit)."""
    return {} if settings is None else json.loads(json.dumps(dataclasses.asdict(settings), default=str))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=list(DESIGNS))
    p.add_argument("--densities", nargs="+", type=float, default=[0.25, 0.1])
    p.add_argument("--warmup-designs", nargs="*", default=["w1:0.1"],
                   help="design:warm-up fraction pairs run as west:fast:<fraction>")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--out", default=str(RESULTS_DIR))
    p.add_argument("--tag", default="")
    args, quality_args = p.parse_known_args(argv)
    cache = tempfile.mkdtemp(prefix="scalingattn_fast_ablation_")
    common = quality_args + ["--cache-dir", cache, "--out", tempfile.mkdtemp(prefix="fast_ablation_runs_")]
    rows, entries, header = [], [], None

    def run(label: str, settings: FitSettings | None, variants: list[str], densities: list[float]) -> None:
        nonlocal header
        result = quality.main(common + ["--variants", *variants, "--densities", *map(str, densities)],
                              fast_fit=settings)
        header = header or {k: result[k] for k in ("device", "device_slug", "versions", "settings")}
        for entry in result["variants"]:
            used = entry["density_used"]
            per_step = used["per_step_self_attention"]
            entries.append({"design": label, "fit_settings": settings_dict(settings), **{k: entry[k] for k in (
                "variant", "density_target", "psnr_mean", "psnr_min", "ssim_mean")}, "density_used": used})
            rows.append([label, entry["variant"], f"{entry['psnr_mean']:.2f}", f"{entry['psnr_min']:.2f}",
                         f"{entry['ssim_mean']:.4f}", f"{used['self_attention_sites_with_dense_steps']:.3f}",
                         " ".join(f"{d:.2f}" for d in per_step[:: max(1, len(per_step) // 6)])])

    if not args.no_baselines:
        for density in args.densities:
            run("baseline", None, BASELINES.get(density, ["west:uniform"]), [density])
    for name in args.designs:
        run(name, DESIGNS[name], ["west:fast"], args.densities)
    for spec in args.warmup_designs:
        name, _, warmup = spec.partition(":")
        feasible = [d for d in args.densities if d > float(warmup) + 1e-9]  # dense steps count in the mean
        if feasible:
            run(f"{name}+warmup{warmup}", DESIGNS[name], [f"west:fast:{warmup}"], feasible)

    print()
    print(tabulate(rows, headers=["design", "variant", "PSNR dB", "min PSNR", "SSIM", "self-attn density",
                                  "per-step density (every 5th step)"]))
    device_slug = header["device_slug"] + (f"_{args.tag}" if args.tag else "")  # benchmarks.quality runs untagged
    result = {"benchmark": "fast_ablation", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              **header, "designs": {name: settings_dict(d) for name, d in DESIGNS.items()},
              "results": entries}
    write_result(args.out, f"fast_ablation_{device_slug}.json", result)
    return result


if __name__ == "__main__":
    main()
