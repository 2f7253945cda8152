"""The benchmark suite runs end to end (`python -m bench --quick --only cache`) and reports its rows.

No timing is asserted: figures on a shared 2-core machine are the benchmarks' business, not a test's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.report import render_section, write_report
from bench.results import Result, Row
from bench.stats import Stats, percentile
from tests.live import ROOT


def test_percentiles_and_stats():
    data = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(data, 50) == 3.0
    assert percentile(data, 0) == 1.0 and percentile(data, 100) == 5.0
    assert percentile(data, 95) == pytest.approx(4.8)
    s = Stats.of(data)
    assert (s.n, s.median, s.min, s.max) == (5, 3.0, 1.0, 5.0)
    assert Stats.of([]).n == 0


def test_report_keeps_sections_of_benchmarks_not_run(tmp_path):
    out = tmp_path / "B.md"
    a = Result("bulk", "1. Bulk", rows=[Row("speed", "8.1×", goal="≥ 8×", status="met")], command="python -m bench --only bulk")
    b = Result("cache", "6. Cache", rows=[Row("calls", "1", goal="0", status="MISSED")], command="python -m bench --only cache")
    write_report(out, [a], ["bulk", "cache"], {"nproc": "2"}, "python -m bench", 30)  # a partial write of the run
    assert "Last full run: none recorded" in out.read_text()
    write_report(out, [a, b], ["bulk", "cache"], {"nproc": "2"}, "python -m bench", 60, full_run=True)
    b2 = Result("cache", "6. Cache", rows=[Row("calls", "0", goal="0", status="met")], command="python -m bench --only cache")
    write_report(out, [b2], ["bulk", "cache"], {"nproc": "2"}, "python -m bench --only cache", 10)
    text = out.read_text()
    assert "Last run: `python -m bench --only cache` (0.2 min)" in text
    assert text.count("Last full run: `python -m bench` (1.0 min)") == 1  # kept by the --only run, once
    assert "| speed | 8.1× |" in text  # kept from the first run
    assert "| calls | 0 |" in text and "| calls | 1 |" not in text  # replaced
    assert text.index("1. Bulk") < text.index("6. Cache")
    summary = text.split("## Summary of goals")[1].split("<!-- bench:")[0]
    assert "| 1. Bulk | speed | 8.1× |  | ≥ 8× | met |" in summary
    assert "| 6. Cache | calls | 0 |  | 0 | met |" in summary
    assert "**MISSED**" in render_section(b)


@pytest.mark.slow
def test_quick_cache_benchmark_writes_its_rows(tmp_path, redis_url):
    out, raw = tmp_path / "BENCH.md", tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "bench", "--quick", "--only", "cache", "--out", str(out), "--json", str(raw), "-q"]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    text = out.read_text()
    for expected in ("# Benchmarks", "## Machine", "| nproc |", "| torch |", "| ultralytics |", "## Summary of goals",
                     "## 6. Cache", "Gemini calls when the same 8 tasks are predicted again", "time of the repeat /predict",
                     "repeat answers identical", "Reproduce: `python -m bench --only cache --quick`", "Method:"):
        assert expected in text, expected
    data = json.loads(raw.read_text())
    (result,) = data["results"]
    assert result["name"] == "cache" and not result["error"] and result["quick"]
    metrics = [row["metric"] for row in result["rows"]]
    assert len(metrics) == 3
    calls = next(r for r in result["rows"] if r["metric"].startswith("Gemini calls"))
    assert calls["status"] in ("met", "MISSED") and calls["goal"] == "0"


@pytest.mark.slow
def test_quick_bulk_benchmark_runs_inline(tmp_path, redis_url):
    """bench.bulk's batches are answered inline: its warm-up measured the latency, so no 413 too_slow_inline."""
    raw = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "bench", "--quick", "--only", "bulk", "--out", str(tmp_path / "B.md"), "--json",
               str(raw), "-q"]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    (result,) = json.loads(raw.read_text())["results"]
    assert result["name"] == "bulk" and not result["error"] and result["rows"], result


