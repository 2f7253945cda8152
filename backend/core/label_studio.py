"""Everything the worker reads from Label Studio, through label-studio-sdk, in one place.

Webhooks are lossy (docs/label-studio.md#webhook-events), so a training always re-reads the project from the
API: ``GET /api/projects/<id>/`` for the label config and ``GET /api/tasks/?project=<id>&fields=all``
(paginated, filtered to tasks with annotations) for task data, annotations and stored predictions; the
same list filtered to unannotated tasks that hold predictions (``DRAFTED_FILTER``) gives the drafts a
training may learn from (``TRAIN_DRAFTS``).
The SDK's ``LabelStudio(base_url, api_key)`` exchanges a Personal Access Token at
``/api/token/refresh/`` and refreshes the 5-minute access token itself; a legacy token is sent as
``Authorization: Token ...``.

The task list is used instead of ``GET /api/tasks/<id>`` because the latter makes Label Studio call
the ML backend's ``/predict`` for tasks without predictions.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from backend.core.keys import project_key
from backend.core.settings import get_settings

log = logging.getLogger(__name__)

PAGE_SIZE = 100
#: Data Manager filter: only tasks with at least one annotation (cancelled ones included: filtered here).
ANNOTATED_FILTER = {
    "filters": {
        "conjunction": "and",
        "items": [{"filter": "filter:tasks:total_annotations", "operator": "greater", "type": "Number", "value": 0}],
    }
}
#: Data Manager filter: tasks nobody annotated or skipped that hold at least one stored prediction (drafts to
#: train on). Every listed task has a prediction, so listing them never makes Label Studio call /predict
#: (with ``evaluate_predictions_automatically`` it asks only for listed tasks without one).
DRAFTED_FILTER = {
    "filters": {
        "conjunction": "and",
        "items": [
            {"filter": "filter:tasks:total_annotations", "operator": "equal", "type": "Number", "value": 0},
            {"filter": "filter:tasks:cancelled_annotations", "operator": "equal", "type": "Number", "value": 0},
            {"filter": "filter:tasks:total_predictions", "operator": "greater", "type": "Number", "value": 0},
        ],
    }
}


class LabelStudioError(RuntimeError):
    """Reading from Label Studio failed; ``str(exc)`` is a message for humans."""

    retryable = False


class LabelStudioUnavailable(LabelStudioError):
    """Label Studio did not answer (connection refused, timeout, 5xx): retry later."""

    retryable = True


class LabelStudioAuthError(LabelStudioError):
    """401/403: the API key is wrong, expired, or lacks access to the project."""


class LabelStudioNotFound(LabelStudioError):
    """The project does not exist (404)."""


class LabelStudioNotConfigured(LabelStudioError):
    """LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY are not set."""


@dataclass(frozen=True)
class StoredPrediction:
    """A prediction stored in Label Studio (a draft an annotator saw)."""

    id: int | None
    model_version: str
    score: float | None
    result: list[dict]
    created_at: str = ""

    def region_source(self, region: dict) -> str:
        """Which detector drew a region: region ``meta.source``, else guessed from model_version."""
        meta = region.get("meta")
        if isinstance(meta, dict) and isinstance(meta.get("source"), str) and meta["source"].strip():
            return meta["source"].strip().lower()
        return self.source

    @property
    def source(self) -> str:
        """The prediction-level source, from ``model_version`` (``"unknown"`` if it names none)."""
        version = (self.model_version or "").lower()
        for name in ("gemini", "yolo"):
            if name in version:
                return name
        return "unknown"


@dataclass(frozen=True)
class AnnotatedTask:
    """One task with its latest non-cancelled annotation and all stored predictions."""

    id: int
    data: dict
    annotation_id: int | None
    annotation_updated_at: str
    result: list[dict]
    predictions: tuple[StoredPrediction, ...] = ()
    meta: dict = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """What identifies this task's labels for the dataset hash."""
        return f"{self.id}:{self.annotation_id}:{self.annotation_updated_at}"


