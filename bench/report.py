"""BENCHMARKS.md and bench.json from results, with the machine they ran on.

:func:`write_report` keeps the sections of benchmarks that were not run this time, so
``python -m bench --only NAME`` refreshes one section only.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

from bench.common import ROOT, package_version
from bench.results import Result, Row

# --- machine -----------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine() -> dict[str, str]:
    try:
        mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
        memory = f"{mem / 1024 / 1024:.1f} GiB"
    except Exception:
        memory = "unknown"
    try:
        def git(*args: str) -> str:
            run = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False)
            return run.stdout.strip()

        commit, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain")
        commit = f"{commit}{' + uncommitted changes' if dirty else ''}"
    except Exception:
        commit = "unknown"
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu_model(),
        "memory": memory,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": package_version("torch"),
        "ultralytics": package_version("ultralytics"),
        "onnxruntime": package_version("onnxruntime"),
        "openvino": package_version("openvino"),
        "google-genai": package_version("google-genai"),
        "gunicorn": package_version("gunicorn"),
        "commit": commit,
    }


# --- report ------------------------------------------------------------------------------------------

_SECTION = re.compile(r"<!-- bench:(?P<name>[a-z_]+) -->\n(?P<body>.*?)<!-- /bench:(?P=name) -->\n", re.S)
#: The last run of the whole suite (no --only): kept in the header when a later --only run refreshes some sections.
_FULL_RUN = re.compile(r"^Last full run: .*$", re.M)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(rows: list[Row]) -> str:
    lines = ["| metric | value | baseline (same run) | ratio | goal | status |", "|---|---|---|---|---|---|"]
    for r in rows:
        value = r.value + (f" — {r.note}" if r.note else "")
        status = {"met": "met", "MISSED": "**MISSED**"}.get(r.status, "")
        cells = (r.metric, value, r.baseline, r.ratio, r.goal)
        lines.append("| " + " | ".join(_cell(c) for c in cells) + f" | {status} |")
    return "\n".join(lines)


def render_section(result: Result) -> str:
    mode = "quick (smoke-test sizes: figures are NOT representative)" if result.quick else "full"
    parts = [f"## {result.title}", ""]
    if result.error:
        parts += [f"**The benchmark failed:** `{_cell(result.error)}`", ""]
    if result.rows:
        parts += [_table(result.rows), ""]
    if result.notes:
        parts += ["Notes:", ""] + [f"- {n}" for n in result.notes] + [""]
    if result.method:
        parts += [f"Method: {result.method}", ""]
    if result.params:
        parts += ["Parameters: " + ", ".join(f"`{k}={v}`" for k, v in result.params.items()), ""]
    parts += [f"Reproduce: `{result.command}` — mode: {mode}; took {result.seconds:.0f} s; "
              f"load average (1/5/15 min) at the start: {result.load}.", ""]
    return f"<!-- bench:{result.name} -->\n" + "\n".join(parts) + f"<!-- /bench:{result.name} -->\n"


def _summary(sections: dict[str, str], order: list[str]) -> str:
    lines = ["| benchmark | metric | value | ratio | goal | status |", "|---|---|---|---|---|---|"]
    for name in order:
        body = sections.get(name, "")
        title = re.search(r"^## (.+)$", body, re.M)
        for line in body.splitlines():
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            if len(cells) == 6 and cells[5] in ("met", "**MISSED**"):
                picked = (title.group(1) if title else name, cells[0], cells[1], cells[3], cells[4], cells[5])
                lines.append("| " + " | ".join(picked) + " |")
    return "\n".join(lines)


def write_report(path: Path, results: list[Result], order: list[str], info: dict[str, str], argv: str,
                 total_seconds: float, full_run: bool = False) -> None:
    """BENCHMARKS.md: summary of every goal, then one section per benchmark.

    Sections of benchmarks not run this time are kept from the existing file, so
    ``python -m bench --only NAME`` refreshes one section only.
    ``full_run``: a finished run of the whole suite (no ``--only``, not a partial write); it becomes the
    header's "Last full run", which every other write keeps.
    """
    old = path.read_text() if path.exists() else ""
    sections = {m.group("name"): m.group(0) for m in _SECTION.finditer(old)}
    this_run = f"`{argv}` ({total_seconds / 60:.1f} min), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    kept = _FULL_RUN.search(old)
    full_line = (f"Last full run: {this_run}." if full_run
                 else kept.group(0) if kept else "Last full run: none recorded in this file.")
    for result in results:
        sections[result.name] = render_section(result)
    machine_lines = "\n".join(f"| {k} | {_cell(v)} |" for k, v in info.items())
    header = f"""# Benchmarks

Generated by `python -m bench` (`make bench`; `make bench-full` adds the long benchmarks, whose
sections are otherwise kept from their last run); do not edit by hand. Every figure is measured against a
baseline measured in the same run; timings are medians over repeats with (min–max), latencies are
percentiles over all requests. Goals come from issue 5; a missed goal is marked **MISSED** and
explained in its section. A section's own "Reproduce" line says which run wrote it.
Last run: {this_run}.
{full_line}

## Machine

| | |
|---|---|
{machine_lines}

The machine is shared: other processes (other engineers' tests) may run at the same time; each
section states the load average when it started. Two cores: wherever the backend and its load
generator run together they share them, as they would on a 2-core production host.

## Summary of goals

{_summary(sections, [n for n in order if n in sections])}

"""
    body = "".join(sections[name] + "\n" for name in order if name in sections)
    body += "".join(sections[name] + "\n" for name in sections if name not in order)
    path.write_text(header + body.rstrip() + "\n")


def write_json(path: Path, results: list[Result], info: dict[str, str]) -> None:
    data = {"machine": info, "results": [asdict(r) for r in results]}
    path.write_text(json.dumps(data, indent=2, default=str))