@pytest.mark.slow
def test_quick_annotation_efficiency_curve_writes_table_and_plot(tmp_path, redis_url):
    """bench.curve in quick mode: the real pipeline at tiny sizes; rows, drafts' mAP50 and the PNG are there."""
    out, raw = tmp_path / "BENCH.md", tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "bench", "--quick", "--only", "curve", "--out", str(out), "--json", str(raw), "-q",
               "--keep"]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    text = out.read_text()
    for expected in ("## 11. Annotation efficiency", "4 corrected, random start, with drafts: held-out mAP50",
                     "4 corrected, pretrained start (stand-in, see method), without drafts", "ROUTING=auto sends to YOLO",
                     "Method:", "annotation_efficiency.png"):
        assert expected in text, expected
    result = next(r for r in json.loads(raw.read_text())["results"] if r["name"] == "curve")
    runs = result["raw"]["runs"]
    assert {(r["start"], r["drafts"]) for r in runs} == {("random", True), ("pretrained", False)}
    assert all(r["promoted"] for r in runs)  # a first training always passes the gate
    with_drafts = next(r for r in runs if r["drafts"])
    assert with_drafts["draft_tasks"] > 0 and next(r for r in runs if not r["drafts"])["draft_tasks"] == 0
    assert 0.3 < with_drafts["drafts_map50"] < 1.0  # simulated drafts: imperfect, yet useful
    from pathlib import Path

    png = Path(result["raw"]["png"])
    assert png.stat().st_size > 1000
    import shutil

    shutil.rmtree(png.parent, ignore_errors=True)  # --keep kept the quick run's work folder for the PNG


def _curve_run(n: int, start: str, budget: dict, map50: float, seed: int = 1) -> dict:
    return {"n": n, "start": start, "drafts": True, "budget": budget, "map50": map50, "drafts_map50": 0.85,
            "epochs_run": 5 if budget["time_min"] < 1 else 30, "wall_s": 60.0, "train_images": 2 * n,
            "yolo_preferred": map50 > 0.85, "seed": seed}


def test_curve_summary_says_what_each_budget_bought_and_survives_a_partial_write(tmp_path):
    """A line mixing budgets (random init: 0.75 min learns nothing, 5 min does) is explained, not read as an effect of n."""
    from bench import curve

    real, short = {"time_min": 5.0}, {"time_min": 0.75}
    runs = [_curve_run(n, "random", real if n == 40 else short, 1.0 if n == 40 else 0.0, seed)
            for seed in (1, 2) for n in (10, 20, 40)]
    runs += [_curve_run(n, "pretrained", short, 0.99, seed) for seed in (1, 2) for n in (10, 20, 40)]
    result = Result(curve.NAME, curve.TITLE)
    points = curve._summarise(result, runs, [10, 20, 40], 40)
    assert len(points) == 6 and len(result.rows) == 6 + 2
    goals = {row.metric.split(": ")[-1]: row.status for row in result.rows if row.status}
    assert set(goals.values()) == {"met"}, goals
    notes = curve.budget_notes(runs, real)
    assert len(notes) == 1 and notes[0].startswith("random start:"), notes  # pretrained ran one budget only
    assert "mean mAP50 0.000 over 4 runs (sizes 10, 20" in notes[0] and "too short to learn anything" in notes[0]
    assert "mean mAP50 1.000 over 2 runs (sizes 40" in notes[0]
    lines = curve.series(points)
    assert set(lines) == {("pretrained", True, str(short)), ("random", True, str(real)), ("random", True, str(short))}
    assert [p["n"] for p in lines["random", True, str(short)]] == [10, 20]  # the 0.75-min zeros never reach the 5-min point
    png = tmp_path / "curve.png"
    curve._plot(points, 0.85, png, "test", real)
    assert png.stat().st_size > 1000
    again = curve._summarise(result, runs, [10, 20, 40], 40)  # each partial write starts the rows afresh
    assert again == points and len(result.rows) == 8


