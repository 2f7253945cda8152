"""10. Dataset build memory: peak RSS of one build for 200 and 2,000 large images.

The training job used to keep every decoded image of the project until the train/val split was known
(2,000 photos of 12 MP: about 80 GB); it now writes each image as soon as it is fetched
(worker/training/staging.py), so the peak must not grow with the number of tasks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from bench.common import ROOT, Context
from bench.results import Result, Row, goal_row
from bench.stats import ratio

NAME = "dataset"
TITLE = "10. Dataset build memory: peak RSS for 200 and 2,000 large images"
MAX_RATIO = 1.1  # "ratio ≈ 1": allocator noise, not growth with the task count


def _build(ctx: Context, tasks: int, width: int, height: int) -> dict:
    """One build in a child process; its JSON line plus the wall time from spawn to exit."""
    work = ctx.tmp(f"dataset-{tasks}")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "bench.dataset_child", "--tasks", str(tasks), "--out", str(work),
                           "--width", str(width), "--height", str(height)],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=3600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"dataset child for {tasks} tasks failed: {proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.monotonic() - started
    return out


def run(ctx: Context) -> Result:
    width, height = ctx.pick((3000, 2000), (1500, 1000))
    small, large = ctx.pick((200, 2000), (20, 200))
    result = Result(NAME, TITLE, params={"image": f"{width}x{height} RGB, made up by the loader stub",
                                         "original_bytes_per_image": "2 MiB", "threads": 4,
                                         "TRAIN_IMGSZ": "default (saved long side = max(2 × TRAIN_IMGSZ, 640))"})
    runs = {}
    for n in (small, large):
        ctx.log(f"dataset: building {n} images of {width}x{height}")
        runs[n] = _build(ctx, n, width, height)
        r = runs[n]
        ctx.log(f"dataset: {n} images: peak RSS {r['peak_rss_mib']:.0f} MiB (before the build {r['rss_before_mib']:.0f}), "
                f"{r['seconds']:.0f} s")
        ctx.partial(result)
    growth = ratio(runs[large]["peak_rss_mib"], runs[small]["peak_rss_mib"])
    result.add(goal_row(f"peak RSS of a build of {large:,} images (MiB)", f"{runs[large]['peak_rss_mib']:.0f}", growth,
                        MAX_RATIO, False, f"≤ {MAX_RATIO}× the {small}-image build (≈ 1)",
                        baseline=f"{small} images: {runs[small]['peak_rss_mib']:.0f}", ratio_text=f"{growth:.2f}×"))
    for n in (small, large):
        r = runs[n]
        result.add(Row(f"build of {n:,} images", f"{r['seconds']:.0f} s, {r['images'] / r['seconds']:.1f} images/s",
                       note=f"RSS before the build {r['rss_before_mib']:.0f} MiB, peak {r['peak_rss_mib']:.0f} MiB; "
                            f"saved as {r['saved_size'][0]}×{r['saved_size'][1]} JPEG"))
    decoded_mib = width * height * 4 / 2**20  # Pillow keeps RGB as 4 bytes a pixel
    result.notes.append(f"Keeping every decoded image, as the build did before, would need about "
                        f"{decoded_mib * large / 1024:.0f} GiB for {large:,} of these images ({decoded_mib:.0f} MiB each): "
                        f"computed, not run.")
    result.raw = {"runs": runs}
    result.method = ("`bench.dataset_child` runs `worker.training.dataset.build_dataset` (what the training job calls, "
                     "default settings, 4 loader threads) in a child process on N annotated tasks whose images come "
                     "from an in-process loader stub: each load makes a fresh RGB picture and 2 MiB of random "
                     "\"downloaded\" bytes, as `ImageLoader.load` returns them, so no network or disk read is timed. "
                     "Peak RSS is the child's VmHWM (/proc/self/status) at the end of the build, not ru_maxrss, "
                     "which Linux carries over from the parent across exec; \"before\" is the same figure after "
                     "imports and task set-up.")
    return result
