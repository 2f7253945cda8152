"""worker.jobs.training against a changing world: a rollback while it trains, a lock lost to a Redis flush."""

from __future__ import annotations

import json

from rq.job import Job

from backend.core import keys
from backend.core.registry import ModelRegistry
from tests.models import make_checkpoint
from tests.worker_fixtures import make_settings, populate
from worker.jobs import training as training_mod
from worker.jobs.training import run_training, train_project


def test_a_rollback_during_a_training_is_not_promoted_over(fake_ls, tmp_path, redis15, project_id, monkeypatch):
    pid, _, _ = populate(fake_ls, n=12, project=project_id, seed=4)
    settings = make_settings(tmp_path, fake_ls, promote_min_gain=-1.0, export_formats="")  # the gate always says yes
    registry = ModelRegistry(settings.model_dir, redis15)
    for seed in (1, 2):
        ckpt = make_checkpoint(tmp_path / f"m{seed}.pt", ["Car", "Person"], seed=seed)
        registry.promote(pid, registry.add_version(pid, ckpt, {"classes": ["Car", "Person"]}).version)
    real_train = training_mod.train

    def train_while_an_operator_rolls_back(*args, **kwargs):
        trained = real_train(*args, **kwargs)  # fine-tuned from v0002, the version current at start
        registry.rollback(pid)  # v0002 misbehaves in production: back to v0001
        return trained

    monkeypatch.setattr(training_mod, "train", train_while_an_operator_rolls_back)
    result = run_training(pid, force=True, settings=settings, redis=redis15, train_overrides={"epochs": 1})
    assert result["status"] == "superseded" and result["promoted"] is False
    assert result["parent"] == "v0002" and result["version"] == "v0001" and result["candidate_version"] == "v0003"
    assert "changed from v0002 to v0001" in result["reason"] and "v0003 is kept unpromoted" in result["reason"]
    assert registry.current_version(pid) == "v0001" and redis15.get(keys.model_current(pid)) == b"v0001"
    kept = registry.get(pid, "v0003")
    assert kept is not None and kept.meta["promotion"]["promoted"] is False  # an operator may still roll forward to it
    assert json.loads(redis15.get(keys.train_last(pid)))["status"] == "superseded"


def test_a_training_whose_lock_was_lost_is_requeued(fake_ls, tmp_path, redis15, project_id, monkeypatch, qprefix):
    pid, _, _ = populate(fake_ls, n=12, project=project_id)
    settings = make_settings(tmp_path, fake_ls, export_formats="")
    monkeypatch.setattr("worker.jobs.training.get_settings", lambda: settings)
    monkeypatch.setattr("worker.jobs.training.connect_patient", lambda url, **kw: redis15)
    real_fetch = training_mod.fetch_project

    def fetch_while_redis_is_flushed(*args, **kwargs):
        redis15.delete(keys.train_running(pid))  # what FLUSHALL or a restart without persistence does to the lock
        return real_fetch(*args, **kwargs)

    monkeypatch.setattr(training_mod, "fetch_project", fetch_while_redis_is_flushed)
    redis15.set(keys.train_force(pid), "1")  # a coalesced request asked for force: the requeued run keeps it
    result = train_project(f"0{pid}")
    assert result["status"] == "requeued" and "lock" in result["reason"]
    queued = result["requeued"]
    assert queued["status"] == "queued" and queued["queue"] == f"{qprefix}training"
    job = Job.fetch(queued["job_id"], connection=redis15)
    assert job.args == (str(pid), None, True)  # the same training, forced as it was
    assert redis15.get(keys.train_pending(pid)).decode().startswith(queued["job_id"] + " ")
    assert json.loads(redis15.get(keys.train_last(pid)))["status"] == "requeued"
    assert ModelRegistry(settings.model_dir, redis15).versions(pid) == []  # nothing was published
