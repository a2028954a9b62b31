"""Cache faults (issue 15, item 3): every injected fault heals, with one warning, to a clean-cache run.

Each test starts from the entry a clean compile wrote (or a cache directory that cannot hold
entries), injects one fault, compiles again and checks: exactly one warning from the package,
WEST recalibrated (never a stale or broken map used), masks and outputs bitwise equal to the
clean-cache run's, and, for a faulty entry, the rewritten entry is a valid hit on the next compile.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from scaling_compiler import ScalingAttnBackend
from scaling_compiler.policies.west_fast.topology import Topology

from tests.local_dit import LocalDiT
from tests.processes import run_in_two_processes

GRID = (4, 16, 16)  # 1,024 tokens, 8 query blocks: masks at density 0.25 keep 2 blocks per row
OTHER_GRID = (4, 8, 8)
SITE = "<model>"


def compile_run(cache_dir: Path, grid=GRID, **options) -> tuple[ScalingAttnBackend, torch.Tensor]:
    """Compile LocalDiT at `grid` with the cache at `cache_dir`; the report's backend and the output."""
    os.environ["SCALINGATTN_CACHE_DIR"] = str(cache_dir)
    torch.manual_seed(0)
    model = LocalDiT(grid).eval()
    x = torch.randn(1, 4, *grid)
    options = {"density": 0.25, "schedule": "uniform", "calibration_samples": 2, **options}
    backend = ScalingAttnBackend(compiler="eager", **options)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(x)
    return backend, out


@pytest.fixture(autouse=True)
def restore_cache_dir_variable(monkeypatch):
    """compile_run sets the variable; monkeypatch restores it after each test."""
    monkeypatch.setenv("SCALINGATTN_CACHE_DIR", os.environ.get("SCALINGATTN_CACHE_DIR", ""))


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A clean-cache run: its entry's bytes, masks and output; and entries at another grid and seed."""
    saved = os.environ.get("SCALINGATTN_CACHE_DIR")
    root = tmp_path_factory.mktemp("clean")
    try:
        backend, out = compile_run(root / "main")
        assert "calibrated" in backend.report.topology_origin and backend.report.sites[0].status == "sparse"
        [entry] = (root / "main").glob("*.safetensors")
        compile_run(root / "grid", grid=OTHER_GRID)
        [other_grid] = (root / "grid").glob("*.safetensors")
        compile_run(root / "seed", calibration_seed=1)
        [other_seed] = (root / "seed").glob("*.safetensors")
    finally:
        if saved is None:
            os.environ.pop("SCALINGATTN_CACHE_DIR", None)
        else:
            os.environ["SCALINGATTN_CACHE_DIR"] = saved
    return {"name": entry.name, "bytes": entry.read_bytes(), "masks": backend.report.masks[SITE], "out": out,
            "other_grid": other_grid, "other_seed": other_seed}


@pytest.fixture
def cache(tmp_path, clean, monkeypatch):
    """A cache directory holding the clean run's entry; returns the entry's path."""
    monkeypatch.setenv("SCALINGATTN_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    entry = tmp_path / "cache" / clean["name"]
    entry.write_bytes(clean["bytes"])
    return entry


def package_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and r.name.startswith("scaling_compiler")]


def assert_heals(cache_dir: Path, clean, caplog, *, entry: Path | None, **options) -> None:
    """One warning, recalibrated, equal to the clean run; the entry rewritten and then a clean hit."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="scaling_compiler"):
        backend, out = compile_run(cache_dir, **options)
    warned = package_warnings(caplog)
    assert len(warned) == 1, warned
    report = backend.report
    assert "calibrated" in report.topology_origin, report.topology_origin
    assert torch.equal(report.masks[SITE], clean["masks"])
    torch.testing.assert_close(out, clean["out"], rtol=0, atol=0)  # the same masks: bitwise equal
    if entry is None:
        return
    assert entry.is_file() and Topology.load(str(entry)).sites
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="scaling_compiler"):
        backend, out = compile_run(cache_dir, **options)
    assert package_warnings(caplog) == []
    assert "from cache" in backend.report.topology_origin
    assert torch.equal(backend.report.masks[SITE], clean["masks"])
    torch.testing.assert_close(out, clean["out"], rtol=0, atol=0)


def rewrite(entry: Path, edit) -> None:
    """Load the entry, let `edit` change the Topology, save it back: a well-formed file, valid checksum."""
    topology = Topology.load(str(entry))
    edit(topology)
    topology.save(str(entry))


def tensor_span(entry: Path, name: str) -> tuple[int, int]:
    """Byte range of tensor `name`'s data in a safetensors file."""
    data = entry.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8:8 + header_len])[name]["data_offsets"]
    return 8 + header_len + start, 8 + header_len + end


