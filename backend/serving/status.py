"""What the status page shows, per project, assembled from what the service already keeps.

Never trains, evaluates or loads a model: a page load reads the registry's meta files, a few Redis
keys (training status, history, draft quality, Gemini money), rq's failed-job registry and the
Prometheus samples ``/metrics`` exposes. The page polls it every few seconds, so every part is
bounded (history capped at 50, failures at 10) and a part that cannot be read says so instead of
failing the page.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from typing import Any

import redis as redis_lib
from prometheus_client.parser import text_string_to_metric_families
from rq import Queue
from rq.job import Job
from rq.registry import FailedJobRegistry

from backend.core import keys
from backend.core import metrics as prom
from backend.core import queue as training_queue
from backend.core.registry import ModelRegistry, VersionInfo
from backend.core.settings import Settings
from backend.detectors.gemini.cost import cost_per_1000, money_tally, project_money_tally
from backend.serving import quality

log = logging.getLogger(__name__)

HISTORY_SHOWN = 50
FAILED_JOBS_SHOWN = 10
NOT_MEASURED = "not measured yet"


def _version_row(info: VersionInfo, current: str | None) -> dict[str, Any]:
    """One version as the page's table and mAP plot need it (from its meta file only)."""
    meta = info.meta or {}
    metrics = meta.get("metrics") or {}
    gate = meta.get("gate") or {}
    promotion = meta.get("promotion") or {}
    counts = (meta.get("dataset") or {}).get("counts") or {}
    if info.version == current:
        state = "current"
    elif promotion and promotion.get("promoted") is False:
        state = "superseded"
    else:
        state = "promoted"
    return {
        "version": info.version, "state": state, "created_at": meta.get("created_at"), "parent": meta.get("parent"),
        "map50": metrics.get("map50"), "map50_95": metrics.get("map50_95"),
        "counts": counts, "gate": {"promote": gate.get("promote"), "reason": gate.get("reason"), "gain": gate.get("gain")},
        "promotion_reason": promotion.get("reason"),
    }


def _training_row(result: dict) -> dict[str, Any]:
    """One entry of the training history (promoted, rejected, superseded, skipped, failed)."""
    cand = result.get("candidate_metrics") or {}
    return {
        "status": result.get("status"), "version": result.get("version"),
        "candidate_version": result.get("candidate_version"), "reason": result.get("reason") or result.get("error"),
        "started_at": result.get("started_at"), "finished_at": result.get("finished_at"),
        "map50": cand.get("map50"), "map50_95": cand.get("map50_95"), "counts": result.get("counts"),
        "epochs_run": result.get("epochs_run"), "seconds": (result.get("durations") or {}).get("total"),
        "job_id": result.get("job_id"),
    }


def training_history(redis: redis_lib.Redis, project: str) -> list[dict]:
    """The last trainings, newest first (``lsb:train:<p>:history``, written by the training job)."""
    rows = []
    for raw in redis.lrange(keys.train_history(project), 0, HISTORY_SHOWN - 1):
        try:
            rows.append(_training_row(json.loads(raw)))
        except (ValueError, AttributeError):
            continue
    return rows


def live_training(redis: redis_lib.Redis, project: str, status: dict) -> dict[str, Any]:
    """The running training's progress with its remaining time, and the queued one's place in the queue."""
    progress = status.get("progress") or None
    live: dict[str, Any] = {"running": status.get("running"), "queued": status.get("queued"), "progress": progress,
                            "remaining_s": None, "queue_position": None}
    if progress and progress.get("epoch") and progress.get("epochs") and progress.get("elapsed_s") is not None:
        per_epoch = float(progress["elapsed_s"]) / max(1, int(progress["epoch"]))
        live["remaining_s"] = round(per_epoch * max(0, int(progress["epochs"]) - int(progress["epoch"])), 1)
    queued = status.get("queued") or {}
    if queued.get("job_id"):
        try:
            position = Queue(training_queue.queue_name(), connection=redis).get_job_position(queued["job_id"])
            live["queue_position"] = None if position is None else int(position) + 1
        except redis_lib.RedisError:
            pass
    return live


def failed_jobs(redis: redis_lib.Redis, project: str) -> list[dict]:
    """The project's latest failed RQ jobs (training, pre-labeling) with their messages."""
    out = []
    for kind in (training_queue.TRAINING_QUEUE, training_queue.PRELABEL_QUEUE):
        registry = FailedJobRegistry(training_queue.queue_name(kind), connection=redis)
        ids = registry.get_job_ids(0, 49)
        for job in Job.fetch_many(ids, connection=redis):
            if job is None or str((job.meta or {}).get("project")) != project:
                continue
            message = (job.meta or {}).get("error")
            if not message:
                result = job.latest_result()
                message = (getattr(result, "exc_string", "") or "").strip().splitlines()[-1:] or [""]
                message = message[0]
            out.append({"job_id": job.id, "queue": kind, "message": str(message)[:500],
                        "ended_at": job.ended_at.replace(tzinfo=dt.UTC).timestamp() if job.ended_at else None})
    out.sort(key=lambda row: row["ended_at"] or 0, reverse=True)
    return out[:FAILED_JOBS_SHOWN]


