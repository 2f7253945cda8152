"""A bulk import into a real Label Studio 1.23.2 drafted through Gemini's Batch API (the fake's batch endpoints).

A second backend (scripts/run.sh, GEMINI_BULK_TIER=batch, GEMINI_BATCH_MIN_TASKS=4) beside the session's one:
12 images uploaded in one import -> TASKS_CREATED -> the pre-labeling job submits them as batches (no
per-task generateContent) -> the scheduled polls store one prediction per task through the Label Studio
API, of the version /setup reports -> GET /prelabel/status shows them drafted, the batch settled and spent.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.e2e.conftest import CLASSES, TIMINGS, running_backend
from tests.live import wait_for
from tests.synthetic import make_images

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CONFIG = (ROOT / "label_config.xml").read_text()
N_TASKS = 12
SECRET_HEADER = "X-Webhook-Secret"
BATCH_ENV = {"GEMINI_BULK_TIER": "batch", "GEMINI_BATCH_MIN_TASKS": "4", "GEMINI_BATCH_CHUNK": "8",
             "GEMINI_BATCH_POLL_INITIAL_S": "1", "GEMINI_BATCH_POLL_MAX_S": "2", "GEMINI_BATCH_SWEEP_S": "5"}


@pytest.fixture(scope="module")
def batch_backend(base_model, label_studio, ls_token, gemini, redis_url, tmp_path_factory):
    base_model.wait()
    with running_backend(tmp_path_factory.mktemp("batch-backend"), base_model, label_studio, ls_token, gemini, redis_url,
                         extra_env=BATCH_ENV, name="scripts/run.sh (GEMINI_BULK_TIER=batch)") as server:
        yield server


def _connect(api, backend, project: int) -> None:
    """The ML backend as Label Studio connects it (it creates the webhook), given the webhook secret."""
    user, password = backend.auth
    response = api.post("/api/ml", json={"url": backend.url, "project": project, "is_interactive": False, "title": "batch",
                                         "auth_method": "BASIC_AUTH", "basic_auth_user": user, "basic_auth_pass": password})
    assert response.status_code == 201, f"POST /api/ml: HTTP {response.status_code} {response.text[:500]}"
    hooks = [h for h in api.get("/api/webhooks/", params={"project": project}).json() if h["url"] == f"{backend.url}/webhook"]
    assert len(hooks) == 1, hooks
    response = api.patch(f"/api/webhooks/{hooks[0]['id']}/", json={"headers": {SECRET_HEADER: backend.webhook_secret}})
    assert response.status_code == 200, response.text[:500]


def test_a_bulk_import_is_drafted_through_the_batch_api_once_per_task(batch_backend, ls_api, ls_sdk, gemini):
    backend, started = batch_backend, time.monotonic()
    project = int(ls_sdk.projects.create(title="bulk batch (e2e)", label_config=CONFIG).id)
    backend.projects.add(project)
    try:
        _connect(ls_api, backend, project)
        seed = int(time.time() * 1000) % 1_000_000  # fresh images: no cached Gemini answer
        images = make_images(N_TASKS, seed=seed, classes=CLASSES, max_objects=2)
        for image in images:
            gemini.oracle.add(image.image, [(box.xyxy, box.label) for box in image.boxes])
        calls_before, batches_before = len(gemini.calls), set(gemini.server.batches.jobs)
        names = [f"bulk-{seed}-{i:03d}.png" for i in range(N_TASKS)]
        files = {name: (name, im.encode(), "image/png") for name, im in zip(names, images)}
        response = ls_api.post(f"/api/projects/{project}/import", files=files)
        assert response.status_code == 201 and response.json().get("task_count") == N_TASKS, response.text[:500]
        task_ids = sorted(int(t.id) for t in ls_sdk.tasks.list(project=project))
        assert len(task_ids) == N_TASKS

        def drafted():
            held: dict[int, list] = {}
            for prediction in ls_sdk.predictions.list(project=project):
                held.setdefault(int(prediction.task), []).append(prediction)
            return held if len(held) == N_TASKS else None

        held = wait_for(drafted, 60, "a draft on every task of the bulk import (through the Batch API)", interval=1.0,
                        on_timeout=lambda: backend.story(project))
        version = backend.setup_version(project, CONFIG)
        for task_id in task_ids:
            assert [p.model_version for p in held[task_id]] == [version], (task_id, held[task_id])
            assert all((r.get("meta") or {}).get("source") == "gemini" for r in held[task_id][0].result)
        new_batches = [gemini.server.batches.jobs[name] for name in set(gemini.server.batches.jobs) - batches_before]
        assert sorted(len(job.requests) for job in new_batches) == [4, 8], new_batches  # chunks of GEMINI_BATCH_CHUNK
        assert len(gemini.calls) == calls_before, "tasks of the bulk import went through generateContent"

        def settled():
            status = backend.get("/prelabel/status", params={"project": project}).json()
            return status if status["drafted"] == N_TASKS and status["reserved_usd"] == 0 else None

        status = wait_for(settled, 30, "the import status: every task drafted, the batches settled",
                          on_timeout=lambda: backend.get("/prelabel/status", params={"project": project}).text)
        assert (status["batched"], status["queued"], status["failed"], status["imported"]) == (0, 0, 0, N_TASKS), status
        assert status["spent_usd"] > 0, status
        time.sleep(2)  # a late duplicate (a second poll chain) would store a second prediction by now
        assert drafted() is not None and all(len(v) == 1 for v in drafted().values())
    finally:
        ls_api.delete(f"/api/projects/{project}/")
        TIMINGS["bulk import of 12 through the Batch API"] = time.monotonic() - started
