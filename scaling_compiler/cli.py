"""`scalingattn` command line: `demo`, `inspect`, `calibrate` and `cache`.

    scalingattn demo                         # compile the trained tiny video DiT, report, compare with dense
                                             # (on a GPU also one attention call at the Wan2.1-1.3B shape)
    scalingattn inspect WanTransformer3DModel --config '{"num_layers": 4}' --grid 5,32,32
    scalingattn inspect mypkg.models:make_model --options '{"density": 0.25}'
    scalingattn calibrate WanTransformer3DModel --grid 5,32,32 --out wan_topology.safetensors
    scalingattn cache [show|clear]           # the WEST topology cache: list its entries, or remove them

A `module:factory` path names a function returning `(model, forward_kwargs)`.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import time
from typing import Any, Callable

import torch

from .backend import ScalingAttnBackend
from .demo import zoo

log = logging.getLogger(__name__)


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

    cache_command = commands.add_parser("cache", help="show or clear the on-disk cache ($SCALINGATTN_CACHE_DIR)")
    cache_command.add_argument("action", choices=["show", "clear"], nargs="?", default="show")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("scaling_compiler").setLevel(logging.INFO)  # progress of long steps
    return {"demo": _demo, "inspect": _inspect, "calibrate": _calibrate, "cache": _cache}[args.command](args)


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


def _cache(args: argparse.Namespace) -> int:
    from . import cache

    if args.action == "clear":
        print(f"removed {cache.clear()} entries from {cache.cache_dir()}")
        return 0
    found = cache.entries()
    total = sum(p.lstat().st_size for p in found if p.is_file())
    print(f"{cache.cache_dir()}: {len(found)} entries, {total / 2**20:.2f} MiB")
    for path in found:
        kind = "directory (bad: removed on next use)" if path.is_dir() else f"{path.lstat().st_size / 2**10:.1f} KiB"
        print(f"  {path.name}  {kind}  {time.strftime('%Y-%m-%d %H:%M', time.localtime(path.lstat().st_mtime))}")
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
    from .demo.run import run_demo

    return run_demo(density=args.density, steps=args.steps, repeats=args.repeats, out=args.out)


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


if __name__ == "__main__":
    raise SystemExit(main())
