"""worker.training.lock: one training per project, a heartbeat that keeps the lock, expiry after a crash."""

from __future__ import annotations

import threading
import time

import pytest

from backend.core import keys
from worker.training import lock


def test_training_slot_protocol(redis15, project_id, monkeypatch):
    monkeypatch.setenv("LSB_TRAIN_LOCK_TTL", "1")
    redis15.set(keys.train_pending(project_id), "train-X 1")
    redis15.set(keys.train_events(project_id), 5)
    order = []
    with lock.training_slot(redis15, project_id, "train-X") as slot:
        assert slot.events_consumed == 5 and redis15.get(keys.train_events(project_id)) == b"0"
        assert redis15.get(keys.train_pending(project_id)) is None  # cleared: it named this job

        def other():
            with lock.training_slot(redis15, project_id, "train-Y") as second:
                order.append(("second", time.monotonic(), second.waited_s))

        thread = threading.Thread(target=other)
        thread.start()
        time.sleep(2.5)  # longer than the TTL: the heartbeat keeps the lock
        slot.check()
        order.append(("first-done", time.monotonic(), 0))
    thread.join(10)
    assert [o[0] for o in order] == ["first-done", "second"] and order[1][2] >= 2.0
    assert redis15.get(keys.train_running(project_id)) is None


def test_dead_holder_lock_expires_and_lost_lock_is_detected(redis15, project_id, monkeypatch):
    monkeypatch.setenv("LSB_TRAIN_LOCK_TTL", "1")
    crashed = lock.TrainingSlot(redis15, str(project_id), "dead-job", 1.0)
    assert crashed.try_acquire()  # ... and its process dies: no heartbeat, no release
    started = time.monotonic()
    with lock.training_slot(redis15, project_id, "next-job") as slot:
        assert 0.5 < time.monotonic() - started < 5
        redis15.delete(slot.key)  # e.g. an operator or a long Redis outage
        with pytest.raises(lock.LockLost):
            slot.check()


def test_requeue_marker_keeps_the_retried_job_pending_unless_another_is(redis15, project_id):
    assert lock.requeue_marker(redis15, project_id, "train-A")  # nothing pending: it marks itself
    assert lock.requeue_marker(redis15, project_id, "train-A")  # already its own marker
    assert redis15.get(keys.train_pending(project_id)).decode().startswith("train-A ")
    assert not lock.requeue_marker(redis15, project_id, "train-B")  # another one is pending: it does the work
