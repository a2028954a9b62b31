"""`scalingattn` command line: `demo` and `inspect`.

    scalingattn demo                         # compile the trained tiny video DiT, report, compare with dense
    scalingattn inspect WanTransformer3DModel --config '{"num_layers": 4}' --grid 5,32,32
    scalingattn inspect mypkg.models:make_model --options '{"density": 0.25}'
    scalingattn calibrate WanTransformer3DModel --grid 5,32,32 --out wan_topology.safetensors

A `module:factory` path names a function returning `(model, forward_kwargs)`.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from . import zoo
from .backend import ScalingAttnBackend

log = logging.getLogger(__name__)

# Demo video (frames, height, width) and sampling steps: the trained model's own size on a
# GPU; a smaller video and fewer steps on a CPU so that the demo ends in a few minutes there.
DEMO_SETTINGS = {"cuda": ((9, 64, 64), 30, torch.bfloat16), "cpu": ((5, 32, 32), 8, torch.float32)}
DEMO_PROMPT = "red circle bounce"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scalingattn", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="compile the trained tiny video DiT, report, compare with dense")
    demo.add_argument("--density", type=float, default=0.25)
    demo.add_argument("--steps", type=int, help="sampling steps (default: 30 on a GPU, 8 on a CPU)")
    demo.add_argument("--repeats", type=int, default=3, help="timed forward passes per variant")
    demo.add_argument("--out", default="scalingattn-demo", help="folder for the dense vs sparse video strips")

    inspect = commands.add_parser("inspect", help="compile a model and print the scalingattn report")
    inspect.add_argument("model", help=f"a diffusers class ({', '.join(sorted(zoo.ZOO))}) or module:factory")
    inspect.add_argument("--config", default="{}", help="JSON overrides of the model's small config")
    inspect.add_argument("--grid", default="3,32,32", help="latent frames,height,width (diffusers classes)")
    inspect.add_argument("--batch", type=int, default=1)
    inspect.add_argument("--options", default="{}", help="JSON backend options, e.g. '{\"density\": 0.25}'")
    inspect.add_argument("--json", metavar="PATH", help="also write the report as JSON")

    calibrate = commands.add_parser("calibrate", help="write a WEST topology file for a model")
    calibrate.add_argument("model", help="a diffusers class or module:factory, as for inspect")
    calibrate.add_argument("--out", required=True, help="topology file to write (.safetensors)")
    calibrate.add_argument("--samples", type=int, default=8, help="calibration samples")
    calibrate.add_argument("--config", default="{}", help="JSON overrides of the model's small config")
    calibrate.add_argument("--grid", default="3,32,32", help="latent frames,height,width (diffusers classes)")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("scaling_compiler").setLevel(logging.INFO)  # progress of long steps
    return {"demo": _demo, "inspect": _inspect, "calibrate": _calibrate}[args.command](args)


def _calibrate(args: argparse.Namespace) -> int:
    # any density below 1 triggers calibration; the file stores T, which is independent of it
    backend = ScalingAttnBackend(density=0.5, compiler="eager", cache=False, calibration_samples=args.samples)
    model, inputs = _load_model(args.model, json.loads(args.config), _parse_grid(args.grid), 1)
    with torch.no_grad():
        torch.compile(model, backend=backend)(**inputs)
    topologies = [r.topology for r in backend.reports if r.topology is not None]
    if len(topologies) != 1:
        raise SystemExit(f"expected one calibrated graph, got {len(topologies)} (graph breaks split the model?)")
    topologies[0].save(args.out)
    print(f"wrote {args.out}: {len(topologies[0].sites)} sites ({backend.report.topology_origin})")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    options = json.loads(args.options)
    backend = ScalingAttnBackend(**(options | {"compiler": options.get("compiler", "eager")}))
    model, inputs = _load_model(args.model, json.loads(args.config), _parse_grid(args.grid), args.batch)
    with torch.no_grad():
        torch.compile(model, backend=backend)(**inputs)
    for report in backend.reports:
        print(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.to_dict() for r in backend.reports], f, indent=2)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .models import sampling, synthetic_videos, video_dit
    from .quality import psnr, ssim

    device = "cuda" if torch.cuda.is_available() else "cpu"
    (frames, height, width), steps, dtype = DEMO_SETTINGS[device]
    steps = args.steps or steps
    model = video_dit.load_pretrained(device=device, dtype=dtype)
    tokens = synthetic_videos.parse_prompt(DEMO_PROMPT)[None].to(device)
    null = synthetic_videos.null_tokens(1, device)
    shape = (model.config.in_channels, frames, height, width)
    print(f"demo: the trained tiny video DiT (diffusers WanTransformer3DModel, {model.config.num_layers} layers, "
          f"{model.config.num_attention_heads} heads) on {device}, {dtype}, video {frames}x{height}x{width} = "
          f"{model.config.num_tokens(frames, height, width)} tokens, prompt {DEMO_PROMPT!r}, {steps} steps")

    # the sampler's own timesteps: FAST fits its per-step densities to the steps that run
    backend = ScalingAttnBackend(density=args.density, timesteps=sampling.sampler_timesteps(steps))
    sparse = torch.compile(model, backend=backend, fullgraph=True)
    dense = torch.compile(model, fullgraph=True)  # inductor with dense SDPA: the fair baseline
    with torch.no_grad():
        start = time.perf_counter()
        sparse_video = sampling.sample(sparse, tokens, null, shape, seed=0, steps=steps)
        print(f"compiled with scalingattn and sampled in {time.perf_counter() - start:.1f} s\n")
        print(backend.report, "\n")
        start = time.perf_counter()
        dense_video = sampling.sample(model, tokens, null, shape, seed=0, steps=steps)
        print(f"sampled with dense eager attention in {time.perf_counter() - start:.1f} s")
        x, t, c = video_dit.example_inputs(model.config, batch=2, frames=frames, height=height, width=width,
                                           device=device, dtype=dtype)
        start = time.perf_counter()
        times = {name: _time_ms(lambda fn=fn: fn(x, t, c), args.repeats, device)
                 for name, fn in [("dense eager", model), ("dense inductor", dense), ("scalingattn", sparse)]}
        print(f"compiled dense inductor and timed forwards in {time.perf_counter() - start:.1f} s")

    print(f"sampled video vs dense, same noise: PSNR {float(psnr(sparse_video, dense_video)[0]):.2f} dB, "
          f"SSIM {float(ssim(sparse_video, dense_video)[0]):.4f}")
    print(f"one CFG forward (batch 2), median of {args.repeats}: "
          + ", ".join(f"{k} {v:.1f} ms" for k, v in times.items()))
    print(f"scalingattn at density {args.density:g} vs dense inductor: "
          f"{times['dense inductor'] / times['scalingattn']:.2f}x")
    if device == "cpu":
        print("(on a CPU the sparse op is a block-wise PyTorch loop; the speedup target is the GPU kernel)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, video in [("dense", dense_video), ("scalingattn", sparse_video)]:
        print(f"wrote {sampling.save_video_strip(video[0], out / f'{name}.gif')}")
    return 0


def _load_model(spec: str, config: dict[str, Any], grid: tuple[int, int, int], batch: int):
    if ":" in spec:
        module, _, name = spec.partition(":")
        factory: Callable = getattr(importlib.import_module(module), name)
        return factory()
    model = zoo.build(spec, config)
    return model, zoo.example_inputs(spec, model, grid, batch)


def _parse_grid(text: str) -> tuple[int, int, int]:
    try:
        grid = tuple(int(x) for x in text.split(","))
    except ValueError:
        grid = ()
    if len(grid) != 3 or min(grid) <= 0:
        raise SystemExit(f"--grid must be three positive ints frames,height,width; got {text!r}")
    return grid


def _time_ms(fn: Callable[[], Any], repeats: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


if __name__ == "__main__":
    raise SystemExit(main())
