"""The generic on-disk cache (`scaling_compiler.cache`): keys and their fields, checksums, bad entries,
unusable directories, and two processes writing one key at once."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest
import torch

from scaling_compiler import cache
from scaling_compiler.policies.west_fast.topology import SiteTopology, Topology, thresholds_from_significance
from tests.processes import run_in_two_processes

PAYLOAD = {"fingerprint": "f" * 32, "sites": [{"name": "a", "grid": (2, 3, 4)}], "calibration": {"seed": 0}}


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_DIR_ENV_VAR, str(tmp_path / "cache"))
    return tmp_path / "cache"


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_key_fields_are_what_the_key_hashes():
    fields = cache.key_fields(PAYLOAD, torch.device("cpu"))
    assert fields["device"] == "cpu" and fields["torch"] == torch.__version__.split("+")[0]
    assert fields["sites"][0]["grid"] == [2, 3, 4]  # JSON values: as read back from a file
    expected = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]
    assert cache.cache_key(PAYLOAD, torch.device("cpu")) == expected
    other = {**PAYLOAD, "calibration": {"seed": 1}}
    assert cache.cache_key(other, torch.device("cpu")) != expected


def test_field_mismatch_names_the_field():
    fields = cache.key_fields(PAYLOAD, torch.device("cpu"))
    assert cache.field_mismatch(json.loads(json.dumps(fields)), fields) is None
    changed = json.loads(json.dumps(fields))
    changed["calibration"]["seed"] = 1
    assert "'calibration.seed' is 1, expected 0" in cache.field_mismatch(changed, fields)
    changed = json.loads(json.dumps(fields))
    changed["sites"][0]["grid"] = [2, 3, 5]
    assert "'sites.0.grid.2'" in cache.field_mismatch(changed, fields)
    del changed["device"]
    assert "'device' is missing" in cache.field_mismatch(changed, fields)
    assert cache.field_mismatch([fields], fields) is not None
    assert cache.field_mismatch({**fields, "calibration": {"seed": 0.0}}, fields) is not None  # 0.0 is not 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.int64, torch.bool])
def test_checksum_sees_every_byte_name_dtype_shape_and_field(dtype):
    tensors = {"a": (torch.arange(24) % 3).to(dtype).reshape(2, 12), "b": torch.ones(3, dtype=dtype)}
    reference = cache.checksum(tensors, {"x": 1})
    assert cache.checksum(dict(reversed(tensors.items())), {"x": 1}) == reference  # order of names is not data
    raw = tensors["a"].reshape(-1).view(torch.uint8).clone()
    for byte in range(raw.numel()):
        flipped = raw.clone()
        flipped[byte] ^= 1
        damaged = {**tensors, "a": flipped.view(dtype).reshape(2, 12)}
        assert cache.checksum(damaged, {"x": 1}) != reference, byte
    assert cache.checksum({**tensors, "a": tensors["a"].reshape(12, 2)}, {"x": 1}) != reference
    assert cache.checksum({"c": tensors["a"], "b": tensors["b"]}, {"x": 1}) != reference
    assert cache.checksum(tensors, {"x": 2}) != reference


def test_load_removes_whatever_is_not_a_good_entry(cache_dir, caplog):
    path = cache.entry_path("k", ".json")
    cache_dir.mkdir()
    read = lambda p: json.loads(Path(p).read_text())  # noqa: E731
    problem = lambda value: None if value == {"ok": 1} else f"value {value}"  # noqa: E731

    assert cache.load(path, read, problem) is None  # missing: no warning
    assert warnings_of(caplog) == []
    assert cache.store(path, lambda tmp: Path(tmp).write_text('{"ok": 1}')) == path
    assert cache.load(path, read, problem) == {"ok": 1}
    for bad in ['{"ok": 2}', "[1, 2", '"text"']:  # a problem; a parse error; a wrong type for the problem check
        path.write_text(bad)
        caplog.clear()
        assert cache.load(path, read, lambda v: problem(v) if isinstance(v, dict) else v["ok"]) is None
        assert len(warnings_of(caplog)) == 1 and not path.exists()
    (path / "sub").mkdir(parents=True)  # a directory where the entry should be
    caplog.clear()
    assert cache.load(path, read, problem) is None
    assert len(warnings_of(caplog)) == 1 and "not a regular file" in warnings_of(caplog)[0]
    assert not path.exists()
    (path / "sub").mkdir(parents=True)  # and a store replaces one too
    assert cache.store(path, lambda tmp: Path(tmp).write_text('{"ok": 1}')) == path
    assert cache.load(path, read, problem) == {"ok": 1}
    assert sorted(p.name for p in cache_dir.iterdir()) == ["k.json", "k.json.lock"]  # no temporary file left


def test_store_that_fails_warns_and_leaves_nothing(cache_dir, caplog):
    path = cache.entry_path("k", ".json")

    def write(tmp: str) -> None:
        Path(tmp).write_text("partial")
        raise OSError("disk full")

    assert cache.store(path, write) is None
    assert len(warnings_of(caplog)) == 1 and "disk full" in warnings_of(caplog)[0]
    assert sorted(p.name for p in cache_dir.iterdir()) == ["k.json.lock"]


def test_writable_dir(cache_dir, tmp_path, monkeypatch, caplog):
    assert cache.writable_dir() == cache_dir and cache_dir.is_dir()  # a missing directory is created
    assert list(cache_dir.iterdir()) == []  # the probe is removed
    assert warnings_of(caplog) == []
    regular = tmp_path / "file"
    regular.write_text("keep")
    for unusable in (regular, regular / "below"):  # a regular file; a directory that cannot be created
        monkeypatch.setenv(cache.CACHE_DIR_ENV_VAR, str(unusable))
        caplog.clear()
        assert cache.writable_dir() is None
        [warning] = warnings_of(caplog)
        assert str(unusable) in warning and "caching disabled" in warning
    assert regular.read_text() == "keep"


# Two processes writing one key


def _topology(writer: int) -> Topology:
    """A topology of a few MB; the writers' differ, so an interleaved file would fail its checksum."""
    generator = torch.Generator().manual_seed(writer)
    significance = torch.rand(4, 40, 40, generator=generator)
    site = SiteTopology(thresholds_from_significance(significance), significance, 40 * 128, 40 * 128, (10, 32, 16), (),
                        "calibrated", torch.rand(4, 2000, 40, generator=generator),
                        torch.randint(0, 40, (2000,), generator=generator))
    return Topology("f" * 32, {"site": site}, {"seed": 0}, key={"k": 1})


