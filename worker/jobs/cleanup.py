"""RQ job: remove what this service kept for a project deleted in Label Studio (after the grace period).

Enqueued by :func:`backend.core.lifecycle.mark_project_deleted` on the training queue,
``PROJECT_DELETE_GRACE_HOURS`` after ``PROJECT_DELETED``. It removes nothing when:

- the deletion marker is gone or names another deletion (cancelled, or a newer deletion owns it);
- Label Studio says the project exists (re-created under the same id, or the event was not real).

When Label Studio cannot answer (down, token refused) the job fails and RQ retries it later
(``CLEANUP_RETRY_INTERVALS``); with no Label Studio configured at all the marker is trusted.
It then takes the project's training lock (a training still running finishes or is stopped first),
removes ``MODEL_DIR/<p>``, ``DATA_DIR/datasets/<p>`` and ``DATA_DIR/candidates/<p>``, and deletes every Redis
key of the project (:func:`backend.core.keys.project_patterns`), the marker last.

Cached images are not removed here: the upload cache (``DATA_DIR/images``) is keyed by a hash of the
URL, not by project, and is bounded by ``IMAGE_CACHE_MAX_MB`` (oldest used evicted first), so a deleted
project's images leave it as other images are used.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import redis as redis_lib
from rq import get_current_job

from backend.core import keys, lifecycle
from backend.core.connection import connect_patient
from backend.core.label_studio import (
    LabelStudioError,
    LabelStudioNotConfigured,
    LabelStudioNotFound,
    client_from_settings,
    fetch_label_config,
)
from backend.core.logs import configure_logging
from backend.core.queue import text
from backend.core.settings import get_settings
from worker.training.lock import training_slot

log = logging.getLogger(__name__)


def exists_in_label_studio(project: str, settings: Any, client: Any = None) -> bool | None:
    """True / False when Label Studio says; None when no Label Studio is configured. Raises when it cannot say."""
    try:
        client = client or client_from_settings(settings)
        fetch_label_config(client, project, settings.label_studio_url)
    except LabelStudioNotFound:
        return False
    except LabelStudioNotConfigured:
        return None
    except LabelStudioError as exc:
        if "has no label config" in str(exc):
            return True
        raise
    return True


def _remove_tree(path: Path) -> bool:
    if not path.exists():
        return False
    shutil.rmtree(path)
    return True


def run_cleanup(project: str | int, stamp: str, *, settings: Any, redis: redis_lib.Redis, job_id: str | None = None,
                client: Any = None) -> dict:
    """The cleanup itself (in the caller's process; ``cleanup_project`` is the RQ wrapper)."""
    project = keys.project_key(project)
    marker = lifecycle.deletion(redis, project)
    if marker is None or marker.stamp != stamp:
        log.info("project %s: cleanup %s cancelled (deletion marker gone or replaced)", project, stamp)
        return {"status": "cancelled", "project": project, "reason": "deletion marker gone or replaced"}
    exists = exists_in_label_studio(project, settings, client=client)
    if exists:
        lifecycle.cancel_deletion(redis, project, "the project exists in Label Studio")
        return {"status": "cancelled", "project": project, "reason": "project exists in Label Studio"}
    lifecycle.stop_project_work(redis, project)  # anything queued during the grace period
    folders = [Path(settings.model_dir) / project, Path(settings.data_dir) / "datasets" / project,
               Path(settings.data_dir) / "candidates" / project]
    with training_slot(redis, project, job_id, timeout=float(settings.train_job_timeout)):
        removed = [str(folder) for folder in folders if _remove_tree(folder.resolve())]
    deleted_keys = 0
    marker_key = keys.project_deleted(project)
    for pattern in keys.project_patterns(project):
        for key in redis.scan_iter(pattern, count=1000):
            if text(key) != marker_key:
                deleted_keys += int(redis.delete(key))
    deleted_keys += int(redis.delete(marker_key))
    log.warning("project %s: cleaned up after its deletion (%s; %d Redis keys)", project, ", ".join(removed) or "no folders",
                deleted_keys)
    return {"status": "cleaned", "project": project, "folders": removed, "redis_keys": deleted_keys,
            "label_studio_checked": exists is not None}


def cleanup_project(project: str, stamp: str) -> dict:
    """RQ entry point (enqueued by name by :func:`backend.core.lifecycle.mark_project_deleted`)."""
    settings = get_settings()
    configure_logging(settings)
    job = get_current_job()
    redis = job.connection if job is not None else connect_patient(settings.redis_url)
    return run_cleanup(project, stamp, settings=settings, redis=redis, job_id=job.id if job is not None else None)