def test_curve_goal_rows_only_for_headline_runs_at_the_real_budget():
    """A 40-image run at the short budget (without drafts) is a point of the table, never a goal row of the defaults."""
    from bench import curve

    real, short = {"time_min": 5.0}, {"time_min": 0.25}
    runs = [_curve_run(40, "random", real, 1.0, seed) for seed in (1, 2, 3)]
    runs += [{**_curve_run(40, "random", short, 0.0, seed), "drafts": False} for seed in (1, 2, 3)]
    result = Result(curve.NAME, curve.TITLE)
    curve._summarise(result, runs, [40], 40, real)
    goals = [row.metric for row in result.rows if row.status]
    assert len(goals) == 2 and all("with drafts, real defaults" in g for g in goals), goals
    assert any("without drafts: held-out mAP50" in row.metric for row in result.rows)  # still in the table
    curve._summarise(result, runs, [40], 40)  # without ``real`` every headline run counts: the short one misses
    assert any(row.status == "MISSED" for row in result.rows)


def test_make_bench_leaves_the_long_benchmarks_to_full():
    from bench.__main__ import BENCHMARKS, LONG, selection

    default = selection([], full=False)
    assert not set(LONG) & set(default) and set(default) | set(LONG) == set(BENCHMARKS)
    assert set(selection([], full=True)) == set(BENCHMARKS)
    assert selection(["training,cache", "bulk"], full=False) == ["training", "cache", "bulk"]  # --only names win


def _hotswap_data(release_ms: float | None) -> dict:
    """Requests every 0.1 s from t=0 to 12: 20 ms, except 400 ms while the first candidate loads (8.0-8.5) and
    60 ms in the 2 s after each promotion (8.5 and 10.5)."""
    def lat(t: float) -> float:
        if 8.0 <= t < 8.5:
            return 0.4
        return 0.06 if any(p <= t < p + 2.0 for p in (8.5, 10.5)) else 0.02

    records = [{"t": i / 10, "lat": lat(i / 10), "status": 200, "mv": "yolo:v0001"} for i in range(120)]
    answer = {"loaded": 2, "listeners": 2, "waited_s": 0.5, "timed_out": 0}
    return {"records": records, "promotions": [("v0002", 8.5), ("v0003", 10.5)],
            "swaps": {"v0002": {1: 8.51, 2: 8.52}, "v0003": {1: 10.51, 2: 10.52}}, "started": 0.0,
            "preloads": [(8.0, 8.5, answer), (10.0, 10.5, answer)], "format": "OpenVINO INT8 export",
            "loaded_on_promotion": 0, "workers": [1, 2], "release_ms": release_ms}


def test_hotswap_steady_baseline_ends_when_the_first_candidate_is_announced():
    """The first candidate's load (400 ms) is not steady: the baseline stays 20 ms, so 60 ms after a swap is 3×."""
    from bench import hotswap

    result = Result(hotswap.NAME, hotswap.TITLE)
    hotswap._analyse(result, "int8", _hotswap_data(22.0), 2)
    assert result.raw["int8"]["p99_before"] == pytest.approx(0.02)
    swap = next(row for row in result.rows if "p99 latency in the 2 s after each promotion" in row.metric)
    assert swap.status == "MISSED" and swap.ratio == "3.00×"
    loading = next(row for row in result.rows if "while the candidate loads" in row.metric)
    assert "first candidate: max 400 ms (n=5)" in loading.note
    assert "later ones: max 60 ms (n=5)" in loading.note  # the second load falls inside the first swap's 2 s
    teardown = next(row for row in result.rows if "dropping the old model" in row.metric)
    assert teardown.value == "22.0"
    assert any("22 ms of C++ teardown holding the GIL" in note for note in result.notes)


def test_hotswap_teardown_note_only_when_the_swap_window_misses():
    from bench import hotswap

    data = _hotswap_data(None)
    result = Result(hotswap.NAME, hotswap.TITLE)
    hotswap._analyse(result, "pt", data, 2)
    assert not any("dropping the old model" in row.metric for row in result.rows) and not result.notes
