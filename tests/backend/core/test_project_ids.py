"""Project ids with leading zeros are one Label Studio project: one lock, one registry folder, one key set."""

from __future__ import annotations

import pytest

from backend.core import keys
from backend.core import queue as wq
from backend.core.registry import ModelRegistry
from tests.worker_fixtures import make_settings
from worker.training import lock


def test_02_and_2_share_one_lock(redis15, project_id):
    with lock.training_slot(redis15, f"0{project_id}", "job-a") as slot:
        assert slot.key == keys.train_running(project_id)
        assert not lock.TrainingSlot(redis15, str(project_id), "job-b", 5.0).try_acquire()
        with pytest.raises(TimeoutError):  # a second training of the same project waits, it does not run
            with lock.training_slot(redis15, f"00{project_id}.1795306664", "job-c", timeout=1.5):
                pass
    assert redis15.get(keys.train_running(project_id)) is None


def test_02_and_2_share_one_registry_folder(tmp_path, redis15, project_id):
    reg = ModelRegistry(tmp_path / "models", redis15)
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(b"x" * 512)
    first = reg.add_version(f"0{project_id}", ckpt, {})
    second = reg.add_version(f"00{project_id}", ckpt, {})
    reg.promote(f"{project_id}.1795306664", second.version)
    assert (first.version, second.version) == ("v0001", "v0002")  # one numbering, not two v0001
    assert [p.name for p in (tmp_path / "models").iterdir() if not p.name.startswith(".")] == [str(project_id)]
    assert first.meta["project"] == str(project_id)
    assert reg.current_version(f"000{project_id}") == reg.current_version(project_id) == "v0002"
    assert [v.version for v in reg.versions(f"0{project_id}")] == ["v0001", "v0002"]
    (tmp_path / "models" / f"0{project_id}").mkdir()  # a shadow folder left by an older release
    assert reg.projects() == [str(project_id)]


def test_02_and_2_share_one_redis_key_set(tmp_path, redis15, project_id, qprefix):
    settings = make_settings(tmp_path, None, train_min_new_annotations=100)
    queued = wq.request_training(redis15, f"0{project_id}", settings=settings)
    assert queued["status"] == "queued" and queued["project"] == str(project_id)
    again = wq.request_training(redis15, project_id, settings=settings)
    assert again["status"] == "coalesced" and again["job_id"] == queued["job_id"]  # not a second training
    wq.record_annotation_event(redis15, f"00{project_id}", settings)
    wq.record_annotation_event(redis15, project_id, settings)
    assert redis15.get(keys.train_events(project_id)) == b"2"
    assert wq.training_status(redis15, f"0{project_id}")["queued"]["job_id"] == queued["job_id"]
    assert not list(redis15.scan_iter(f"lsb:*:0{project_id}*")) and not list(redis15.scan_iter(f"lsb:*:0{project_id}"))
