"""scaling-compiler: compile video-DiT attention into per-head block-sparse kernels.

    torch.compile(model, backend="scalingattn", options={"density": 0.25})

or, to keep a handle on what the backend did:

    backend = scaling_compiler.ScalingAttnBackend(density=0.25)
    torch.compile(model, backend=backend)(...)
    print(backend.report)
"""
from .backend import ScalingAttnBackend, scalingattn_backend
from .config import Config
from .report import PassReport, SiteReport

__all__ = ["Config", "PassReport", "ScalingAttnBackend", "SiteReport", "scalingattn_backend"]
