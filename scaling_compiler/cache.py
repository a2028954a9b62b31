"""On-disk cache of what compiling costs time to find (WEST topologies), keyed by everything that changes it.

Directory: `$SCALINGATTN_CACHE_DIR`, default `~/.cache/scaling_compiler`. One file per key; the key
hashes the caller's payload (for WEST: the weights fingerprint, each site's signature with its
token order, the calibration settings) with the package, torch and Triton versions and the GPU
name, so an entry from another setup is never reused. Writes are atomic (temporary file + rename)
under a file lock. An entry that fails to load or does not describe what was asked for is
reported, removed and recomputed, never used.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch

log = logging.getLogger(__name__)

CACHE_DIR_ENV_VAR = "SCALINGATTN_CACHE_DIR"
PACKAGE = "scaling-compiler"
_FINGERPRINT_SAMPLES = 4096  # values read per weight tensor
T = TypeVar("T")


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV_VAR) or Path.home() / ".cache" / "scaling_compiler")


@functools.cache
def versions() -> dict[str, str]:
    """The package's version (from its installed metadata), torch's and Triton's."""
    try:
        package = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        package = "unknown"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"package": package, "torch": torch.__version__.split("+")[0], "triton": triton_version}


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def weights_fingerprint(weights: Sequence[torch.Tensor]) -> str:
    """Hash of every weight's shape and dtype and an evenly strided sample of its values.

    Sampling keeps this cheap for multi-GB models (a few KB read per tensor) while any
    retraining or different checkpoint changes the sampled values.
    """
    digest = hashlib.sha256()
    for weight in weights:
        flat = weight.detach().reshape(-1)
        step = max(1, flat.numel() // _FINGERPRINT_SAMPLES)
        sample = flat[::step][:_FINGERPRINT_SAMPLES].float().cpu()
        digest.update(f"{tuple(weight.shape)}:{weight.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:32]


def cache_key(payload: dict[str, Any], device: torch.device) -> str:
    """A key for `payload` made on `device` with this package, torch and Triton."""
    full = {**payload, **versions(), "device": device_name(device)}
    return hashlib.sha256(json.dumps(full, sort_keys=True, default=str).encode()).hexdigest()[:32]


def entry_path(key: str, suffix: str = ".safetensors") -> Path:
    return cache_dir() / f"{key}{suffix}"


def load(path: Path, read: Callable[[str], T], problem: Callable[[T], str | None]) -> T | None:
    """The entry at `path` read by `read`, or None (missing; unreadable or `problem` says it does not
    match: then removed, with a warning)."""
    if not path.exists():
        return None
    with _locked(path):
        try:
            value = read(str(path))
            reason = problem(value)
        except (OSError, ValueError) as error:
            value, reason = None, str(error)
        if reason is not None:
            log.warning("scalingattn: ignoring and removing cache entry %s: %s; recomputing", path, reason)
            path.unlink(missing_ok=True)
            return None
    return value


def store(path: Path, write: Callable[[str], None]) -> Path:
    """Write the entry at `path` with `write(temporary path)`, then rename it into place atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
