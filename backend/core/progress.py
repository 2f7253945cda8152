"""Progress of a running RQ job, stored in the job's meta where ``/train/status`` and the CLI read it.

Best effort by design: a Redis hiccup while reporting progress must never fail a training or a
pre-labeling run, so errors are logged at debug level and swallowed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from rq import get_current_job
from rq.job import Job

log = logging.getLogger(__name__)


def save_meta(job: Job | None = None, **fields: Any) -> bool:
    """Merge ``fields`` into the job's meta (default: the current RQ job). False outside a job or on error."""
    job = job if job is not None else get_current_job()
    if job is None:
        return False
    try:
        job.meta.update(fields)
        job.save_meta()
    except Exception as exc:  # noqa: BLE001 - any Redis or pickling trouble: progress is not worth a failed job
        log.debug("job meta not saved: %s", exc)
        return False
    return True


def report_progress(update: Mapping[str, Any], job: Job | None = None) -> bool:
    """Store ``update`` as ``job.meta["progress"]``, stamped with the time (``at``) it was reported."""
    return save_meta(job, progress={**update, "at": round(time.time(), 3)})
