"""``lsb push``: drafts for every task of a Label Studio project, stored as predictions.

    lsb push --project 3                 # in this process, with a progress bar
    lsb push --project 3 --tasks 10,11   # only these tasks
    lsb push --project 3 --queue --wait  # as a job of the RQ "prelabel" queue (a running worker does it)

No 100 s limit: this is not Label Studio's ``/predict`` call but the backend's own pre-labeling job
(:func:`worker.jobs.prelabeling.prelabel_tasks`), run here in chunks of ``--chunk`` tasks or queued. It uses
the service's predictor (routing, Gemini cache and cost ledger, YOLO fallback, the project's
current YOLO version), drafts ``GEMINI_CONCURRENCY`` tasks at once, stores each draft with
``POST /api/predictions`` and skips tasks that already hold a prediction of the current
``model_version``, so an interrupted push resumes where it stopped. Needs LABEL_STUDIO_URL and
LABEL_STUDIO_API_KEY. Exit code 1 when some tasks failed (they are drafted again on the next run).
"""

from __future__ import annotations

import argparse
import sys
import time

from rq.job import Job
from tqdm import tqdm

from backend.core.keys import project_key
from backend.core.prelabel_queue import enqueue_prelabel
from backend.core.queue import PRELABEL_QUEUE, queue_name
from worker.cli import common
from worker.jobs import prelabeling
from worker.jobs.prelabeling import prelabel_tasks


def add_parser(sub) -> None:
    p = sub.add_parser("push", help="send predictions for a whole Label Studio project (resumable, concurrent)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--project", required=True, help="Label Studio project id")
    p.add_argument("--tasks", help="comma-separated task ids (default: every task)")
    p.add_argument("--chunk", type=int, default=100, help="tasks per pre-labeling call in-process (default 100)")
    p.add_argument("--queue", action="store_true", help="enqueue on the RQ 'prelabel' queue instead of running here")
    p.add_argument("--wait", action="store_true", help="with --queue: follow the job until it ends")
    common.common_flags(p)
    p.set_defaults(run=run)


def _task_list(s, project: str, ids: str | None) -> tuple[list[dict] | None, str]:
    """(tasks, label config) from Label Studio through the pre-labeling module's own client and listing."""
    ls = prelabeling.label_studio(s)
    pid = int(project)
    label_config = ls.projects.get(pid).label_config
    tasks = prelabeling.all_tasks(ls, pid)
    if ids:
        wanted = {int(t) for t in ids.split(",") if t.strip()}
        tasks = [t for t in tasks if int(t["id"]) in wanted]
        missing = wanted - {int(t["id"]) for t in tasks}
        if missing:
            raise common.CLIError(f"project {project} has no task(s) {sorted(missing)}")
    return tasks, label_config


def _follow(job_id: str, redis, quiet: bool) -> dict:
    bar = tqdm(desc="push (queued)", unit="task", disable=quiet, file=sys.stderr)
    try:
        while True:
            job = Job.fetch(job_id, connection=redis)
            status = job.get_status(refresh=True)
            status = str(getattr(status, "value", status))
            meta = job.get_meta(refresh=True) or {}
            if meta.get("total") is not None:
                bar.total = int(meta["total"])
                bar.n = int(meta.get("done") or 0)
                bar.refresh()
            if status in ("finished", "failed", "stopped", "canceled"):
                return {"job_id": job_id, "status": status, "result": job.return_value() if status == "finished" else None,
                        "error": (job.latest_result().exc_string if status == "failed" and job.latest_result() else None)}
            time.sleep(1.0)
    finally:
        bar.close()


def run(args: argparse.Namespace) -> int:
    s = common.settings()
    project = project_key(args.project)
    if not s.label_studio_url or not s.label_studio_api_key.get_secret_value():
        raise common.CLIError("push needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (a Personal Access Token)")

    if args.queue:
        redis = common.redis_or_none(s, timeout=5.0)
        if redis is None:
            raise common.CLIError(f"--queue needs Redis at {s.redis_url}")
        tasks = _task_list(s, project, args.tasks)[0] if args.tasks else None
        job_id = enqueue_prelabel(redis, project, tasks, settings=s)
        queue = queue_name(PRELABEL_QUEUE)
        out = {"queued": True, "job_id": job_id, "queue": queue, "tasks": "all" if tasks is None else len(tasks)}
        if args.wait:
            out.update(_follow(job_id, redis, args.quiet))
        common.print_json(out)
        return 0 if not args.wait or out.get("status") == "finished" else 1

    tasks, label_config = _task_list(s, project, args.tasks)
    total = {"project": project, "tasks": len(tasks), "stored": 0, "skipped": 0, "failed": 0, "failure_reasons": {}}
    started = time.monotonic()
    with tqdm(total=len(tasks), desc="push", unit="task", disable=args.quiet, file=sys.stderr) as bar:
        for start in range(0, len(tasks), max(1, args.chunk)):
            chunk = tasks[start:start + max(1, args.chunk)]
            result = prelabel_tasks(project, chunk, label_config)
            for key in ("stored", "skipped", "failed"):
                total[key] += int(result.get(key) or 0)
            for reason, count in (result.get("failure_reasons") or {}).items():
                total["failure_reasons"][reason] = total["failure_reasons"].get(reason, 0) + count
            bar.update(len(chunk))
            bar.set_postfix(stored=total["stored"], skipped=total["skipped"], failed=total["failed"])
    total["seconds"] = round(time.monotonic() - started, 2)
    common.print_json(total)
    return 1 if total["failed"] else 0
