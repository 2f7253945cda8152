"""One dataset build in its own process (so its peak RSS is its own): ``worker.training.dataset.build_dataset``
as the training job calls it (default settings, 4 loader threads), on N large synthetic images served by an
in-process loader stub. Prints one JSON line.

    python -m bench.dataset_child --tasks 2000 --out DIR [--width 3000 --height 2000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import time
from pathlib import Path

from PIL import Image, ImageDraw

from bench.common import CLASSES, setup_environment

ORIGINAL_BYTES = 2 << 20  # what a 6 MP JPEG weighs: the loader returns the fetched bytes with the pixels


class LargeImageLoader:
    """What ``backend.core.images.ImageLoader.load`` returns, made up on the spot: a fresh ``width`` x ``height``
    RGB picture (one box drawn in it) and ``ORIGINAL_BYTES`` of "downloaded" bytes per task."""

    def __init__(self, width: int, height: int):
        self.width, self.height = width, height

    def load(self, url: str, task_id: int | None = None):
        from backend.core.images import LoadedImage  # project imports after setup_environment(), as in bench.train_child

        shade = (int(task_id or 0) * 37) % 200
        image = Image.new("RGB", (self.width, self.height), (shade, 220 - shade, 128))
        ImageDraw.Draw(image).rectangle([self.width // 4, self.height // 4, self.width // 2, self.height // 2],
                                        fill=(220, 30, 30))
        data = os.urandom(ORIGINAL_BYTES)
        return LoadedImage(image=image, width=self.width, height=self.height, sha256=hashlib.sha256(data).hexdigest(),
                           data=data)


def tasks_for(n: int, width: int, height: int) -> list:
    """``n`` annotated tasks, one box each (the box the loader draws)."""
    from backend.core.geometry import xyxy_to_ls
    from backend.core.label_studio import AnnotatedTask

    box = (width / 4, height / 4, width / 2, height / 2)
    region = {"from_name": "label", "to_name": "image", "type": "rectanglelabels", "original_width": width,
              "original_height": height, "value": {**xyxy_to_ls(box, width, height), "rectanglelabels": [CLASSES[0]]}}
    return [AnnotatedTask(id=i + 1, data={"image": f"/data/upload/1/{i + 1}.jpg"}, annotation_id=i + 1,
                          annotation_updated_at="t0", result=[{**region, "id": f"r{i}"}]) for i in range(n)]


def peak_rss_mib() -> float:
    """This process's peak RSS since it started: VmHWM. Not ru_maxrss, which Linux carries over an exec
    from the parent (the bench runner, with torch loaded) and so hides the child's own peak."""
    try:
        status = Path("/proc/self/status").read_text()
        return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--width", type=int, default=3000)
    parser.add_argument("--height", type=int, default=2000)
    args = parser.parse_args()
    setup_environment()
    from backend.core.label_config import ProjectConfig, config_from_labels
    from backend.core.settings import Settings
    from worker.training.dataset import build_dataset

    settings = Settings(data_dir=args.out / "data", model_dir=args.out / "models")
    config = ProjectConfig.parse(config_from_labels(list(CLASSES)))
    tasks = tasks_for(args.tasks, args.width, args.height)
    before = peak_rss_mib()
    started = time.perf_counter()
    dataset = build_dataset("1", tasks, config, settings, loader=LargeImageLoader(args.width, args.height))
    seconds = time.perf_counter() - started
    print(json.dumps({"tasks": args.tasks, "images": dataset.counts["images"], "seconds": seconds,
                      "peak_rss_mib": peak_rss_mib(), "rss_before_mib": before,
                      "saved_size": [dataset.items[0].width, dataset.items[0].height]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
