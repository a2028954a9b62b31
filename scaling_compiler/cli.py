"""`scalingattn` command line: `demo`, `inspect`, `calibrate` and `cache`.

    scalingattn demo                         # compile the trained tiny video DiT, report, compare with dense
                                             # (on a GPU also one attention call at the Wan2.1-1.3B shape)
    scalingattn inspect WanTransformer3DModel --config '{"num_layers": 4}' --grid 5,32,32
    scalingattn inspect mypkg.models:make_model --options '{"density": 0.25}'
    scalingattn calibrate WanTransformer3DModel --grid 5,32,32 --out wan_topology.safetensors
    scalingattn cache [show|clear]           # the WEST topology cache: list its entries, or remove them

A `module:factory` path names a function returning `(model, forward_kwargs)`. Models and inputs are
built after `torch.manual_seed(--seed)`: two identical runs give identical reports (and share one
cache entry). A mistake on the command line (bad JSON, an unknown model, a bad option) is printed
as one line and exits with status 2, as argparse does for its own errors.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
from typing import Any, Callable

import torch

from .backend import ScalingAttnBackend
from .report import PassReport
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
    inspect.add_argument("--pictures", metavar="DIR", help="write PNGs of the block masks and densities to DIR")
    inspect.add_argument("--seed", type=int, default=0, help="seed of the model's weights and inputs")

    calibrate = commands.add_parser("calibrate", help="write a WEST topology file for a model")
    calibrate.add_argument("model", help="a diffusers class or module:factory, as for inspect")
    calibrate.add_argument("--out", required=True, help="topology file to write (.safetensors)")
    calibrate.add_argument("--samples", type=int, default=8, help="calibration samples")
    calibrate.add_argument("--config", default="{}", help="JSON overrides of the model's small config")
    calibrate.add_argument("--grid", default="3,32,32", help="latent frames,height,width (diffusers classes)")
    calibrate.add_argument("--seed", type=int, default=0, help="seed of the model's weights and inputs")

    cache_command = commands.add_parser("cache", help="show or clear the on-disk cache ($SCALINGATTN_CACHE_DIR)")
    cache_command.add_argument("action", choices=["show", "clear"], nargs="?", default="show")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("scaling_compiler").setLevel(logging.INFO)  # progress of long steps
    command = {"demo": _demo, "inspect": _inspect, "calibrate": _calibrate, "cache": _cache}[args.command]
    try:
        return command(args)
    except UsageError as error:
        print(f"scalingattn {args.command}: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # a user's mistake surfacing as an exception: one line, not a traceback
        message = _user_mistake(error)
        if message is None:
            raise
        print(f"scalingattn {args.command}: error: {message}", file=sys.stderr)
        return 2


class UsageError(Exception):
    """A mistake in the command line: printed as one line, exit status 2."""


def _user_mistake(error: BaseException) -> str | None:
    """The one-line message of an option or input mistake (also when torch.compile wraps it), else None."""
    from torch._dynamo.exc import BackendCompilerFailed

    while isinstance(error, BackendCompilerFailed) and error.__cause__ is not None:
        error = error.__cause__  # the backend's own error, e.g. an option checked at compile time
    inner = getattr(error, "inner_exception", None)
    if isinstance(inner, (ValueError, TypeError)):
        error = inner
    if isinstance(error, (ValueError, TypeError)) and str(error).startswith(("option", "options", "scalingattn",
                                                                             "unknown scalingattn")):
        return str(error).splitlines()[0]
    return None


def _calibrate(args: argparse.Namespace) -> int:
    # any density below 1 triggers calibration; the file stores T, which is independent of it
    backend = ScalingAttnBackend(density=0.5, compiler="eager", cache=False, calibration_samples=args.samples)
    model, inputs = _load_model(args.model, _json(args.config, "--config"), _parse_grid(args.grid), 1, args.seed)
    with torch.no_grad():
        torch.compile(model, backend=backend)(**inputs)
    topologies = [r.topology for r in backend.reports if r.topology is not None]
    if len(topologies) != 1:
        raise UsageError(f"expected one calibrated graph, got {len(topologies)}\n{backend.summary()}")
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
    options = _json(args.options, "--options")
    if not isinstance(options, dict):
        raise UsageError(f"--options must be a JSON object, e.g. '{{\"density\": 0.25}}'; got {args.options!r}")
    backend = ScalingAttnBackend(**(options | {"compiler": options.get("compiler", "eager")}))
    model, inputs = _load_model(args.model, _json(args.config, "--config"), _parse_grid(args.grid), args.batch,
                                args.seed)
    with torch.no_grad():
        torch.compile(model, backend=backend)(**inputs)
    for report in backend.reports:
        print(report)
    print(backend.summary())
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.to_dict() for r in backend.reports], f, indent=2)
    if args.pictures:
        written = [path for report in backend.reports
                   for path in report.save_pictures(_graph_folder(args.pictures, report, len(backend.reports)))]
        print(f"wrote {len(written)} pictures to {args.pictures}" if written
              else f"no sparse site: no pictures written to {args.pictures}")
    return 0


def _graph_folder(root: str, report: PassReport, graphs: int) -> str:
    """Pictures of one graph go to `root`, of several to `root/graph<i>`."""
    return root if graphs == 1 else f"{root}/graph{report.graph_index}"


def _demo(args: argparse.Namespace) -> int:
    from .demo.run import run_demo

    return run_demo(density=args.density, steps=args.steps, repeats=args.repeats, out=args.out)


def _load_model(spec: str, config: Any, grid: tuple[int, int, int], batch: int, seed: int = 0):
    """The model and its forward kwargs, built after seeding (same weights, same inputs, same cache key)."""
    torch.manual_seed(seed)
    if ":" in spec:
        module, _, name = spec.partition(":")
        try:
            factory: Callable = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as error:
            raise UsageError(f"cannot load the model factory {spec!r}: {error}") from error
        return factory()
    if spec not in zoo.ZOO:
        raise UsageError(f"unknown model {spec!r}: one of {', '.join(sorted(zoo.ZOO))}, or a module:factory path")
    if not isinstance(config, dict):
        raise UsageError(f"--config must be a JSON object of constructor arguments, got {config!r}")
    try:
        model = zoo.build(spec, config)
    except TypeError as error:  # an unknown constructor argument in --config
        raise UsageError(f"--config: {error}") from error
    return model, zoo.example_inputs(spec, model, grid, batch)


def _json(text: str, flag: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"{flag} is not valid JSON ({error}): {text!r}") from error


def _parse_grid(text: str) -> tuple[int, int, int]:
    try:
        grid = tuple(int(x) for x in text.split(","))
    except ValueError:
        grid = ()
    if len(grid) != 3 or min(grid) <= 0:
        raise UsageError(f"--grid must be three positive ints frames,height,width; got {text!r}")
    return grid


if __name__ == "__main__":
    raise SystemExit(main())