def prometheus_totals() -> dict[str, Any]:
    """The counters /metrics shows (all processes when multiprocess is on): predictions, failures, tokens, cache."""
    body, _ = prom.render()
    totals: dict[str, Any] = {"predictions": {}, "prediction_failures": {}, "tokens": {}, "cache": {},
                              "gemini_cost_usd": 0.0, "gemini_calls": {}}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            name, labels, value = sample.name, sample.labels, float(sample.value)
            if name == "lsb_predictions_total":
                totals["predictions"][labels["source"]] = totals["predictions"].get(labels["source"], 0) + value
            elif name == "lsb_prediction_failures_total":
                totals["prediction_failures"][labels["reason"]] = value
            elif name == "lsb_gemini_tokens_total":
                totals["tokens"][labels["kind"]] = totals["tokens"].get(labels["kind"], 0) + value
            elif name == "lsb_gemini_cache_total":
                totals["cache"][labels["result"]] = value
            elif name == "lsb_gemini_cost_usd_total":
                totals["gemini_cost_usd"] += value
            elif name == "lsb_gemini_calls_total":
                totals["gemini_calls"][labels["outcome"]] = totals["gemini_calls"].get(labels["outcome"], 0) + value
    return totals


def tally_summary(tally: dict[str, float], fallback_per_task: float | None = None) -> dict[str, Any]:
    """Spend per tier, drafted tasks per source and each source's share, the cost per 1,000 drafted tasks,
    Gemini's measured cost per billed draft and what YOLO's drafts saved, from one money tally.

    The cost per task is measured (USD over billed Gemini drafts, cache hits excluded); a tally without a
    billed Gemini draft uses ``fallback_per_task`` (the service-wide figure) and says so, else None.
    """
    by_tier = {k.partition(":")[2]: v for k, v in tally.items() if k.startswith("usd:")}
    tasks = {k.partition(":")[2]: v for k, v in tally.items() if k.startswith("tasks:")}
    total_usd, drafted = sum(by_tier.values()), sum(tasks.values())
    families: dict[str, float] = {}
    for source, n in tasks.items():
        families[source.partition(":")[0]] = families.get(source.partition(":")[0], 0.0) + n
    billed = sum(n for source, n in tasks.items() if source.startswith("gemini") and source != "gemini:cache")
    per_task = total_usd / billed if billed else fallback_per_task
    yolo_tasks = tasks.get("yolo", 0.0)
    return {
        "total_usd": total_usd, "spend_by_tier_usd": by_tier, "tasks_by_source": tasks, "drafted_tasks": drafted,
        "share_by_source": {f: n / drafted for f, n in families.items()} if drafted else {},
        "cost_per_1000_tasks_usd": cost_per_1000(tally), "gemini_cost_per_task_usd": per_task,
        "cost_per_task_measured": bool(billed), "yolo_tasks": yolo_tasks,
        "yolo_savings_usd": None if per_task is None else yolo_tasks * per_task,
    }


def money(redis: redis_lib.Redis, totals: dict[str, Any]) -> dict[str, Any]:
    """Gemini spend today and in total, and what YOLO drafts saved (tasks YOLO drafted x Gemini's cost per task).

    Spend is shared by every project (one Gemini key, one daily budget): ``lsb:gemini:spend:<day>`` and the
    lifetime hash ``lsb:gemini:money`` (usd:<tier>, tasks:<source>). The cost per task is measured: lifetime
    USD over billed Gemini drafts; until Gemini has drafted a task it is "not measured yet".
    """
    day = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    today = redis.get(keys.Keys.SPEND_DAY.format(prefix=keys.gemini_spend(), day=day))
    lifetime = money_tally(redis)
    summary = tally_summary(lifetime)
    if "tasks:yolo" not in lifetime:  # Gemini off: no tally is kept, this process's counter is what there is
        summary["yolo_tasks"] = yolo = totals["predictions"].get("yolo", 0.0)
        per_task = summary["gemini_cost_per_task_usd"]
        summary["yolo_savings_usd"] = None if per_task is None else yolo * per_task
    return {
        **summary, "today_usd": float(today or 0.0), "tasks": lifetime, "tokens": totals["tokens"], "cache": totals["cache"],
    }


def project_money(redis: redis_lib.Redis, project: str, service_per_task: float | None) -> dict[str, Any]:
    """One project's spend per tier, drafts per source, cost per 1,000 drafts and YOLO's savings
    (``lsb:gemini:money:<p>``, written as each drafted task is counted)."""
    return tally_summary(project_money_tally(redis, project), service_per_task)