def _problem(topology: Topology) -> str | None:
    return None if topology.key == {"k": 1} and topology.checksum else "wrong key"


def _write_and_read(writer: int, directory: str, rounds: int, barrier, results) -> None:
    """In a spawned process: store this writer's topology and load the entry, `rounds` times."""
    os.environ[cache.CACHE_DIR_ENV_VAR] = directory
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("scaling_compiler").addHandler(handler)
    topology, path = _topology(writer), cache.entry_path("key")
    seen = {0: 0, 1: 0}
    barrier.wait()
    for _ in range(rounds):
        assert cache.store(path, topology.save) == path
        loaded = cache.load(path, Topology.load, _problem)
        if loaded is not None:
            seen[int(torch.equal(loaded.sites["site"].mass, _topology(1).sites["site"].mass))] += 1
    results.put((writer, warnings, seen))


def test_two_processes_writing_one_key_leave_a_whole_entry(cache_dir):
    """Both store and load one key, at once, many times: every load finds a whole entry (one
    writer's or the other's, never a mix or a torn file), no warning, and one good entry after."""
    outcomes = run_in_two_processes(_write_and_read, lambda w: (w, str(cache_dir), 40))
    for writer, warnings, seen in outcomes:
        assert warnings == [], (writer, warnings)
        assert sum(seen.values()) == 40, (writer, seen)  # every load after its own store found an entry
    loaded = cache.load(cache.entry_path("key"), Topology.load, _problem)
    assert loaded is not None
    assert any(torch.equal(loaded.sites["site"].thresholds, _topology(w).sites["site"].thresholds.half().float())
               for w in (0, 1))
    assert sorted(p.name for p in cache_dir.iterdir()) == ["key.safetensors", "key.safetensors.lock"]


def test_cli_cache_show_and_clear(cache_dir, capsys):
    from scaling_compiler import cli

    assert cli.main(["cache", "clear"]) == 0  # nothing there yet
    assert "removed 0 entries" in capsys.readouterr().out
    keys = [cache.cache_key({"n": n}, torch.device("cpu")) for n in range(2)]
    for key, suffix in zip(keys, (".safetensors", ".json")):
        cache.store(cache.entry_path(key, suffix), lambda tmp: Path(tmp).write_bytes(b"x" * 2048))
    (cache_dir / f".{keys[0]}.safetensors.abc.tmp").write_text("cut short")
    (cache_dir / "notes.txt").write_text("not ours")
    assert cli.main(["cache", "show"]) == 0
    out = capsys.readouterr().out
    assert f"{cache_dir}: 2 entries" in out and all(key in out for key in keys) and "notes" not in out
    assert cli.main(["cache", "clear"]) == 0
    assert f"removed 2 entries from {cache_dir}" in capsys.readouterr().out
    assert [p.name for p in cache_dir.iterdir()] == ["notes.txt"]
    assert cli.main(["cache"]) == 0
    assert f"{cache_dir}: 0 entries" in capsys.readouterr().out