@dataclass(frozen=True)
class DraftedTask:
    """A task nobody has annotated, with its stored predictions (drafts)."""

    id: int
    data: dict
    predictions: tuple[StoredPrediction, ...]


@dataclass(frozen=True)
class ProjectSnapshot:
    project: str
    label_config: str
    tasks: list[AnnotatedTask]
    tasks_seen: int
    cancelled_only: int  # tasks whose only annotations were skips


# --- client ----------------------------------------------------------------------------------------

def make_client(url: str, api_key: str, timeout: float = 30.0, max_retries: int = 1):
    """An SDK client; PAT refresh is the SDK's job. Raises :class:`LabelStudioNotConfigured`."""
    if not url or not api_key:
        raise LabelStudioNotConfigured("LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY must be set for training to read annotations")
    from label_studio_sdk import LabelStudio  # lazy: the SDK client costs ~0.5 s to import

    try:
        return LabelStudio(base_url=url.rstrip("/"), api_key=api_key, timeout=timeout, max_retries=max_retries)
    except Exception as exc:  # the SDK raises ApiError(401) for an expired PAT at construction
        raise translate_error(exc, url, "connect") from exc


def client_from_settings(settings) -> Any:
    return make_client(settings.label_studio_url, settings.label_studio_api_key.get_secret_value())


def translate_error(exc: BaseException, url: str, what: str) -> LabelStudioError:
    """Map SDK / httpx errors to this module's exception types with a clear message."""
    import httpx  # lazy, like the SDK client above: only needed on an API error
    from label_studio_sdk.core.api_error import ApiError  # lazy, with the SDK client

    if isinstance(exc, LabelStudioError):
        return exc
    if isinstance(exc, httpx.TransportError):  # refused, reset, DNS, timeouts
        return LabelStudioUnavailable(f"Label Studio at {url} is unreachable ({what}): {type(exc).__name__}: {exc}")
    if isinstance(exc, ApiError):
        status = exc.status_code or 0
        body = exc.body if isinstance(exc.body, (str, dict, list)) else ""
        detail = json.dumps(body)[:300] if not isinstance(body, str) else body[:300]
        if status in (401, 403):
            return LabelStudioAuthError(
                f"Label Studio refused the API key ({status}) while trying to {what}: check LABEL_STUDIO_API_KEY "
                f"(a Personal Access Token or legacy token with access to the project). {detail}"
            )
        if status == 404:
            return LabelStudioNotFound(f"Label Studio answered 404 while trying to {what}: {detail}")
        if status >= 500 or status in (408, 429):
            return LabelStudioUnavailable(f"Label Studio at {url} answered {status} while trying to {what}: {detail}")
        return LabelStudioError(f"Label Studio answered {status} while trying to {what}: {detail}")
    return LabelStudioError(f"reading from Label Studio failed while trying to {what}: {type(exc).__name__}: {exc}")


def _plain(obj: Any) -> Any:
    """SDK models to plain JSON-like data (datetimes as ISO strings)."""
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if hasattr(obj, "dict"):
        return json.loads(json.dumps(obj.dict(), default=str))
    return obj


def _stamp(value: Any) -> str:
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    return "" if value is None else str(value)


# --- reading ---------------------------------------------------------------------------------------

def fetch_label_config(client, project: str | int, url: str = "") -> str:
    try:
        info = client.projects.get(id=int(project))
    except Exception as exc:
        raise translate_error(exc, url, f"read project {project}") from exc
    config = getattr(info, "label_config", None) or ""
    if not config:
        raise LabelStudioError(f"project {project} has no label config")
    return config


def latest_annotation(annotations: Iterable[dict]) -> dict | None:
    """The most recently updated annotation that is not a skip (``was_cancelled``)."""
    kept = [a for a in annotations or () if isinstance(a, dict) and not a.get("was_cancelled")]
    if not kept:
        return None
    return max(kept, key=lambda a: (_stamp(a.get("updated_at") or a.get("created_at")), a.get("id") or 0))


