"""Run the benchmark suite and write BENCHMARKS.md.

    python -m bench                      # make bench: every benchmark but the long ones, about an hour on 2 cores
    python -m bench --full               # make bench-full: also the long ones (training, active), about half an hour more
    python -m bench --quick              # smoke-test sizes, a few minutes; figures not representative
    python -m bench --only bulk,cache    # some benchmarks; other sections of the report are kept
    python -m bench --list

Benchmarks need the local Redis (BENCH_REDIS_URL, default db 14) and nothing from the network.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import time
import traceback
from pathlib import Path

from bench.common import ROOT, Context, new_workdir, setup_environment
from bench.report import load_average, machine, write_json, write_report
from bench.results import Result

# Report order: the numbering.
BENCHMARKS = {
    "bulk": "bench.bulk",
    "yolo_latency": "bench.yolo_latency",
    "formats": "bench.formats",
    "hotswap": "bench.hotswap",
    "health": "bench.health",
    "cache": "bench.cache",
    "training": "bench.training",
    "memory": "bench.memory",
    "dataset": "bench.dataset",
    "active": "bench.active",
    "curve": "bench.curve",
    "tiers": "bench.tiers",
}
# Run order: the long training benchmarks last, so a broken one costs the least.
RUN_ORDER = ["formats", "yolo_latency", "cache", "bulk", "hotswap", "health", "memory", "dataset", "tiers", "curve", "active",
             "training"]
#: Benchmarks that `make bench` leaves out to stay near an hour: they measure the training recipe and active learning,
#: which change rarely; `--full` (make bench-full) or `--only` runs them, and their sections are kept until then.
LONG = ("training", "active")


def selection(only: list[str], full: bool) -> list[str]:
    """The benchmarks to run: those named by ``--only`` (comma-separated, repeatable), else all but LONG unless ``full``."""
    return [n.strip() for item in only for n in item.split(",") if n.strip()] or [
        n for n in BENCHMARKS if full or n not in LONG]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and budgets (development, smoke tests)")
    parser.add_argument("--only", action="append", default=[], help="comma-separated benchmark names (repeatable)")
    parser.add_argument("--full", action="store_true", help=f"also the long benchmarks ({', '.join(LONG)})")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md", help="report to write (default BENCHMARKS.md)")
    parser.add_argument("--json", type=Path, help="also write the raw results as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work folder under var/bench/")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    if args.list:
        for name, module in BENCHMARKS.items():
            print(f"{name:14s} {importlib.import_module(module).TITLE}{'  (--full)' if name in LONG else ''}")
        return 0
    selected = selection(args.only, args.full)
    unknown = [n for n in selected if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    setup_environment()
    from backend.core import ultralytics_env

    ultralytics_env.prepare()
    info = machine()
    workdir = new_workdir()
    ctx = Context(quick=args.quick, workdir=workdir, verbose=not args.quiet)
    started = time.monotonic()
    command = ("python -m bench" + (" --full" if args.full and not args.only else "") + (" --quick" if args.quick else "")
               + (f" --only {','.join(selected)}" if args.only else ""))
    results: list[Result] = []
    for name in [n for n in RUN_ORDER if n in selected]:
        module = importlib.import_module(BENCHMARKS[name])
        load = load_average()
        ctx.log(f"=== {name}: {module.TITLE} (load average {load})")
        t = time.monotonic()

        def partial(result: Result, name=name, load=load, t=t) -> None:
            import copy

            snapshot = copy.copy(result)
            snapshot.notes = [*result.notes, "PARTIAL: the run was still going (or was interrupted) when this was written."]
            snapshot.quick, snapshot.seconds, snapshot.load = args.quick, time.monotonic() - t, load
            snapshot.command = f"python -m bench --only {name}" + (" --quick" if args.quick else "")
            write_report(args.out, [*results, snapshot], list(BENCHMARKS), info, command, time.monotonic() - started)

        ctx.on_partial = partial
        try:
            result = module.run(ctx)
        except Exception as exc:  # one broken benchmark must not lose the others' figures
            traceback.print_exc()
            result = Result(name, module.TITLE, error=f"{type(exc).__name__}: {exc}"[:400])
        result.quick = args.quick
        result.seconds = time.monotonic() - t
        result.load = load
        result.command = f"python -m bench --only {name}" + (" --quick" if args.quick else "")
        results.append(result)
        for row in result.rows:
            ctx.log(f"  {row.metric}: {row.value} | {row.baseline} | {row.ratio} | {row.goal} {row.status}")
        ctx.log(f"=== {name} done in {result.seconds:.0f} s" + (f" — FAILED: {result.error}" if result.error else ""))
        # After every benchmark, so an interrupted run keeps what it measured.
        write_report(args.out, results, list(BENCHMARKS), info, command, time.monotonic() - started)
        if args.json:
            write_json(args.json, results, info)
    total = time.monotonic() - started
    write_report(args.out, results, list(BENCHMARKS), info, command, total, full_run=not args.only)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    missed = [(r.name, row.metric) for r in results for row in r.missed]
    failed = [r.name for r in results if r.error]
    print(f"wrote {args.out}: {len(results)} benchmark(s) in {total / 60:.1f} min; "
          f"{len(missed)} goal(s) missed; {len(failed)} benchmark(s) failed{': ' + ', '.join(failed) if failed else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
