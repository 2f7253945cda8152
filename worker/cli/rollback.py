"""``lsb rollback``: serve an earlier YOLO version of a project (every serving process hot-swaps).

    lsb rollback --project 3                  # the version before the current one
    lsb rollback --project 3 --version v0002

Runs ``python -m worker.cli.admin rollback`` (:meth:`backend.core.registry.ModelRegistry.rollback`).
"""

from __future__ import annotations

import argparse

from worker.cli import common


def add_parser(sub) -> None:
    p = sub.add_parser("rollback", help="serve an earlier model version", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--project", required=True, help="Label Studio project id")
    p.add_argument("--version", help="target version (default: the one before the current)")
    common.common_flags(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from worker.cli import admin as worker_cli  # lazy: admin imports worker.jobs.training (pycocotools), too slow for lsb --help

    common.settings()
    argv = ["rollback", "--project", str(args.project)]
    if args.version:
        argv += ["--version", args.version]
    return worker_cli.main(argv)
