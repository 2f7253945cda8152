"""``lsb rank``: re-score the drafts of a project's un-annotated tasks, most useful first.

    lsb rank --project 3                 # here, with the project's current YOLO version
    lsb rank --project 3 --queue         # as a job of the RQ "prelabel" queue (coalesced per project)

Writes each task's usefulness (backend/serving/usefulness.py) as the score of its predictions in Label
Studio; sort the Data Manager by "Prediction score", descending, to label the most useful tasks first.
The training job does the same after every promotion.
"""

from __future__ import annotations

import argparse

from backend.core.keys import project_key
from backend.core.rank_queue import request_ranking
from worker.cli import common
from worker.jobs.ranking import run_ranking


def add_parser(sub) -> None:
    p = sub.add_parser("rank", help="re-score a project's drafts: most useful tasks first", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--project", required=True, help="Label Studio project id")
    p.add_argument("--queue", action="store_true", help="enqueue on the RQ 'prelabel' queue instead of running here")
    p.add_argument("--scores", action="store_true", help="print every task's score too")
    common.common_flags(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    s = common.settings()
    try:
        project = project_key(args.project)
    except ValueError as exc:
        raise common.CLIError(str(exc)) from exc
    if not s.label_studio_url or not s.label_studio_api_key.get_secret_value():
        raise common.CLIError("rank needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (a Personal Access Token)")
    redis = common.redis_or_none(s, timeout=5.0)
    if args.queue:
        if redis is None:
            raise common.CLIError(f"--queue needs Redis at {s.redis_url}")
        common.print_json(request_ranking(redis, project, reason="lsb rank"))
        return 0
    result = run_ranking(project, s, redis)
    if not args.scores:
        result.pop("scores", None)
    common.print_json(result)
    if result.get("status") == "skipped":
        return 1
    return 1 if result.get("failed") else 0