def stored_predictions(raw: dict) -> list[StoredPrediction]:
    """The predictions a task dict from the API carries."""
    predictions = []
    for pred in raw.get("predictions") or []:
        if not isinstance(pred, dict):
            continue
        score = pred.get("score")
        predictions.append(
            StoredPrediction(
                id=pred.get("id"),
                model_version=str(pred.get("model_version") or ""),
                score=float(score) if isinstance(score, (int, float)) else None,
                result=list(pred.get("result") or []),
                created_at=_stamp(pred.get("created_at")),
            )
        )
    return predictions


def parse_task(raw: dict) -> AnnotatedTask | None:
    """A task dict from the API (or an export) to :class:`AnnotatedTask`; None when nothing to learn from."""
    annotation = latest_annotation(raw.get("annotations") or [])
    if annotation is None:
        return None
    predictions = stored_predictions(raw)
    return AnnotatedTask(
        id=int(raw["id"]),
        data=dict(raw.get("data") or {}),
        annotation_id=annotation.get("id"),
        annotation_updated_at=_stamp(annotation.get("updated_at") or annotation.get("created_at")),
        result=list(annotation.get("result") or []),
        predictions=tuple(predictions),
        meta=dict(raw.get("meta") or {}),
    )


def iter_raw_tasks(client, project: str | int, page_size: int | None = None, url: str = "", query: dict | None = None):
    """Every task of the project that ``query`` selects (default: annotated ones), with annotations and
    predictions, page by page (plain dicts)."""
    try:
        pager = client.tasks.list(
            project=int(project),
            fields="all",
            page_size=page_size or PAGE_SIZE,
            query=json.dumps(query or ANNOTATED_FILTER),
        )
        for task in pager:
            yield _plain(task)
    except Exception as exc:
        raise translate_error(exc, url, f"list tasks of project {project}") from exc


def fetch_project(project: str | int, settings=None, client=None, label_config: str | None = None) -> ProjectSnapshot:
    """Label config (unless given) and every annotated task of ``project``.

    Raises :class:`LabelStudioUnavailable` (retry later), :class:`LabelStudioAuthError`,
    :class:`LabelStudioNotFound` or :class:`LabelStudioNotConfigured`.
    """
    if settings is None:
        settings = get_settings()
    url = settings.label_studio_url
    project = project_key(project)
    client = client or client_from_settings(settings)
    config = label_config or fetch_label_config(client, project, url)
    tasks: list[AnnotatedTask] = []
    seen = cancelled = 0
    for raw in iter_raw_tasks(client, project, url=url):
        seen += 1
        task = parse_task(raw)
        if task is None:
            if raw.get("annotations"):
                cancelled += 1
            continue
        tasks.append(task)
    tasks.sort(key=lambda t: t.id)
    log.info("project %s: %d annotated tasks (%d listed, %d skipped-only)", project, len(tasks), seen, cancelled)
    return ProjectSnapshot(project, config, tasks, seen, cancelled)


def fetch_drafted_tasks(project: str | int, settings=None, client=None) -> list[DraftedTask]:
    """Every task of ``project`` without annotation (or skip) that holds stored predictions, by id.

    A task annotated meanwhile may still be listed: callers let its annotation win. Raises like
    :func:`fetch_project`.
    """
    if settings is None:
        settings = get_settings()
    project = project_key(project)
    client = client or client_from_settings(settings)
    tasks = []
    for raw in iter_raw_tasks(client, project, url=settings.label_studio_url, query=DRAFTED_FILTER):
        if raw.get("annotations") or not raw.get("predictions"):  # annotated (or skipped) meanwhile: not a draft task
            continue
        tasks.append(DraftedTask(int(raw["id"]), dict(raw.get("data") or {}), tuple(stored_predictions(raw))))
    tasks.sort(key=lambda t: t.id)
    log.info("project %s: %d unannotated tasks with stored drafts", project, len(tasks))
    return tasks
