"""On-disk cache of WEST topologies, so a second compile of the same model and shape skips calibration.

Directory: `$SCALINGATTN_CACHE_DIR`, default `~/.cache/scaling_compiler`. One safetensors file
per key; the key hashes everything that changes the result: the weights fingerprint, each
site's signature (name, shapes, dtype, grid, text spans), the calibration settings, and the
package and torch versions. Writes are atomic (temporary file + rename) under a file lock. A
file that fails to load or does not describe what was asked for is reported, removed and
recomputed, never used.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from .topology import Topology, TopologyFileError

log = logging.getLogger(__name__)

CACHE_DIR_ENV_VAR = "SCALINGATTN_CACHE_DIR"
PACKAGE_VERSION = "0.1.0"
_FINGERPRINT_SAMPLES = 4096  # values read per weight tensor


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV_VAR) or Path.home() / ".cache" / "scaling_compiler")


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


def cache_key(fingerprint: str, sites: list[dict[str, Any]], calibration: dict[str, Any]) -> str:
    payload = {
        "fingerprint": fingerprint, "sites": sites, "calibration": calibration,
        "package": PACKAGE_VERSION, "torch": torch.__version__.split("+")[0],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def load(key: str, fingerprint: str, site_names: list[str]) -> Topology | None:
    """The cached topology for `key`, or None (missing, corrupted or mismatched: then removed)."""
    path = cache_dir() / f"{key}.safetensors"
    if not path.exists():
        return None
    with _locked(path):
        try:
            topology = Topology.load(str(path))
            problem = None
            if topology.fingerprint != fingerprint:
                problem = f"weights fingerprint {topology.fingerprint} != {fingerprint}"
            elif sorted(topology.sites) != sorted(site_names):
                problem = f"sites {sorted(topology.sites)} != {sorted(site_names)}"
        except TopologyFileError as error:
            topology, problem = None, str(error)
        if problem is not None:
            log.warning("scalingattn: ignoring and removing cached topology %s: %s; recalibrating", path, problem)
            path.unlink(missing_ok=True)
            return None
    return topology


def store(key: str, topology: Topology) -> Path:
    path = cache_dir() / f"{key}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            topology.save(tmp)
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
