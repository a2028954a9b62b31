"""Ablation of FAST's fit on the trained tiny DiT: each design sets `passes/tune.py` constants.

    python benchmarks/fast_ablation.py                                  # every design, 0.25 and 0.1
    python benchmarks/fast_ablation.py --designs w1 w1-floor75-fitwarm --densities 0.25 --prompts "red circle bounce"

A design is a set of values of tune's fit constants (STEP_WEIGHT, HEAD_FLOOR, FIT_WARMUPS); each
runs `quality.py`'s "west:fast" variant with them (same videos, noise, WEST topology cached once),
and the baselines run once: uniform density after dense warm-up (20% at 0.25, 5% at 0.1, where
20% cannot average 0.1) and plain uniform. Writes benchmarks/results/fast_ablation_<device>.json.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tabulate import tabulate  # noqa: E402

from benchmarks import quality  # noqa: E402
from scaling_compiler.passes import tune  # noqa: E402

WARMUPS = (0.0, 0.05, 0.1, 0.2)
# each design sets every fit constant, so it means the same whatever tune's defaults are
DESIGNS: dict[str, dict[str, object]] = {
    "unweighted": {"STEP_WEIGHT": 0.0, "HEAD_FLOOR": 0.5, "FIT_WARMUPS": (0.0,)},
    "w1": {"STEP_WEIGHT": 1.0, "HEAD_FLOOR": 0.5, "FIT_WARMUPS": (0.0,)},
    "w4": {"STEP_WEIGHT": 4.0, "HEAD_FLOOR": 0.5, "FIT_WARMUPS": (0.0,)},
    "w1-floor75": {"STEP_WEIGHT": 1.0, "HEAD_FLOOR": 0.75, "FIT_WARMUPS": (0.0,)},
    "w1-fitwarm": {"STEP_WEIGHT": 1.0, "HEAD_FLOOR": 0.5, "FIT_WARMUPS": WARMUPS},
    "w4-fitwarm": {"STEP_WEIGHT": 4.0, "HEAD_FLOOR": 0.5, "FIT_WARMUPS": WARMUPS},
    "w1-floor75-fitwarm": {"STEP_WEIGHT": 1.0, "HEAD_FLOOR": 0.75, "FIT_WARMUPS": WARMUPS},  # the default
    "w2-floor75-fitwarm": {"STEP_WEIGHT": 2.0, "HEAD_FLOOR": 0.75, "FIT_WARMUPS": WARMUPS},
}
BASELINES = {0.25: ["west:uniform:0.2", "west:uniform"], 0.1: ["west:uniform:0.05", "west:uniform"]}


@contextlib.contextmanager
def fit_constants(values: dict[str, object]):
    saved = {name: getattr(tune, name) for name in values}
    for name, value in values.items():
        setattr(tune, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(tune, name, value)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=list(DESIGNS))
    p.add_argument("--densities", nargs="+", type=float, default=[0.25, 0.1])
    p.add_argument("--warmup-designs", nargs="*", default=["w1:0.1"],
                   help="design:warm-up fraction pairs run as west:fast:<fraction>")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default="")
    args, quality_args = p.parse_known_args(argv)
    cache = tempfile.mkdtemp(prefix="scalingattn_fast_ablation_")
    common = quality_args + ["--cache-dir", cache, "--out", tempfile.mkdtemp(prefix="fast_ablation_runs_")]
    rows, entries, header = [], [], None

    def run(label: str, values: dict[str, object], variants: list[str], densities: list[float]) -> None:
        nonlocal header
        with fit_constants(values):
            result = quality.main(common + ["--variants", *variants, "--densities", *map(str, densities)])
        header = header or {k: result[k] for k in ("device", "device_slug", "versions", "settings")}
        for entry in result["variants"]:
            used = entry["density_used"]
            per_step = used["per_step_self_attention"]
            entries.append({"design": label, "constants": values, **{k: entry[k] for k in (
                "variant", "density_target", "psnr_mean", "psnr_min", "ssim_mean")}, "density_used": used})
            rows.append([label, entry["variant"], f"{entry['psnr_mean']:.2f}", f"{entry['psnr_min']:.2f}",
                         f"{entry['ssim_mean']:.4f}", f"{used['self_attention_sites_with_dense_steps']:.3f}",
                         " ".join(f"{d:.2f}" for d in per_step[:: max(1, len(per_step) // 6)])])

    if not args.no_baselines:
        for density in args.densities:
            run("baseline", {}, BASELINES.get(density, ["west:uniform"]), [density])
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
    device_slug = header["device_slug"] + (f"_{args.tag}" if args.tag else "")  # quality.py runs untagged
    result = {"benchmark": "fast_ablation", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              **header, "designs": DESIGNS, "results": entries}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"fast_ablation_{device_slug}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
