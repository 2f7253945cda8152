"""The sweep of live Gemini batches and the poll lock's holder check, on a real Redis and RQ's registries.

The resume after a SIGKILLed worker with real rq workers is tests/worker/jobs/test_batch_drafting.py."""

from __future__ import annotations

import json
import subprocess
import sys

from rq import Queue

from backend.core import batch_queue as bq
from backend.core import keys


def _live_batch(redis, project, batch: str, **fields) -> None:
    redis.hset(keys.gbatch(project, batch), mapping={"status": "running", "name": "batches/x", **fields})
    redis.sadd(keys.gbatch_live(), f"{project}:{batch}")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_lock_of_a_dead_process_is_broken_and_a_live_one_kept(redis15, project_id):
    lock = keys.gbatch_lock(project_id, "b1")
    mine = bq.lock_value(None, None)
    assert bq.holder_alive(redis15, mine)  # this process, outside RQ: alive
    dead = json.dumps({**json.loads(mine), "pid": _dead_pid()})
    redis15.set(lock, dead)
    assert not bq.holder_alive(redis15, dead)
    assert bq.break_dead_lock(redis15, project_id, "b1") and not redis15.exists(lock)
    redis15.set(lock, mine)
    assert not bq.break_dead_lock(redis15, project_id, "b1") and redis15.get(lock).decode() == mine
    gone_job = json.dumps({**json.loads(mine), "job": "no-such-job", "worker": "w"})
    assert not bq.holder_alive(redis15, gone_job)  # a live pid, but its RQ job no longer exists
    assert bq.holder_alive(redis15, "an-old-token")  # another format: left to its TTL


def test_the_sweep_resumes_a_batch_whose_poll_is_gone_once_and_leaves_other_queues_alone(redis15, project_id, qprefix):
    queue = f"{qprefix}prelabel"
    _live_batch(redis15, project_id, "dead", poll_job="gbatch-poll-gone", attempt=3, queue=queue)
    _live_batch(redis15, project_id, "other", poll_job="gbatch-poll-gone-too", queue="someone-else-prelabel")
    _live_batch(redis15, project_id, "done")
    redis15.hset(keys.gbatch(project_id, "done"), "status", "finished")
    redis15.set(keys.gbatch_lock(project_id, "dead"), json.dumps({"job": "x", "worker": "", "host": "h", "pid": _dead_pid()}))
    try:
        counts = bq.sweep(redis15)
        assert counts["resumed"] == 1 and counts["forgotten"] >= 1, counts
        state = {k.decode(): v.decode() for k, v in redis15.hgetall(keys.gbatch(project_id, "dead")).items()}
        new = state["poll_job"]
        assert new != "gbatch-poll-gone" and state["resumes"] == "1" and state["attempt"] == "3"
        assert new in Queue(queue, connection=redis15).scheduled_job_registry.get_job_ids()
        assert not redis15.exists(keys.gbatch_lock(project_id, "dead"))  # its holder is dead (no such job)
        assert redis15.hget(keys.gbatch(project_id, "other"), "poll_job") == b"gbatch-poll-gone-too"  # not ours
        assert f"{project_id}:done" not in {m.decode() for m in redis15.smembers(keys.gbatch_live())}

        assert bq.sweep(redis15)["resumed"] == 0  # the new poll waits in the scheduler: nothing to do
        # a poll that lost the race (the batch names another poll by now) schedules nothing
        assert bq.schedule_poll(redis15, project_id, "dead", 4, 1.0, expect="gbatch-poll-gone") is None
        assert redis15.hget(keys.gbatch(project_id, "dead"), "poll_job").decode() == new
    finally:
        for batch in ("dead", "other", "done"):
            redis15.srem(keys.gbatch_live(), f"{project_id}:{batch}")