@pytest.mark.parametrize("tensor", ["thresholds", "mass", "row_mass"])
def test_bit_rot_in_tensor_data(cache, clean, caplog, tensor):
    """Bytes flipped inside one tensor's data, header intact: the checksum catches it."""
    start, end = tensor_span(cache, f"{SITE}/{tensor}")
    data = bytearray(cache.read_bytes())
    middle = (start + end) // 2
    for i in range(middle, middle + 8):
        data[i] ^= 0x5A
    cache.write_bytes(bytes(data))
    assert_heals(cache.parent, clean, caplog, entry=cache)


def test_all_nan_thresholds(cache, clean, caplog):
    """A well-formed entry (valid checksum, right key) whose thresholds are all NaN."""
    def nan(topology):
        topology.sites[SITE].thresholds.fill_(float("nan"))
    rewrite(cache, nan)
    assert_heals(cache.parent, clean, caplog, entry=cache)


def test_other_grid_under_this_key(cache, clean, caplog):
    """A valid topology of the same weights at another grid, copied under this key."""
    fingerprint = Topology.load(str(cache)).fingerprint
    shutil.copyfile(clean["other_grid"], cache)
    rewrite(cache, lambda topology: setattr(topology, "fingerprint", fingerprint))
    assert_heals(cache.parent, clean, caplog, entry=cache)


def test_other_grid_with_this_entrys_key_fields(cache, clean, caplog):
    """As above, and the file also claims this entry's key fields: its sites' shapes give it away."""
    genuine = Topology.load(str(cache))

    def forge(topology):
        topology.fingerprint, topology.key = genuine.fingerprint, getattr(genuine, "key", None)
    shutil.copyfile(clean["other_grid"], cache)
    rewrite(cache, forge)
    assert_heals(cache.parent, clean, caplog, entry=cache)


def test_other_calibration_settings(cache, clean, caplog):
    """An entry made with another calibration seed (same weights, same sites) under this key."""
    shutil.copyfile(clean["other_seed"], cache)
    assert_heals(cache.parent, clean, caplog, entry=cache)


def test_other_calibration_settings_with_this_entrys_key_fields(cache, clean, caplog):
    genuine = Topology.load(str(cache))
    shutil.copyfile(clean["other_seed"], cache)
    rewrite(cache, lambda topology: setattr(topology, "key", getattr(genuine, "key", None)))
    assert_heals(cache.parent, clean, caplog, entry=cache)


def test_another_models_file(cache, clean, caplog):
    """An entry of other weights (another grid, so other buffers) copied under this key."""
    shutil.copyfile(clean["other_grid"], cache)
    assert_heals(cache.parent, clean, caplog, entry=cache)


def raw_rewrite(entry: Path, edit_tensors=None, edit_metadata=None) -> None:
    """Rewrite the file with safetensors itself (types Topology.save would fix), checksum recomputed where
    this version has one, so that the type checks, not the checksum, are what must catch the fault."""
    from safetensors.torch import load_file, save_file

    from scaling_compiler import cache as cache_module

    tensors = load_file(str(entry))
    data = entry.read_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    metadata = json.loads(header["__metadata__"]["scalingattn"])
    metadata.pop("checksum", None)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_metadata:
        metadata = edit_metadata(metadata)
    if hasattr(cache_module, "checksum") and isinstance(metadata, dict):
        metadata["checksum"] = cache_module.checksum(tensors, metadata)
    save_file(tensors, str(entry), metadata={"scalingattn": json.dumps(metadata)})


def _set_site_field(field, value):
    def edit(metadata):
        metadata["sites"][SITE][field] = value(metadata["sites"][SITE][field])
        return metadata
    return edit


WRONG_TYPES = {
    "int_thresholds": dict(edit_tensors=lambda t: t.update({f"{SITE}/thresholds": torch.ones_like(
        t[f"{SITE}/thresholds"], dtype=torch.int64)})),
    "float_row_blocks": dict(edit_tensors=lambda t: t.update({f"{SITE}/row_blocks": t[f"{SITE}/row_blocks"].float()})),
    "string_length": dict(edit_metadata=_set_site_field("q_len", str)),
    "float_grid": dict(edit_metadata=_set_site_field("token_grid", lambda g: [float(n) for n in g])),
    "sites_a_list": dict(edit_metadata=lambda m: {**m, "sites": list(m["sites"].values())}),
    "metadata_a_list": dict(edit_metadata=lambda m: [m]),
}


