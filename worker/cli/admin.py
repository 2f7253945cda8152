"""Command line for training and the model registry.

    python -m worker.cli.admin train    --project 3 [--now] [--no-force]
    python -m worker.cli.admin status   --project 3
    python -m worker.cli.admin versions --project 3
    python -m worker.cli.admin rollback --project 3 [--version v0002]

``train`` queues a forced training on the ``training`` queue (like Label Studio's "Start Training");
``--now`` runs it in this process instead (no worker needed). Output is JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from backend.core.connection import connect_patient
from backend.core.queue import request_training, training_status
from backend.core.registry import ModelRegistry, describe
from backend.core.settings import get_settings
from worker.jobs.training import run_training


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.cli.admin", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["train", "status", "versions", "rollback"])
    parser.add_argument("--project", required=True, help="Label Studio project id")
    parser.add_argument("--version", help="rollback target (default: the version before the current)")
    parser.add_argument("--now", action="store_true", help="train in this process instead of queueing")
    parser.add_argument("--no-force", action="store_true", help="skip when no annotation changed")
    args = parser.parse_args(argv)

    settings = get_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    redis = connect_patient(settings.redis_url, timeout=5.0)
    out: object
    if args.command == "train":
        if args.now:
            out = run_training(args.project, None, not args.no_force, settings=settings, redis=redis)
        else:
            out = request_training(redis, args.project, force=not args.no_force, settings=settings)
    elif args.command == "status":
        out = training_status(redis, args.project, settings=settings)
    else:
        registry = ModelRegistry(settings.model_dir, redis)
        if args.command == "versions":
            current = registry.current_version(args.project)
            out = [
                {"version": v.version, "current": v.version == current, "created_at": v.meta.get("created_at"),
                 "parent": v.meta.get("parent"),
                 "metrics": {k: (v.meta.get("metrics") or {}).get(k) for k in ("map50", "map50_95")},
                 "dataset_hash": v.meta.get("dataset_hash"), "classes": v.classes}
                for v in registry.versions(args.project)
            ]
        else:
            try:
                out = describe(registry.rollback(args.project, args.version))
            except KeyError as exc:
                print(json.dumps({"error": str(exc)}), file=sys.stderr)
                return 1
    print(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
