"""The re-score job with a real Redis, a real rq worker, a real YOLO and the fake Label Studio.

Un-annotated tasks get a new score on every prediction, annotated tasks are untouched, a task whose
image cannot be loaded fails alone, and an image YOLO is unsure about outranks one it knows well.
"""

from __future__ import annotations

import time

import pytest

from backend.core import keys
from backend.core.rank_queue import request_ranking
from backend.core.registry import ModelRegistry
from tests.fake_label_studio import as_prediction
from tests.synthetic import draft_result, label_config, ls_result, noise_images
from tests.worker_fixtures import CLASSES, RQWorker, good_model, job_status, make_settings, settings_env

OLD = 0.77  # the confidence every stored draft starts with


@pytest.fixture
def ranked_project(fake_ls, tmp_path, redis15, project_id):
    """A project whose current YOLO is ``good_model()``: 4 known images, 2 noise images, 1 annotated, 1 broken."""
    good = good_model()
    settings = make_settings(tmp_path, fake_ls)
    registry = ModelRegistry(settings.model_dir, redis15)
    version = registry.add_version(str(project_id), good["checkpoint"], {"classes": list(CLASSES)}).version
    registry.promote(str(project_id), version)
    fake_ls.add_project(label_config(CLASSES), project_id=project_id)
    known = good["images"][:4]
    ids = {"known": [], "noise": []}
    for i, im in enumerate(known):  # the first two also hold a Gemini draft that agrees (the truth), the others YOLO's
        version = "gemini:fake" if i < 2 else "yolo:v0001"
        result = draft_result([(b, 0.9) for b in im.boxes], im.width, im.height)
        ids["known"].append(fake_ls.add_task(project_id, im.encode(), predictions=[as_prediction(result, version, OLD)]))
    for im in noise_images(2, seed=5, size=(128, 96)):
        ids["noise"].append(fake_ls.add_task(project_id, im.encode(), predictions=[as_prediction([], "yolo:v0001", OLD)]))
    annotated_im = good["images"][5]
    ids["annotated"] = fake_ls.add_task(project_id, annotated_im.encode(),
                                        result=ls_result(annotated_im.boxes, annotated_im.width, annotated_im.height),
                                        predictions=[as_prediction([], "yolo:v0001", OLD)])
    ids["broken"] = fake_ls.add_task(project_id, f"/data/upload/{project_id}/missing.png",
                                     predictions=[as_prediction([], "yolo:v0001", OLD)])
    yield settings, ids
    for key in redis15.scan_iter(f"lsb:rank:{project_id}:*"):
        redis15.delete(key)


def scores(fake_ls, task_id: int) -> list[float | None]:
    return [p["score"] for p in fake_ls.tasks[task_id]["predictions"]]


@pytest.mark.slow
def test_a_worker_rescores_the_unannotated_drafts_and_a_bad_image_fails_alone(ranked_project, fake_ls, redis15, project_id,
                                                                             qprefix, tmp_path):
    settings, ids = ranked_project
    queued = request_ranking(redis15, project_id, reason="test")
    assert queued["status"] == "queued"
    assert request_ranking(redis15, project_id)["status"] == "coalesced"  # still waiting: joins it

    worker = RQWorker([f"{qprefix}prelabel"], settings_env(settings), tmp_path / "worker.log", burst=True)
    try:
        deadline = time.monotonic() + 240
        while job_status(redis15, queued["job_id"]) not in ("finished", "failed") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert job_status(redis15, queued["job_id"]) == "finished", worker.log()
    finally:
        worker.stop()
    assert redis15.get(keys.rank_pending(project_id)) is None  # the job cleared its marker when it started

    new = {tid: scores(fake_ls, tid)[0] for tid in ids["known"] + ids["noise"]}
    assert all(score is not None and score != OLD and 0.0 <= score <= 1.0 for score in new.values()), new
    assert scores(fake_ls, ids["annotated"]) == [OLD]  # annotated: not listed, not touched
    assert scores(fake_ls, ids["broken"]) == [OLD]  # its image failed: that task only
    # A noise image (YOLO finds nothing it trusts) outranks every image it was trained on.
    assert min(new[t] for t in ids["noise"]) > max(new[t] for t in ids["known"]), new
    patches = [r for r in fake_ls.api_calls("/api/predictions/") if r["method"] == "PATCH"]
    assert len(patches) == len(new)