def routing_choice(settings: Settings, info: VersionInfo | None) -> dict[str, Any]:
    """Which source drafts first now, and why (the rule of backend.serving.routing.Router.order)."""
    mode = settings.routing
    yolo = quality.model_map50(info.meta) if info else None
    gemini = ((info.meta.get("draft_quality") or {}).get("gemini") or {}) if info else {}
    if mode == "yolo":
        return {"mode": mode, "first": "yolo", "why": "ROUTING=yolo: YOLO only"}
    if mode == "gemini":
        return {"mode": mode, "first": "gemini", "why": "ROUTING=gemini: Gemini first, YOLO when Gemini cannot serve"}
    if info is None:
        return {"mode": mode, "first": "gemini", "why": "no YOLO model trained yet"}
    if quality.yolo_preferred(info):
        return {"mode": mode, "first": "yolo",
                "why": f"YOLO {info.version} mAP50 {yolo:.3f} >= Gemini drafts' {float(gemini['map50']):.3f}"}
    if gemini.get("map50") is None:
        return {"mode": mode, "first": "gemini", "why": "Gemini's drafts are " + NOT_MEASURED}
    return {"mode": mode, "first": "gemini",
            "why": f"YOLO {info.version} mAP50 {yolo if yolo is not None else float('nan'):.3f} < Gemini drafts' "
                   f"{float(gemini['map50']):.3f}"}


def _label_studio_links(settings: Settings, project: str) -> dict[str, str | None]:
    base = settings.label_studio_url.rstrip("/")
    return {"project": f"{base}/projects/{project}/data" if base else None,
            "task": f"{base}/projects/{project}/data?task=" if base else None}


def _part(name: str, errors: dict[str, str], func, *args, default=None):
    """Run one part; a Redis or file hiccup shows as an error on that part, never a failed page."""
    try:
        return func(*args)
    except Exception as exc:  # noqa: BLE001 - the page shows what it could read
        log.debug("status part %s failed: %s", name, exc)
        errors[name] = f"{type(exc).__name__}: {exc}"[:300]
        return default


def project_status(settings: Settings, redis: redis_lib.Redis, registry: ModelRegistry, project: str | int,
                   totals: dict[str, Any] | None = None, service_per_task: float | None = None) -> dict[str, Any]:
    """Everything the page shows for one project (see the module docstring for where each part comes from)."""
    project = keys.project_key(project)
    errors: dict[str, str] = {}
    totals = totals if totals is not None else _part("metrics", errors, prometheus_totals, default=None)
    current = _part("registry", errors, registry.current_version, project)
    infos = _part("registry", errors, registry.versions, project, default=[]) or []
    info = next((i for i in infos if i.version == current), None)
    status = _part("training", errors, training_queue.training_status, redis, project, default={}) or {}
    drafts = _part("quality", errors, quality.read, redis, project)
    return {
        "project": project,
        "current_version": current,
        "versions": [_version_row(i, current) for i in infos],
        "trainings": _part("history", errors, training_history, redis, project, default=[]),
        "live": _part("live", errors, live_training, redis, project, status, default={}),
        "last_training": status.get("last"),
        "events_since_training": status.get("events_since_training"),
        "quality": drafts,
        "evaluation": (drafts or {}).get("evaluation"),
        "routing": routing_choice(settings, info),
        "money": _part("money", errors, project_money, redis, project, service_per_task),
        "failures": {"jobs": _part("failed_jobs", errors, failed_jobs, redis, project, default=[]),
                     "predictions": (totals or {}).get("prediction_failures", {})},
        "links": _label_studio_links(settings, project),
        "errors": errors,
    }


def collect(settings: Settings, redis: redis_lib.Redis, registry: ModelRegistry, project: str | int | None = None) -> dict:
    """The whole page: every project on disk (or just ``project``), the shared money and the service's totals."""
    errors: dict[str, str] = {}
    totals = _part("metrics", errors, prometheus_totals, default=None)
    if project is not None:
        listed = [keys.project_key(project)]
    else:
        listed = _part("registry", errors, registry.projects, default=[]) or []
    shared = _part("money", errors, money, redis, totals or {"predictions": {}, "tokens": {}, "cache": {}})
    per_task = (shared or {}).get("gemini_cost_per_task_usd")
    return {
        "generated_at": round(time.time(), 3),
        "routing": settings.routing,
        "gemini_enabled": settings.gemini_enabled,
        "label_studio_url": settings.label_studio_url or None,
        "totals": totals,
        "money": shared,
        "projects": [project_status(settings, redis, registry, p, totals, per_task) for p in sorted(listed, key=int)],
        "errors": errors,
    }
