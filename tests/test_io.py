"""kd_utils.io: atomic writes (umask permissions, fsync before the rename, nothing half-written) and JSON reading."""

import os
import stat
from pathlib import Path

import pytest

from kd_utils import io


@pytest.fixture()
def umask():
    """Set a umask for one test and restore the process's own afterwards."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield lambda mask: os.umask(mask)
    os.umask(saved)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_written_files_get_the_permissions_the_umask_gives_any_new_file(tmp_path, umask, mask):
    umask(mask)
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what open() gives a new file under this umask
    io.write_atomic(tmp_path / "atomic.txt", "x")
    assert mode(tmp_path / "atomic.txt") == mode(plain) == 0o666 & ~mask
    assert mode(io.temp_path_beside(tmp_path / "next.ipynb", ".ipynb")) == 0o666 & ~mask  # not mkstemp's 0600


def test_text_is_utf8_bytes_are_kept_and_a_rewrite_replaces(tmp_path):
    target = tmp_path / "sub" / "file.json"  # the directory is made
    io.write_atomic(target, "naïve ✓")
    assert target.read_bytes() == "naïve ✓".encode()
    io.write_atomic(target, b"\x00\xff")
    assert target.read_bytes() == b"\x00\xff"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.json"]  # no temporary file left


def test_the_file_is_fsynced_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        events.append((f"fsync {kind}", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(source, target):
        events.append(("replace", str(source), Path(source).read_bytes()))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "out.txt"
    io.write_atomic(target, "content")
    (synced_file, temp), (renamed, source, data), (synced_dir, directory) = events
    assert (synced_file, renamed, synced_dir) == ("fsync file", "replace", "fsync dir")
    assert temp == source and Path(source).parent == tmp_path and data == b"content"  # all of it, before the rename
    assert directory == str(tmp_path) and target.read_text() == "content"


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path, monkeypatch, failing):
    target = tmp_path / "results.csv"
    target.write_text("old, complete\n")

    def fail(*args):
        raise OSError(f"{failing} failed (disk full?)")

    monkeypatch.setattr(os, failing, fail)
    with pytest.raises(OSError, match=f"{failing} failed"):
        io.write_atomic(target, "new, and much longer content that never lands\n")
    with pytest.raises(OSError):
        io.write_atomic(tmp_path / "fresh.csv", "never written")
    monkeypatch.undo()
    assert target.read_text() == "old, complete\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]


def test_read_json_names_the_file_when_it_is_missing_truncated_or_not_text(tmp_path):
    good = tmp_path / "manifest.json"
    io.write_atomic(good, '{"fields": {"k": 4}, "shards": [1, 2]}')
    assert io.read_json(good) == {"fields": {"k": 4}, "shards": [1, 2]}
    with pytest.raises(ValueError, match=f"{tmp_path / 'absent.json'}: file not found"):
        io.read_json(tmp_path / "absent.json")
    truncated = tmp_path / "truncated.json"
    truncated.write_text('{"fields": {"k": 4}, "sha')
    with pytest.raises(ValueError, match=f"{truncated}: not valid JSON \\(truncated or corrupt\\?\\)"):
        io.read_json(truncated)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=f"{binary}: not valid JSON"):
        io.read_json(binary)


def strict_loads(text: str):
    """json.loads refusing NaN and Infinity, as jq, JavaScript and other strict readers do."""
    import json

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(text, parse_constant=refuse)


def test_standard_json_writes_non_finite_floats_as_null_at_any_depth():
    value = {"a": float("nan"), "b": [1.5, float("inf"), (float("-inf"), 2)], "c": {"d": float("nan"), "e": "NaN"},
             "f": 0.0, "g": None, "h": 3}
    text = io.standard_json(value, indent=1)
    assert strict_loads(text) == {"a": None, "b": [1.5, None, [None, 2]], "c": {"d": None, "e": "NaN"}, "f": 0.0,
                                  "g": None, "h": 3}
    assert io.standard_json({"p": Path("x")}, default=str) == '{"p": "x"}'  # dumps' keywords pass through
    assert value["a"] != value["a"]  # the input is left as it was
