"""Compiling a diffusers model under its context parallelism (`model.enable_parallelism(config=
ContextParallelConfig(ulysses_degree=N))`) with `backend="scalingattn"` and `fullgraph=True`.

diffusers' context-parallel hooks log a warning from inside the traced forward when an input of the
model's `_cp_plan` has fewer dims than the plan expects (Wan2.1's 1-D timestep), through
`logger.warning_once`, which dynamo cannot trace: without this, `fullgraph=True` fails and a plain
compile breaks the graph there. The hooks also look up the forward's signature on first use
(`inspect.signature`, not traceable either): call the model once eagerly before compiling it.
"""
from __future__ import annotations

import logging

import torch


def ignore_warning_once() -> bool:
    """Let dynamo skip `logging.Logger.warning_once` (installed by transformers, which diffusers
    imports) instead of breaking the graph. Returns whether there was one to skip."""
    if not hasattr(logging.Logger, "warning_once"):
        try:
            import transformers.utils.logging  # noqa: F401  (installs it, as importing a diffusers model does)
        except ImportError:
            return False
    warning_once = getattr(logging.Logger, "warning_once", None)
    if warning_once is None:
        return False
    config = torch._dynamo.config
    ignored = getattr(config, "ignore_logging_functions", None)  # torch >= 2.12; before: ignore_logger_methods
    (ignored if ignored is not None else config.ignore_logger_methods).add(warning_once)
    return True


def enable_ulysses(model: torch.nn.Module, degree: int) -> None:
    """`model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree))` on a (ring 1,
    ulysses `degree`) mesh of this machine's accelerator, or of the CPU without one (gloo).

    Without an accelerator diffusers picks the device as `rank % torch.accelerator.device_count()`,
    a division by 0: the call then sees a device count of 1 (the CPU). The model's attention backend
    must support context parallelism (e.g. `model.set_attention_backend("native")`).
    """
    import unittest.mock

    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    device_type = torch._C._get_accelerator().type
    mesh = init_device_mesh(device_type, (1, degree), mesh_dim_names=("ring", "ulysses"))
    config = ContextParallelConfig(ulysses_degree=degree, mesh=mesh)
    if torch.accelerator.device_count() > 0:
        model.enable_parallelism(config=config)
        return
    with unittest.mock.patch("torch.accelerator.device_count", return_value=1):
        model.enable_parallelism(config=config)
