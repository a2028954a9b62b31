"""`scalingattn` command line: `demo` and `inspect`.

    scalingattn demo                         # compile the default DiT, report, compare with dense
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
from typing import Any, Callable

import torch

from . import zoo
from .backend import ScalingAttnBackend

log = logging.getLogger(__name__)

# Demo sizes: (config overrides for WanTransformer3DModel, latent grid, dtype).
# "small" fits a 2-core CPU in a few minutes; "large" is one Wan2.1-1.3B-shaped layer stack at 480p.
DEMO_SIZES: dict[str, tuple[dict[str, Any], tuple[int, int, int], torch.dtype]] = {
    "small": (dict(num_attention_heads=4, attention_head_dim=64, num_layers=2, ffn_dim=512), (5, 32, 32), torch.float32),
    "large": (
        dict(num_attention_heads=12, attention_head_dim=128, num_layers=4, ffn_dim=8960, text_dim=4096, freq_dim=256,
             in_channels=16, out_channels=16, rope_max_seq_len=1024),
        (21, 60, 104), torch.bfloat16,
    ),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scalingattn", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="compile a small DiT, print the report, compare against dense")
    demo.add_argument("--density", type=float, default=0.25)
    demo.add_argument("--size", choices=["auto", *DEMO_SIZES], default="auto",
                      help="auto: large on a GPU, small on a CPU")
    demo.add_argument("--repeats", type=int, default=3, help="timed forward passes per variant")

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
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = args.size if args.size != "auto" else ("large" if device == "cuda" else "small")
    overrides, grid, dtype = DEMO_SIZES[size]
    torch.manual_seed(0)
    model = zoo.build("WanTransformer3DModel", overrides).to(device)
    if dtype != torch.float32:
        model = model.to(dtype)
    inputs = {k: v.to(device) if torch.is_tensor(v) else v
              for k, v in zoo.example_inputs("WanTransformer3DModel", model, grid).items()}
    inputs["hidden_states"] = inputs["hidden_states"].to(dtype)
    inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"].to(dtype)
    print(f"demo: WanTransformer3DModel ({size}: {overrides}) on {device}, latent grid {grid}, {dtype}")

    backend = ScalingAttnBackend(density=args.density)
    sparse = torch.compile(model, backend=backend, fullgraph=True)
    dense = torch.compile(model, fullgraph=True)  # inductor with dense SDPA: the fair baseline
    with torch.no_grad():
        start = time.perf_counter()
        sparse_out = sparse(**inputs)[0]
        print(f"compiled with scalingattn in {time.perf_counter() - start:.1f} s\n")
        print(backend.report, "\n")
        dense_out = model(**inputs)[0]
        times = {name: _time_ms(lambda fn=fn: fn(**inputs), args.repeats, device)
                 for name, fn in [("dense eager", model), ("dense inductor", dense), ("scalingattn", sparse)]}
    error = (sparse_out.float() - dense_out.float()).norm() / dense_out.float().norm()
    print(f"output vs dense eager: relative L2 error {error:.3e}, max abs diff "
          f"{(sparse_out.float() - dense_out.float()).abs().max():.3e}")
    print(f"forward time, median of {args.repeats}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in times.items()))
    print(f"scalingattn at density {args.density:g} vs dense inductor: "
          f"{times['dense inductor'] / times['scalingattn']:.2f}x")
    if device == "cpu":
        print("(on a CPU the sparse op is a block-wise PyTorch loop; the speedup target is the GPU kernel)")
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
