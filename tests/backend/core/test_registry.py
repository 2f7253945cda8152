"""backend.core.registry: atomic versions, promotion everywhere, rollback, pruning."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from backend.core import registry as registry_mod
from backend.core.keys import Keys
from backend.core.registry import ModelRegistry


def _ckpt(tmp_path, name="c.pt", size=2048):
    path = tmp_path / name
    path.write_bytes(bytes(range(256)) * (size // 256))
    return path


def test_add_version_is_complete_and_numbered(tmp_path, redis15, project_id):
    reg = ModelRegistry(tmp_path / "models", redis15)
    extra = _ckpt(tmp_path, "model.onnx", 512)
    v1 = reg.add_version(project_id, _ckpt(tmp_path), {"metrics": {"map50_95": 0.1}, "classes": ["A"]}, {"onnx": extra})
    v2 = reg.add_version(project_id, _ckpt(tmp_path), {"metrics": {"map50_95": 0.2}})
    assert (v1.version, v2.version) == ("v0001", "v0002")
    assert v1.checkpoint.read_bytes() == _ckpt(tmp_path).read_bytes()
    meta = json.loads((v1.path / "meta.json").read_text())
    assert meta["project"] == str(project_id) and meta["version"] == "v0001" and meta["classes"] == ["A"]
    assert v1.export("onnx") == v1.path / "model.onnx"
    assert [v.version for v in reg.versions(project_id)] == ["v0001", "v0002"]
    assert not list((tmp_path / "models" / str(project_id)).glob(".staging-*"))
    assert reg.current(project_id) is None  # adding never promotes


def test_promote_sets_redis_pubsub_and_pointer(tmp_path, redis15, project_id):
    reg = ModelRegistry(tmp_path / "models", redis15)
    info = reg.add_version(project_id, _ckpt(tmp_path), {})
    pubsub = redis15.pubsub()
    pubsub.subscribe(Keys.MODELS_CHANNEL)
    assert pubsub.get_message(timeout=2)["type"] == "subscribe"
    reg.promote(project_id, info.version)
    assert redis15.get(f"lsb:model:{project_id}:current") == b"v0001"
    pointer = json.loads((tmp_path / "models" / str(project_id) / "current.json").read_text())
    assert pointer["version"] == "v0001"
    deadline = time.monotonic() + 3
    message = None
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.5)
        if message and message["type"] == "message":
            data = json.loads(message["data"])
            if data["project"] == str(project_id):
                break
    pubsub.close()
    assert message and json.loads(message["data"]) == {"project": str(project_id), "version": "v0001"}
    # the disk pointer survives a Redis flush of the key
    redis15.delete(f"lsb:model:{project_id}:current")
    assert reg.current_version(project_id) == "v0001"
    with pytest.raises(KeyError):
        reg.promote(project_id, "v0099")


def test_rollback_and_prune_keep_current(tmp_path, redis15, project_id):
    reg = ModelRegistry(tmp_path / "models", redis15)
    for _ in range(4):
        reg.promote(project_id, reg.add_version(project_id, _ckpt(tmp_path), {}).version)
    assert reg.current_version(project_id) == "v0004"
    assert reg.rollback(project_id).version == "v0003"
    assert reg.rollback(project_id, "v0001").version == "v0001"
    assert redis15.get(f"lsb:model:{project_id}:current") == b"v0001"
    deleted = reg.prune(project_id, keep=2)
    assert sorted(deleted) == ["v0002"]  # v0001 is current, v0003/v0004 are the newest two
    assert [v.version for v in reg.versions(project_id)] == ["v0001", "v0003", "v0004"]
    with pytest.raises(KeyError):
        reg.rollback(project_id)  # nothing before v0001


def test_crash_during_add_version_leaves_nothing_visible(tmp_path, redis15, project_id, monkeypatch):
    reg = ModelRegistry(tmp_path / "models", redis15)
    reg.promote(project_id, reg.add_version(project_id, _ckpt(tmp_path), {}).version)
    real_copy = shutil.copy2

    def half_copy_then_crash(src, dst, *args, **kwargs):
        with open(src, "rb") as fh, open(dst, "wb") as out:
            out.write(fh.read(100))  # a partial file in the staging folder
        raise OSError("disk died mid-copy")

    monkeypatch.setattr(registry_mod.shutil, "copy2", half_copy_then_crash)
    with pytest.raises(OSError):
        reg.add_version(project_id, _ckpt(tmp_path), {"metrics": {}})
    monkeypatch.setattr(registry_mod.shutil, "copy2", real_copy)
    root = tmp_path / "models" / str(project_id)
    assert sorted(p.name for p in root.iterdir()) == ["current.json", "v0001"]
    assert [v.version for v in reg.versions(project_id)] == ["v0001"]
    assert reg.current_version(project_id) == "v0001"
    # a crash between copy and rename (exports copied, meta written) also leaves nothing
    monkeypatch.setattr(registry_mod.os, "rename", lambda *a: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError):
        reg.add_version(project_id, _ckpt(tmp_path), {})
    monkeypatch.undo()
    assert sorted(p.name for p in root.iterdir()) == ["current.json", "v0001"]
    assert reg.add_version(project_id, _ckpt(tmp_path), {}).version == "v0002"
