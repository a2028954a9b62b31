"""On-disk cache of what compiling costs time to find (WEST topologies), keyed by everything that changes it.

Directory: `$SCALINGATTN_CACHE_DIR`, default `~/.cache/scaling_compiler`. One file per key; the key
hashes the caller's payload (for WEST: the weights fingerprint, each site's signature with its
token order, the calibration settings) with the package, torch and Triton versions and the GPU
name, so an entry from another setup is never reused. Entries store the key's fields and a
checksum of their data (`key_fields`, `checksum`), checked on load. Writes are atomic (temporary
file + rename) under a file lock, so concurrent writers of one key leave one whole entry. An
entry that fails to load or does not describe what was asked for is reported, removed and
recomputed, never used; a directory that cannot hold entries disables caching for the compile
(`writable_dir`), never fails it.
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
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

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


class UnfingerprintableWeight(TypeError):
    """A weight whose values `weights_fingerprint` cannot reach (a tensor subclass without `__tensor_flatten__`)."""


def weights_fingerprint(weights: Sequence[torch.Tensor]) -> str:
    """Hash of every weight's shape and dtype and an evenly strided sample of its values.

    Sampling keeps this cheap for multi-GB models (a few KB read per tensor) while any
    retraining or different checkpoint changes the sampled values. A tensor subclass (torchao's
    quantized weights: `Int8Tensor`, `Float8Tensor`, which implement neither `view` nor strided
    indexing) is hashed through what it is made of (`plain_parts`). Raises
    `UnfingerprintableWeight` rather than hash a weight without its values.
    """
    digest = hashlib.sha256()
    for weight in weights:
        digest.update(f"{tuple(weight.shape)}:{weight.dtype}".encode())
        for label, part in plain_parts(weight):
            if label:  # a subclass's inner tensor: which one, of what
                digest.update(f"{label}:{tuple(part.shape)}:{part.dtype}".encode())
            flat = part.detach().reshape(-1)
            step = max(1, flat.numel() // _FINGERPRINT_SAMPLES)
            digest.update(flat[::step][:_FINGERPRINT_SAMPLES].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:32]


def plain_parts(tensor: torch.Tensor, label: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(label, plain tensor) pairs that make up `tensor`: itself ("") if plain, else its inner tensors.

    Wrapper subclasses are opened with `__tensor_flatten__` (the protocol torch.compile itself
    uses), recursively; the label names the subclass, its metadata (object addresses removed, so
    it is the same in every process) and the inner tensor's attribute. A subclass with its own
    storage (no wrapper) is read as a plain tensor.
    """
    if is_traceable_wrapper_subclass(tensor):
        names, context = tensor.__tensor_flatten__()
        kind = f"{type(tensor).__module__}.{type(tensor).__qualname__}{_ADDRESS.sub('', repr(context))}"
        for name in names:
            yield from plain_parts(getattr(tensor, name), f"{label}/{kind}.{name}")
        return
    try:
        plain = tensor if type(tensor) is torch.Tensor else tensor.as_subclass(torch.Tensor)
        plain.untyped_storage()
    except Exception as error:  # noqa: BLE001  (a subclass with no data of its own raises what its dispatch raises)
        raise UnfingerprintableWeight(f"cannot fingerprint a {type(tensor).__qualname__}: no storage and no "
                                      "__tensor_flatten__ to reach its data") from error
    yield label, plain


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def key_fields(payload: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Everything `cache_key` hashes, as JSON values: `payload`, the versions and the device name.

    Entries store these fields so that a load can check them one by one: a file copied or
    written under the wrong key is then recognised, and the warning names the field that differs.
    """
    return json.loads(json.dumps({**payload, **versions(), "device": device_name(device)}, sort_keys=True, default=str))


def cache_key(payload: dict[str, Any], device: torch.device) -> str:
    """A key for `payload` made on `device` with this package, torch and Triton."""
    return hashlib.sha256(json.dumps(key_fields(payload, device), sort_keys=True).encode()).hexdigest()[:32]


def field_mismatch(stored: Any, expected: Any, where: str = "") -> str | None:
    """The first field (a dotted path) where `stored` differs from `expected`, in words; None if equal."""
    if isinstance(expected, dict) and isinstance(stored, dict):
        for name in sorted(set(expected) | set(stored), key=str):
            if name not in stored or name not in expected:
                return f"key field {where + str(name)!r} is {'missing' if name not in stored else 'unexpected'}"
            found = field_mismatch(stored[name], expected[name], f"{where}{name}.")
            if found:
                return found
        return None
    if isinstance(expected, list) and isinstance(stored, list) and len(stored) == len(expected):
        for i, (a, b) in enumerate(zip(stored, expected)):
            found = field_mismatch(a, b, f"{where}{i}.")
            if found:
                return found
        return None
    if stored != expected or type(stored) is not type(expected):
        return f"key field {where.rstrip('.') or '<root>'!r} is {_short(stored)}, expected {_short(expected)}"
    return None


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def checksum(tensors: Mapping[str, torch.Tensor], fields: Any = None) -> str:
    """SHA-256 of every tensor's name, dtype, shape and bytes (in name order) and of `fields` (JSON).

    Stored in an entry and checked on load: bit rot inside tensor data passes every structural
    check of the file format (the header is intact), only a checksum of the data finds it.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps(fields, sort_keys=True, default=str).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"\0{name}:{tensor.dtype}:{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def writable_dir() -> Path | None:
    """The cache directory, created if missing, or None (with a warning) when it cannot hold entries.

    Called once per compile before the cache is used, so that a read-only or uncreatable directory,
    or `$SCALINGATTN_CACHE_DIR` naming a regular file, disables caching with one warning instead of
    failing the compile. The probe writes and removes a temporary file: permission bits alone do
    not say whether a write succeeds (root, read-only mounts, immutable directories).
    """
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".probe-", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        log.warning("scalingattn: cache directory %s cannot hold entries (%s: %s); caching disabled for this "
                    "compile (set %s to a writable directory, or cache=False)",
                    directory, type(error).__name__, error.strerror or error, CACHE_DIR_ENV_VAR)
        return None
    return directory


def entry_path(key: str, suffix: str = ".safetensors") -> Path:
    return cache_dir() / f"{key}{suffix}"


def load(path: Path, read: Callable[[str], T], problem: Callable[[T], str | None]) -> T | None:
    """The entry at `path` read by `read`, or None: missing, or bad (then removed, with one warning).

    An entry is bad when it is not a regular file (a directory, a device, a broken link), when `read` raises
    anything, or when `problem` names a reason. A cache that cannot be read at all (the lock
    cannot be taken) is reported the same way and not used.
    """
    if not os.path.lexists(path):
        return None
    try:
        with _locked(path):
            reason: str | None
            if not path.is_file():  # a directory, a device, a broken link
                value, reason = None, "not a regular file"
            else:
                try:
                    value = read(str(path))
                    reason = problem(value)
                except Exception as error:  # anything a damaged file makes a reader raise
                    value, reason = None, f"{type(error).__name__}: {error}"
            if reason is not None:
                removal = _remove(path)
                if removal is None:
                    log.warning("scalingattn: ignoring and removing cache entry %s: %s; recomputing", path, reason)
                else:
                    log.warning("scalingattn: ignoring cache entry %s: %s (could not remove it: %s); recomputing",
                                path, reason, removal)
                return None
    except OSError as error:
        log.warning("scalingattn: cannot read cache entry %s (%s); recomputing", path, error)
        return None
    return value


def store(path: Path, write: Callable[[str], None]) -> Path | None:
    """Write the entry at `path` with `write(temporary path)`, then rename it into place atomically.

    Returns None (with a warning) if the entry cannot be written: the compile goes on uncached.
    Whatever occupies the path (a directory left there) is replaced.
    """
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(fd)
            write(tmp)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            os.replace(tmp, path)
    except OSError as error:
        log.warning("scalingattn: could not write cache entry %s (%s); not cached", path, error)
        return None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


_KEY_NAME = re.compile(r"^[0-9a-f]{32}(\.[A-Za-z0-9_.-]+)?$")  # an entry (cache_key + suffix) or its lock
_TEMPORARY = re.compile(r"^\.([0-9a-f]{32}\..*|probe-.*)\.tmp$")  # a write or probe cut short


def entries() -> list[Path]:
    """The cache's entries (not their lock files), oldest first; none when the directory is missing."""
    directory = cache_dir()
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _KEY_NAME.match(p.name) and not p.name.endswith(".lock")]
    return sorted(found, key=lambda p: (p.lstat().st_mtime, p.name))


def clear() -> int:
    """Remove every entry, lock file and left-over temporary file; returns the number of entries removed.

    Only names this module makes are touched, so a cache directory shared with other files (or
    `$SCALINGATTN_CACHE_DIR` set to a folder in use) keeps them.
    """
    directory = cache_dir()
    if not directory.is_dir():
        return 0
    removed = 0
    for path in directory.iterdir():
        if _KEY_NAME.match(path.name) or _TEMPORARY.match(path.name):
            error = _remove(path)
            if error:
                raise OSError(f"cannot remove {path}: {error}")
            removed += not (path.name.endswith(".lock") or path.name.endswith(".tmp"))
    return removed


def _remove(path: Path) -> str | None:
    """Remove whatever is at `path` (a file, a link or a directory tree); the error in words, or None."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError as error:
        return str(error)
    return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path`'s entry (`<path>.lock`), among threads and processes of this host.

    A directory at the lock's path (never made by this module) is removed first.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = Path(f"{path}.lock")
    if lock_path.is_dir() and not lock_path.is_symlink():
        log.warning("scalingattn: removing directory %s that stands where a cache lock file belongs", lock_path)
        shutil.rmtree(lock_path)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
