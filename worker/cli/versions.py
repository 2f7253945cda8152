"""``lsb versions``: a project's YOLO versions (the registry), newest last, current marked.

    lsb versions --project 3
    lsb versions --project 3 --status      # the training status as well

The same output as ``python -m worker.cli.admin versions`` (this command runs it).
"""

from __future__ import annotations

import argparse

from worker.cli import common


def add_parser(sub) -> None:
    p = sub.add_parser("versions", help="list a project's model versions", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--project", required=True, help="Label Studio project id")
    p.add_argument("--status", action="store_true", help="print the training status instead")
    common.common_flags(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from worker.cli import admin as worker_cli  # lazy: admin imports worker.jobs.training (pycocotools), too slow for lsb --help

    common.settings()  # fresh settings for the worker CLI too
    return worker_cli.main(["status" if args.status else "versions", "--project", str(args.project)])
