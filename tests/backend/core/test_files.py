"""backend.core.files: a crash between writing and renaming leaves the old file intact."""

from __future__ import annotations

import json
import os
import stat

import pytest

from backend.core import files


def test_write_json_atomic_replaces_whole_file(tmp_path):
    target = tmp_path / "sub" / "current.json"
    files.write_json_atomic(target, {"version": "v0001"})
    files.write_json_atomic(target, {"version": "v0002", "at": tmp_path})
    assert json.loads(target.read_text()) == {"version": "v0002", "at": str(tmp_path)}
    assert [p.name for p in target.parent.iterdir()] == ["current.json"]  # no temp file left
    assert stat.S_IMODE(target.stat().st_mode) & 0o044  # readable by others (umask permitting)


def test_crash_between_write_and_replace_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "meta.json"
    target.write_text('{"old": true}')

    def killed(*_args):
        raise KeyboardInterrupt  # the process dies after the temp file is written, before the rename

    monkeypatch.setattr(files.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        files.write_json_atomic(target, {"new": True})
    assert json.loads(target.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]


def test_write_is_fsynced_unless_asked_not_to(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(files.os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    files.write_atomic(tmp_path / "a.bin", b"abc")
    files.write_atomic(tmp_path / "b.bin", "text", durable=False)
    assert len(synced) == 1
    assert (tmp_path / "a.bin").read_bytes() == b"abc" and (tmp_path / "b.bin").read_text() == "text"


def test_copy_atomic(tmp_path):
    source = tmp_path / "best.pt"
    source.write_bytes(os.urandom(3 * 1024 * 1024 + 7))
    files.copy_atomic(source, tmp_path / "out" / "candidate.pt")
    assert (tmp_path / "out" / "candidate.pt").read_bytes() == source.read_bytes()
