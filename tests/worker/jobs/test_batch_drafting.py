"""Bulk drafting through the Batch API with a real Redis, real rq workers, the fake Gemini and a fake Label Studio."""

from __future__ import annotations

import time

import pytest
from rq import Queue

from backend.core import keys
from backend.core.settings import get_settings
from backend.detectors.gemini.cost import CostTracker
from tests import fake_gemini as fg
from tests.synthetic import label_config, make_images
from tests.worker_fixtures import CLASSES, RQWorker, make_settings, settings_env
from worker.jobs.prelabeling import prelabel_tasks

N = 6


@pytest.fixture
def bulk(monkeypatch, tmp_path, fake_ls, redis15, qprefix):
    images = make_images(N, seed=5, max_objects=2)
    oracle = fg.Oracle()
    for im in images:
        oracle.add(im.image, [(b.xyxy, b.label) for b in im.boxes])
    with fg.FakeGemini(responder=oracle) as gemini:
        pid = fake_ls.add_project(label_config(CLASSES))
        ids = [fake_ls.add_task(pid, im.encode()) for im in images]
        settings = make_settings(tmp_path, fake_ls)
        env = {**settings_env(settings), "LSB_QUEUE_PREFIX": qprefix, "GEMINI_API_KEY": fg.DEFAULT_KEY,
               "GEMINI_BASE_URL": gemini.base_url, "GEMINI_BULK_TIER": "batch", "GEMINI_BATCH_MIN_TASKS": "2",
               "GEMINI_BATCH_CHUNK": "4", "GEMINI_BATCH_POLL_INITIAL_S": "2", "GEMINI_BATCH_POLL_MAX_S": "3",
               "GEMINI_TASK_DEADLINE": "5", "GEMINI_BREAKER_FAILURES": "1000", "GEMINI_CACHE_TTL": "1",
               "GEMINI_DAILY_BUDGET_USD": "50"}
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()
        yield gemini, pid, ids, env
        get_settings.cache_clear()
        for batch_key in redis15.scan_iter(f"lsb:gbatch:{pid}:*"):
            redis15.delete(batch_key)


def _batches(redis15, pid) -> dict[str, dict]:
    out = {}
    for key in redis15.scan_iter(f"lsb:gbatch:{pid}:*"):
        name = key.decode()
        if name.count(":") == 3:
            out[name] = {k.decode(): v.decode() for k, v in redis15.hgetall(key).items()}
    return out


def _wait_finished(redis15, pid, worker: RQWorker, timeout: float = 90.0) -> dict[str, dict]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        batches = _batches(redis15, pid)
        if batches and all(b.get("status") == "finished" for b in batches.values()):
            return batches
        time.sleep(0.3)
    raise AssertionError(f"batches never finished: {_batches(redis15, pid)}\n{worker.log()}")


@pytest.mark.slow
@pytest.mark.xfail(reason="a poll killed mid-run is only resumed by RQ's abandoned-job retry and the poll lock's TTL "
                          "(minutes): the resume sweep is not written yet", strict=False)
def test_batch_survives_a_killed_worker_stores_each_task_once_and_settles_the_budget(bulk, fake_ls, redis15, qprefix, tmp_path):
    gemini, pid, ids, env = bulk
    gemini.batches.running_s = 1e9  # running at Google until the first worker is dead
    failing = str(ids[1])
    gemini.batches.request_error = lambda md: {"code": 503, "message": "overloaded"} if md.get("key") == failing else None
    cost = CostTracker(get_settings(), redis15)
    spent_before, money_before = cost.spent_today(), cost.money()

    tasks = [{"id": tid, "data": fake_ls.tasks[tid]["data"]} for tid in ids]
    result = prelabel_tasks(str(pid), tasks, fake_ls.projects[pid]["label_config"])
    assert result["batched"] == N and result["stored"] == 0
    submitted = _batches(redis15, pid)
    assert len(submitted) == 2  # chunks of 4 and 2
    reserved = sum(float(b["reserved_usd"]) for b in submitted.values())
    assert reserved > 0 and cost.spent_today() == pytest.approx(spent_before + reserved)  # charged at submission
    assert not gemini.calls  # nothing drafted synchronously

    first = RQWorker([f"{qprefix}prelabel"], env, tmp_path / "w1.log")
    queue = Queue(f"{qprefix}prelabel", connection=redis15)
    try:  # kill it between polls: both batches polled at least once, their next polls scheduled, none running
        end = time.monotonic() + 40
        time.sleep(3)
        while time.monotonic() < end and not (
                min((job.polls for job in gemini.batches.jobs.values()), default=0) >= 1
                and queue.started_job_registry.count == 0 and not queue.count):
            time.sleep(0.05)
        assert min(job.polls for job in gemini.batches.jobs.values()) >= 1, first.log()
    finally:
        first.kill()
    assert all(not fake_ls.tasks[tid]["predictions"] for tid in ids)  # still running at Google
    gemini.batches.running_s = 0.0  # the batches are done at Google now
    redis15.delete(f"rq:scheduler-lock:{qprefix}prelabel")  # the dead scheduler's lock would expire after 61 s

    second = RQWorker([f"{qprefix}prelabel"], env, tmp_path / "w2.log")
    try:
        finished = _wait_finished(redis15, pid, second)
    finally:
        second.stop()
    for tid in ids:
        predictions = fake_ls.tasks[tid]["predictions"]
        assert len(predictions) == 1, (tid, predictions)
        assert predictions[0]["model_version"] == "gemini:gemini-2.5-flash"
    assert [c.service_tier for c in gemini.calls] == ["flex"]  # the per-request failure, retried synchronously
    assert sum(int(b["stored"]) for b in finished.values()) == N
    assert sum(int(b["retried"]) for b in finished.values()) == 1
    settled = sum(float(b["settled_usd"]) for b in finished.values())
    assert 0 < settled < reserved
    flex_call = cost.money().get("usd:flex", 0.0) - money_before.get("usd:flex", 0.0)
    assert flex_call > 0
    assert cost.spent_today() == pytest.approx(spent_before + settled + flex_call, rel=1e-6, abs=1e-9)
    assert not any(m.decode().startswith(f"{pid}:") for m in redis15.smembers(keys.gbatch_live()))

