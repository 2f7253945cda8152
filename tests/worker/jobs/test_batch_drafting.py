"""Bulk drafting through the Batch API with a real Redis, real rq workers, the fake Gemini and a fake Label Studio."""

from __future__ import annotations

import time

import pytest

from backend.core import import_status, keys
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
        for pattern in keys.project_patterns(pid):
            for key in redis15.scan_iter(pattern):
                redis15.delete(key)
        ids = [fake_ls.add_task(pid, im.encode()) for im in images]
        settings = make_settings(tmp_path, fake_ls)
        env = {**settings_env(settings), "LSB_QUEUE_PREFIX": qprefix, "GEMINI_API_KEY": fg.DEFAULT_KEY,
               "GEMINI_BASE_URL": gemini.base_url, "GEMINI_BULK_TIER": "batch", "GEMINI_BATCH_MIN_TASKS": "2",
               "GEMINI_BATCH_CHUNK": "4", "GEMINI_BATCH_POLL_INITIAL_S": "2", "GEMINI_BATCH_POLL_MAX_S": "3",
               "GEMINI_BATCH_SWEEP_S": "1",
               "GEMINI_TASK_DEADLINE": "5", "GEMINI_BREAKER_FAILURES": "1000", "GEMINI_CACHE_TTL": "1",
               "GEMINI_DAILY_BUDGET_USD": "50"}
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()
        yield gemini, pid, ids, env
        get_settings.cache_clear()
        for pattern in keys.project_patterns(pid):  # the fake Label Studio's project ids repeat across tests
            for key in redis15.scan_iter(pattern):
                redis15.delete(key)
        redis15.delete(keys.gbatch_sweep(f"{qprefix}prelabel"))


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
def test_a_poll_killed_mid_run_is_resumed_by_the_sweep_stores_each_task_once_and_settles_once(
        bulk, fake_ls, redis15, qprefix, tmp_path):
    """SIGKILL the worker while a poll stores a finished batch (blocked in the synchronous retry of its one
    failed request): the next worker's sweep breaks the dead poll's lock and resumes the batch at once (not
    after RQ's 30-minute abandoned-job timeout or the lock's TTL); no task is stored twice."""
    gemini, pid, ids, env = bulk
    failing = str(ids[1])
    gemini.batches.request_error = lambda md: {"code": 503, "message": "overloaded"} if md.get("key") == failing else None
    gemini.flex.latency_s = 60.0  # the retry of the failed request hangs: the first worker dies in it
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
    status = import_status.read(redis15, pid)
    assert (status["batched"], status["drafted"], status["reserved_usd"]) == (N, 0, pytest.approx(reserved, abs=1e-6))
    assert redis15.exists(keys.gbatch_sweep(f"{qprefix}prelabel"))  # a sweep is scheduled while batches are live

    (victim,) = [name for name in submitted if redis15.hexists(f"{name}:tasks", failing)]
    first = RQWorker([f"{qprefix}prelabel"], env, tmp_path / "w1.log")
    try:  # until the poll of the victim batch is inside the failed request's flex retry, holding the lock
        end = time.monotonic() + 40
        while time.monotonic() < end and not (gemini.calls and redis15.exists(f"{victim}:lock")):
            time.sleep(0.05)
        assert gemini.calls and redis15.exists(f"{victim}:lock"), first.log()
    finally:
        first.kill()
    dead_poll = redis15.hget(victim, "poll_job").decode()
    stored_before = {tid for tid in ids if fake_ls.tasks[tid]["predictions"]}
    assert str(ids[1]) not in {str(t) for t in stored_before} and len(stored_before) >= 3  # killed mid-batch
    assert redis15.hget(victim, "status") == b"running" and redis15.exists(f"{victim}:lock")
    gemini.flex.latency_s = 0.0
    redis15.delete(f"rq:scheduler-lock:{qprefix}prelabel")  # the dead scheduler's lock would expire after 61 s

    second = RQWorker([f"{qprefix}prelabel"], env, tmp_path / "w2.log")
    try:
        finished = _wait_finished(redis15, pid, second)
    finally:
        second.stop()
    assert int(finished[victim]["resumes"]) == 1 and finished[victim]["poll_job"] != dead_poll, second.log()
    for tid in ids:
        predictions = fake_ls.tasks[tid]["predictions"]
        assert len(predictions) == 1, (tid, predictions)
        assert predictions[0]["model_version"] == "gemini:gemini-2.5-flash"
    tiers = [c.service_tier for c in gemini.calls]
    assert set(tiers) == {"flex"} and len(tiers) >= 2, tiers  # the killed retry, then the resumed one
    assert sum(int(b["stored"]) for b in finished.values()) == N
    settled = sum(float(b["settled_usd"]) for b in finished.values())
    assert 0 < settled < reserved
    flex_call = cost.money().get("usd:flex", 0.0) - money_before.get("usd:flex", 0.0)
    assert flex_call > 0  # the resumed retry's answer (the killed one was never answered, so never billed)
    # the victim's results were read by the killed poll and again by the resumed one: tallied once, when settled
    batch_tally = cost.money().get("usd:batch", 0.0) - money_before.get("usd:batch", 0.0)
    assert batch_tally == pytest.approx(settled, rel=1e-6, abs=1e-9)
    assert cost.spent_today() == pytest.approx(spent_before + settled + flex_call, rel=1e-6, abs=1e-9)
    assert not any(m.decode().startswith(f"{pid}:") for m in redis15.smembers(keys.gbatch_live()))
    status = import_status.read(redis15, pid)
    assert (status["batched"], status["drafted"], status["failed"]) == (0, N, 0), status
    assert status["reserved_usd"] == pytest.approx(0.0, abs=1e-9)
    assert status["spent_usd"] == pytest.approx(settled + flex_call, abs=1e-6)  # read() rounds to 6 places