@pytest.mark.parametrize("fault", sorted(WRONG_TYPES))
def test_wrong_types(cache, clean, caplog, fault):
    """Fields or tensors of the wrong type in a file that safetensors reads."""
    raw_rewrite(cache, **WRONG_TYPES[fault])
    assert_heals(cache.parent, clean, caplog, entry=cache)


def test_thresholds_no_calibration_makes(cache, clean, caplog):
    """Thresholds in range but impossible (every block at 1: no row has a first block), valid checksum."""
    rewrite(cache, lambda topology: topology.sites[SITE].thresholds.fill_(1.0))
    assert_heals(cache.parent, clean, caplog, entry=cache)


@pytest.mark.parametrize("fault", ["truncated_data", "truncated_header", "empty", "random_bytes"])
def test_unreadable_entries(cache, clean, caplog, fault):
    """Faults the starting code already survived, kept as regression tests."""
    data = cache.read_bytes()
    damaged = {"truncated_data": data[:-100], "truncated_header": data[:40], "empty": b"",
               "random_bytes": torch.randint(0, 256, (len(data),), generator=torch.Generator().manual_seed(0),
                                             dtype=torch.uint8).numpy().tobytes()}[fault]
    cache.write_bytes(damaged)
    assert_heals(cache.parent, clean, caplog, entry=cache)


def test_directory_where_the_entry_should_be(cache, clean, caplog):
    cache.unlink()
    (cache / "inside").mkdir(parents=True)
    (cache / "inside" / "file").write_text("x")
    assert_heals(cache.parent, clean, caplog, entry=cache)


def test_directory_where_the_lock_should_be(cache, clean, caplog):
    cache.unlink()
    Path(f"{cache}.lock").mkdir()
    assert_heals(cache.parent, clean, caplog, entry=cache)


def test_cache_dir_is_a_regular_file(tmp_path, clean, caplog):
    path = tmp_path / "not-a-directory"
    path.write_text("a file")
    assert_heals(path, clean, caplog, entry=None)
    assert path.read_text() == "a file"


def test_cache_dir_cannot_be_created(tmp_path, clean, caplog):
    """A missing directory whose parent is a regular file."""
    (tmp_path / "file").write_text("a file")
    assert_heals(tmp_path / "file" / "cache", clean, caplog, entry=None)


@pytest.fixture
def read_only_cache(cache):
    """The cache directory made read-only (chmod, and for root, which chmod does not stop, chattr +i)."""
    directory = cache.parent
    directory.chmod(0o555)
    immutable = False
    if os.geteuid() == 0 and shutil.which("chattr"):
        immutable = subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode == 0
    try:
        probe = directory / "probe"
        try:
            probe.write_text("x")
        except OSError:
            pass
        else:
            probe.unlink()
            pytest.skip("cannot make a directory read-only here (root without chattr +i)")
        yield cache
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(directory)], check=True)
        directory.chmod(0o755)


def test_read_only_cache_dir(read_only_cache, clean, caplog):
    """Caching is disabled for the compile (one warning); the entry is left as it was."""
    before = read_only_cache.read_bytes()
    assert_heals(read_only_cache.parent, clean, caplog, entry=None)
    assert read_only_cache.read_bytes() == before


def _compile_in_process(directory: str, barrier, results) -> None:
    """In a spawned process: compile the clean run's model with the cache at `directory`."""
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("scaling_compiler").addHandler(handler)
    barrier.wait()
    backend, _ = compile_run(Path(directory))
    results.put((backend.report.topology_origin, warnings))


def test_two_processes_compiling_at_once(tmp_path, clean, caplog):
    """Two compiles of one model in two processes at once both calibrate and write the same key;
    the entry left is whole: the next compile is a clean hit, equal to the clean-cache run."""
    directory = tmp_path / "cache"
    outcomes = run_in_two_processes(_compile_in_process, lambda i: (str(directory),))
    assert [warnings for _, warnings in outcomes] == [[], []]
    assert sum("calibrated" in origin for origin, _ in outcomes) >= 1
    assert [p.name for p in directory.glob("*.safetensors")] == [clean["name"]]
    with caplog.at_level(logging.WARNING, logger="scaling_compiler"):
        backend, out = compile_run(directory)
    assert package_warnings(caplog) == []
    assert "from cache" in backend.report.topology_origin
    assert torch.equal(backend.report.masks[SITE], clean["masks"])
    torch.testing.assert_close(out, clean["out"], rtol=0, atol=0)
