"""``lsb`` entry point (console script ``lsb = "worker.cli.__main__:main"``; also ``python -m worker.cli``).

Commands::

    detect     images -> one JSON + annotated PNG per image (gemini | yolo | owlvit)
    export     detect results -> Label Studio tasks JSON with predictions, YOLO dataset, COCO json
    push       drafts for a whole Label Studio project (in-process, or --queue to the RQ worker)
    check      one tiny Gemini call: key, model, latency, tokens
    train      YOLO from a local dataset folder, or a Label Studio project's training
    eval       score a drafting source or YOLO version against human labels -> Markdown report
    versions   a project's model versions
    rollback   serve an earlier version
    rank       re-score a project's drafts so the Data Manager shows the most useful tasks first
    base-model install or inspect the pretrained weights first trainings start from (air-gapped hosts)

Configuration is the service's (environment variables, ``python -m backend.core.settings``); exit codes:
0 ok, 1 some work failed, 2 a usage/configuration problem (message on stderr).
"""

from __future__ import annotations

import argparse
import logging
import sys

from worker.cli import base_model, check, detect, export, push, rank, rollback, train, versions
from worker.cli import eval as eval_cmd
from worker.cli.common import CLIError

COMMANDS = (detect, export, push, check, train, eval_cmd, versions, rollback, rank, base_model)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lsb", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The Label Studio ML backend's detectors, datasets, evaluation and model registry from the command line.",
        epilog="Configuration: the service's environment variables (python -m backend.core.settings lists them). "
               "Exit codes: 0 ok, 1 some work failed, 2 usage or configuration problem. 'lsb COMMAND --help' for each command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", 0) or 0
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if verbose == 0:
        for name in ("httpx", "httpx2", "google_genai", "transformers", "ultralytics"):
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        return int(args.run(args) or 0)
    except CLIError as exc:
        print(f"lsb {args.command}: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print(f"lsb {args.command}: interrupted (re-run to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
